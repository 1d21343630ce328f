"""The loss modules against lightly's (the peer they stand in for): the same loss and gradients to
fp32 rounding, the memory bank's contents step by step; and the banks load into fresh modules."""
import pytest
import torch

import sslcore
from sslcore import BarlowTwinsLoss, DCLLoss, DCLWLoss, InfoNCELoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss

lightly_loss = pytest.importorskip("lightly.loss")
BACKENDS = ["torch", "triton"]


def _pair(n=19, d=24, dtype=torch.float32):
    return (torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype))


def _both(ours, theirs, a, b, rtol, atol):
    """Loss and gradients of ``ours`` and ``theirs`` on the same inputs."""
    outs = []
    for fn in (ours, theirs):
        x0, x1 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = fn(x0, x1)
        outs.append((loss.detach(), *torch.autograd.grad(loss, (x0, x1))))
    for name, mine, peer in zip(("loss", "grad out0", "grad out1"), *outs):
        torch.testing.assert_close(mine.to(peer.dtype), peer, rtol=rtol, atol=atol, msg=lambda e: f"{name}: {e}")


TOL = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_is_lightlys(seed, backend, dtype, temperature):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp32/fp16/bf16 (fp64 runs on torch)")
    _both(NTXentLoss(temperature, backend=backend), lightly_loss.NTXentLoss(temperature), *_pair(dtype=dtype),
          **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ntxent_memory_bank_is_lightlys_step_by_step(seed, backend):
    """lightly's MoCo-style NT-Xent: out0's rows against [their positive; the bank], the bank a ring of
    past out1 rows.  From the same bank, three steps (the third wraps around): loss, grads, bank."""
    n, d, rows = 6, 16, 16
    ours, theirs = NTXentLoss(0.2, memory_bank_size=(rows, d), backend=backend), \
        lightly_loss.NTXentLoss(0.2, memory_bank_size=(rows, d))
    ours.memory.bank.copy_(theirs.memory_bank.bank)
    for step in range(3):
        _both(ours, theirs, *_pair(n, d), rtol=2e-5, atol=1e-6)
        # each _both call enqueues once per module
        torch.testing.assert_close(ours.memory.bank, theirs.memory_bank.bank, msg=lambda e: f"bank, step {step}: {e}")
        assert int(ours.memory.bank_ptr) == int(theirs.memory_bank.bank_ptr)


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")  # inside lightly's DCLW weights
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_dcl_and_dclw_are_lightlys(seed, backend, weighted):
    ours = DCLWLoss(0.1, sigma=0.5, backend=backend) if weighted else DCLLoss(0.1, backend=backend)
    theirs = lightly_loss.DCLWLoss(0.1, sigma=0.5) if weighted else lightly_loss.DCLLoss(0.1)
    _both(ours, theirs, *_pair(), rtol=2e-5, atol=1e-6)
    custom = lambda a, b: (a * b).sum(1).detach()  # noqa: E731 - any weight function, as lightly's DCLLoss takes
    _both(DCLLoss(0.3, weight_fn=custom, backend=backend), lightly_loss.DCLLoss(0.3, weight_fn=custom), *_pair(),
          rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ntxent_on_one_sample_is_lightlys_and_warns(seed, backend):
    """lightly's NTXentLoss takes a last batch of one sample: without a bank its only logit is the positive, so
    the loss is 0 with zero gradients (lightly's own tests assert it); with a bank the bank gives negatives."""
    with pytest.warns(UserWarning, match="batch of 1 sample"):
        _both(NTXentLoss(0.5, backend=backend), lightly_loss.NTXentLoss(0.5), *_pair(1), rtol=0, atol=0)
        loss = NTXentLoss(0.5, backend=backend)(*_pair(1))
    assert loss.item() == 0.0 and not str(loss.item()).startswith("-")
    ours, theirs = NTXentLoss(0.2, memory_bank_size=(8, 24), backend=backend), \
        lightly_loss.NTXentLoss(0.2, memory_bank_size=(8, 24))
    ours.memory.bank.copy_(theirs.memory_bank.bank)
    _both(ours, theirs, *_pair(1), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ours.memory.bank, theirs.memory_bank.bank)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["out0", "out1"])
def test_ntxent_memory_bank_refuses_non_finite_input_before_it_enqueues(seed, backend, bad):
    """A NaN batch used to return NaN and enter the bank, so every later call returned NaN."""
    loss = NTXentLoss(0.2, memory_bank_size=(16, 8), backend=backend)
    loss(*(t.requires_grad_(True) for t in _pair(4, 8)))
    bank, ptr = loss.memory.bank.clone(), loss.memory.bank_ptr.clone()
    out = dict(zip(("out0", "out1"), _pair(4, 8)))
    out[bad] = torch.full((4, 8), float("nan"))
    with pytest.raises(ValueError, match=f"{bad} contains NaN or Inf"):
        loss(out["out0"].requires_grad_(True), out["out1"])
    assert torch.equal(loss.memory.bank, bank) and torch.equal(loss.memory.bank_ptr, ptr)
    assert torch.isfinite(loss(*(t.requires_grad_(True) for t in _pair(4, 8))))


@pytest.mark.parametrize("make", [lambda: NTXentLoss(0.2, memory_bank_size=(16, 8), backend="torch"),
                                  lambda: InfoNCELoss(0.2, memory_bank_size=(16, 8), backend="torch")])
def test_unchecked_non_finite_rows_never_enter_a_bank(seed, make, monkeypatch):
    """Where values are not read (CUDA without SSLCORE_VALIDATE; here forced), a NaN row is not enqueued."""
    import importlib

    for module in map(importlib.import_module, ("sslcore.losses", "sslcore.kernels.infonce")):
        monkeypatch.setattr(module, "validating", lambda device, validate=None: False)
    loss = make()
    bank = loss.memory.bank.clone()
    out0, out1 = _pair(4, 8)
    out1[1] = float("nan")
    loss(out0.requires_grad_(True), out1)
    assert torch.isfinite(loss.memory.bank).all() and torch.equal(loss.memory.bank[1], bank[1])
    assert not torch.equal(loss.memory.bank[0], bank[0])  # the finite rows were written
    assert torch.isfinite(loss(*(t.requires_grad_(True) for t in _pair(4, 8))))


def test_negative_cosine_similarity_is_lightlys(seed):
    _both(NegativeCosineSimilarity(), lightly_loss.NegativeCosineSimilarity(), *_pair(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Barlow Twins and VICReg: lightly's values and gradients, and the authors' formulas written out here.

def _barlow_twins_authors(z1, z2, lambd):
    """facebookresearch/barlowtwins, main.py: a non-affine BatchNorm1d (biased variance, eps 1e-5) on each
    view, c = bn(z1)^T bn(z2) / N, sum of (c_ii - 1)^2 plus lambd times the sum of c_ij^2 off the diagonal."""
    def bn(z):
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    c = torch.einsum("ni,nj->ij", bn(z1), bn(z2)) / z1.shape[0]
    eye = torch.eye(c.shape[0], dtype=torch.bool)
    return ((c[eye] - 1) ** 2).sum() + lambd * (c[~eye] ** 2).sum()


def _vicreg_authors(x, y, sim=25.0, std=25.0, cov=1.0):
    """facebookresearch/vicreg, main_vicreg.py: MSE, the hinge on the std (unbiased variance + 1e-4) averaged
    over both views, the squared off-diagonal covariances (unbiased) over the feature count, summed over views."""
    d = x.shape[1]
    eye = torch.eye(d, dtype=torch.bool)
    hinge = sum(torch.relu(1 - torch.sqrt(v.var(0) + 1e-4)).mean() for v in (x, y)) / 2
    decorrelate = sum((torch.cov(v.T)[~eye] ** 2).sum() / d for v in (x, y))
    return sim * ((x - y) ** 2).mean() + std * hinge + cov * decorrelate


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lambda_param", [5e-3, 0.3])
def test_barlow_twins_is_lightlys_and_the_authors(seed, dtype, lambda_param):
    a, b = _pair(19, 24, dtype)
    _both(BarlowTwinsLoss(lambda_param), lightly_loss.BarlowTwinsLoss(lambda_param), a, b, **TOL[dtype])
    _both(BarlowTwinsLoss(lambda_param), lambda x, y: _barlow_twins_authors(x.double(), y.double(), lambda_param),
          a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("params", [{}, dict(lambda_param=1.0, mu_param=10.0, nu_param=3.0)])
def test_vicreg_is_lightlys_and_the_authors(seed, dtype, params):
    a, b = _pair(19, 24, dtype)
    a[:, :5] *= 0.2  # some features below the std hinge, some above
    _both(VICRegLoss(**params), lightly_loss.VICRegLoss(**params), a, b, **TOL[dtype])
    coeffs = [params.get(k, d) for k, d in (("lambda_param", 25.0), ("mu_param", 25.0), ("nu_param", 1.0))]
    _both(VICRegLoss(**params), lambda x, y: _vicreg_authors(x.double(), y.double(), *coeffs), a, b, **TOL[dtype])


def test_barlow_twins_and_vicreg_at_points_worked_by_hand():
    """Columns of a Hadamard matrix: mean 0, biased variance 1, orthogonal.  Barlow Twins: C = I / (1 + 1e-5)
    for equal views, -I / (1 + 1e-5) for opposite ones (4 per diagonal entry).  VICReg: equal views with std
    sqrt(4/3) > 1 and no covariance cost nothing; constant views pay the hinge 1 - sqrt(1e-4) = 0.99."""
    z = torch.tensor([[1.0, 1, 1], [-1, 1, -1], [1, -1, -1], [-1, -1, 1]], dtype=torch.float64)
    shrink = 1 / (1 + 1e-5)
    assert BarlowTwinsLoss()(z, z).item() == pytest.approx(3 * (1 - shrink) ** 2, abs=1e-15)
    assert BarlowTwinsLoss()(z, -z).item() == pytest.approx(3 * (1 + shrink) ** 2, rel=1e-12)
    assert VICRegLoss()(z, z).item() == 0.0
    flat = torch.ones(4, 3, dtype=torch.float64)
    assert VICRegLoss()(flat, flat).item() == pytest.approx(25 * 0.99, rel=1e-12)
    assert VICRegLoss()(flat, flat + 1).item() == pytest.approx(25 + 25 * 0.99, rel=1e-12)


@pytest.mark.parametrize("make", [lambda: NTXentLoss(0.2, memory_bank_size=12),
                                  lambda: InfoNCELoss(0.2, memory_bank_size=12)])
def test_a_used_memory_bank_loads_into_a_fresh_module(seed, make):
    """The bank is a persistent buffer: a checkpoint of a used loss loads (strictly) into a new one, even
    when its width was only learnt from the first batch."""
    used = make()
    for _ in range(2):
        a, b = _pair(5, 10)
        used(a.requires_grad_(True), b)
    fresh = make()
    fresh.load_state_dict(used.state_dict())
    assert torch.equal(fresh.memory.bank, used.memory.bank) and int(fresh.memory.bank_ptr) == 10
    a, b = _pair(5, 10)
    torch.testing.assert_close(fresh(a, b), used(a, b))


def test_lightly_names_are_exported():
    assert {"NTXentLoss", "DCLLoss", "DCLWLoss", "NegativeCosineSimilarity", "InfoNCELoss", "BarlowTwinsLoss",
            "VICRegLoss"} <= set(sslcore.__all__)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: NTXentLoss(memory_bank_size=(4,)), ValueError, "memory_bank_size"),
    (lambda: NTXentLoss(memory_bank_size=-1), ValueError, "memory_bank_size"),
    (lambda: NTXentLoss(gather_distributed="all"), ValueError, "gather_distributed"),
    (lambda: DCLWLoss(sigma=0), ValueError, "sigma"),
    (lambda: DCLLoss(weight_fn=3), TypeError, "weight_fn"),
    (lambda: NTXentLoss(memory_bank_size=8)(*_pair(4, 6), weight=torch.ones(4)), ValueError, "memory bank"),
    (lambda: NTXentLoss(memory_bank_size=8)([[1.0] * 6], _pair(1, 6)[1]), TypeError, "out0 must be a tensor"),
    (lambda: NTXentLoss(memory_bank_size=8)(*_pair(4, 6)[0].unbind(1)[:2]), ValueError, r"must be \[N, D\]"),
    # one row: no negatives, and the positive is out of DCL's denominator, so lightly's gives -inf
    (lambda: DCLLoss()(*_pair(1, 16)), ValueError, "hold 1 sample each: DCL's negatives"),
    (lambda: DCLWLoss()(*_pair(1, 16)), ValueError, "hold 1 sample each"),
    (lambda: sslcore.functional.dcl(*_pair(1, 16)), ValueError, "hold 1 sample each"),
    (lambda: DCLLoss(weight_fn=lambda a, b: torch.full((4,), float("nan")))(*_pair(4, 16)), ValueError,
     "the weights weight_fn returned contains NaN"),
    (lambda: NegativeCosineSimilarity(eps=-1), ValueError, "eps must be a number >= 0, got -1"),
    (lambda: NegativeCosineSimilarity(eps=float("nan")), ValueError, "eps must be"),
    (lambda: NegativeCosineSimilarity(dim=1.5), ValueError, "dim must be an integer"),
    (lambda: NegativeCosineSimilarity()(torch.full((4, 8), float("nan")), torch.randn(4, 8)), ValueError,
     "x0 contains NaN or Inf"),
    (lambda: NegativeCosineSimilarity()(torch.randn(4, 8), [[0.0] * 8] * 4), TypeError, "x1 must be a tensor"),
    (lambda: BarlowTwinsLoss(lambda_param=-1), ValueError, "lambda_param must be a number >= 0"),
    (lambda: BarlowTwinsLoss(gather_distributed="ring"), ValueError, "gather_distributed"),
    (lambda: BarlowTwinsLoss()(*_pair(1, 8)), ValueError, "hold 1 sample.*BatchNorm over the batch needs at least 2"),
    (lambda: BarlowTwinsLoss()(torch.randn(4, 8), torch.randn(4, 6)), ValueError, "the same shape"),
    (lambda: BarlowTwinsLoss()(torch.full((4, 8), float("inf")), torch.randn(4, 8)), ValueError, "out0 contains NaN"),
    (lambda: VICRegLoss(mu_param=float("nan")), ValueError, "mu_param must be"),
    (lambda: VICRegLoss(eps=-1e-4), ValueError, "eps must be"),
    (lambda: VICRegLoss()(*_pair(1, 8)), ValueError, "the variance over the batch needs at least 2"),
    (lambda: VICRegLoss()(torch.randn(4, 2, 8), torch.randn(4, 2, 8)), ValueError, r"must be \[N, D\]"),
    (lambda: VICRegLoss()(torch.randn(4, 8), "b"), TypeError, "out1 must be a tensor"),
])
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
