"""The contrastive methods of issue 5 (MoCo, SimSiam, ArCL, SimCLR-Attn, SimSiam-Multi, NNCLR) and issue 22's
BYOL and MoCo v3: each objective against its definition computed by hand, their state (queues, momentum
encoders, memories), training steps and option checks.  Tiny CNNs on 8x8 inputs, torch loss backend."""
from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sslcore.kernels import infonce_ref
from sslcore.methods import METHODS, create_model, method_options
from sslcore.methods.arcl import max_pair_distance, worst_pair
from sslcore.methods.simsiam_multi import SimSiamMulti
from sslcore.models import SmallCNN

B = 16  # batch size
N_TRAIN = 40  # training-set size seen by SimSiam-Multi's memory
TAU = 0.5


def _encoder():
    return SmallCNN(in_chans=1, width=4)


def _build(name, **options):
    cls = METHODS[name]
    if cls is SimSiamMulti:
        return cls(_encoder(), N_TRAIN, **options)
    if "temperature" in method_options(name):
        options = {"temperature": TAU, "backend": "torch", **options}
    return cls(_encoder(), **options)


def _views(m=2, n=B):
    x = torch.rand(n, 1, 8, 8)
    return [x + 0.1 * torch.randn_like(x) for _ in range(m)]


def _nt_xent(z0, z1, weight=None):
    w = None if weight is None else torch.cat([weight, weight]).double()
    return infonce_ref(torch.cat([z0, z1]).double(), temperature=TAU, weight=w)


def _neg_cos(p, t):
    return -F.cosine_similarity(p.double(), t.double(), dim=1).mean()


# ---------------------------------------------------------------------------------------------
# Every method: trains (loss finite and decreasing), gradients reach the encoder.

HEADS = {"proj_hidden": 32, "proj_dim": 16}  # BYOL, MoCo v3: the default heads scale a 16-wide CNN to 2 outputs
SMALL_QUEUE = {"queue_size": 2 * B, "momentum": 0.9}  # MoCo on 40 samples: few stale copies of a sample's keys
CASES = {"moco": SMALL_QUEUE, "moco-symmetric": {"symmetric": True, **SMALL_QUEUE}, "simsiam": {}, "arcl": {},
         "arcl-penalty": {"mode": "penalty"}, "arcl-moco": {"base": "moco", **SMALL_QUEUE}, "simclr-attn": {},
         "simsiam-multi": {"mix_epoch": 2}, "nnclr": {"queue_size": 2 * B}, **{m: HEADS for m in ("byol", "mocov3")},
         "barlowtwins": {}, "vicreg": {}}


@pytest.mark.parametrize("case", CASES)
def test_training_steps_lower_the_loss_and_reach_the_encoder(case, seed):
    name = case.split("-symmetric")[0].split("-penalty")[0].replace("arcl-moco", "arcl")
    model = _build(name, **CASES[case])
    data = torch.rand(N_TRAIN, 1, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(16):  # 10 steps: Barlow Twins' loss, flat after its first step, rose in 4 of 500 seeds
        index = torch.randperm(N_TRAIN)[:B]
        views = [data[index] + 0.1 * torch.randn(B, 1, 8, 8) for _ in range(model.n_views)]
        loss = model.loss(views, index=index, epoch=1 + step // 4)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = [p.grad for p in model.encoder.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert sum(g.abs().sum() for g in grads) > 0
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < sum(losses[1:4]) / 3, losses  # step 0: NNCLR's queue is still empty


def test_registry_options_and_create():
    for name in ("moco", "arcl", "simclr-attn", "nnclr"):
        assert {"temperature", "backend", "gather_distributed"} <= set(method_options(name)), name
    assert "gather_distributed" not in method_options("simsiam")  # its loss is a local mean: nothing to gather
    assert "gather_distributed" in method_options("simsiam-multi") and "n_train" not in method_options("simsiam-multi")
    data = SimpleNamespace(n_train=37, in_chans=1, image_shape=(1, 8, 8))  # create checks the encoder on it
    model = create_model("simsiam-multi", data, encoder="smallcnn", temperature=0.1, backend="torch")
    assert model.memory.shape == (37, 64) and model.name == "simsiam-multi"
    assert create_model("arcl", data, encoder="smallcnn", views=3).n_views == 3


@pytest.mark.parametrize("name, state", [("moco", ("queue", "queue_ptr", "key_encoder.0.weight")),
                                         ("nnclr", ("support", "support_ptr", "support_len")),
                                         ("simsiam-multi", ("memory",)),
                                         ("byol", ("target_encoder.0.weight", "target_projector.3.bias")),
                                         ("mocov3", ("target_encoder.0.weight", "target_projector.4.running_mean"))])
def test_method_state_is_in_the_state_dict(name, state, seed):
    """Queues, pointers, momentum encoders and memories are buffers/submodules: a checkpoint restores them."""
    model = _build(name)
    model.loss(_views(), index=torch.arange(B), epoch=1)
    fresh = _build(name)
    fresh.load_state_dict(model.state_dict())
    for key in state:
        assert torch.equal(fresh.state_dict()[key], model.state_dict()[key]), key
    assert any(not torch.equal(_build(name).state_dict()[k], model.state_dict()[k]) for k in state)


# ---------------------------------------------------------------------------------------------
# MoCo: the EMA key encoder, the FIFO queue, the loss against [keys; queue before the step].


def test_moco_momentum_update_queue_and_loss(seed):
    model = _build("moco", queue_size=3 * B, momentum=0.9)
    queue = model.queue.clone()
    with torch.no_grad():  # key networks that differ from the online ones
        for p in itertools.chain(model.key_encoder.parameters(), model.key_projector.parameters()):
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in itertools.chain(model.encoder.parameters(), model.projector.parameters())]
    key_before = [p.detach().clone() for p in itertools.chain(model.key_encoder.parameters(),
                                                              model.key_projector.parameters())]
    x0, x1 = _views()
    loss = model.loss([x0, x1])
    key_after = list(itertools.chain(model.key_encoder.parameters(), model.key_projector.parameters()))
    for before, theta, after in zip(key_before, online, key_after):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * theta)
        assert not after.requires_grad
    with torch.no_grad():
        k = F.normalize(model.key_projector(model.key_encoder(x1)), dim=1)
    q = model.projector(model.encoder(x0))
    expected = infonce_ref(q.double(), torch.cat([k, queue]).double(), temperature=TAU)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.queue[:B], k)
    torch.testing.assert_close(model.queue[B:], queue[B:])
    assert int(model.queue_ptr) == B

    written = [k]
    for _ in range(3):  # the third batch fills the ring, the fourth overwrites the oldest rows
        x0, x1 = _views()
        model.loss([x0, x1])
        with torch.no_grad():
            written.append(F.normalize(model.key_projector(model.key_encoder(x1)), dim=1))
    torch.testing.assert_close(model.queue, torch.cat([written[3], written[1], written[2]]))
    assert int(model.queue_ptr) == B
    model.eval()
    frozen = model.queue.clone()
    model.loss(_views())
    assert torch.equal(model.queue, frozen)  # evaluation does not enqueue


def test_moco_symmetric_averages_both_directions(seed):
    model = _build("moco", symmetric=True, momentum=0.0)
    queue = model.queue.clone()
    x0, x1 = _views()
    loss = model.loss([x0, x1])
    with torch.no_grad():
        k0, k1 = (F.normalize(model.key_projector(model.key_encoder(x)), dim=1) for x in (x0, x1))
        q0, q1 = model.projector(model.encoder(torch.cat([x0, x1]))).chunk(2)
    expected = 0.5 * sum(infonce_ref(q.double(), torch.cat([k, queue]).double(), temperature=TAU)
                         for q, k in ((q0, k1), (q1, k0)))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_moco_queue_not_divisible_by_batch_is_refused():
    model = _build("moco", queue_size=40)
    before = model.queue.clone()
    with pytest.raises(ValueError, match=r"queue_size \(40\) must be divisible by the batch size \(16\)"):
        model.loss(_views())
    assert torch.equal(model.queue, before) and int(model.queue_ptr) == 0


# ---------------------------------------------------------------------------------------------
# BYOL and MoCo v3: the EMA target on the cosine schedule, each loss against the authors' formula.


def _perturbed_target(model):
    """Target networks that differ from the online ones; (online, target) parameters before the step."""
    with torch.no_grad():
        for p in itertools.chain(model.target_encoder.parameters(), model.target_projector.parameters()):
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in itertools.chain(model.encoder.parameters(), model.projector.parameters())]
    target = [p.detach().clone() for p in itertools.chain(model.target_encoder.parameters(),
                                                          model.target_projector.parameters())]
    return online, target


def _check_ema(model, online, target, base, progress):
    m = 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2  # BYOL's tau_k, written out
    after = list(itertools.chain(model.target_encoder.parameters(), model.target_projector.parameters()))
    assert len(after) == len(online)
    for before, theta, now in zip(target, online, after):
        torch.testing.assert_close(now, m * before + (1 - m) * theta)
        assert not now.requires_grad


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def test_byol_target_schedule_and_loss_are_the_authors(seed):
    model = _build("byol", **HEADS).double()
    model.progress = 0.3
    online, target = _perturbed_target(model)
    x0, x1 = (x.double() for x in _views())
    loss = model.loss([x0, x1])
    _check_ema(model, online, target, 0.996, 0.3)

    def regression(p, t):  # the authors' 2 - 2 cos(p, t) per sample, float64
        p, t = p.double(), t.double()
        return 2 - 2 * (p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1))
    with torch.no_grad():
        t0, t1 = (model.target_projector(model.target_encoder(x)) for x in (x0, x1))
    p0, p1 = (model.predictor(model.projector(model.encoder(x))) for x in (x0, x1))  # each view on its own
    expected = regression(p0, t1).mean() + regression(p1, t0).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    params = [*model.encoder.parameters(), *model.projector.parameters(), *model.predictor.parameters()]
    for g, want in zip(_grads(loss, params), _grads(expected, params)):  # the targets carry no gradient
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
    model.eval()
    frozen = [p.clone() for p in model.target_encoder.parameters()]
    model.loss([v.double() for v in _views()])
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.target_encoder.parameters()))  # eval: no EMA


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mocov3_target_schedule_and_loss_are_the_authors(seed, backend):
    tau = 0.3  # not 0.5: the authors' factor 2 tau must show
    model = _build("mocov3", backend=backend, temperature=tau, **HEADS)
    assert model.base_momentum == 0.99
    model.progress = 0.7
    online, target = _perturbed_target(model)
    x0, x1 = _views(n=13)
    loss = model.loss([x0, x1])
    _check_ema(model, online, target, 0.99, 0.7)

    def ctr(q, k):  # facebookresearch/moco-v3: CrossEntropyLoss(q k^T / T, arange) * 2T, float64
        q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
        return F.cross_entropy(q @ k.T / tau, torch.arange(len(q))) * (2 * tau)
    with torch.no_grad():
        k0, k1 = (model.target_projector(model.target_encoder(x)) for x in (x0, x1))
    q0, q1 = (model.predictor(model.projector(model.encoder(x))) for x in (x0, x1))
    expected = ctr(q0, k1) + ctr(q1, k0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    params = [*model.encoder.parameters(), *model.projector.parameters(), *model.predictor.parameters()]
    for g, want in zip(_grads(loss, params), _grads(expected, params)):  # float32 loss vs float64 formula
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("spec, vit", [("vit_tiny_patch16_224:img_size=16,patch_size=4,depth=1", True),
                                       ("resnet18", False)])
def test_mocov3_and_byol_train_a_timm_vit_and_resnet(spec, vit, seed):
    """The authors' per-encoder defaults (tau, projector depth, widths) and one optimizer step each."""
    from sslcore.models import create_encoder
    data = SimpleNamespace(in_chans=3, image_shape=(3, 16, 16))
    for name in ("mocov3", "byol"):
        model = create_model(name, data, encoder=spec, backend="torch")
        width = model.encoder.num_features  # 192 (ViT-Ti), 512 (ResNet-18)
        linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
        if name == "mocov3":
            ref = 768 if vit else 2048  # ViT-B's and ResNet-50's widths, for the paper's 4096 -> 256 heads
            assert model.temperature == (0.2 if vit else 1.0) and len(linears) == (3 if vit else 2)
            assert isinstance(model.predictor[-1], torch.nn.BatchNorm1d) == vit  # as the authors' code
        else:
            ref = 2048
            assert len(linears) == 2 and model.base_momentum == 0.996
        assert [m.out_features for m in linears][-2:] == [4096 * width // ref, 256 * width // ref]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.rand(4, 3, 16, 16)
        loss = model.loss([x, x.flip(3)])
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoder.parameters()
                   if p.requires_grad)
        assert all(p.grad is None for p in model.target_encoder.parameters())
        before = [p.clone() for p in model.target_encoder.parameters()]
        opt.step()
        model.progress = 0.5
        model.loss([x, x.flip(3)])
        assert any(not torch.equal(a, b) for a, b in zip(before, model.target_encoder.parameters()))
        assert create_encoder(spec, in_chans=3).num_features == width


# ---------------------------------------------------------------------------------------------
# SimSiam and SimSiam-Multi.


def _simsiam_expected(model, x0, x1, t0=None, t1=None):
    z = model.projector(model.encoder(torch.cat([x0, x1])))
    p0, p1 = model.predictor(z).chunk(2)
    z0, z1 = z.detach().chunk(2)
    t0, t1 = (z0 if t0 is None else t0), (z1 if t1 is None else t1)
    return 0.5 * (_neg_cos(p0, t1) + _neg_cos(p1, t0)), z0, z1


def test_simsiam_loss_and_stop_gradient(seed):
    model = _build("simsiam")
    x0, x1 = _views()
    loss = model.loss([x0, x1])
    expected, _, _ = _simsiam_expected(model, x0, x1)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    # the target is constant: the gradient w.r.t. the projector's output flows through the predictor only
    z = model.projector(model.encoder(torch.cat([x0, x1]))).detach().requires_grad_(True)
    p0, p1 = model.predictor(z).chunk(2)
    t0, t1 = model.targets(*z.chunk(2), None, 1)
    assert not t0.requires_grad and not t1.requires_grad


def test_simsiam_multi_memory_and_mixing(seed):
    model = _build("simsiam-multi", mix_epoch=3, mix=0.25)
    x0, x1 = _views()
    first = torch.randperm(N_TRAIN)[:B]
    loss = model.loss([x0, x1], index=first, epoch=1)
    expected, z0, z1 = _simsiam_expected(model, x0, x1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)  # no memory before mix_epoch
    torch.testing.assert_close(model.memory[first], z1)  # view 2's projection, as the authors
    rest = torch.ones(N_TRAIN, dtype=torch.bool)
    rest[first] = False
    assert not model.memory[rest].any()

    # epoch 2 < mix_epoch: a batch of written samples still gets SimSiam's targets
    x0, x1 = _views()
    loss = model.loss([x0, x1], index=first, epoch=2)
    expected, z0, z1 = _simsiam_expected(model, x0, x1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    memory = model.memory.clone()

    # epoch 3: half the batch has a memory (mixed in), half has none (zero rows: SimSiam's target); then overwritten
    index = torch.cat([first[:B // 2], torch.nonzero(rest).flatten()[:B // 2]])
    x0, x1 = _views()
    loss = model.loss([x0, x1], index=index, epoch=3)
    z = model.projector(model.encoder(torch.cat([x0, x1]))).detach()
    z0, z1 = z.chunk(2)
    has = torch.arange(B) < B // 2
    t0, t1 = (torch.where(has[:, None], 0.75 * t + 0.25 * memory[index], t) for t in (z0, z1))
    expected, _, _ = _simsiam_expected(model, x0, x1, t0, t1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.memory[index], z1)


def test_simsiam_multi_bad_index_or_epoch():
    model = _build("simsiam-multi")
    with pytest.raises(ValueError, match="index"):
        model.loss(_views(), index=None, epoch=1)
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 40\)"):
        model.loss(_views(), index=torch.arange(B) + N_TRAIN - 1, epoch=1)
    with pytest.raises(ValueError, match="epoch"):
        model.loss(_views(), index=torch.arange(B), epoch=0)
    assert not model.memory.any()


# ---------------------------------------------------------------------------------------------
# ArCL: the worst pair, and the loss on it.


def _brute_force_worst_pair(z):
    m, n = z.shape[:2]
    a, b = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    for i in range(n):
        cos = {(u, v): F.cosine_similarity(z[u, i], z[v, i], dim=0).item()
               for u, v in itertools.combinations(range(m), 2)}
        a[i], b[i] = min(cos, key=cos.get)
    return a, b


def test_worst_pair_equals_brute_force(seed):
    z = torch.randn(5, 33, 7, dtype=torch.float64)
    a, b = worst_pair(z)
    ea, eb = _brute_force_worst_pair(z)
    assert torch.equal(a, ea) and torch.equal(b, eb)


@pytest.mark.parametrize("mode", ["worst_pair", "penalty"])
def test_arcl_loss_on_the_worst_pair(mode, seed):
    model = _build("arcl", views=4, mode=mode, penalty=0.7)
    views = _views(4)
    loss = model.loss(views)
    z = model.base.projector(model.encoder(torch.cat(views))).detach().unflatten(0, (4, B)).double()
    rows = torch.arange(B)
    if mode == "worst_pair":
        a, b = _brute_force_worst_pair(z)
        expected = _nt_xent(z[a, rows], z[b, rows])
    else:
        zn = F.normalize(z, dim=-1)
        spread = torch.stack([max((zn[u, i] - zn[v, i]).pow(2).sum() for u, v in itertools.combinations(range(4), 2))
                              for i in range(B)])
        expected = _nt_xent(z[0], z[1]) + 0.7 * spread.mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_arcl_with_two_views_is_simclr(seed):
    """m = 2: the only pair is (0, 1), so ArCL's loss and gradients are SimCLR's on the same weights."""
    arcl, simclr = _build("arcl", views=2), _build("simclr")
    simclr.load_state_dict({k.removeprefix("base."): v for k, v in arcl.state_dict().items()})
    views = _views(2)
    losses = [model.loss(views) for model in (arcl, simclr)]
    torch.testing.assert_close(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(arcl.encoder[0].weight.grad, simclr.encoder[0].weight.grad)
    torch.testing.assert_close(arcl.base.projector[0].weight.grad, simclr.projector[0].weight.grad)


def test_max_pair_distance_is_the_largest_over_pairs(seed):
    z = torch.randn(4, 9, 5, dtype=torch.float64)
    zn = F.normalize(z, dim=-1)
    expected = torch.stack([max((zn[a, i] - zn[b, i]).pow(2).sum() for a, b in itertools.combinations(range(4), 2))
                            for i in range(9)])
    torch.testing.assert_close(max_pair_distance(z), expected)


def test_arcl_moco_keys_come_from_the_worst_pair(seed):
    model = _build("arcl", views=3, base="moco", momentum=0.0)
    queue = model.base.queue.clone()
    views = _views(3)
    loss = model.loss(views)
    x = torch.stack(views)
    with torch.no_grad():
        z = model.base.projector(model.encoder(x.flatten(0, 1))).unflatten(0, (3, B))
        a, b = _brute_force_worst_pair(z)
        rows = torch.arange(B)
        k = F.normalize(model.base.key_projector(model.base.key_encoder(x[b, rows])), dim=1)
    expected = infonce_ref(z[a, rows].double(), torch.cat([k, queue]).double(), temperature=TAU)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.base.queue[:B], k)


# ---------------------------------------------------------------------------------------------
# SimCLR-Attn: weights on backbone features, into the fused loss's weight.


@pytest.mark.parametrize("weighting", ["row", "alignment"])
def test_simclr_attn_weights_match_their_definition(seed, weighting):
    """Default, the authors' form: L = sum_i w_i l_i / sum_i w_i over the 2N rows, w_i = exp(1 + cos(h0_i, h1_i))
    (no gradient) on both rows of pair i; "alignment": w (mean 1) on the alignment term only."""
    model = _build("simclr-attn", weighting=weighting)
    x0, x1 = _views()
    loss = model.loss([x0, x1])
    h = model.encoder(torch.cat([x0, x1])).detach()
    h0, h1 = h.double().chunk(2)
    raw = torch.exp(1 + (h0 * h1).sum(1) / (h0.norm(dim=1) * h1.norm(dim=1)))
    w = raw / raw.mean()
    torch.testing.assert_close(model.attention_weights(h0, h1).double(), w, rtol=1e-6, atol=1e-6)
    z0, z1 = model.projector(h).detach().chunk(2)
    if weighting == "alignment":
        expected = _nt_xent(z0, z1, weight=w)
    else:  # written out: each row's NT-Xent from the similarity matrix, weighted by its pair's raw weight
        z = F.normalize(torch.cat([z0, z1]).double(), dim=1)
        s = (z @ z.T / TAU).fill_diagonal_(float("-inf"))
        m = len(z)
        rows = torch.arange(m)
        per_row = torch.logsumexp(s, 1) - s[rows, (rows + m // 2) % m]
        ww = torch.cat([raw, raw])
        expected = (ww * per_row).sum() / ww.sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, _nt_xent(z0, z1))  # the weights matter


# ---------------------------------------------------------------------------------------------
# NNCLR-style rewiring: the nearest support row is an extra positive.


def test_nnclr_neighbour_is_the_true_nearest_and_loss(seed):
    model = _build("nnclr", queue_size=48)
    x0, x1 = _views()
    loss = model.loss([x0, x1])  # empty queue: SimCLR's NT-Xent, then z0 is enqueued
    z0, z1 = model.projector(model.encoder(torch.cat([x0, x1]))).detach().chunk(2)
    torch.testing.assert_close(loss.double(), _nt_xent(z0, z1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.support[:B], F.normalize(z0, dim=1))
    assert int(model.support_len) == B
    model.enqueue(torch.randn(B, 64))  # more support rows to search

    x0, x1 = _views()
    z = model.projector(model.encoder(torch.cat([x0, x1]))).detach()
    bank = model.support[:2 * B].clone()
    cos = F.normalize(z.double(), dim=1) @ F.normalize(bank.double(), dim=1).T
    idx = cos.argmax(1)
    assert torch.equal(model.nearest(z)[0], idx)
    loss = model.loss([x0, x1])
    m = 2 * B
    rows = torch.arange(m)
    pos = torch.cat([torch.stack([(rows + B) % m, rows + m], 1), torch.stack([rows, torch.full_like(rows, -1)], 1)])
    per_row = infonce_ref(torch.cat([z, bank[idx]]).double(), temperature=TAU, pos_index=pos, reduction="none")
    torch.testing.assert_close(loss.double(), per_row[:m].mean(), rtol=1e-5, atol=1e-5)
    assert int(model.support_len) == 3 * B and int(model.support_ptr) == 0  # ring of 48 rows is full


# ---------------------------------------------------------------------------------------------
# Barlow Twins and VICReg (issue 22): the authors' heads, scaled, and each view's own BatchNorm pass.

@pytest.mark.parametrize("name, bias, lambdas", [("barlowtwins", False, (0.0051,)),
                                                 ("vicreg", True, (25.0, 25.0, 1.0))])
def test_redundancy_reduction_heads_defaults_and_loss(name, bias, lambdas, seed):
    """The authors' 2048 -> 8192-8192-8192 as a ratio (4x the encoder's features, here 4 x 16), Linear-BN-ReLU
    twice then a Linear without bias (Barlow Twins' hidden Linears without bias, VICReg's with); their
    coefficients; BYOL's views; and the loss on each view's own pass through the networks, in training mode."""
    model = _build(name)
    assert model.encoder.num_features == 16 and model.recipe == "byol"
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 64), (64, 64), (64, 64)]
    assert [m.bias is not None for m in linears] == [bias, bias, False]
    assert [type(m).__name__ for m in model.projector][:3] == ["Linear", "BatchNorm1d", "ReLU"]
    coeffs = ("lambda_param",) if name == "barlowtwins" else ("lambda_param", "mu_param", "nu_param")
    assert tuple(getattr(model.criterion, k) for k in coeffs) == lambdas
    assert method_options(name)["gather_distributed"] is False
    wide = _build(name, proj_hidden=24, proj_dim=40)
    assert [m.out_features for m in wide.projector if isinstance(m, torch.nn.Linear)] == [24, 24, 40]
    views = _views()
    z = [model.projector(model.encoder(v)) for v in views]
    torch.testing.assert_close(model.loss(views), model.criterion(*z))
    together = model.criterion(*model.projector(model.encoder(torch.cat(views))).chunk(2))
    assert not torch.allclose(together, model.loss(views))  # one pass of both views would mix their statistics


# ---------------------------------------------------------------------------------------------
# Bad options: ValueError naming the option, at construction.


@pytest.mark.parametrize("name, options, match", [
    ("arcl", {"views": 1}, "views"),
    ("arcl", {"base": "byol"}, "base"),
    ("arcl", {"mode": "average"}, "mode"),
    ("arcl", {"penalty": -1.0}, "penalty"),
    ("arcl", {"queue_size": 64}, "queue_size"),  # a MoCo option with base="simclr"
    ("moco", {"momentum": 1.0}, "momentum"),
    ("moco", {"queue_size": 0}, "queue_size"),
    ("moco", {"temperature": 0.0}, "temperature"),
    ("nnclr", {"queue_size": -4}, "queue_size"),
    ("simsiam-multi", {"mix_epoch": 0}, "mix_epoch"),
    ("simsiam-multi", {"mix": 1.0}, "mix"),
    ("byol", {"momentum": 1.0}, "momentum"),
    ("mocov3", {"momentum": -0.1}, "momentum"),
    ("mocov3", {"temperature": 0.0}, "temperature"),
    ("mocov3", {"proj_layers": 1}, "proj_layers"),
    ("barlowtwins", {"lambda_param": -0.1}, "lambda_param"),
    ("barlowtwins", {"proj_dim": 0}, "proj_dim"),
    ("vicreg", {"nu_param": float("inf")}, "nu_param"),
    ("vicreg", {"proj_hidden": 1.5}, "proj_hidden"),
])
def test_bad_options_are_refused(name, options, match):
    with pytest.raises(ValueError, match=match):
        _build(name, **options)


def test_cosine_momentum_schedule_ends_and_midpoint():
    """BYOL's schedule: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2."""
    import math

    from sslcore.methods.momentum import cosine_momentum
    assert cosine_momentum(0.996, 0.0) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(0.996, 0.25) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_momentum(0.9, 0.5, final=0.99) == pytest.approx(0.945)


def test_heads_are_sized_from_the_encoder_width_and_moco_queue_from_the_data():
    """The papers' head shapes from the encoder's width (SimCLR/MoCo v2: width -> 128, NNCLR: -> 256, SimSiam:
    width, width, predictor width/4) for encoders >= 256 wide; sslcore's digits-sized heads below; MoCo v2's
    65,536-key queue and 0.999 momentum on data of >= 50,000 samples, 1,024 and 0.99 on the small sets."""
    from types import SimpleNamespace

    from sslcore.methods import create_model
    from sslcore.methods.heads import SMALL_WIDTH

    def widths(module):
        return [m.out_features for m in module if isinstance(m, torch.nn.Linear)]

    small = SimpleNamespace(n_train=1437, in_chans=1, image_shape=(1, 8, 8), kind="image")
    large = SimpleNamespace(n_train=50_000, in_chans=3, image_shape=(3, 32, 32), kind="image")
    wide = "resnet18:small"  # 512 features
    assert SMALL_WIDTH <= 512
    assert widths(create_model("simclr", large, encoder=wide).projector) == [512, 128]
    assert widths(create_model("nnclr", large, encoder=wide).projector) == [512, 256]
    s = create_model("simsiam", large, encoder=wide)
    assert widths(s.projector) == [512, 512] and widths(s.predictor) == [128, 512]
    assert widths(create_model("simclr", small, encoder="smallcnn").projector) == [256, 64]
    assert widths(create_model("simclr", large, encoder=wide, proj_dim=32).projector) == [512, 32]  # given wins
    m = create_model("moco", large, encoder=wide)
    assert m.queue.shape == (65536, 128) and m.momentum == 0.999
    m = create_model("moco", small, encoder="smallcnn", queue_size=512)
    assert m.queue.shape == (512, 64) and m.momentum == 0.99
