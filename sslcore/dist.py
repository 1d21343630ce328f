"""torch.distributed helpers: all-gather that keeps the gradient.

Convention: every rank gathers the whole batch (with gradient) and computes the *global* loss, so
each rank's loss and the gradient w.r.t. its own inputs equal the single-process result on the
concatenated batch.  The backward hands each rank its own slice of the (already global) gradient,
with no further reduction.  DDP then *averages* parameter gradients across ranks, which would
divide them by the world size; a trainer that wants the single-process update multiplies the
loss by :func:`world_size` before ``backward`` (sslcore's trainer does, for every method that takes
``gather_distributed``; such a method must return the *global* loss on every rank, all of its
terms computed on gathered tensors).  A method without ``gather_distributed`` returns the mean
over its own shard, and DDP's average of those is already the global mean: no scaling.

BatchNorm: the trainer replaces every BatchNorm by :class:`SyncBatchNorm` (torch's own on CUDA;
torch's refuses CPU tensors, so on CPU this module's, over two differentiable all-reduces), so
that batch statistics are the global batch's, as in one process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0 of the running group, or of the one torchrun describes (``RANK``) before/after it exists."""
    return rank() == 0 if is_distributed() else int(os.environ.get("RANK", "0")) == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device_type: str) -> bool:
    """Join the process group that torchrun describes (``WORLD_SIZE`` > 1 in the environment) unless one
    exists: nccl for CUDA, gloo otherwise.  Returns whether this call created it (then destroy it)."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return True


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


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the gradients over ranks (every rank's output used ``x``)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``x`` over ranks; identity if not distributed."""
    return _AllReduceSum.apply(x) if world_size() > 1 else x


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on any device: in training with several ranks, the channel mean
    ``mu = sum_ranks sum x / n`` and biased variance ``sum_ranks sum (x - mu)^2 / n`` come from
    differentiable all-reduces; running statistics get the unbiased variance, as in torch.
    Otherwise it is plain BatchNorm (same parameters and buffers, so state dicts are interchangeable)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        dist.all_reduce(count)
        n = count.item()
        mean = all_reduce_sum(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * (n / max(n - 1, 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every ``BatchNorm*d`` of ``module`` synchronised across ranks (torch's on CUDA, :class:`SyncBatchNorm`
    elsewhere), keeping the same parameter and buffer objects."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device_type))
    return out
