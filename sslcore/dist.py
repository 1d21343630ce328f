"""torch.distributed helpers: all-gather that keeps the gradient.

Convention: every rank gathers the whole batch (with gradient) and computes the *global* loss, so
each rank's loss and the gradient w.r.t. its own inputs equal the single-process result on the
concatenated batch.  The backward hands each rank its own slice of the (already global) gradient,
with no further reduction.  DDP then *averages* parameter gradients across ranks, which would
divide them by the world size; a trainer that wants the single-process update multiplies the
loss by :func:`world_size` before ``backward`` (sslcore's trainer does).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        sizes = [int(s) for s in sizes]
        if len(set(sizes)) != 1:
            raise ValueError(f"gather_distributed needs the same batch size on every rank, got {sizes}")
        out = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order), differentiable; identity if not distributed."""
    return _GatherWithGrad.apply(x) if world_size() > 1 else x
