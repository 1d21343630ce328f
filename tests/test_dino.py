"""DINO: ``DINOLoss`` against lightly's and an independent float64 transcription of the authors' loss, the head,
the ``dino`` method and multi-crop recipe, CLI training and resume, and gloo runs at 2 and 3 ranks."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sslcore.dist
from sslcore import DINOLoss
from sslcore.cli import main
from sslcore.data import load_dataset
from sslcore.data.augment import build_recipe, dino_local_size
from sslcore.methods import METHODS, create_model
from sslcore.methods.dino import DINOHead, head_widths
from sslcore.train import PretrainConfig, load_checkpoint, pretrain

K, B = 37, 5  # prototypes, batch: odd
SMALL = dict(local_crops=2, out_dim=64)  # a small head for fast method tests
TINY = dict(method="dino", epochs=2, batch_size=16, limit=32, backend="torch", options=SMALL)


def _views(n, generator, rows=B, requires_grad=False):
    return [torch.randn(rows, K, generator=generator, dtype=torch.float64).requires_grad_(requires_grad)
            for _ in range(n)]


def _authors(teacher, student, center, tau_t, tau_s=0.1, m=0.9):
    """The authors' DINOLoss.forward (facebookresearch/dino, main_dino.py), transcribed in float64: a double
    loop over (teacher chunk, student chunk) skipping equal indices, the mean over the batch of each term, the
    mean over the terms; then ``center * m + batch_center * (1 - m)``, batch_center the mean of the teacher
    rows."""
    t = [torch.softmax((x - center) / tau_t, dim=-1) for x in teacher]
    s = [torch.log_softmax(x / tau_s, dim=-1) for x in student]
    total, n_terms = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(len(s)):
            if v == iq:
                continue
            total = total + torch.sum(-q * s[v], dim=-1).mean()
            n_terms += 1
    batch_center = torch.cat([x.detach() for x in teacher]).mean(0, keepdim=True)
    return total / n_terms, center * m + batch_center * (1 - m)


@pytest.mark.parametrize("n_teacher, n_student, epoch", [(2, 10, 0), (2, 2, 7), (1, 3, 29), (3, 2, 45), (2, 4, None)])
def test_dino_loss_equals_the_authors_formula_and_schedule(n_teacher, n_student, epoch, seed):
    g = torch.Generator().manual_seed(seed)
    loss_fn = DINOLoss(K, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    schedule = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(20, 0.07)])  # the authors' teacher_temp_schedule
    tau_t = 0.07 if epoch is None else float(schedule[epoch])
    center = torch.zeros(1, K, dtype=torch.float64)
    loss_fn.center = loss_fn.center.double()
    for _ in range(3):  # the centre moves between calls
        teacher, student = _views(n_teacher, g), _views(n_student, g, requires_grad=True)
        teacher = [3 * t for t in teacher]  # logits spread enough for the temperatures to matter
        loss = loss_fn(teacher, student, epoch=epoch)
        want, center = _authors(teacher, student, center, tau_t)
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)
        grads = (torch.autograd.grad(f, student, allow_unused=True, materialize_grads=True) for f in (loss, want))
        torch.testing.assert_close(*grads, rtol=1e-9, atol=1e-12)  # a student view no pair uses: 0
        torch.testing.assert_close(loss_fn.center[0], center, rtol=1e-12, atol=1e-15)
    assert center.abs().max() > 0.1  # the centre did move


@pytest.mark.parametrize("n_teacher, n_student, epoch, teacher_temp", [(2, 8, 3, None), (2, 2, None, None),
                                                                       (1, 3, 0, None), (3, 2, 40, None),
                                                                       (2, 6, 1, 0.05)])
def test_dino_loss_equals_lightly_values_gradients_and_centre(n_teacher, n_student, epoch, teacher_temp, seed):
    lightly_loss = pytest.importorskip("lightly.loss")
    g = torch.Generator().manual_seed(seed)
    args = dict(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=10, student_temp=0.2,
                center_momentum=0.8)
    ours, theirs = DINOLoss(K, **args), lightly_loss.DINOLoss(K, **args)
    ours.center, theirs.center = ours.center.double(), theirs.center.double()
    for _ in range(3):
        teacher, student = _views(n_teacher, g, requires_grad=True), _views(n_student, g, requires_grad=True)
        teacher = [(3 * t).detach().requires_grad_(True) for t in teacher]
        a = ours(teacher, student, teacher_temp=teacher_temp, epoch=epoch)
        b = theirs(teacher, student, teacher_temp=teacher_temp, epoch=epoch)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)  # lightly's warm-up schedule is a float32 linspace
        for x, y in zip(torch.autograd.grad(a, teacher + student), torch.autograd.grad(b, teacher + student)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(ours.center, theirs.center, rtol=1e-12, atol=1e-15)
    assert ours.center.shape == (1, 1, K) and ours.state_dict().keys() == theirs.state_dict().keys()


def test_dino_loss_refuses_bad_input_before_any_work(seed):
    g = torch.Generator().manual_seed(seed)
    loss_fn = DINOLoss(K)
    t, s = _views(2, g), _views(4, g)
    for bad, match in [((t[0], s), "teacher_out must be a non-empty list"), (([], s), "teacher_out must be"),
                       ((t, [s[0], "x"]), r"student_out\[1\] must be a tensor"),
                       ((t, [s[0], s[1][:, :5]]), r"student_out\[1\] must be \[B, 37\]"),
                       ((t, [x[:3] for x in s]), "same, non-zero batch size"),
                       (([t[0]], [s[0]]), "different indices"),
                       ((t, [s[0], s[1] * float("nan")]), r"student_out\[1\].*NaN")]:
        with pytest.raises((TypeError, ValueError), match=match):
            loss_fn(*bad)
    with pytest.raises(ValueError, match="teacher_temp"):
        loss_fn(t, s, teacher_temp=0.0)
    with pytest.raises(ValueError, match="epoch counts from 0"):
        loss_fn(t, s, epoch=-1)
    assert torch.equal(loss_fn.center, torch.zeros(1, 1, K))  # nothing moved
    for kwargs, match in [({"output_dim": 0}, "output_dim"), ({"student_temp": 0.0}, "student_temp"),
                          ({"center_momentum": 1.5}, "center_momentum"), ({"center_mode": "median"}, "center_mode"),
                          ({"warmup_teacher_temp_epochs": -1}, "warmup_teacher_temp_epochs")]:
        with pytest.raises(ValueError, match=match):
            DINOLoss(**{"output_dim": K, **kwargs})


def test_a_non_finite_teacher_batch_leaves_the_centre_unchanged(seed):
    loss_fn = DINOLoss(K)
    loss_fn.update_center([torch.ones(B, K)])
    before = loss_fn.center.clone()
    torch.testing.assert_close(before, torch.full((1, 1, K), 0.1))
    bad = torch.ones(B, K)
    bad[2, 3] = float("inf")
    loss_fn.update_center([bad])  # the device-side guard (CUDA without validation reaches it)
    assert torch.equal(loss_fn.center, before)


def test_dino_loss_compiles_fullgraph(seed):
    g = torch.Generator().manual_seed(seed)
    eager, traced = DINOLoss(K, teacher_temp=0.07), DINOLoss(K, teacher_temp=0.07)
    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager")
    teacher, student = [t.float() for t in _views(2, g)], [s.float() for s in _views(4, g)]
    results = []
    for fn in (eager, compiled):
        xs = [s.clone().requires_grad_(True) for s in student]
        loss = fn(teacher, xs, epoch=3)
        results.append((loss, torch.autograd.grad(loss, xs)))
    torch.testing.assert_close(results[1], results[0])
    torch.testing.assert_close(traced.center, eager.center)


def test_head_widths_keep_the_papers_ratios_and_cap_at_its_widths():
    assert head_widths(384) == (2048, 256, 65536)  # ViT-S/16: the paper's head
    assert head_widths(2048) == (2048, 256, 65536)  # ResNet-50: the same head in the paper
    assert head_widths(48) == (256, 32, 8192)  # the digits CNN: 1/8 of each


def test_dino_head_is_weight_normalised_with_a_frozen_norm(seed):
    head = DINOHead(6, 16, 5, 11)
    x = torch.randn(4, 6)
    out = head(x)
    assert out.shape == (4, 11) and out.abs().max() <= 1 + 1e-6  # unit vectors against unit prototypes
    with torch.no_grad():
        head.last_layer.weight.mul_(torch.rand(11, 1) * 10 + 0.1)  # any prototype's norm: the same layer
    torch.testing.assert_close(head(x), out)
    z = nn.functional.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.weight
    torch.testing.assert_close(out, z @ (v / v.norm(dim=1, keepdim=True)).T)


def _method(**options):
    return create_model("dino", load_dataset("digits"), encoder="smallcnn", **{**SMALL, **options})


def test_dino_method_teacher_is_an_ema_of_the_student_once_per_update(seed):
    model = _method()
    assert METHODS["dino"] is type(model) and model.n_views == 4 and model.recipe == "dino"
    for a, b in zip(model.teacher_encoder.parameters(), model.encoder.parameters()):
        assert torch.equal(a, b) and not a.requires_grad
    views = build_recipe("dino", image_size=8, flips=False).views(load_dataset("digits").x_train[:6],
                                                                 torch.Generator().manual_seed(seed), 4)
    assert [v.shape[-1] for v in views] == [8, 8, 4, 4]
    model.loss(views, epoch=1).backward()
    assert all(p.grad is None for p in model.teacher_head.parameters())
    assert model.head.last_layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    teacher = [p.clone() for p in model.teacher_head.parameters()]
    model.progress = 0.5
    model.loss(views, epoch=1)
    m = 1 - (1 - 0.996) * (np.cos(np.pi * 0.5) + 1) / 2  # the cosine schedule at half way
    for t0, t, s in zip(teacher, model.teacher_head.parameters(), model.head.parameters()):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s)
    moved = [p.clone() for p in model.teacher_head.parameters()]
    model.loss(views, epoch=1)  # the next micro-batch of the same (accumulated) update: no second step
    assert all(torch.equal(a, b) for a, b in zip(moved, model.teacher_head.parameters()))
    with pytest.raises(ValueError, match="built for 4 views"):
        model.loss(views[:3], epoch=1)


def test_dino_recipe_gives_global_then_local_crops_sharded_as_whole(seed):
    assert dino_local_size(224) == 96 and dino_local_size(32) == 14 and dino_local_size(8) == 4
    recipe = build_recipe("dino", image_size=32)
    x = torch.rand(6, 3, 32, 32)
    whole = recipe.views(x, torch.Generator().manual_seed(seed), 5)
    assert [v.shape[-1] for v in whole] == [32, 32, 14, 14, 14]
    part = recipe.views(x[2:5], torch.Generator().manual_seed(seed), 5, batch=6, rows=slice(2, 5))
    for a, b in zip(whole, part):
        torch.testing.assert_close(a[2:5], b)
    assert not torch.equal(whole[2], whole[3])  # each local crop draws its own box


def test_dino_trains_from_the_cli_on_digits(tmp_path, capsys):
    out = tmp_path / "run"
    main(["pretrain", "--data", "digits", "--method", "dino", "--epochs", "2", "--batch-size", "16", "--limit", "32",
          "--backend", "torch", "-o", "local_crops=2", "-o", "out_dim=64", "--out", str(out)])
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["config"]["options"] == {"local_crops": 2, "out_dim": 64}
    assert ckpt["model"]["criterion.center"].abs().sum() > 0  # the centre trained and was saved
    assert "augment dino" in capsys.readouterr().out


def test_dino_resume_equals_an_uninterrupted_run(tmp_path, interrupted):
    full = pretrain(PretrainConfig(out=str(tmp_path / "full"), **TINY))
    interrupted(lambda: pretrain(PretrainConfig(out=str(tmp_path / "cut"), **TINY)))
    resumed = pretrain(PretrainConfig(out=str(tmp_path / "cut"), resume="", **TINY))
    assert resumed["final_loss"] == full["final_loss"]
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt")["model"] for d in ("full", "cut"))
    assert a.keys() == b.keys() and any(k.startswith("teacher_head.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
def test_dino_step_on_cuda_in_bf16_without_host_synchronisation(seed):
    """The method's loss and backward under autocast, with any host read an error; the loss in fp32, the
    centre finite and moved."""
    model = _method(local_crops=6, out_dim=4096).cuda()
    views = build_recipe("dino", image_size=8, flips=False).views(load_dataset("digits").x_train[:64].cuda(),
                                                                 torch.Generator().manual_seed(seed), model.n_views)
    model.progress = 0.3
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(views, epoch=2)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(model.criterion.center).all() and model.criterion.center.abs().sum() > 0
    assert model.head.last_layer.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# gloo, 2 and 3 ranks: the loss module in a plain DDP loop, and the trainer.

M, D = 6, 5  # rows of the global batch (3 or 2 per rank), input width of the toy student


def _ddp_loss_steps(seed, steps=3):
    """``steps`` SGD steps of a float64 linear student under DDP (each rank its rows), or on the whole batch
    without a process group: the losses, gradients, weights and the loss's centre after each step."""
    world, rank = sslcore.dist.world_size(), sslcore.dist.rank()
    g = torch.Generator().manual_seed(seed)
    student = nn.Linear(D, K).double()
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    model = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    loss_fn = DINOLoss(K, teacher_temp=0.07, warmup_teacher_temp_epochs=5).double()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    rows = M // world
    mine = slice(rank * rows, (rank + 1) * rows)
    out = []
    for epoch in range(steps):
        x = torch.randn(4, M, D, generator=g, dtype=torch.float64)  # 4 views of the global batch
        teacher = [3 * torch.randn(M, K, generator=g, dtype=torch.float64)[mine] for _ in range(2)]
        opt.zero_grad()
        loss = loss_fn(teacher, list(model(x[:, mine]).unbind(0)), epoch=epoch)
        loss.backward()
        out.append((loss.detach(), student.weight.grad.clone(), student.weight.detach().clone(),
                    loss_fn.center.clone()))
        opt.step()
    return out


def _worker(rank, world, port, seed, out, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        summary = pretrain(PretrainConfig(out=out, overwrite=True, **{**TINY, "epochs": 1, "batch_size": 12,
                                                                       "limit": 24}))
        results[rank] = {"loss": _ddp_loss_steps(seed), "summary": summary}
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_dino_distributed_equals_one_process(world, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little") % 2 ** 31
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, port, seed, str(tmp_path / "ddp"), results), nprocs=world, join=True)
    single = _ddp_loss_steps(seed)
    for step, (loss, grad, weight, center) in enumerate(single):
        ranks = [results[r]["loss"][step] for r in range(world)]
        torch.testing.assert_close(torch.stack([r[0] for r in ranks]).mean(), loss, rtol=1e-10, atol=0)
        for r, (_, r_grad, r_weight, r_center) in enumerate(ranks):  # DDP's mean over ranks; the centre all-reduced
            torch.testing.assert_close(r_grad, grad, rtol=1e-9, atol=1e-12, msg=lambda e: f"grad, rank {r}: {e}")
            torch.testing.assert_close(r_weight, weight, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(r_center, center, rtol=1e-10, atol=1e-14, msg=lambda e: f"centre {r}: {e}")
    one = pretrain(PretrainConfig(out=str(tmp_path / "one"), **{**TINY, "epochs": 1, "batch_size": 12, "limit": 24}))
    summary = results[0]["summary"]
    assert summary["world_size"] == world
    assert summary["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["model"]
    for key, value in a.items():  # student, teacher (EMA) and centre
        torch.testing.assert_close(b[key], value, rtol=1e-3, atol=1e-4, msg=lambda e: f"{key}, {world} ranks: {e}")
