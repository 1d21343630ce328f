"""torch.distributed on the gloo backend (CPU), 2 and 3 processes: lightly's convention.

Each rank computes its own rows' loss against every rank's keys (gathered, or passed round the ring)
and returns their mean.  Checked against one process on the concatenated batch: the mean of the
ranks' losses is its loss, each rank's input gradient is W times its gradient on those rows (the
gather's backward sums over ranks), and in a *plain* DDP loop -- no sslcore trainer -- the averaged
parameter gradients, the updated parameters and the updated state (queues, memories, BatchNorm
statistics) are the single process's, for every method; the trainer likewise.  One spawn per world
size runs every case."""
import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sslcore.dist
import sslcore.train.loop as loop
from sslcore import BarlowTwinsLoss, DCLLoss, DCLWLoss, InfoNCELoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss
from sslcore.data import load_dataset
from sslcore.functional import infonce_messages, supcon
from sslcore.methods import METHODS, method_options
from sslcore.train import PretrainConfig, pretrain

pytestmark = pytest.mark.distributed
WORLDS = (2, 3)
N, D = 7, 20  # rows per rank: odd, so that tiles straddle the rank boundary


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Losses on plain inputs.

def _labels(ids):
    """SupCon's labels of the two views of samples ``ids``: a label per sample, 4 labels in all."""
    return torch.cat([ids, ids]) % 4


LOSSES = {  # name -> gather mode -> (out0, out1, sample ids) -> loss
    "ntxent": lambda g: lambda a, b, ids: NTXentLoss(0.3, gather_distributed=g, backend="torch")(a, b),
    "ntxent-triton": lambda g: lambda a, b, ids: NTXentLoss(0.3, gather_distributed=g, backend="triton")(a, b),
    "ntxent-bank": lambda g: lambda a, b, ids: NTXentLoss(0.3, memory_bank_size=(30, D), gather_distributed=g,
                                                           backend="torch")(a, b),
    "moco": lambda g: lambda a, b, ids: InfoNCELoss(0.2, memory_bank_size=(30, D), gather_distributed=g,
                                                     backend="torch")(a, b),
    "clip": lambda g: lambda a, b, ids: InfoNCELoss(0.2, symmetric=True, gather_distributed=g, backend="torch")(a, b),
    "mocov3": lambda g: lambda a, b, ids: InfoNCELoss(1.0, gather_distributed=g, backend="torch")(a, b),  # no queue
    "byol": lambda g: lambda a, b, ids: NegativeCosineSimilarity()(a, b),  # a local mean: nothing to gather
    "dcl": lambda g: lambda a, b, ids: DCLLoss(0.2, gather_distributed=g, backend="torch")(a, b),
    "dclw": lambda g: lambda a, b, ids: DCLWLoss(0.2, gather_distributed=g, backend="torch")(a, b),
    "barlowtwins": lambda g: lambda a, b, ids: BarlowTwinsLoss(0.3, gather_distributed=g)(a, b),
    "vicreg": lambda g: lambda a, b, ids: VICRegLoss(2.0, 3.0, 0.5, gather_distributed=g)(0.5 * a, b),
    "supcon": lambda g: lambda a, b, ids: supcon(torch.cat([a, b]), _labels(ids), temperature=0.3,
                                                 gather_distributed=g, backend="torch"),
}
RING = ("ntxent", "moco", "clip", "mocov3", "dcl", "dclw")  # the losses with a ring mode


def _inputs(seed, world):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(world * N, D, generator=g, dtype=torch.float64) for _ in range(2)]


def _loss_and_grads(fn, a, b, ids):
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = fn(a, b, ids)
    return (loss.detach(), *torch.autograd.grad(loss, (a, b)))


def _loss_cases(seed, world):
    """This rank's (loss, grad a, grad b) of every loss and mode; the banks after the step too."""
    a, b = _inputs(seed, world)
    mine = slice(sslcore.dist.rank() * N, (sslcore.dist.rank() + 1) * N)
    out = {}
    for name, make in LOSSES.items():
        for mode in (True, "ring") if name in RING else (True,):
            a_, b_ = (a.float(), b.float()) if name == "ntxent-triton" else (a, b)
            out[name, mode] = _loss_and_grads(make(mode), a_[mine], b_[mine], torch.arange(world * N)[mine])
    bank = NTXentLoss(0.3, memory_bank_size=(30, D), gather_distributed=True, backend="torch")
    bank(a[mine].clone().requires_grad_(True), b[mine])
    out["bank-after"] = bank.memory.bank.clone()
    z = torch.cat([a[mine], b[mine]])
    out["messages"] = infonce_messages(z, temperature=0.4, gather_distributed=True, backend="torch")
    return out


def test_losses(distributed_runs):
    for world, (seed, results) in distributed_runs.items():
        a, b = _inputs(seed, world)
        for (name, mode), local in ((k, v) for k, v in results[0]["losses"].items() if isinstance(k, tuple)):
            a_, b_ = (a.float(), b.float()) if name == "ntxent-triton" else (a, b)
            tol = dict(rtol=1e-4, atol=1e-5) if name == "ntxent-triton" else dict(rtol=1e-9, atol=1e-10)
            loss, g0, g1 = _loss_and_grads(LOSSES[name](False), a_, b_, torch.arange(world * N))
            ranks = [results[r]["losses"][name, mode] for r in range(world)]
            what = f"{name} ({'ring' if mode == 'ring' else 'gather'}), {world} ranks"
            torch.testing.assert_close(torch.stack([r[0] for r in ranks]).mean(), loss, **tol,
                                       msg=lambda e: f"{what}: loss: {e}")
            for r, (_, r0, r1) in enumerate(ranks):
                mine = slice(r * N, (r + 1) * N)
                torch.testing.assert_close(r0, world * g0[mine], **tol,
                                           msg=lambda e: f"{what}: grad of out0, rank {r}: {e}")
                torch.testing.assert_close(r1, world * g1[mine], **tol,
                                           msg=lambda e: f"{what}: grad of out1, rank {r}: {e}")
        single = NTXentLoss(0.3, memory_bank_size=(30, D), backend="torch")
        single(a.clone().requires_grad_(True), b)
        for r in range(world):  # every rank's bank took every rank's out1 rows, in rank order
            torch.testing.assert_close(results[r]["losses"]["bank-after"], single.memory.bank)
        loss, g_align, g_unif = infonce_messages(torch.cat([a, b]).reshape(2, world, N, D).transpose(0, 1)
                                                 .reshape(-1, D), temperature=0.4,
                                                 pos_index=_block_pairs(world), backend="torch")
        for r in range(world):
            r_loss, r_align, r_unif = results[r]["losses"]["messages"]
            rows = slice(r * 2 * N, (r + 1) * 2 * N)
            torch.testing.assert_close(r_loss, loss, msg=lambda e: f"messages: loss, {world} ranks: {e}")
            torch.testing.assert_close(r_align, g_align[rows], msg=lambda e: f"alignment messages, rank {r}: {e}")
            torch.testing.assert_close(r_unif, g_unif[rows], msg=lambda e: f"uniformity messages, rank {r}: {e}")


def _block_pairs(world):
    """The positives of rows stacked rank by rank ([a_r; b_r] per rank): each row's other view."""
    rows = torch.arange(world * 2 * N)
    return rows // (2 * N) * 2 * N + (rows % (2 * N) + N) % (2 * N)


# ---------------------------------------------------------------------------------------------
# A plain DDP loop (no sslcore trainer), one step of every method.

STEP_METHODS = {
    "simclr": {}, "simclr-ring": {"gather_distributed": "ring"}, "moco": {"queue_size": 72},
    "moco-ring": {"queue_size": 72, "gather_distributed": "ring"},
    "moco-symmetric": {"queue_size": 72, "symmetric": True},
    "simsiam": {}, "arcl": {}, "arcl-penalty": {"mode": "penalty"}, "arcl-moco": {"base": "moco", "queue_size": 72},
    "simclr-attn": {}, "simclr-attn-alignment": {"weighting": "alignment"}, "simsiam-multi": {"mix_epoch": 1},
    "nnclr": {"queue_size": 36}, "dino": {"local_crops": 2, "out_dim": 64}, "byol": {}, "mocov3": {},
    "mocov3-ring": {"gather_distributed": "ring"},
    "barlowtwins": {}, "vicreg": {},
}
STEP_BATCH = 12  # images: 6 per rank at 2 ranks, 4 at 3


class _Step(nn.Module):
    """The method's loss as a module's forward, so that DDP sees the whole step."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, views, index, epoch):
        return self.method.loss(views, index=index, epoch=epoch)


def _plain_step(case, seed, steps=2):
    """``steps`` SGD steps of a seeded float64 model on a seeded, augmented batch: in a process group, each
    rank its shard under DDP (SyncBatchNorm, ``gather_distributed``); without one, the whole batch.  Returns
    the losses, the last step's gradients, the updated parameters and buffers."""
    name = max((m for m in METHODS if case.startswith(m)), key=len)  # "moco-ring" -> "moco"
    options, accepted = dict(STEP_METHODS[case]), method_options(name)
    if "backend" in accepted:
        options["backend"] = "torch"
    data = load_dataset("digits")
    data.x_train = data.x_train[:200].double()
    world = sslcore.dist.world_size()
    if world > 1 and "gather_distributed" in accepted:
        options.setdefault("gather_distributed", True)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        method = sslcore.dist.convert_sync_batchnorm(METHODS[name].create(data, encoder="smallcnn", **options), "cpu")
        step = nn.parallel.DistributedDataParallel(_Step(method)) if world > 1 else _Step(method)
    finally:
        torch.set_default_dtype(default)
    opt = torch.optim.SGD(method.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(1, steps + 1):
        index = torch.randperm(len(data.x_train), generator=g)[:STEP_BATCH]
        views = [data.augment(data.x_train[index], g) for _ in range(method.n_views)]
        per_rank = STEP_BATCH // world
        mine = slice(sslcore.dist.rank() * per_rank, (sslcore.dist.rank() + 1) * per_rank)
        opt.zero_grad()
        loss = step([v[mine] for v in views], index[mine], epoch)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    return (torch.stack(losses), grads, {n: p.detach().clone() for n, p in method.named_parameters()},
            {n: b.clone() for n, b in method.named_buffers()})


def test_plain_ddp_loop_equals_one_process(distributed_runs):
    for world, (seed, results) in distributed_runs.items():
        for case in STEP_METHODS:
            losses, grads, params, buffers = _plain_step(case, seed)
            ranks = [results[r]["steps"][case] for r in range(world)]
            what = f"{case}, {world} ranks"
            torch.testing.assert_close(torch.stack([r[0] for r in ranks]).mean(0), losses, rtol=1e-7, atol=1e-9,
                                       msg=lambda e: f"{what}: loss: {e}")
            scale = max(g.abs().max().item() for g in grads.values())
            for r, (_, r_grads, r_params, r_buffers) in enumerate(ranks):
                assert r_grads.keys() == grads.keys(), what
                for key, g in grads.items():  # DDP's average over ranks: the single-process gradient
                    torch.testing.assert_close(r_grads[key], g, rtol=1e-6, atol=1e-9 * scale,
                                               msg=lambda e: f"{what}: grad {key}, rank {r}: {e}")
                for key, p in params.items():
                    torch.testing.assert_close(r_params[key], p, rtol=1e-7, atol=1e-10,
                                               msg=lambda e: f"{what}: {key}, rank {r}: {e}")
                for key, b in buffers.items():  # queues, memories, BatchNorm statistics
                    torch.testing.assert_close(r_buffers[key], b, rtol=1e-7, atol=1e-10,
                                               msg=lambda e: f"{what}: {key}, rank {r}: {e}")


# ---------------------------------------------------------------------------------------------
# The trainer.

RUN = dict(epochs=1, batch_size=30, limit=60, backend="torch", overwrite=True)  # 2 steps; 30 = 2 x 15 = 3 x 10
TRAINER_METHODS = ("barlowtwins", "vicreg")  # losses of global batch statistics, not of each rank's rows


def test_ddp_pretrain_matches_single_process_and_only_rank0_writes(distributed_runs, tmp_path):
    single = pretrain(PretrainConfig(out=str(tmp_path), **RUN))
    one_ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    one_model, one_head = one_ckpt["model"], one_ckpt["online_linear"]["head"]
    for world, (_, results) in distributed_runs.items():
        out = results[0]["trainer_out"]
        assert f"multiple of the number of processes ({world})" in results[0]["batch_error"]
        summary = results[0]["summary"]
        assert all(results[r]["summary"] == summary for r in range(world)) and summary["world_size"] == world
        assert sorted(p.name for p in out.iterdir()) == [".sslcore-run.json", "checkpoint.pt", "config.yaml",
                                                          "metrics.jsonl", "steps.jsonl", "summary.json", "tensorboard"]
        # same data order, views and (synchronised) batch statistics: the same losses up to float reordering
        assert summary["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4)
        ddp_ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        ddp_model = ddp_ckpt["model"]
        # the online linear head: each rank's shard, gradients averaged, BatchNorm synchronised
        for key, value in one_head.items():
            torch.testing.assert_close(ddp_ckpt["online_linear"]["head"][key], value, rtol=1e-3, atol=1e-4,
                                       msg=lambda e: f"online head {key}, {world} ranks: {e}")
        for key, value in one_model.items():
            torch.testing.assert_close(ddp_model[key], value, rtol=1e-3, atol=1e-4,
                                       msg=lambda e: f"{key}, {world} ranks: {e}")


# issue 22's EMA-target methods: SyncBatchNorm in both networks, MoCo v3's keys gathered.  SGD, not AdamW: BYOL's
# projector.3.bias has an identically zero gradient (the predictor's BatchNorm removes a shift), and AdamW turns
# its float rounding noise (which differs with the reduction order) into steps of size lr.
TARGETS = ("byol", "mocov3")
TARGET_RUN = dict(RUN, optimizer="sgd")


def test_ddp_pretrain_of_momentum_target_methods_matches_single_process(distributed_runs, tmp_path):
    for method in TARGETS:
        single = pretrain(PretrainConfig(out=str(tmp_path / method), method=method, **TARGET_RUN))
        one_model = torch.load(tmp_path / method / "checkpoint.pt", weights_only=True)["model"]
        for world, (_, results) in distributed_runs.items():
            summary = results[0]["momentum_targets"][method]
            assert summary["world_size"] == world
            assert summary["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4), (method, world)
            ddp_model = torch.load(f"{results[0]['trainer_out']}-{method}/checkpoint.pt", weights_only=True)["model"]
            assert any(k.startswith("target_") for k in ddp_model)
            for key, value in one_model.items():
                torch.testing.assert_close(ddp_model[key], value, rtol=1e-3, atol=1e-4,
                                           msg=lambda e: f"{method}: {key}, {world} ranks: {e}")


def _no_probes(data, encoder, **kw):
    return {"linear": 0.0, "knn": 0.0}


def test_ddp_pretrain_of_batch_statistics_methods_matches_single_process(distributed_runs, tmp_path, monkeypatch):
    """Barlow Twins' cross-correlation and VICReg's variance/covariance over the global batch: the trainer's
    losses and weights under DDP are the single process's (probes stubbed: the SimCLR run covers them).
    VICReg's expander biases sit right before a BatchNorm: their gradient is 0 but for round-off, which AdamW
    scales to steps of about lr, so they are held to that bound, not to the others' tolerance."""
    monkeypatch.setattr(loop, "probe", _no_probes)
    peak_lr = PretrainConfig(**RUN).peak_lr
    for method in TRAINER_METHODS:
        single = pretrain(PretrainConfig(out=str(tmp_path / method), method=method, **RUN))
        one_model = torch.load(tmp_path / method / "checkpoint.pt", weights_only=True)["model"]
        for world, (_, results) in distributed_runs.items():
            summaries = [results[r][method] for r in range(world)]
            assert all(s == summaries[0] for s in summaries) and summaries[0]["world_size"] == world
            assert summaries[0]["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4), (method, world)
            ddp_model = torch.load(results[0]["trainer_out"].with_name(f"run-{method}") / "checkpoint.pt",
                                   weights_only=True)["model"]
            for key, value in one_model.items():
                if method == "vicreg" and key in ("projector.0.bias", "projector.3.bias"):
                    assert (ddp_model[key] - value).abs().max() <= 2 * 2 * peak_lr, (method, key, world)
                    continue
                torch.testing.assert_close(ddp_model[key], value, rtol=1e-3, atol=1e-4,
                                           msg=lambda e: f"{method}: {key}, {world} ranks: {e}")


# ---------------------------------------------------------------------------------------------
# One spawn per world size.

def _worker(rank, world, port, seed, out, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = {"losses": _loss_cases(seed, world), "steps": {c: _plain_step(c, seed) for c in STEP_METHODS}}
        try:
            pretrain(PretrainConfig(out=out, **{**RUN, "batch_size": world + 1}))
        except ValueError as e:
            mine["batch_error"] = str(e)
        mine["summary"] = pretrain(PretrainConfig(out=out, **RUN))
        mine["momentum_targets"] = {m: pretrain(PretrainConfig(out=f"{out}-{m}", method=m, **TARGET_RUN))
                                    for m in TARGETS}
        loop.probe = _no_probes
        for method in TRAINER_METHODS:
            mine[method] = pretrain(PretrainConfig(out=f"{out}-{method}", method=method, **RUN))
        mine["trainer_out"] = Path(out)
        results[rank] = mine
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    runs = {}
    for world in WORLDS:
        seed = int.from_bytes(os.urandom(4), "little") % 2**31
        results = mp.Manager().dict()
        out = tmp_path_factory.mktemp(f"ddp{world}") / "run"
        mp.spawn(_worker, args=(world, _free_port(), seed, str(out), results), nprocs=world, join=True)
        runs[world] = (seed, dict(results))
    return runs


def test_sync_batchnorm_is_plain_batchnorm_in_one_process(seed):
    bn = torch.nn.BatchNorm2d(5, momentum=None)
    sync = sslcore.dist.convert_sync_batchnorm(torch.nn.Sequential(copy.deepcopy(bn)), "cpu")[0]
    assert isinstance(sync, sslcore.dist.SyncBatchNorm)
    x = torch.randn(6, 5, 3, 3)
    torch.testing.assert_close(sync(x), bn(x))
    torch.testing.assert_close(sync.running_var, bn.running_var)


def test_gather_and_ring_are_identities_in_one_process(seed):
    x = torch.randn(5, 4, requires_grad=True)
    assert sslcore.dist.gather(x) is x
    lse = sslcore.dist.ring_lse(x, x, scale=2.0, exclude_own=True, backend="torch")
    s = (x @ x.T * 2.0).fill_diagonal_(float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, 1).detach())


def test_torchrun_runs_the_cli_as_one_process_would(tmp_path):
    """The real entry point: ``torchrun --nproc_per_node 2 -m sslcore pretrain`` (gloo on CPU) joins the group from
    torchrun's environment, writes one run folder from rank 0, and ends where one process on the whole batch ends
    (BYOL: its EMA target and SyncBatchNorm in both networks; SGD as above)."""
    import subprocess
    import sys

    argv = ["pretrain", "--method", "byol", "--data", "digits", "--epochs", "1", "--batch-size", "30", "--limit",
            "60", "--backend", "torch", "--optimizer", "sgd", "--no-online-linear"]
    single = pretrain(PretrainConfig(out=str(tmp_path / "one"), method="byol", online_linear=False, **TARGET_RUN))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "sslcore", *argv, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["config"]["method"] == "byol"
    assert summary["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4)
