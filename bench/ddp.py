"""``python -m bench infonce --world-size 1,2,4``: NT-Xent under data parallelism, per rank.

For each world size W, W processes (gloo on CPU, nccl on GPUs) each hold M/W rows of a fixed global
batch of M two-view rows and time the forward + backward of their own loss (lightly's convention:
their rows against every rank's keys), gathered (``gather_distributed=True``) and passed round the
ring (``"ring"``).  Per row: the slowest rank's median time, the loss FLOPs one rank performs
(3 x 2 (M/W) M D: 1/W of the whole), and the memory that shows the ring's point -- the bytes one rank
keeps for backward (``saved MiB``, from ``saved_tensors_hooks``: the gathered keys are M x D, the
ring's own block M/W x D) and, on a GPU, the peak extra memory of the step.
"""
from __future__ import annotations

import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.harness import DTYPE_NAMES, environment

TAU = 0.5
CPU_SHAPE, GPU_SHAPE = (4096, 128), (65536, 256)
MODES = {"gather": True, "ring": "ring"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _saved_mib(fn) -> float:
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        fn()
    return sum(sizes) / 2**20


def _worker(rank, world, port, m, d, runs, results):
    from sslcore.functional import nt_xent

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        g = torch.Generator().manual_seed(0)
        half = m // 2 // world  # this rank's samples; two views each
        x0 = torch.randn(half, d, generator=g).to(device, torch.bfloat16 if cuda else torch.float32)
        x1 = torch.randn(half, d, generator=g).to(x0)
        out = {}
        for name, mode in MODES.items():
            a, b = x0.clone().requires_grad_(True), x1.clone().requires_grad_(True)

            def step():
                loss = nt_xent(a, b, temperature=TAU, gather_distributed=mode)
                torch.autograd.grad(loss, (a, b))
                if cuda:
                    torch.cuda.synchronize()
            step()  # warm-up: compile, autotune
            saved = _saved_mib(lambda: nt_xent(a, b, temperature=TAU, gather_distributed=mode))
            peak = None
            if cuda:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            times = []
            for _ in range(runs):
                dist.barrier()
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            ms = torch.tensor([statistics.median(times) * 1e3], dtype=torch.float64)
            if cuda:
                ms = ms.to(device)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the slowest rank sets the step
            out[name] = (float(ms), saved, peak)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def rows(world_sizes: list[int], quick: bool = False) -> list[dict]:
    """One row per (world size, mode), measured in ``W`` fresh processes each."""
    cuda = torch.cuda.is_available()
    m, d = GPU_SHAPE if cuda else CPU_SHAPE
    if quick:
        m //= 4
    if cuda and max(world_sizes) > torch.cuda.device_count():
        raise ValueError(f"--world-size {max(world_sizes)} needs as many GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    out = []
    for world in world_sizes:
        if m % (2 * world):
            raise ValueError(f"the global batch {m} is not divisible by 2 x {world}")
        results = mp.Manager().dict()
        mp.spawn(_worker, args=(world, _free_port(), m, d, 5 if quick else 20, results), nprocs=world, join=True)
        for name in MODES:
            ms, saved, peak = results[0][name]
            flops = 3 * 2.0 * (m // world) * m * d
            out.append({**environment(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "op": "infonce-ddp",
                        "impl": f"sslcore-{name}", "dtype": DTYPE_NAMES[torch.bfloat16 if cuda else torch.float32],
                        "shape": {"W": world, "M": m, "D": d}, "flops": flops, "median_ms": ms,
                        "peak_extra_mib": peak, "saved_mib": saved, "tflops": flops / (ms * 1e-3) / 1e12,
                        "frac_bf16_peak": None, "passes": None, "status": "ok",
                        "note": f"nt_xent(gather_distributed={MODES[name]!r}) per rank: its M/W rows, "
                                f"{'nccl' if cuda else 'gloo'}; ms of the slowest rank"})
    return out
