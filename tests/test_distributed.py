"""2 processes on the gloo backend (CPU): each rank's loss and the gradient w.r.t. its own inputs
equal the single-process result on the concatenated batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sslcore import InfoNCELoss, NTXentLoss

pytestmark = pytest.mark.distributed
WORLD = 2
N, D = 9, 20  # rows per rank: odd, so that tiles straddle the rank boundary


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(WORLD * N, D, generator=g) for _ in range(2)]


def _worker(rank, port, seed, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        a, b = _data(seed)
        mine = slice(rank * N, (rank + 1) * N)
        out = {}
        for name, loss_fn in (("ntxent", NTXentLoss(temperature=0.3, gather_distributed=True)),
                              ("infonce", InfoNCELoss(temperature=0.2, gather_distributed=True))):
            x0, x1 = a[mine].clone().requires_grad_(True), b[mine].clone().requires_grad_(True)
            loss = loss_fn(x0, x1)
            g0, g1 = torch.autograd.grad(loss, (x0, x1))
            out[name] = (loss.detach(), g0, g1)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_gathered_loss_equals_single_process():
    seed = int.from_bytes(os.urandom(4), "little")
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), seed, results), nprocs=WORLD, join=True)
    a, b = _data(seed)
    for name, loss_fn in (("ntxent", NTXentLoss(temperature=0.3)), ("infonce", InfoNCELoss(temperature=0.2))):
        x0, x1 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = loss_fn(x0, x1)
        g0, g1 = torch.autograd.grad(loss, (x0, x1))
        for rank in range(WORLD):
            r_loss, r_g0, r_g1 = results[rank][name]
            mine = slice(rank * N, (rank + 1) * N)
            torch.testing.assert_close(r_loss, loss.detach(), rtol=1e-6, atol=1e-6, msg=f"{name} loss, rank {rank}")
            torch.testing.assert_close(r_g0, g0[mine], rtol=1e-5, atol=1e-7, msg=f"{name} grad out0, rank {rank}")
            torch.testing.assert_close(r_g1, g1[mine], rtol=1e-5, atol=1e-7, msg=f"{name} grad out1, rank {rank}")
