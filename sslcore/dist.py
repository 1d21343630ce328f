"""torch.distributed helpers: an all-gather whose backward sums over ranks, a ring of key blocks,
and BatchNorm over the global batch.

Convention (lightly's): with ``gather_distributed`` a loss computes **its own rank's rows** against the
keys gathered from every rank and returns the mean over its rows.  :func:`gather`'s backward sums the
gradients of the gathered tensor over ranks (an all-reduce) and keeps this rank's slice, so each
rank's inputs receive the gradient of every rank's loss.  DDP's average of parameter gradients is then
exactly the gradient of the single-process loss on the concatenated batch -- in any DDP loop, with no
scaling -- and each rank does 1/W of the loss work.

:func:`ring_lse` computes the same row log-sum-exps without gathering: key blocks travel round the
ring of ranks (``isend``/``irecv``, overlapped with the local tiles), so a rank holds O(M/W . D) keys,
not O(M . D); its backward rotates the blocks again, each with its gradient, back to their owners.

BatchNorm: the trainer replaces every BatchNorm by :class:`SyncBatchNorm` (torch's own on CUDA;
torch's refuses CPU tensors, so on CPU this module's, over two differentiable all-reduces), so
that batch statistics are the global batch's, as in one process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from . import kernels


def is_distributed() -> bool:
    """Whether a torch.distributed process group is running."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the running group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the running group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0 of the running group, or of the one torchrun describes (``RANK``) before/after it exists."""
    return rank() == 0 if is_distributed() else int(os.environ.get("RANK", "0")) == 0


def local_rank() -> int:
    """The rank on this node, as torchrun sets ``LOCAL_RANK`` (0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device_type: str) -> bool:
    """Join the process group that torchrun describes (``WORLD_SIZE`` > 1 in the environment) unless one
    exists: nccl for CUDA, gloo otherwise.  Returns whether this call created it (then destroy it)."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return True


def _check_same_rows(x: torch.Tensor) -> None:
    """Every rank must contribute the same number of rows (one small all-gather)."""
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"gather_distributed needs the same batch size on every rank, got {sizes}")


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward: the gradient summed over ranks, this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather(x: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order); differentiable, the gradient summed over
    ranks (see the module docstring); identity if not distributed.  ``check``: refuse unequal sizes
    (one extra small all-gather)."""
    if world_size() == 1:
        return x
    if check:
        _check_same_rows(x)
    return _GatherWithGrad.apply(x)


def _pass_on(t: torch.Tensor, tag: int):
    """Send ``t`` to the next rank of the ring and receive the previous rank's into a new buffer
    (asynchronously; :func:`_arrived` waits).  ``tag`` keeps concurrent transfers apart."""
    w, r = dist.get_world_size(), dist.get_rank()
    buf = torch.empty_like(t)
    ops = [dist.P2POp(dist.isend, t.contiguous(), (r + 1) % w, tag=tag),
           dist.P2POp(dist.irecv, buf, (r - 1) % w, tag=tag)]
    return [buf], dist.batch_isend_irecv(ops)


def _arrived(pending) -> list[torch.Tensor]:
    bufs, works = pending
    for work in works:
        work.wait()
    return bufs


class _RingLSE(torch.autograd.Function):
    """Row LSEs of ``scale q . K^T`` over every rank's key block ``K_r`` (each rank's own block ``k``),
    the blocks passed round the ring; backward: the query side from every block, and each block's
    key-side gradient accumulated as it travels and handed back to its owner."""

    @staticmethod
    def forward(ctx, q, k, scale, unit_norm, exclude_own, backend):
        w, wide = dist.get_world_size(), torch.promote_types(q.dtype, torch.float32)
        lse = torch.full((q.shape[0],), float("-inf"), device=q.device, dtype=wide)
        blk = k.detach()
        for t in range(w):
            pending = _pass_on(blk, 1) if t < w - 1 else None  # the next block is in flight while this one runs
            own = 0 if t == 0 and exclude_own else None
            part = kernels.lse_similarity(q.detach(), blk, scale=scale, unit_norm=unit_norm,
                                          self_offset=own, backend=backend)
            lse = torch.logaddexp(lse, part.to(wide))
            if pending is not None:
                blk, = _arrived(pending)
        ctx.save_for_backward(q, k, lse)
        ctx.scale, ctx.exclude_own, ctx.backend = scale, exclude_own, backend
        return lse

    @staticmethod
    def backward(ctx, g):
        q, k, lse = ctx.saved_tensors
        w, key_grad, wide = dist.get_world_size(), ctx.needs_input_grad[1], lse.dtype
        args = dict(scale=ctx.scale, backend=ctx.backend)
        dq = torch.zeros(q.shape, device=q.device, dtype=wide)
        blk, gblk = k.detach(), torch.zeros(k.shape, device=k.device, dtype=wide) if key_grad else None
        for t in range(w):
            pending = _pass_on(blk, 1) if t < w - 1 else None
            own = 0 if t == 0 and ctx.exclude_own else None
            dq += kernels.lse_grad(q.detach(), blk, lse, g, side="rows", self_offset=own, **args).to(wide)
            if key_grad:  # this rank's share of the block's gradient; the block's owner gets the sum
                gblk += kernels.lse_grad(q.detach(), blk, lse, g, side="keys", self_offset=own, **args).to(wide)
                gblk, = _arrived(_pass_on(gblk, 2))  # after the last step it is back with its owner
            if pending is not None:
                blk, = _arrived(pending)
        return dq.to(q.dtype), gblk.to(k.dtype) if key_grad else None, None, None, None, None


def ring_lse(q: torch.Tensor, k: torch.Tensor, *, scale: float, unit_norm: bool = False, exclude_own: bool = False,
             backend: str = "auto") -> torch.Tensor:
    """``LSE_i = log sum_j exp(scale q_i . K_j)`` over the key blocks ``k`` of all ranks (rank order),
    differentiable in ``q`` and ``k``, holding two blocks at a time, never all of K.  ``exclude_own``:
    ``q`` and ``k`` are this rank's rows in the self form, row i's own key (row i of ``k``) left out.
    Not distributed: one block, the plain LSE."""
    if world_size() == 1:
        return kernels.lse_similarity(q, k, scale=scale, unit_norm=unit_norm, self_offset=0 if exclude_own else None,
                                      backend=backend)
    _check_same_rows(k)
    return _RingLSE.apply(q, k, scale, unit_norm, exclude_own, backend)


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
