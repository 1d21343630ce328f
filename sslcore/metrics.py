"""Oversmoothing / dimensional-collapse metrics of token or node representations, and per-layer hooks.

Both take ``x`` [N, D] (one set of rows: a graph's nodes) or [B, L, D] (B sequences: the metric
of each sequence's L rows, averaged over B).  They run in float64 without gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _sets(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"x must be a [N, D] or [B, L, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    x = x.detach().to(torch.float64)
    return x[None] if x.dim() == 2 else x


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity over pairs of distinct rows, ``1/(n(n-1)) sum_{i != j} x_i.x_j / (|x_i||x_j|)``.

    Computed without the n x n matrix: ``sum_{i != j} u_i.u_j = |sum_i u_i|^2 - sum_i |u_i|^2`` for
    the unit rows ``u_i`` (a zero row counts as similarity 0).  1 means all rows point the same way.
    """
    x = _sets(x)
    n = x.shape[1]
    if n < 2:
        raise ValueError(f"mean_pairwise_cosine needs at least 2 rows per set, got {n}")
    u = F.normalize(x, dim=-1)
    pairs = u.sum(1).square().sum(-1) - u.square().sum((1, 2))
    return (pairs / (n * (n - 1))).mean().item()


def effective_rank(x: torch.Tensor) -> float:
    """``exp(H(p))`` with ``p = sigma / sum(sigma)`` over the singular values ``sigma`` of x (no centring).

    Between 1 (all rows parallel) and ``min(n, D)`` (equal singular values, e.g. orthonormal rows).
    """
    sigma = torch.linalg.svdvals(_sets(x))
    p = sigma / sigma.sum(-1, keepdim=True).clamp_min(torch.finfo(sigma.dtype).tiny)
    return torch.special.entr(p).sum(-1).exp().mean().item()


class LayerStats:
    """Records ``mean_pairwise_cosine`` and ``effective_rank`` of chosen modules' outputs via forward hooks.

    ``targets``: module names (as in ``model.named_modules()``, kept in that order) or module
    types.  Use as a context manager around forward passes; ``stats.layers`` is then one dict per
    layer, ``{"name", "mean_cosine", "effective_rank"}``, averaged over the recorded calls::

        with LayerStats(vit, [f"blocks.{i}" for i in range(depth)] + ["norm"]) as stats:
            vit(images)
        stats.layers[-1]["effective_rank"]
    """

    def __init__(self, model: nn.Module, targets):
        if isinstance(targets, type) or (isinstance(targets, tuple) and all(isinstance(t, type) for t in targets)):
            self.modules = [(n, m) for n, m in model.named_modules() if isinstance(m, targets)]
        else:
            named = dict(model.named_modules())
            missing = [t for t in targets if t not in named]
            if missing:
                raise ValueError(f"no module named {missing} in the model")
            self.modules = [(t, named[t]) for t in targets]
        if not self.modules:
            raise ValueError(f"no module of the model matches {targets!r}")
        self._records = {name: [] for name, _ in self.modules}
        self._handles = []

    def __enter__(self) -> LayerStats:
        for name, module in self.modules:
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            self._records[name].append((mean_pairwise_cosine(out), effective_rank(out)))
        return hook

    @property
    def layers(self) -> list[dict]:
        rows = []
        for name, _ in self.modules:
            rec = self._records[name]
            if rec:
                cos, rank = (sum(v) / len(rec) for v in zip(*rec))
                rows.append({"name": name, "mean_cosine": cos, "effective_rank": rank})
        return rows


__all__ = ["LayerStats", "effective_rank", "mean_pairwise_cosine"]
