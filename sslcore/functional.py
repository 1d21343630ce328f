"""``torch.nn.functional``-style entry points (tensors positional, options keyword-only)."""
from __future__ import annotations

import torch

from .kernels import infonce, infonce_messages, lse_similarity


def nt_xent(out0: torch.Tensor, out1: torch.Tensor, *, temperature: float = 0.5, weight: torch.Tensor | None = None,
            reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """SimCLR's NT-Xent of two views ``[N, D]`` each (row i of out0 pairs with row i of out1)."""
    if out0.shape != out1.shape:
        raise ValueError(f"out0 and out1 must have the same shape, got {tuple(out0.shape)} and {tuple(out1.shape)}")
    w = torch.cat([weight, weight]) if weight is not None else None
    return infonce(torch.cat([out0, out1]), temperature=temperature, weight=w, reduction=reduction, backend=backend)


def supcon(z: torch.Tensor, labels: torch.Tensor, *, temperature: float = 0.1, reduction: str = "mean",
           backend: str = "auto") -> torch.Tensor:
    """Supervised contrastive loss: positives of row i are all other rows with its label."""
    return infonce(z, temperature=temperature, labels=labels, reduction=reduction, backend=backend)


__all__ = ["infonce", "infonce_messages", "lse_similarity", "nt_xent", "supcon"]
