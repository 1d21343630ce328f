"""ContraNorm's fused update (Triton; the interpreter without a GPU) against its float64 reference."""
import importlib
import math

import pytest
import torch

from sslcore.kernels import contranorm, contranorm_features_ref, contranorm_ref, tied_attention_ref

K = importlib.import_module("sslcore.kernels.contranorm")
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _close(got, want, dtype, what):
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def _check(shape, dtype, scale=0.3, **kw):
    """Output and gradients (w.r.t. h and a tensor scale) of the Triton path vs float64 reference."""
    h = torch.randn(*shape, device=_dev()).to(dtype).requires_grad_(True)
    s = scale.to(_dev()).requires_grad_(True) if isinstance(scale, torch.Tensor) else scale
    out = contranorm(h, scale=s, backend="triton", **kw)
    g = torch.randn(out.shape, device=_dev())
    inputs = [h, s] if isinstance(s, torch.Tensor) else [h]
    grads = torch.autograd.grad(out.float().mul(g).sum(), inputs)
    ref_in = [x.detach().double().requires_grad_(True) for x in inputs]
    ref = contranorm_ref(ref_in[0], scale=ref_in[1] if len(ref_in) > 1 else s, **kw)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_in)
    assert out.dtype == dtype
    _close(out, ref, dtype, "output")
    for name, got, want in zip(("h", "scale"), grads, ref_grads):
        _close(got, want, dtype, f"grad of {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequences(seed, dtype):
    _check((2, 37, 100), dtype)


@pytest.mark.parametrize("variant", [dict(dual=True), dict(identity=True), dict(temperature=0.3),
                                     dict(dual=True, temperature=0.5, identity=True)])
def test_variants(seed, variant):
    _check((3, 41, 33), torch.float32, **variant)


def test_learnable_per_channel_scale(seed):
    _check((2, 29, 33), torch.float32, scale=torch.rand(33) * 0.5)


@pytest.mark.parametrize("dual", [False, True])
def test_key_padding_mask(seed, dual):
    kpm = torch.zeros(3, 37, dtype=torch.bool, device=_dev())
    kpm[0, 30:] = True
    kpm[1, :5] = True
    kpm[2, ::3] = True
    _check((3, 37, 33), torch.float32, key_padding_mask=kpm, dual=dual)


def test_padding_rows_pass_through_and_padding_keys_are_ignored(seed):
    h = torch.randn(1, 20, 16, device=_dev())
    kpm = torch.zeros(1, 20, dtype=torch.bool, device=_dev())
    kpm[0, 15:] = True
    out = contranorm(h, scale=0.5, key_padding_mask=kpm, backend="triton")
    assert torch.equal(out[0, 15:], h[0, 15:])
    changed = h.clone()
    changed[0, 15:] = 100 * torch.randn(5, 16, device=_dev())
    out2 = contranorm(changed, scale=0.5, key_padding_mask=kpm, backend="triton")
    torch.testing.assert_close(out2[0, :15], out[0, :15])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_excludes_self_and_neighbours(seed, dtype):
    n = 70
    src = torch.randint(0, n, (150,), device=_dev())
    dst = torch.randint(0, n, (150,), device=_dev())
    edges = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])  # undirected, with repeats and self-loops
    _check((n, 45), dtype, scale=torch.rand(45) * 0.8, edge_index=edges)


def test_graph_matches_dense_exclusion(seed):
    """Graph mode equals tied attention with the neighbour mask materialised."""
    n, d = 40, 24
    edges = torch.randint(0, n, (2, 90), device=_dev())
    h = torch.randn(n, d, device=_dev(), dtype=torch.float64)
    mask = torch.eye(n, dtype=torch.bool, device=_dev())
    mask[edges[0], edges[1]] = True
    y = tied_attention_ref(torch.nn.functional.normalize(h, dim=1), h, scale=1.0, exclude=mask)
    out = contranorm(h.float(), scale=1.0, edge_index=edges, backend="triton")
    _close(out, h - y, torch.float32, "graph update")


@pytest.mark.parametrize("kw", [dict(), dict(identity=True, temperature=0.4), dict(pad=True)])
def test_torch_path_matches_reference(seed, kw):
    """The torch path (SDPA for sequences) against the float64 reference."""
    h = torch.randn(3, 23, 17, dtype=torch.float64, requires_grad=True)
    if kw.pop("pad", False):
        kpm = torch.zeros(3, 23, dtype=torch.bool)
        kpm[1, 18:] = True
        kw["key_padding_mask"] = kpm
    out = contranorm(h, scale=0.4, backend="torch", **kw)
    ref = contranorm_ref(h, scale=0.4, **kw)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad((out * g).sum(), h)[0], torch.autograd.grad((ref * g).sum(), h)[0])


def test_tied_attention_lse_gradient(seed):
    """The LSE output is differentiable (graph mode relies on it)."""
    q = torch.nn.functional.normalize(torch.randn(2, 33, 20, device=_dev()), dim=-1).requires_grad_(True)
    v = torch.randn(2, 33, 20, device=_dev())
    _, lse = K.tied_attention(q, v, scale=2.0, exclude_self=True)
    g, = torch.autograd.grad(lse.sum(), q)
    qr = q.detach().double().requires_grad_(True)
    s = (qr @ qr.transpose(-1, -2) * 2.0).masked_fill(torch.eye(33, dtype=torch.bool, device=_dev()), float("-inf"))
    gr, = torch.autograd.grad(torch.logsumexp(s, -1).sum(), qr)
    _close(g, gr, torch.float32, "grad of LSE")


def test_scale_zero_is_identity_update(seed):
    h = torch.randn(2, 19, 12, device=_dev())
    assert torch.equal(contranorm(h, scale=0.0, backend="triton"), h)


def test_outputs_fully_written_and_deterministic(seed):
    h = torch.randn(2, 67, 70, device=_dev(), requires_grad=True)
    runs = []
    for _ in range(2):
        out = contranorm(h, scale=0.2, dual=True, backend="triton")
        runs.append((out.detach(), torch.autograd.grad(out.sum(), h)[0]))
    assert torch.isfinite(runs[0][0]).all() and torch.isfinite(runs[0][1]).all()
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_saved_tensors_linear_in_length(seed):
    b, l, d = 1, 150, 8
    h = torch.randn(b, l, d, device=_dev(), requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        contranorm(h, scale=0.1, backend="triton")
    ref_sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: ref_sizes.append(t.numel()) or t, lambda t: t):
        contranorm_ref(h, scale=0.1)
    assert max(ref_sizes) >= l * l, "the check must see the reference's L x L buffer"
    assert max(sizes) <= b * l * d, sizes


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
    cols = torch.nn.functional.normalize(h, dim=-2)  # the old, wrong normalisation differs by O(1)
    wrong = (1.7 if identity else 1.0) * h - 0.7 * h @ torch.softmax(cols.transpose(-1, -2) @ cols / 0.6, -1)
    assert (wrong - want).abs().max() > 1e-3


def test_fullgraph_trace(seed):
    h = torch.randn(2, 21, 16, device=_dev(), requires_grad=True)
    fn = torch.compile(lambda x: contranorm(x, scale=0.3, dual=True, backend="triton"), fullgraph=True,
                       backend="aot_eager")
    out = fn(h)
    g, = torch.autograd.grad(out.sum(), h)
    hr = h.detach().double().requires_grad_(True)
    ref = contranorm_ref(hr, scale=0.3, dual=True)
    _close(out, ref, torch.float32, "compiled output")
    _close(g, torch.autograd.grad(ref.sum(), hr)[0], torch.float32, "compiled grad")


def _h(*shape):
    return torch.randn(*shape)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: contranorm(_h(2, 5, 4), scale=-0.1), ValueError, "scale must be >= 0"),
    (lambda: contranorm(_h(2, 5, 4), scale=0.1, temperature=0), ValueError, "temperature"),
    (lambda: contranorm(_h(5, 4), scale=0.1), ValueError, "edge_index"),
    (lambda: contranorm(_h(1, 2, 5, 4), scale=0.1), ValueError, "h must have 2 or 3 dimensions"),
    (lambda: contranorm(_h(2, 5, 4), scale=torch.ones(3)), ValueError, r"scale must be a float or a \[4\] tensor"),
    (lambda: contranorm(_h(2, 5, 4), scale=0.1, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
     ValueError, "key_padding_mask must have shape"),
    (lambda: contranorm(_h(2, 5, 4), scale=0.1, key_padding_mask=torch.zeros(2, 5)), TypeError, "bool"),
    (lambda: contranorm(_h(2, 5, 4), scale=0.1, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)),
     ValueError, "masks every token"),
    (lambda: contranorm(_h(6, 4), scale=0.1, edge_index=torch.tensor([[0, 1], [1, 6]])), ValueError, "edge_index values"),
    (lambda: contranorm(_h(6, 4), scale=0.1, edge_index=torch.tensor([0, 1])), ValueError, r"shape \[2, E\]"),
    (lambda: contranorm(_h(6, 4), scale=0.1, edge_index=torch.tensor([[0], [1]]), dual=True, backend="triton"),
     ValueError, "dual=True with edge_index"),
    (lambda: contranorm(_h(2, 5, 4).index_fill(1, torch.tensor([2]), float("nan")), scale=0.1), ValueError, "NaN"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("d", [384, 768, 1024])
def test_gpu_vit_sizes(seed, d):
    _check((4, 197, d), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_large_graph_memory(seed):
    n, d = 131072, 256
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    edges = torch.randint(0, n, (2, 10 * n), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = contranorm(h, scale=0.5, edge_index=edges, backend="triton")
    out.float().sum().backward()
    assert torch.cuda.max_memory_allocated() - base < 2 * 2 ** 30
