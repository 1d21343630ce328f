"""Fused InfoNCE (Triton; the interpreter without a GPU) against its float64 plain-torch reference."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from traffic import Traffic

from sslcore import InfoNCELoss, NTXentLoss
from sslcore.functional import nt_xent, supcon
from sslcore.kernels import infonce, infonce_messages, infonce_ref, lse_similarity, lse_similarity_ref, resolve_backend

K = importlib.import_module("sslcore.kernels.infonce")

# Tolerances relative to the largest reference magnitude: fp32 is near-exact; fp16/bf16 inputs
# are rounded first (the reference sees the same rounded values), the kernel then casts the
# message weights to the input dtype for the tensor-core dot and returns gradients in it.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _close(got, want, dtype, what):
    scale = want.abs().max().clamp_min(1e-12)
    err = (got.double() - want).abs().max() / scale
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def _leaf(shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=_dev()) * scale).to(dtype).requires_grad_(True)


def _check(fn, inputs, dtype, **kw):
    """Loss and gradients of fn(backend=triton) vs fn's reference in float64 on the same rounded inputs."""
    out = fn[0](*inputs, backend="triton", **kw)
    grads = torch.autograd.grad(out.sum(), inputs)
    ref_in = [x.detach().double().requires_grad_(True) for x in inputs]
    ref_kw = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    ref = fn[1](*ref_in, **ref_kw)
    ref_grads = torch.autograd.grad(ref.sum(), ref_in)
    assert out.dtype == torch.float32
    _close(out, ref, dtype, "loss")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == dtype
        _close(g, r, dtype, f"grad of input {i}")


INFONCE = (infonce, infonce_ref)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(37, 24), (37, 33), (129, 100)])
def test_ntxent_two_view(seed, dtype, n, d):
    """D = 24 is one chunk of D under the interpreter (the backward's key tile is its message operand,
    C_IS_B); 33 and 100 stream several chunks."""
    z = _leaf((2 * n, d), dtype)
    _check(INFONCE, [z], dtype, temperature=0.3)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("normalize", [True, False])
def test_reductions_and_unnormalised(seed, reduction, normalize):
    z = _leaf((74, 33), torch.float32, scale=0.3)
    _check(INFONCE, [z], torch.float32, temperature=0.5, reduction=reduction, normalize=normalize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_supcon_labels(seed, dtype):
    labels = torch.randint(0, 7, (90,), device=_dev())
    labels[torch.arange(7, device=_dev()) * 2] = torch.arange(7, device=_dev())  # every class at least twice
    labels[torch.arange(7, device=_dev()) * 2 + 1] = torch.arange(7, device=_dev())
    _check(INFONCE, [_leaf((90, 33), dtype)], dtype, temperature=0.1, labels=labels)


def test_multi_positive_index_with_padding(seed):
    m, views = 3 * 31, 3  # m views per sample, stacked view by view
    rows = torch.arange(m, device=_dev())
    n = m // views
    pos = torch.stack([(rows + n) % m, (rows + 2 * n) % m, torch.full_like(rows, -1)], 1)
    pos[::4, 1] = -1  # some rows with a single positive
    _check(INFONCE, [_leaf((m, 45), torch.float32)], torch.float32, temperature=0.2, pos_index=pos)


def test_weighted_positives(seed):
    w = torch.rand(74, device=_dev()) * 2
    _check(INFONCE, [_leaf((74, 33), torch.float32)], torch.float32, temperature=0.4, weight=w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_key_with_queue(seed, dtype):
    q, k = _leaf((37, 100), dtype), _leaf((37 + 61, 100), dtype)
    _check(INFONCE, [q, k], dtype, temperature=0.2)


def test_query_key_keys_without_grad(seed):
    q = _leaf((37, 33), torch.float32)
    k = torch.randn(50, 33, device=_dev())
    loss = infonce(q, k, temperature=0.2, backend="triton")
    g, = torch.autograd.grad(loss, q)
    qr = q.detach().double().requires_grad_(True)
    gr, = torch.autograd.grad(infonce_ref(qr, k.double(), temperature=0.2), qr)
    _close(g, gr, torch.float32, "grad of queries")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_symmetric(seed, dtype):
    q, k = _leaf((53, 33), dtype), _leaf((53, 33), dtype)
    _check(INFONCE, [q, k], dtype, temperature=0.07, symmetric=True)


def test_lse_similarity_op(seed):
    a, b = _leaf((45, 33), torch.float32), _leaf((70, 33), torch.float32)
    _check((lse_similarity, lse_similarity_ref), [a, b], torch.float32, scale=1.5)
    rows, cols = lse_similarity(a, b, scale=1.5, cols=True, backend="triton")
    _close(cols, lse_similarity_ref(b.double(), a.double(), scale=1.5), torch.float32, "column LSE")


def test_fp16_low_temperature_large_logits(seed):
    """Unnormalised fp16 rows with |s| ~ 1e3 at tau = 0.05: statistics in fp32 must not overflow."""
    z = _leaf((64, 33), torch.float16, scale=1.0)
    with torch.no_grad():
        z.mul_(8.0)
    _check(INFONCE, [z], torch.float16, temperature=0.05, normalize=False)


def test_fp16_large_rows(seed):
    """|z_i|^2 ~ 3e6 is past fp16's range: normalisation must accumulate wider than fp16."""
    z = _leaf((2 * 33, 100), torch.float16)
    with torch.no_grad():
        z.mul_(150.0)
    _check(INFONCE, [z], torch.float16, temperature=0.1)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp16_rows_past_the_fp16_norm_are_normalised_in_fp32(seed, backend):
    """|z_i| ~ 1.6e5 > 65504: an fp16 norm overflows and every row would become 0 (loss log(M-1), gradient 0)."""
    z = (torch.randn(8, 64, device=_dev()).clamp(-1, 1) * 2e4).half().requires_grad_(True)
    loss = infonce(z, temperature=0.5, backend=backend)
    g, = torch.autograd.grad(loss, z)
    zr = z.detach().double().requires_grad_(True)
    ref = infonce_ref(zr, temperature=0.5)
    assert g.abs().max() > 0  # the overflow gave exactly 0 (and log 7, which random rows can be near too)
    _close(loss, ref, torch.float16, "loss")
    # the gradient, ~1/|z| ~ 1e-6..6e-6, lies in fp16's subnormals: compare directions, within twice the
    # error of the reference's own rounding to fp16 (a fixed bound failed on seeds with the smallest gradients)
    g_ref = torch.autograd.grad(ref, zr)[0]
    err = 1 - F.cosine_similarity(g.double().flatten(), g_ref.flatten(), dim=0)
    floor = 1 - F.cosine_similarity(g_ref.half().double().flatten(), g_ref.flatten(), dim=0)
    assert err <= 2 * floor + 1e-9, f"direction error {err:.2e} > twice fp16's rounding {floor:.2e}"
    big = torch.randn(6, 16, device=_dev()) * 1e19  # fp32 rows whose squares overflow fp32
    torch.testing.assert_close(infonce(big, temperature=0.5, backend=backend).double(),
                               infonce_ref(big.double(), temperature=0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["self", "cross"])
@pytest.mark.parametrize("aligned", [True, False])
def test_descriptor_path_and_its_fallback(monkeypatch, seed, dtype, form, aligned):
    """16-bit rows whose base and stride are 16-byte aligned, one chunk of D, take the tensor-descriptor
    kernels (Hopper's overlapped path; the interpreter stands in for sm_90); a strided view (56-byte
    rows) the register-pointer kernels (unnormalised, so the view reaches them).  Both against float64 at
    odd sizes: 74 rows, 53 keys (a ragged last key tile), D = 24 (the descriptor's block of 32 columns
    reads zeros past D)."""
    paths = []
    launch = K._launch
    monkeypatch.setattr(K, "_launch", lambda *a: (paths.append(a[-1]["TMA"]), launch(*a))[1])
    leaf = (lambda n: _leaf((n, 24), dtype)) if aligned else (lambda n: _leaf((n, 28), dtype)[:, :24])
    if form == "self":
        z = leaf(74)
        _check(INFONCE, [z], dtype, temperature=0.3, normalize=False)  # unit_rows would copy the view
    else:
        q, k = leaf(37), leaf(53)
        _check(INFONCE, [q, k], dtype, temperature=0.3, normalize=False)
    assert paths and all(p == aligned for p in paths), paths


@pytest.mark.parametrize("temperature", [0.3, 0.02])
def test_static_max_matches_the_online_max(seed, temperature):
    """Unit rows bound every logit by 1/tau: the kernel then uses it as a fixed max (tau = 0.3); at
    tau = 0.02 exp(s - 1/tau) could underflow, so it keeps the running max there."""
    z = K.unit_rows(torch.randn(70, 40, device=_dev()))
    scale = 1 / temperature
    assert (2 * scale * K.LOG2E < K.STATIC_MAX_LIMIT) == (temperature == 0.3)
    want = lse_similarity_ref(z.double(), z.double(), scale=scale, exclude_self=True)
    for unit in (True, False):
        got = lse_similarity(z, scale=scale, unit_norm=unit, backend="triton")
        _close(got, want, torch.float32, f"LSE, unit_norm={unit}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_self_offset_rows_against_all_keys(seed, backend):
    """A block of rows of z against all of z, each row's own key (shifted by the block's offset) left
    out: the LSEs and the gradients to the block and to every key (what one rank computes in data
    parallelism), against the float64 reference of the same."""
    z = _leaf((90, 33), torch.float32)
    r0, r1, scale = 31, 62, 2.5
    g = torch.rand(r1 - r0, device=_dev())
    lse = lse_similarity(z[r0:r1], z, scale=scale, self_offset=r0, backend=backend)
    grad, = torch.autograd.grad((lse * g).sum(), z)
    zr = z.detach().double().requires_grad_(True)
    ref = lse_similarity_ref(zr[r0:r1], zr, scale=scale, self_offset=r0)
    _close(lse, ref, torch.float32, "LSE of the block")
    _close(grad, torch.autograd.grad((ref * g.double()).sum(), zr)[0], torch.float32, "gradient")
    s = zr.detach() @ zr.detach().T * scale  # the reference's exclusion is the self form's
    _close(ref, torch.logsumexp(s.fill_diagonal_(float("-inf")), 1)[r0:r1], torch.float64, "reference")
    with pytest.raises(ValueError, match="self_offset must be"):
        lse_similarity(z[r0:r1], z, scale=scale, self_offset=70, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("form", ["pairs", "labels", "pos_index", "weight"])
def test_blocks_of_rows_sum_to_the_whole_batch(seed, form, backend):
    """Three blocks of 20 rows (three ranks, 10 samples x 2 views each, views stacked per block), each
    against all 60 keys with ``self_offset``: the block losses add up to the loss of the whole batch,
    and the gradients through the rows and through the keys add up to its gradient."""
    m, blocks = 60, [(0, 20), (20, 40), (40, 60)]
    z = _leaf((m, 24), torch.float32)
    rows = torch.arange(m, device=_dev())
    whole = dict(temperature=0.4, reduction="sum", backend=backend)
    part = [dict() for _ in blocks]
    if form == "pairs":  # the block's own two-view pairing
        whole["pos_index"] = rows // 20 * 20 + (rows % 20 + 10) % 20
    elif form == "labels":
        labels = torch.randint(0, 6, (m,), device=_dev())
        labels[:12] = torch.arange(6, device=_dev()).repeat(2)  # every label at least twice
        whole["labels"] = labels
        part = [dict(labels=labels) for _ in blocks]
    elif form == "pos_index":
        pos = torch.stack([(rows + 7) % m, (rows + 31) % m], 1)
        whole["pos_index"] = pos
        part = [dict(pos_index=pos[a:b]) for a, b in blocks]
    else:
        w = torch.rand(m, device=_dev()) + 0.5
        whole.update(weight=w, pos_index=rows // 20 * 20 + (rows % 20 + 10) % 20)
        part = [dict(weight=w[a:b]) for a, b in blocks]
    loss = infonce(z, **whole)
    grad, = torch.autograd.grad(loss, z)
    total = sum(infonce(z[a:b], z, self_offset=a, temperature=0.4, reduction="sum", backend=backend, **kw)
                for (a, b), kw in zip(blocks, part))
    grad_blocks, = torch.autograd.grad(total, z)
    _close(total, loss.detach().double(), torch.float32, "sum of the block losses")
    _close(grad_blocks, grad.double(), torch.float32, "sum of the block gradients")
    ref = infonce_ref(z.detach().double()[20:40], z.detach().double(), self_offset=20, temperature=0.4,
                      reduction="sum", **part[1])
    _close(infonce(z[20:40], z, self_offset=20, temperature=0.4, reduction="sum", backend=backend, **part[1]),
           ref, torch.float32, "block against the reference")


@pytest.mark.parametrize("d,cc,passes", [(128, 90, 3), (256, 90, 3), (384, 90, 4), (768, 90, 5), (256, 80, 4)])
def test_pass_count(monkeypatch, d, cc, passes):
    """M x M x D matmul passes of forward + backward on a GPU's tiling (bf16): 3 up to D = 256 on Hopper
    (the backward holds all of D), 5 at D = 768."""
    monkeypatch.setattr(K, "interpreting", lambda: False)
    monkeypatch.setattr(importlib.import_module("sslcore.kernels._tiles"), "interpreting", lambda: False)
    assert K.passes(d, 2, cc) == passes


def test_messages_decompose_the_gradient(seed):
    m, d, tau = 74, 33, 0.3
    z = torch.randn(m, d, device=_dev())
    loss, align, unif = infonce_messages(z, temperature=tau, backend="triton")
    zn = F.normalize(z.double(), dim=1)
    s = zn @ zn.T / tau
    s.fill_diagonal_(float("-inf"))
    p = torch.softmax(s, 1)
    pos = (torch.arange(m, device=_dev()) + m // 2) % m
    _close(unif, (p + p.T) @ zn / (m * tau), torch.float32, "uniformity messages")
    _close(align, -2 * zn[pos] / (m * tau), torch.float32, "alignment messages")
    zr = zn.clone().requires_grad_(True)
    g, = torch.autograd.grad(infonce_ref(zr, temperature=tau, normalize=False), zr)
    _close(align + unif, g, torch.float32, "sum of messages")
    _close(loss, infonce_ref(zn, temperature=tau), torch.float32, "loss")


def test_outputs_are_fully_written(seed):
    """Launch outputs are NaN-poisoned under the tests (SSLCORE_POISON=1): any gap shows as NaN."""
    import os
    assert os.environ.get("SSLCORE_POISON") == "1"
    z = torch.randn(2 * 67, 100, device=_dev(), requires_grad=True)
    lse = lse_similarity(z, scale=2.0, backend="triton")
    g, = torch.autograd.grad(lse.sum(), z)
    assert torch.isfinite(lse).all() and torch.isfinite(g).all()


def _saved_numels(fn):
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        fn()
    return sizes


def test_saved_tensors_are_linear_in_batch(seed):
    m, d = 2 * 97, 16
    z = torch.randn(m, d, device=_dev(), requires_grad=True)
    fused = _saved_numels(lambda: infonce(z, temperature=0.5, backend="triton"))
    ref = _saved_numels(lambda: infonce_ref(z, temperature=0.5))
    assert max(ref) >= m * m, "the check must see the reference's M x M buffer"
    assert max(fused) <= m * d and sum(fused) <= 8 * (m * d + m), fused


def test_deterministic(seed):
    z = torch.randn(2 * 45, 60, device=_dev(), requires_grad=True)
    runs = []
    for _ in range(2):
        loss = infonce(z, temperature=0.2, backend="triton")
        runs.append((loss.detach(), torch.autograd.grad(loss, z)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_torch_backend_matches_reference(seed):
    z = _leaf((2 * 20, 12), torch.float32)
    _check((lambda x, backend, **kw: infonce(x, backend="torch", **kw), infonce_ref), [z], torch.float32,
           temperature=0.5)


def test_backend_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", cpu) == "triton"
    monkeypatch.setenv("SSLCORE_BACKEND", "torch")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("triton", cpu) == "triton"  # an explicit choice beats the variable
    monkeypatch.delenv("SSLCORE_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", cpu)
    monkeypatch.setenv("SSLCORE_BACKEND", "fast")
    with pytest.raises(ValueError, match="SSLCORE_BACKEND"):
        resolve_backend("auto", cpu)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any work.

def _z(m=8, d=4, **kw):
    return torch.randn(m, d, **kw)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: infonce(_z(), temperature=0.0), ValueError, "temperature"),
    (lambda: infonce(_z(), temperature=-1.0), ValueError, "temperature"),
    (lambda: infonce(_z(7)), ValueError, "even number of rows"),
    (lambda: infonce(torch.randn(0, 4)), ValueError, "z is empty"),
    (lambda: infonce(torch.randn(8)), ValueError, "z must have 2 dimensions"),
    (lambda: infonce(_z(1)), ValueError, "at least 2 rows"),
    (lambda: infonce(_z(8).long()), TypeError, "z must be float"),
    (lambda: infonce(_z(), _z(8, 5)), ValueError, "keys has dimension 5"),
    (lambda: infonce(_z(), _z(6)), ValueError, "keys must have at least"),
    (lambda: infonce(_z(), _z(dtype=torch.float16)), TypeError, "keys has dtype"),
    (lambda: infonce(_z(), _z(10), symmetric=True), ValueError, "symmetric"),
    (lambda: infonce(_z(), labels=torch.arange(8)), ValueError, "no positive"),
    (lambda: infonce(_z(), labels=torch.zeros(7, dtype=torch.long)), ValueError, "labels must have shape"),
    (lambda: infonce(_z(), pos_index=torch.full((8,), -1)), ValueError, "no positive"),
    (lambda: infonce(_z(), pos_index=torch.arange(8)), ValueError, "own positive"),
    (lambda: infonce(_z(), pos_index=torch.full((8,), 9)), ValueError, "pos_index values"),
    (lambda: infonce(_z(), pos_index=torch.zeros(8)), TypeError, "pos_index must be"),
    (lambda: infonce(_z(), weight=torch.ones(5)), ValueError, "weight must have shape"),
    (lambda: infonce(_z(), reduction="avg"), ValueError, "reduction"),
    (lambda: infonce(_z().index_fill(0, torch.tensor([3]), float("nan"))), ValueError, "z contains NaN"),
    (lambda: infonce(_z(), _z().index_fill(0, torch.tensor([1]), float("inf"))),
     ValueError, "keys contains NaN or Inf"),
    (lambda: NTXentLoss(temperature=0), ValueError, "temperature"),
    (lambda: NTXentLoss()(_z(4), _z(5)), ValueError, "same shape"),
    (lambda: InfoNCELoss(memory_bank_size=-1), ValueError, "memory_bank_size"),
    (lambda: lse_similarity(_z(), scale=0.0), ValueError, "scale"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_mutates_nothing():
    loss = InfoNCELoss(temperature=0.2, memory_bank_size=16)
    loss(_z(4), _z(4))
    before = loss.memory.bank.clone()
    with pytest.raises(ValueError):
        loss(_z(4), _z(4).index_fill(0, torch.tensor([0]), float("nan")))
    assert torch.equal(before, loss.memory.bank)


# ---------------------------------------------------------------------------------------------
# Modules and functional API.

def test_ntxent_module_and_functional(seed):
    a, b = torch.randn(21, 16), torch.randn(21, 16)
    want = infonce_ref(torch.cat([a, b]).double(), temperature=0.5)
    _close(NTXentLoss(temperature=0.5)(a, b), want, torch.float32, "NTXentLoss")
    _close(nt_xent(a, b, temperature=0.5), want, torch.float32, "nt_xent")
    labels = torch.arange(21).repeat(2)
    _close(supcon(torch.cat([a, b]), labels, temperature=0.5), want, torch.float32, "supcon with two views")


def test_infonce_loss_memory_bank_is_a_ring_buffer(seed):
    loss = InfoNCELoss(temperature=0.2, memory_bank_size=10)
    q1, k1, q2, k2, q3, k3 = (torch.randn(4, 8) for _ in range(6))
    loss(q1, k1)
    bank = loss.memory.bank.clone()
    torch.testing.assert_close(bank[:4], F.normalize(k1, dim=1))
    assert int(loss.memory.bank_ptr) == 4
    loss(q2, k2)
    torch.testing.assert_close(loss.memory.bank[4:8], F.normalize(k2, dim=1))
    assert torch.equal(loss.memory.bank[:4], bank[:4])
    loss(q3, k3)  # reaches the end: rows 8, 9 filled, the rest of the batch dropped, back to row 0
    torch.testing.assert_close(loss.memory.bank[8:], F.normalize(k3, dim=1)[:2])
    assert int(loss.memory.bank_ptr) == 0
    loss.eval()
    before = loss.memory.bank.clone()
    loss(q1, k1)
    assert torch.equal(loss.memory.bank, before), "eval mode must not enqueue"


# ---------------------------------------------------------------------------------------------
# GPU only: real sizes, bf16, int64 offsets, torch.compile.

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [128, 256, 768])
def test_gpu_real_sizes(seed, dtype, d, no_host_sync):
    """Forward and backward with no host synchronisation, against the float64 reference."""
    z = _leaf((4096 + 2 * 37, d), dtype)
    with no_host_sync():
        loss = infonce(z, temperature=0.1, backend="triton")
        g, = torch.autograd.grad(loss, z)
    zr = z.detach().double().requires_grad_(True)
    ref = infonce_ref(zr, temperature=0.1)
    _close(loss, ref, dtype, "loss")
    _close(g, torch.autograd.grad(ref, zr)[0], dtype, "grad")


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["labels", "keys", "symmetric"])
def test_gpu_forms_without_sync(seed, form, no_host_sync):
    z = _leaf((2048, 256), torch.bfloat16)
    kw = dict(temperature=0.2, backend="triton")
    if form == "labels":
        kw["labels"] = torch.arange(2048, device="cuda") % 100
        args = (z,)
    else:
        args = (z, _leaf((2048 if form == "symmetric" else 3000, 256), torch.bfloat16))
        kw["symmetric"] = form == "symmetric"
    with no_host_sync():
        loss = infonce(*args, **kw)
        grads = torch.autograd.grad(loss, args)
    refs = [x.detach().double().requires_grad_(True) for x in args]
    ref = infonce_ref(*refs, **{k: v for k, v in kw.items() if k != "backend"})
    _close(loss, ref, torch.bfloat16, "loss")
    for g, r in zip(grads, torch.autograd.grad(ref, refs)):
        _close(g, r, torch.bfloat16, "grad")


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """M x D past 2^31 elements: row offsets must be computed in int64."""
    m, d = 2 ** 21 + 2, 1024  # 2.1e9 elements, 4 GiB in bf16
    z = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    idx = torch.tensor([0, m - 1], device="cuda")
    lse = lse_similarity(z, z[idx], scale=1.0, backend="triton")
    want = lse_similarity_ref(z, z[idx], scale=1.0)
    assert torch.allclose(lse[-5:], want[-5:], rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph(seed):
    z = _leaf((2 * 300, 128), torch.bfloat16)
    compiled = torch.compile(lambda x: infonce(x, temperature=0.2, backend="triton"), fullgraph=True)
    loss = compiled(z)
    g, = torch.autograd.grad(loss, z)
    ref = infonce(z, temperature=0.2, backend="triton")
    g_ref, = torch.autograd.grad(ref, z)
    assert torch.allclose(loss, ref) and torch.allclose(g.float(), g_ref.float(), atol=1e-3)


def test_fullgraph_trace_through_custom_ops(seed):
    """The launches are torch.library ops: dynamo traces infonce forward+backward in one graph
    (aot_eager runs the ops eagerly, so this also runs under the interpreter)."""
    z = _leaf((2 * 19, 24), torch.float32)
    compiled = torch.compile(lambda x: infonce(x, temperature=0.2, backend="triton"), fullgraph=True,
                             backend="aot_eager")
    loss = compiled(z)
    g, = torch.autograd.grad(loss, z)
    zr = z.detach().double().requires_grad_(True)
    ref = infonce_ref(zr, temperature=0.2)
    _close(loss, ref, torch.float32, "compiled loss")
    _close(g, torch.autograd.grad(ref, zr)[0], torch.float32, "compiled grad")


def test_fullgraph_survives_a_new_temperature(seed):
    """A second temperature recompiles with a SymFloat temperature: the checks must not read it."""
    z = _leaf((2 * 19, 24), torch.float32)
    for tau in (0.2, 0.35):
        loss = torch.compile(lambda x: infonce(x, temperature=tau, backend="triton"), fullgraph=True,
                             backend="aot_eager")(z)
        _close(loss, infonce_ref(z.detach().double(), temperature=tau), torch.float32, f"loss at tau={tau}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("form", ["ntxent", "labels", "pos_index", "keys"])
def test_no_host_synchronisation(seed, backend, form, no_host_reads):
    """Forward and backward without validation read no tensor value on the host (labels included)."""
    z = _leaf((40, 16), torch.float32)
    kw = dict(temperature=0.3, backend=backend, validate=False)
    if form == "labels":
        kw["labels"] = torch.arange(40, device=_dev()) % 7
    elif form == "pos_index":
        kw["pos_index"] = (torch.arange(40, device=_dev()) + 20) % 40
    args = (z, _leaf((50, 16), torch.float32)) if form == "keys" else (z,)
    with no_host_reads():
        torch.autograd.grad(infonce(*args, **kw), args)
    with pytest.raises(AssertionError, match="host synchronisation"), no_host_reads():
        infonce(*args, **{**kw, "validate": True})


@pytest.mark.parametrize("op", ["infonce_lse_fwd", "infonce_lse_bwd", "infonce_rows_fwd", "infonce_rows_bwd",
                                "infonce_rows_bwd-index"])
def test_custom_op_registration(op):
    op, args = _opcheck_args(op)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def _opcheck_args(name):
    op = getattr(torch.ops.sslcore, name.split("-")[0])
    a, b = torch.randn(10, 8), torch.randn(12, 8)
    if name == "infonce_lse_fwd":
        return op, (a, b, 2.0, False)
    if name == "infonce_rows_fwd":
        return op, (a, None, 1e-12)
    r, c = torch.rand(10), torch.randn(10)
    if name == "infonce_rows_bwd":
        return op, (a, r, b[:10], c, None, None, None)
    if name == "infonce_rows_bwd-index":
        idx = torch.tensor([[1], [0], [3], [2], [5], [4], [7], [6], [9], [8]])
        return op, (a, r, b[:10], c, idx, torch.arange(11), idx.reshape(-1))
    lse, g = torch.randn(10), torch.rand(10)
    return op, (a, b, b, lse, g, None, None, 2.0, False)


def _rows_ref(z, idx):
    """The row kernels' definition in float64: unit rows (F.normalize) and ``mean_{p in P(i)} zhat_i . zhat_p``
    by a plain loop over the positives (-1 pads); ``idx=None`` is the two-view pairing."""
    zn = F.normalize(z, dim=1, eps=1e-12)
    m = len(z)
    idx = ((torch.arange(m) + m // 2) % m)[:, None] if idx is None else idx.cpu().long()
    align = []
    for i in range(m):
        ps = [p for p in idx[i].tolist() if p >= 0]
        align.append(sum((zn[i] * zn[p]).sum() for p in ps) / len(ps))
    return zn, torch.stack(align)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["pairs", "pos_index", "pos_index-int32"])
@pytest.mark.parametrize("n,d", [(19, 37), (27, 100)])
def test_row_kernels_against_float64(seed, dtype, form, n, d):
    """The fused normalisation + alignment (forward) and its backward (the alignment's messages to both ends
    of each pair, through the normalisation), on their own: outputs and gradients for random upstream
    gradients against autograd of the float64 definition.  Positives: the pairing; [M, 3] with padding and
    a duplicate (int64, int32).  Odd M and D, several row tiles; outputs NaN-poisoned."""
    m = 2 * n
    z = _leaf((m, d), dtype, scale=3.0)
    idx = None
    if form != "pairs":
        idx = torch.stack([(torch.arange(m) + 1) % m, (torch.arange(m) + 5) % m, torch.arange(m) % 4 - 1], 1)
        idx[3] = torch.tensor([7, 7, -1])  # a duplicate counts twice
        idx = idx.to(torch.int32 if form.endswith("int32") else torch.int64).to(_dev())
    zn, align = K._SelfRows.apply(z, idx)
    dzn, dalign = torch.randn(m, d, device=_dev()).to(dtype), torch.randn(m, device=_dev())
    dz, = torch.autograd.grad((zn.float() * dzn.float()).sum() + (align * dalign).sum(), z)
    zr = z.detach().double().requires_grad_(True)
    zn_ref, align_ref = _rows_ref(zr, idx)
    dz_ref, = torch.autograd.grad((zn_ref * dzn.double()).sum() + (align_ref * dalign.double()).sum(), zr)
    assert zn.dtype == dtype and align.dtype == torch.float32 and dz.dtype == dtype
    _close(zn, zn_ref, dtype, "unit rows")
    _close(align, align_ref, dtype, "alignment")
    _close(dz, dz_ref, dtype, "gradient")


def test_row_kernels_are_the_triton_path(monkeypatch, seed):
    """infonce's self form on the Triton backend launches the row kernels (and the torch path does not)."""
    launched = []
    run = K._run_rows
    monkeypatch.setattr(K, "_run_rows", lambda kernel, *a: launched.append(kernel.fn.__name__) or run(kernel, *a))
    z = _leaf((2 * 9, 20), torch.float32)
    torch.autograd.grad(infonce(z, temperature=0.3, backend="triton"), z)
    assert launched == ["_rows_fwd_kernel", "_rows_bwd_kernel"]
    torch.autograd.grad(infonce(z, temperature=0.3, backend="torch"), z)
    assert len(launched) == 2


# Bytes.  One NT-Xent forward + backward at the goal shape (M = 65,536, D = 256, bf16) on meta tensors, the
# launches replaced by a recorder: each Triton launch counted by the tensors it declares (every distinct
# tensor argument once, plus the rows a row kernel gathers: each row's positives, and in the backward the rows
# naming it), every torch op by the dispatch mode of tests/traffic.py (custom ops opened up).
# Model (docs/architecture.md, InfoNCE, "Bytes"): ROW_PASSES passes over [M, D] in bf16 -- forward: the row
# kernel reads z and its positives' rows, writes zhat; the LSE kernel reads zhat; backward: the LSE kernel
# reads zhat and writes dzhat, the row kernel reads zhat, the positives' zhat and dzhat and writes dz -- plus
# O(M) vectors, and GLUE_BYTES_PER_ROW of torch ops per row (8 times that with positives by index: the
# transpose's sort).  Now 0.345 GB per call (glue 6.8 MB); [M, 2] positives 0.50 GB (glue 23 MB).  Before the
# row kernels (unit_rows, the gather and the fp32 casts in torch), counted the same way: 3.52 GB, of which
# 3.41 GB torch glue; [M, 2] positives 3.92 GB (3.82).
ROW_PASSES = {"pairs": 10, "pos_index": 14}
GLUE_BYTES_PER_ROW = 128
GOAL_M, GOAL_D = 65536, 256


@pytest.mark.parametrize("form", ["pairs", "pos_index"])
def test_bytes_per_call_at_the_goal_shape(form, monkeypatch):
    moved = []

    def record(tensors, gathered=0):
        seen = {id(t): t for t in tensors if isinstance(t, torch.Tensor)}
        moved.append(sum(t.numel() * t.element_size() for t in seen.values()) + gathered)

    def rows(kernel, grid, args, meta, warps):
        z, n_pos = args[0], args[-1] if kernel is K._rows_bwd_kernel else args[-2]
        per_row = GOAL_D * z.element_size()
        record(args, per_row * GOAL_M * (max(n_pos, 1) if meta["DEFAULT_POS"] else
                                         (n_pos if kernel is K._rows_fwd_kernel else 2 * n_pos)))

    monkeypatch.setattr(K, "_run_rows", rows)
    monkeypatch.setattr(K, "_launch", lambda kernel, tuned, r, c, n, args, meta: record(args))
    monkeypatch.setattr(K, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(K, "interpreting", lambda: False)
    monkeypatch.setenv("SSLCORE_POISON", "0")
    z = torch.empty(GOAL_M, GOAL_D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    kw = {}
    if form == "pos_index":
        kw["pos_index"] = torch.empty(GOAL_M, 2, device="meta", dtype=torch.int64)
    with Traffic("meta") as ops:
        loss = infonce(z, temperature=0.5, validate=False, **kw)
        torch.autograd.grad(loss, z)
    glue, kernels = sum(ops.bytes.values()), sum(moved)
    md = GOAL_M * GOAL_D * z.element_size()
    assert len(moved) == 4, moved
    assert glue <= GLUE_BYTES_PER_ROW * GOAL_M * (8 if form == "pos_index" else 1), \
        f"torch glue moves {glue / 1e6:.1f} MB: {ops.bytes.most_common(6)}"
    assert kernels <= ROW_PASSES[form] * md + 256 * GOAL_M, f"kernels move {kernels / 1e9:.3f} GB"
    print(f"{form}: kernels {kernels / 1e9:.3f} GB, glue {glue / 1e6:.2f} MB; by op {ops.bytes.most_common(4)}")
