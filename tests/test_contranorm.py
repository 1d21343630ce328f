"""ContraNorm's op (Triton -- the interpreter without a GPU -- and torch backends) against float64
references, the references against independent transcriptions, and the design's guarantees: the
matmul passes it launches, the bytes it moves, the memory it saves for backward, no host synchronisation."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
import traffic
from traffic import Traffic

from sslcore.kernels import contranorm, contranorm_features_ref, contranorm_ref, prepare_graph, tied_attention_ref

K = importlib.import_module("sslcore.kernels.contranorm")
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["triton", "torch"]


def _dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _close(got, want, dtype, what):
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def _check(shape, dtype, scale=0.3, backend="triton", ln=False, **kw):
    """Output and gradients (w.r.t. h, a tensor scale and, with ``ln``, the fused LayerNorm's fp32 weight and
    bias) of the op vs the float64 reference."""
    h = torch.randn(*shape, device=_dev()).to(dtype).requires_grad_(True)
    params = {"scale": scale.to(_dev())} if isinstance(scale, torch.Tensor) else {}
    if ln:
        params.update(weight=1 + 0.5 * torch.randn(shape[-1], device=_dev()),
                      bias=torch.randn(shape[-1], device=_dev()))
    leaves = [h] + [p.clone().requires_grad_(True) for p in params.values()]

    def call(fn, x, *p, **extra):
        p = dict(zip(params, p))
        return fn(x, scale=p.get("scale", scale), layer_norm=(p["weight"], p["bias"], 1e-5) if ln else None, **kw,
                  **extra)

    out = call(contranorm, *leaves, backend=backend)
    g = torch.randn(out.shape, device=_dev())
    grads = torch.autograd.grad(out.float().mul(g).sum(), leaves)
    ref_in = [x.detach().double().requires_grad_(True) for x in leaves]
    ref = call(contranorm_ref, *ref_in)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_in)
    assert out.dtype == dtype and grads[0].dtype == dtype
    _close(out, ref, dtype, "output")
    for name, got, want in zip(["h", *params], grads, ref_grads):
        _close(got, want, dtype, f"grad of {name}")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunk buffers of a few KB: the op then runs several chunks (sequences or graph rows)."""
    monkeypatch.setattr(K, "CHUNK_BYTES", 6 * 1024)


# ---------------------------------------------------------------------------------------------
# Sequences.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sequences(seed, dtype, backend):
    _check((2, 37, 100), dtype, backend=backend)


@pytest.mark.parametrize("kw", [dict(), dict(dual=True, identity=True), dict(graph=True)])
def test_float64_on_the_torch_backend(seed, kw):
    if kw.pop("graph", False):
        kw["edge_index"] = torch.randint(0, 30, (2, 50), device=_dev())
        _check((30, 9), torch.float64, backend="torch", **kw)
    else:
        kpm = torch.zeros(2, 23, dtype=torch.bool, device=_dev())
        kpm[1, 18:] = True
        _check((2, 23, 17), torch.float64, backend="torch", key_padding_mask=kpm, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", [dict(dual=True), dict(identity=True), dict(temperature=0.3),
                                     dict(dual=True, temperature=0.5, identity=True)])
def test_variants(seed, variant, backend):
    _check((3, 41, 33), torch.float32, backend=backend, **variant)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_fused(seed, dtype, backend):
    """ContraNorm the layer: the update and its LayerNorm in one op, per-channel scale and padding included."""
    kpm = torch.zeros(2, 37, dtype=torch.bool, device=_dev())
    kpm[1, 29:] = True
    _check((2, 37, 100), dtype, scale=torch.rand(100) * 0.5, backend=backend, ln=True, key_padding_mask=kpm)


@pytest.mark.parametrize("variant", [dict(dual=True), dict(identity=True), dict(dual=True, identity=True)])
def test_layer_norm_fused_variants(seed, variant):
    kpm = _padded_batch()
    _check((3, 37, 33), torch.float32, scale=torch.rand(33) * 0.5, ln=True, key_padding_mask=kpm, **variant)


def test_rows_wider_than_the_row_kernels_run_the_torch_row_steps(seed, monkeypatch):
    """Past MAX_ROW_D the Triton backend runs the row steps as torch ops around the same chunk kernels."""
    monkeypatch.setattr(K, "MAX_ROW_D", 16)
    with K.record_launches() as log:
        _check((2, 19, 33), torch.float32, scale=torch.rand(33) * 0.5, ln=True)
    assert "grads" in log.kernels and "combine" not in log.kernels


@pytest.mark.parametrize("kw", [dict(), dict(dual=True, key_padding_mask=True)])
def test_similarity_in_panels(seed, monkeypatch, kw):
    """S, forward and backward, in panels of 16 rows (the interpreter's pair tile) against the columns from their
    first row on, odd L: the same values and gradients as the float64 reference, with the chunk buffers
    NaN-poisoned (tests/conftest.py), so a kernel reading S below the panels would fail; its products counted
    as the panels'."""
    monkeypatch.setattr(K, "PANEL_ROWS", 16)
    if kw.pop("key_padding_mask", False):
        kw["key_padding_mask"] = _padded_batch()
    with K.record_launches() as log:
        _check((3, 37, 33), torch.float32, **kw)
    assert log.passes(3, 37, 33) == pytest.approx(_sequence_passes(37, 16))


def test_several_chunks(seed, small_chunks):
    assert len(K._chunks(5, 19, 4)) > 1
    _check((5, 19, 24), torch.float32)
    _check((5, 19, 24), torch.float32, dual=True)


def test_learnable_per_channel_scale(seed):
    _check((2, 29, 33), torch.float32, scale=torch.rand(33) * 0.5)


def _padded_batch():
    kpm = torch.zeros(3, 37, dtype=torch.bool, device=_dev())
    kpm[0, 30:] = True
    kpm[1, :5] = True
    kpm[2, ::3] = True
    return kpm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dual", [False, True])
def test_key_padding_mask(seed, dual, backend):
    _check((3, 37, 33), torch.float32, key_padding_mask=_padded_batch(), dual=dual, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dual,identity", [(False, False), (True, False), (True, True)])
def test_padding_takes_part_in_no_softmax(seed, backend, dual, identity):
    """Real tokens' outputs and gradients do not move when padded tokens' values change, padded rows
    pass through, and real rows equal the op on the sequence with its padding removed."""
    kpm = _padded_batch()
    h = torch.randn(3, 37, 16, device=_dev())
    kw = dict(scale=0.5, dual=dual, identity=identity, backend=backend)
    changed = torch.where(kpm[..., None], 100 * torch.randn_like(h), h)
    outs, grads = [], []
    for x in (h, changed):
        x = x.clone().requires_grad_(True)
        out = contranorm(x, key_padding_mask=kpm, **kw)
        g = torch.ones_like(out).masked_fill(kpm[..., None], 0.0)  # a loss on real tokens only
        outs.append(out.detach())
        grads.append(torch.autograd.grad((out * g).sum(), x)[0])
    real = ~kpm
    torch.testing.assert_close(outs[1][real], outs[0][real])
    torch.testing.assert_close(grads[1][real], grads[0][real])
    assert torch.equal(outs[0][kpm], h[kpm])
    for b in range(3):  # the reference itself: padding removed == the unpadded sequence alone
        alone = contranorm_ref(h[b][real[b]][None].double(), scale=0.5, dual=dual, identity=identity)[0]
        torch.testing.assert_close(outs[0][b][real[b]].double(), alone, rtol=1e-4, atol=1e-4)


def test_scale_zero_is_identity_update(seed):
    h = torch.randn(2, 19, 12, device=_dev())
    assert torch.equal(contranorm(h, scale=0.0, backend="triton"), h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ln", [None, (None, None, 1e-5)])
def test_fp16_large_values_are_normalised_in_fp32(seed, backend, ln):
    """|h| ~ 2e4 in fp16 would overflow an fp16 norm (65504), and the LayerNorm's variance: both in fp32.  With
    the LayerNorm the upstream gradient is scaled by 1/|h| and the gradient is exact too; without it,
    ``dP = G H^T`` itself passes 65504 here and is held in fp16 (docs/architecture.md), so only the output."""
    h = (torch.randn(2, 9, 64, device=_dev()).clamp(-1, 1) * 2e4).half().requires_grad_(True)
    g = torch.randn(h.shape, device=_dev())
    out = contranorm(h, scale=0.3, backend=backend, layer_norm=ln)
    hr = h.detach().double().requires_grad_(True)
    ref = contranorm_ref(hr, scale=0.3, layer_norm=ln)
    _close(out, ref, torch.float16, "fp16 output")
    if ln is not None:
        grad, = torch.autograd.grad(out.float().mul(g).sum(), h)
        want, = torch.autograd.grad(ref.mul(g.double()).sum(), hr)
        _close(grad, want, torch.float16, "fp16 gradient")


def test_outputs_fully_written_and_deterministic(seed):
    h = torch.randn(2, 67, 70, device=_dev(), requires_grad=True)
    runs = []
    for _ in range(2):
        out = contranorm(h, scale=0.2, dual=True, backend="triton")
        runs.append((out.detach(), torch.autograd.grad(out.sum(), h)[0]))
    assert torch.isfinite(runs[0][0]).all() and torch.isfinite(runs[0][1]).all()
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_tied_attention_reference_is_the_softmax_formula(seed):
    """The reference against a row-by-row transcription: P_ij = exp(s_ij) / sum_k exp(s_ik) over kept keys."""
    q = F.normalize(torch.randn(2, 9, 5, dtype=torch.float64), dim=-1)
    v = torch.randn(2, 9, 5, dtype=torch.float64)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    for dual in (False, True):
        want = torch.zeros_like(v)
        for b in range(2):
            keep = [j for j in range(9) if not kpm[b, j]]
            p = torch.zeros(9, 9, dtype=torch.float64)
            for i in keep:
                e = {j: math.exp(1.7 * float(q[b, i] @ q[b, j])) for j in keep}
                for j in keep:
                    p[i, j] = e[j] / sum(e.values())
            want[b] = (p + p.T if dual else p) @ v[b]
        got = tied_attention_ref(q, v, scale=1.7, key_padding_mask=kpm, dual=dual)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("identity", [False, True])
def test_contranorm_reference_is_the_papers_update(seed, identity):
    """ContraNorm the layer written out token by token from the paper (float64): ``u_i = h_i - s sum_j
    softmax_j(h_i . h_j / (|h_i| |h_j| tau)) h_j`` (identity: ``(1 + s) h_i - ...``) over the real tokens,
    padding tokens ``u_i = h_i``, then ``LayerNorm(u_i) = (u_i - mean) / sqrt(var + eps) w + b``; ``s`` per
    channel."""
    b, length, d, tau, eps = 2, 7, 5, 0.6, 1e-5
    h = torch.randn(b, length, d, dtype=torch.float64)
    s, w, bias = torch.rand(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64), torch.randn(d)
    kpm = torch.zeros(b, length, dtype=torch.bool)
    kpm[1, 5:] = True
    want = torch.zeros_like(h)
    for n in range(b):
        real = [j for j in range(length) if not kpm[n, j]]
        for i in range(length):
            u = h[n, i].clone()
            if i in real:
                logits = [float(h[n, i] @ h[n, j]) / (float(h[n, i].norm() * h[n, j].norm()) * tau) for j in real]
                e = [math.exp(x) for x in logits]
                y = sum(e[k] / sum(e) * h[n, j] for k, j in enumerate(real))
                u = (1 + s) * h[n, i] - s * y if identity else h[n, i] - s * y
            mean, var = float(u.mean()), float(((u - u.mean()) ** 2).mean())
            want[n, i] = (u - mean) / math.sqrt(var + eps) * w + bias.double()
    got = contranorm_ref(h, scale=s, temperature=tau, identity=identity, key_padding_mask=kpm,
                         layer_norm=(w, bias, eps))
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# Graphs.


def _graph_ref_by_rows(h, edges, scale, temperature):
    """Node by node: softmax over every node but itself and its neighbours (either direction), float64."""
    n = h.shape[0]
    nb = [{i} for i in range(n)]
    for a, b in edges.T.tolist():
        nb[a].add(b)
        nb[b].add(a)
    x = h.double()
    xn = F.normalize(x, dim=1)
    out = x.clone()
    for i in range(n):
        keep = [j for j in range(n) if j not in nb[i]]
        if keep:
            w = torch.softmax(torch.stack([xn[i] @ xn[j] for j in keep]) / temperature, 0)
            out[i] = x[i] - scale * (w[:, None] * x[keep]).sum(0)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_excludes_self_and_neighbours(seed, dtype, backend):
    n = 70
    src = torch.randint(0, n, (150,), device=_dev())
    dst = torch.randint(0, n, (150,), device=_dev())
    edges = torch.stack([src, dst])  # directed, with repeats and self-loops: taken as undirected
    _check((n, 45), dtype, scale=torch.rand(45) * 0.8, edge_index=edges, backend=backend)


def test_graph_reference_is_the_per_node_formula(seed):
    n, d = 30, 6
    edges = torch.randint(0, n, (2, 40))
    h = torch.randn(n, d, dtype=torch.float64)
    torch.testing.assert_close(contranorm_ref(h, scale=0.6, temperature=0.7, edge_index=edges),
                               _graph_ref_by_rows(h, edges, 0.6, 0.7))


def _homophilous_graph(temperature):
    """Two cliques of 16 near-identical nodes pointing in opposite directions, plus node 0 joined to
    every other node: each clique node's neighbours hold >= 99.9 % of its softmax mass over all nodes
    at tau = 0.2 (its non-neighbours, the other clique, are dissimilar), the case where a design that
    subtracts the neighbours' terms from the full sums cancels."""
    gen = torch.Generator().manual_seed(1)
    centre = F.normalize(torch.randn(16, generator=gen), dim=0) * 3
    noise = 1e-3 * torch.randn(2, 16, 16, generator=gen)
    h = torch.cat([centre + noise[0], -centre + noise[1]])
    edges = [(a, b) for c in (0, 16) for a in range(c, c + 16) for b in range(c, c + 16)]
    edges = torch.tensor(edges + [(0, j) for j in range(1, 32)]).T
    s = F.normalize(h, dim=1) @ F.normalize(h, dim=1).T / temperature
    eye = torch.eye(32, dtype=torch.bool)
    nbr = K._neighbour_mask(32, edges, "cpu") & ~eye
    mass = (torch.softmax(s.masked_fill(eye, float("-inf")), 1) * nbr).sum(1)
    return h, edges, mass


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_graph_exact_when_neighbours_hold_the_mass(seed, backend, temperature):
    h, edges, mass = _homophilous_graph(temperature)
    if temperature == 0.2:
        assert (mass >= 0.999).all(), "the test graph must put the mass on the neighbours"
    got = contranorm(h.to(_dev()), scale=0.8, temperature=temperature, edge_index=edges.to(_dev()), backend=backend)
    want = _graph_ref_by_rows(h, edges, 0.8, temperature)
    err = (got.double().cpu() - want).norm(dim=1) / want.norm(dim=1)
    assert err.max() <= 1e-4, f"worst row off by {err.max():.2e} (row {err.argmax()})"
    torch.testing.assert_close(got[0].double().cpu(), h[0].double())  # node 0 has no one left: unchanged


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,ln", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_graph_several_chunks(seed, small_chunks, dtype, ln, backend):
    """Forward and backward over tile pairs (the last ones ragged: 90 = 5 * 16 + 10 rows), the excluded pairs
    of each tile (and their mirrors), the partial LSEs of both orientations and the fp32 accumulation of Y,
    dV, dQ over the tiles."""
    n, d = 90, 12
    assert K._graph_tile(n, d, dtype.itemsize) == 16
    _check((n, d), dtype, edge_index=torch.randint(0, n, (2, 200), device=_dev()), ln=ln,
           scale=torch.rand(d) * 0.5 if ln else 0.3, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_tiles_in_row_groups(seed, monkeypatch, dtype):
    """Tiles of 64 rows (150 = 64 + 64 + 22): the LSE kernel's programs each take a group of 32 rows in two
    blocks of 16 (interpreted), so a column's sum over a group is carried online across blocks and a tile's
    mirror partials (rows J over columns I) combine two groups; the ragged tile's groups are 16 and 6 rows."""
    monkeypatch.setattr(K, "_graph_tile", lambda n, d, esize: 64)
    with K.record_launches() as log:
        _check((150, 12), dtype, edge_index=torch.randint(0, 150, (2, 300), device=_dev()))
    assert [log.kernels.count(k) for k in ("tile_lse", "tile_probs", "grads")] == [6, 6, 6]


def test_graph_dual_runs_the_reference_on_torch(seed):
    _check((40, 8), torch.float32, backend="torch", dual=True, edge_index=torch.randint(0, 40, (2, 60)))


def test_prepare_graph_and_its_cache():
    edges = torch.tensor([[0, 1, 1, 3], [1, 2, 2, 3]], device=_dev())
    g = prepare_graph(edges, 5)
    pairs = {tuple(p) for p in g.edge_index.T.tolist()}
    assert pairs == {(i, i) for i in range(5)} | {(0, 1), (1, 0), (1, 2), (2, 1)}
    assert g.keys.tolist() == sorted(g.keys.tolist()) and g.rowptr.tolist() == [0, 2, 5, 7, 8, 9]
    assert g.bounds(2) == [0, 5, 8, 9]
    assert K._cached_graph(edges, 5) is K._cached_graph(edges, 5)
    first = K._cached_graph(edges, 5)
    edges[0, 0] = 4  # modified in place: prepared again
    assert K._cached_graph(edges, 5) is not first
    with pytest.raises(ValueError, match="num_nodes"):
        prepare_graph(edges, 0)
    with pytest.raises(ValueError, match=r"edge_index values must lie in \[0, 3\)"):
        prepare_graph(edges, 3)


# ---------------------------------------------------------------------------------------------
# The design's guarantees.


def _graph_passes(n, tile):
    """A graph's matmul passes, over tile pairs (I, J), I <= J: forward S twice per pair ((N^2 + sum R_I^2) /
    N^2) and PV 1; backward S once per pair and dP_IJ, dP_JI^T (1.5 (N^2 + sum R_I^2) / N^2), the A G and T Q
    products 2."""
    diag = sum(min(tile, n - i0) ** 2 for i0 in range(0, n, tile))
    return (n * n + diag) / (n * n) + 1 + 1.5 * (n * n + diag) / (n * n) + 2


def _sequence_passes(length, panel):
    """Sequences' products in L x L x D passes: S, forward and backward, over panels of ``panel`` rows against
    the columns from their first row on (0.5625 each at L = 4096 in panels of 512); PV, dPr, A G and T Q 4."""
    upper = sum(min(panel, length - r0) * (length - r0) for r0 in range(0, length, panel))
    return 2 * upper / length ** 2 + 4


def test_sequence_passes_formula():
    """By hand: L = 30 in panels of 16 rows, 16 x 30 and 14 x 14 elements of S; at the goal shape 36 / 64."""
    assert _sequence_passes(30, 16) == pytest.approx(4 + 2 * (16 * 30 + 14 * 14) / 900)
    assert _sequence_passes(4096, 512) == 5.125 and _sequence_passes(30, 512) == 6


def test_graph_passes_formula():
    """The formula against the products counted by hand (output elements times contraction length, over 2 D):
    N = 60 in 3 tiles of 20 rows, 6 pairs of which 3 on the diagonal."""
    forward = 2 * 6 * 20 * 20 + 60 * 60  # S per pair in both sweeps; PV and its mirrors: every row once
    per_pair = 3 * 20 * 20  # S, dP_IJ, dP_JI^T
    products = 3 * 2 * 20 * 20 + 3 * 4 * 20 * 20  # A G and T Q; off the diagonal also their mirrors
    assert _graph_passes(60, 20) == pytest.approx((forward + 6 * per_pair + products) / (60 * 60)) == 5.5 + 2.5 / 3


@pytest.mark.parametrize("kw,passes", [(dict(), 6), (dict(dual=True), 6), (dict(panel=16), _sequence_passes(30, 16)),
                                       (dict(graph=True), _graph_passes(60, 16))])
def test_matmul_passes(seed, kw, passes, small_chunks, monkeypatch):
    """Forward + backward launches at most 6 L x L x D matmul passes on sequences (dPr's mirror tile stands for
    dPc; S only where the pair kernels read it: 5.125 at the goal shape) and on a graph
    5.5 + 2.5 sum R_I^2 / N^2 (5.58 at the goal shape: its tile pairs compute S once for both tiles and read
    dP_ji from dP_JI^T), however many chunks; one fused kernel per elementwise stage and chunk (a graph: per
    tile pair), and the four row kernels once."""
    if "panel" in kw:
        monkeypatch.setattr(K, "PANEL_ROWS", kw.pop("panel"))
    graph = kw.pop("graph", False)
    shape = (60, 16) if graph else (4, 30, 16)
    h = torch.randn(*shape, device=_dev(), requires_grad=True)
    edges = torch.randint(0, 60, (2, 100), device=_dev()) if graph else None
    with K.record_launches() as log:
        out = contranorm(h, scale=0.3, edge_index=edges, backend="triton", **kw)
        out.sum().backward()
    rows = (1, 60) if graph else (4, 30)
    assert log.passes(*rows, 16) == pytest.approx(passes)
    rows_once = ["unit_rows", "combine", "combine_bwd", "finish"]
    if graph:
        tiles = len(range(0, 60, K._graph_tile(60, 16, 4)))
        assert tiles == 4
        per_pair = ["mask", "tile_lse", "mask", "tile_probs", "mask", "grads"]  # forward's two sweeps, backward
        assert sorted(log.kernels) == sorted(per_pair * (tiles * (tiles + 1) // 2) + rows_once)
        return
    chunks = len(K._chunks(*rows, 4))
    assert chunks > 1
    per_chunk = ["pair_lse", "pair_softmax", "dual_delta", "grads"] if kw.get("dual") else ["pair_lse", "pair_softmax",
                                                                                             "grads"]
    assert sorted(log.kernels) == sorted(per_chunk * chunks + rows_once)


# Bytes.  One forward + backward at the goal shape, on the meta device (shapes only, nothing computed), with
# the launches replaced by a no-op: every torch op counted by a dispatch mode, the Triton launches by the
# traffic they declare (``record_launches``).  The same host code runs as on CUDA: only the backend
# resolution (meta is not CUDA), the tiles (GPU's, not the interpreter's) and the launch are patched.

# Documented bounds (docs/architecture.md, ContraNorm, "Bytes"), bf16, one forward + backward: sequences move
# at most LXL chunk-buffer passes of B L^2 elements (forward 3.57: S written in panels, 0.5625, its tiles I <= J
# read by the pair kernels for the LSEs and for P, 0.504 each, P written whole and read by PV; backward 7.07: S
# written in panels, dPr written, the pair kernel reads S's upper tiles and dPr and writes A and T, A and T read
# by their products; dual 1.5 more: the pair kernel for delta reads S's upper tiles and dPr -- 12 and 15 with S
# whole) plus BLD passes of B L D elements (operands and outputs of the products -- each panel reads Q from its
# first row on, 5.5 L rows a sequence for each S -- and of the 4 row kernels; 28 with S whole), and at most
# GLUE_BLD of one [B, L, D] pass in torch ops other than the matmuls (combining the partial LSEs, 128 a row,
# and dual's deltas).  Counted now: 18.20 GB (LayerNorm 18.42, dual 19.95).  A graph's tile pairs re-read
# the [N, D] operands per tile and accumulate Y, dV, dQ in fp32, so its bound is the model's total (415 GB, glue
# 0.94: the partial LSEs' logsumexp, the fp32 accumulators zeroed, Y cast back; 442 GB with forward row chunks,
# 638 also with backward row chunks and the dPc product).  The code before the row kernels (f2e1b2e), counted
# the same way: 41.7 GB of which 22.8 of glue for sequences, 644 (8.1) for the graph.
LXL = {False: 10.7, True: 12.2}
BLD = 35
GLUE_BLD = 0.7
SEQ = (32, 4096, 768)
GOAL = {"sequences": (SEQ, {}), "sequences+layernorm": (SEQ, dict(ln=True)), "sequences+dual": (SEQ, dict(dual=True)),
        "graph": ((131072, 256), dict(total_gb=415.5, glue_gb=1.0)),
        "graph+layernorm": ((131072, 256), dict(ln=True, total_gb=415.5, glue_gb=1.0))}


def _on_meta(monkeypatch):
    """The Triton backend's host code on meta tensors: the launches do nothing, the tiles are the GPU's."""
    monkeypatch.setattr(K, "_run", lambda *args: None)
    monkeypatch.setattr(K, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(K, "interpreting", lambda: False)
    monkeypatch.setenv("SSLCORE_POISON", "0")


def _meta_graph(n, degree):
    """A prepared graph of ``n`` nodes with ``degree`` excluded pairs each (E = 10 N random edges: ~21)."""
    return K.NeighbourGraph(torch.empty(degree * n, dtype=torch.int64, device="meta"), torch.arange(n + 1) * degree, n)


@pytest.mark.parametrize("case", GOAL)
def test_bytes_per_call_at_the_goal_shape(case, monkeypatch):
    """Everything one call moves (kernels, matmuls, torch glue), counted at the goal shape on meta tensors,
    stays within the documented bound (the L x L passes plus O(B L D)), and the glue around the kernels
    within its own: a change that adds an elementwise pass over [B, L, D] in torch fails."""
    shape, opt = GOAL[case]
    _on_meta(monkeypatch)
    h = torch.empty(shape, device="meta", dtype=torch.bfloat16, requires_grad=True)
    params = [torch.empty(shape[-1], device="meta", requires_grad=True) for _ in range(2 if opt.get("ln") else 0)]
    kw = dict(layer_norm=(*params, 1e-6) if params else None, dual=opt.get("dual", False))
    if len(shape) == 2:
        kw["edge_index"] = _meta_graph(shape[0], 21)
        total_gb, glue_gb = opt["total_gb"], opt["glue_gb"]
    else:
        b, length, d = shape
        total_gb = 2 * (LXL[kw["dual"]] * b * length * length + BLD * b * length * d) / 1e9
        glue_gb = 2 * GLUE_BLD * b * length * d / 1e9
    with K.record_launches() as log, Traffic("meta") as ops:
        out = contranorm(h, scale=0.1, **kw)
        torch.autograd.grad(out, [h, *params], torch.empty_like(out))
    matmul = sum(v for k, v in ops.bytes.items() if k in traffic.MATMULS)
    glue = sum(ops.bytes.values()) - matmul
    total = sum(log.kernel_bytes) + matmul + glue
    rows = (shape[0], shape[1]) if len(shape) == 3 else (1, shape[0])
    passes = (_sequence_passes(shape[1], K.PANEL_ROWS) if len(shape) == 3
              else _graph_passes(shape[0], K._graph_tile(shape[0], shape[1], 2)))
    assert log.passes(*rows, shape[-1]) == pytest.approx(passes)
    assert {"unit_rows", "combine", "grads", "combine_bwd", "finish"} <= set(log.kernels) and matmul > 0
    assert glue <= glue_gb * 1e9, f"torch glue moves {glue / 1e9:.3f} GB: {ops.bytes.most_common(6)}"
    parts = f"kernels {sum(log.kernel_bytes) / 1e9:.2f}, matmuls {matmul / 1e9:.2f}, glue {glue / 1e9:.3f}"
    assert total <= total_gb * 1e9, f"{total / 1e9:.2f} GB > {total_gb:.2f} ({parts})"


@pytest.mark.parametrize("form", ["padded", "dual", "graph"])
def test_no_host_synchronisation_on_the_triton_driver(form, monkeypatch, no_host_reads):
    """The Triton backend's host code, run on meta tensors with the launches replaced (the interpreter reads
    tensors itself), reads no device data in forward and backward: LayerNorm and per-channel scale included."""
    _on_meta(monkeypatch)
    shape = (40, 8) if form == "graph" else (3, 20, 8)
    h = torch.empty(shape, device="meta", requires_grad=True)
    s, w = (torch.empty(8, device="meta", requires_grad=True) for _ in range(2))
    kw = dict(scale=s, layer_norm=(w, None, 1e-6), validate=False)
    if form == "graph":
        kw["edge_index"] = _meta_graph(40, 3)
    else:
        kw.update(key_padding_mask=torch.zeros(3, 20, dtype=torch.bool, device="meta"), dual=form == "dual")
    with no_host_reads():
        out = contranorm(h, **kw)
        torch.autograd.grad(out, [h, s, w], torch.empty_like(out))


def _saved_numel(fn):
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        fn()
    return sum(sizes), max(sizes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_saves_o_nd_plus_e(seed, backend):
    """What backward keeps grows as O(N D + E): not with E x D (gathered neighbour rows), not N x N."""
    n, d = 256, 32
    h = torch.randn(n, d, device=_dev(), requires_grad=True)

    def saved(e):
        edges = torch.randint(0, n, (2, e), device=_dev())
        return _saved_numel(lambda: contranorm(h, scale=0.5, edge_index=edges, backend=backend))

    (few, few_max), (many, many_max) = saved(2 * n), saved(20 * n)
    assert many - few <= 2 * (20 - 2) * n * 1.1, "saved tensors grow faster than the edges"
    assert max(few_max, many_max) < n * n / 4
    assert few <= 8 * n * d + 4 * 2 * n + 4 * n  # a few [N, D] tensors, the keys, the LSEs


def test_sequences_save_o_bld(seed):
    b, length, d = 1, 150, 8
    h = torch.randn(b, length, d, device=_dev(), requires_grad=True)
    _, op_max = _saved_numel(lambda: contranorm(h, scale=0.1, dual=True, backend="triton"))
    _, ref_max = _saved_numel(lambda: contranorm_ref(h, scale=0.1))
    assert ref_max >= length * length, "the check must see the reference's L x L buffer"
    assert op_max <= b * length * d


@pytest.mark.parametrize("backend", ["torch"])
@pytest.mark.parametrize("form", ["padded", "dual", "graph"])
def test_no_host_synchronisation(seed, form, backend, no_host_reads):
    """Forward and backward without validation read no device data on the host.  (The Triton
    interpreter copies tensors to numpy itself, so the driver is checked on the torch backend; the
    Triton backend runs the same driver.)"""
    h = torch.randn(40, 8) if form == "graph" else torch.randn(3, 20, 8)
    h.requires_grad_(True)
    kw = dict(scale=0.5, backend=backend, validate=False)
    if form == "graph":
        kw["edge_index"] = prepare_graph(torch.randint(0, 40, (2, 70)), 40)
    else:
        kpm = torch.zeros(3, 20, dtype=torch.bool)
        kpm[1, 15:] = True
        kw.update(key_padding_mask=kpm, dual=form == "dual")
    contranorm(h, **kw)  # warm: a graph's chunk bounds are computed once, on the CPU copy of its rows
    with no_host_reads():
        contranorm(h, **kw).sum().backward()
    with pytest.raises(AssertionError, match="host synchronisation"), no_host_reads():
        contranorm(h, **{**kw, "validate": True})  # the checker does see the validating path's reads


def test_fullgraph_trace_and_a_second_temperature(seed):
    """torch.compile(fullgraph=True) traces through the op, also for a new temperature (a SymFloat)."""
    h = torch.randn(2, 21, 16, device=_dev(), requires_grad=True)
    for temperature in (1.0, 0.5):
        fn = torch.compile(lambda x: contranorm(x, scale=0.3, dual=True, temperature=temperature, backend="triton"),
                           fullgraph=True, backend="aot_eager")
        out = fn(h)
        g, = torch.autograd.grad(out.sum(), h)
        hr = h.detach().double().requires_grad_(True)
        ref = contranorm_ref(hr, scale=0.3, dual=True, temperature=temperature)
        _close(out, ref, torch.float32, "compiled output")
        _close(g, torch.autograd.grad(ref.sum(), hr)[0], torch.float32, "compiled grad")


# ---------------------------------------------------------------------------------------------
# D-ContraNorm's reference.


def _d_contranorm_transcribed(x, s, tau, identity):
    """D-ContraNorm written out element by element from the paper's formula (float64, loops):
    x_hat_i = x_i / |x_i| per token; A_ab = exp(sum_i x_hat_ia x_hat_ib / tau) / sum_c (...);
    out_ia = (1 + s [identity]) x_ia - s sum_b x_ib A_ba."""
    n, d = len(x), len(x[0])
    norms = [sum(v * v for v in row) ** 0.5 for row in x]
    xh = [[v / nr for v in row] for row, nr in zip(x, norms)]
    gram = [[sum(xh[i][a] * xh[i][b] for i in range(n)) / tau for b in range(d)] for a in range(d)]
    attn = []
    for a in range(d):
        top = max(gram[a])
        e = [math.exp(g - top) for g in gram[a]]
        attn.append([v / sum(e) for v in e])
    keep = 1 + s if identity else 1.0
    return [[keep * x[i][a] - s * sum(x[i][b] * attn[b][a] for b in range(d)) for a in range(d)] for i in range(n)]


@pytest.mark.parametrize("identity", [False, True])
def test_feature_wise_reference_is_the_papers_formula(seed, identity):
    """Tokens (rows) normalised, as the paper and the authors' code: a column-normalised version fails."""
    h = torch.randn(3, 7, 5, dtype=torch.float64) * torch.rand(3, 7, 1, dtype=torch.float64) * 3
    got = contranorm_features_ref(h, scale=0.7, temperature=0.6, identity=identity)
    want = torch.tensor([_d_contranorm_transcribed(seq.tolist(), 0.7, 0.6, identity) for seq in h], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    cols = F.normalize(h, dim=-2)  # the old, wrong normalisation differs by O(1)
    wrong = (1.7 if identity else 1.0) * h - 0.7 * h @ torch.softmax(cols.transpose(-1, -2) @ cols / 0.6, -1)
    assert (wrong - want).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Bad input.


def _h(*shape):
    return torch.randn(*shape)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: contranorm(_h(2, 5, 4), scale=-0.1), ValueError, "scale must be a finite number >= 0"),
    (lambda: contranorm(_h(2, 5, 4), scale=float("inf")), ValueError, "scale must be a finite number >= 0"),
    (lambda: contranorm(_h(2, 5, 4), scale=torch.tensor([0.1, float("nan"), 0.1, 0.1])), ValueError,
     "every channel"),
    (lambda: contranorm(_h(2, 5, 4), scale=torch.tensor([0.1, -0.1, 0.1, 0.1])), ValueError, "every channel"),
    (lambda: contranorm(_h(2, 5, 4), scale=torch.ones(4, dtype=torch.long)), ValueError, "float"),
    (lambda: contranorm(_h(2, 5, 4), scale=0.1, temperature=0), ValueError, "temperature"),
    (lambda: contranorm(_h(5, 4), scale=0.1), ValueError, "edge_index"),
    (lambda: contranorm(_h(1, 2, 5, 4), scale=0.1), ValueError, "h must have 2 or 3 dimensions"),
    (lambda: contranorm(_h(2, 5, 4), scale=torch.ones(3)), ValueError, r"\[4\] tensor"),
    (lambda: contranorm(_h(2, 5, 4), scale=0.1, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
     ValueError, "key_padding_mask must have shape"),
    (lambda: contranorm(_h(2, 5, 4), scale=0.1, key_padding_mask=torch.zeros(2, 5)), TypeError, "bool"),
    (lambda: contranorm(_h(2, 5, 4), scale=0.1, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)),
     ValueError, "masks every token"),
    (lambda: contranorm(_h(6, 4), scale=0.1, edge_index=torch.tensor([[0, 1], [1, 6]])),
     ValueError, "edge_index values"),
    (lambda: contranorm(_h(6, 4), scale=0.1, edge_index=torch.tensor([0, 1])), ValueError, r"shape \[2, E\]"),
    (lambda: contranorm(_h(6, 4), scale=0.1, edge_index=prepare_graph(torch.tensor([[0], [1]]), 5)), ValueError,
     "5 nodes but h has 6"),
    (lambda: contranorm(_h(6, 4), scale=0.1, edge_index=torch.tensor([[0], [1]]), dual=True, backend="triton"),
     ValueError, "dual=True with edge_index"),
    (lambda: contranorm(_h(2, 5, 4).double(), scale=0.1, backend="triton"), TypeError, "float64"),
    (lambda: contranorm(_h(2, 5, 4).index_fill(1, torch.tensor([2]), float("nan")), scale=0.1), ValueError, "NaN"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_validate_false_skips_the_value_checks():
    h = _h(2, 5, 4).index_fill(1, torch.tensor([2]), float("nan"))
    assert torch.isnan(contranorm(h, scale=0.1, backend="torch", validate=False)).any()


# ---------------------------------------------------------------------------------------------
# On a GPU.


def _fwd_bwd(h, no_host_sync, **kw):
    """The op's forward and backward with no host synchronisation (``no_host_sync``, conftest)."""
    h = h.detach().requires_grad_(True)
    g = torch.randn(h.shape, device=h.device, dtype=h.dtype)
    with no_host_sync():
        out = contranorm(h, **kw)
        grad, = torch.autograd.grad(out, h, g)
    return out, grad, g


def _against_reference(h, no_host_sync, **kw):
    out, grad, g = _fwd_bwd(h, no_host_sync, backend="triton", **kw)
    hr = h.detach().double().requires_grad_(True)
    ref = contranorm_ref(hr, **kw)
    ref_grad, = torch.autograd.grad(ref, hr, g.double())
    _close(out, ref, h.dtype, "output")
    _close(grad, ref_grad, h.dtype, "grad of h")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [384, 768, 1024])
def test_gpu_vit_sizes(seed, d, no_host_sync):
    _against_reference(torch.randn(4, 197, d, device="cuda", dtype=torch.bfloat16), no_host_sync, scale=0.3)


@pytest.mark.gpu
def test_gpu_long_sequences_dual_padded(seed, no_host_sync):
    kpm = torch.zeros(2, 2048, dtype=torch.bool, device="cuda")
    kpm[1, 1500:] = True
    _against_reference(torch.randn(2, 2048, 256, device="cuda", dtype=torch.bfloat16), no_host_sync, scale=0.3,
                       key_padding_mask=kpm, dual=True)


@pytest.mark.gpu
def test_gpu_graph_matches_reference(seed, no_host_sync):
    n = 3000
    h = torch.randn(n, 256, device="cuda", dtype=torch.bfloat16)
    edges = torch.randint(0, n, (2, 10 * n), device="cuda")
    _against_reference(h, no_host_sync, scale=0.5, edge_index=prepare_graph(edges, n))


@pytest.mark.gpu
def test_gpu_large_graph_memory(seed, no_host_sync):
    """N = 131,072, E = 1.31 M, D = 256: under 1 GiB beyond the input, forward + backward, no host sync."""
    n, d = 131072, 256
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    graph = prepare_graph(torch.randint(0, n, (2, 10 * n), device="cuda"), n)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _, grad, _ = _fwd_bwd(h, no_host_sync, scale=0.5, edge_index=graph, backend="triton")
    assert torch.cuda.max_memory_allocated() - base < 2 ** 30
    assert torch.isfinite(grad).all()
