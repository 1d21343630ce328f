"""Contrastive loss modules (lightly-style ``forward(out0, out1)``) over the fused InfoNCE op."""
from __future__ import annotations

import torch
from torch import nn

from . import dist
from .checks import Backend, NonNegativeInt, Temperature, check_value
from .kernels import infonce


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent on two views: ``infonce(cat[out0, out1])``, positive of row i is row i+N.

    ``gather_distributed=True`` gathers both views from every rank (with gradient) first, so the
    loss is the one of the concatenated global batch (see :mod:`sslcore.dist`).  Each view needs at
    least 2 rows (over all ranks): a row's negatives are the other samples.
    """

    def __init__(self, temperature: Temperature = 0.5, gather_distributed: bool = False, backend: Backend = "auto"):
        super().__init__()
        self.temperature = check_value("temperature", temperature, Temperature)
        self.gather_distributed = check_value("gather_distributed", gather_distributed, bool)
        self.backend = check_value("backend", backend, Backend)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(out0, torch.Tensor) or not isinstance(out1, torch.Tensor):
            raise TypeError("out0 and out1 must be tensors")
        if out0.shape != out1.shape:
            raise ValueError(f"out0 and out1 must have the same shape, got {tuple(out0.shape)} and {tuple(out1.shape)}")
        world = dist.world_size() if self.gather_distributed else 1
        if out0.dim() and out0.shape[0] * world == 1:
            raise ValueError("out0 and out1 hold 1 sample each: NT-Xent's negatives are the batch's other samples, "
                             "so the loss would be 0 with no gradient; give at least 2")
        if self.gather_distributed:
            out0, out1 = dist.gather(out0), dist.gather(out1)
            weight = dist.gather(weight) if weight is not None else None
        w = torch.cat([weight, weight]) if weight is not None else None
        return infonce(torch.cat([out0, out1]), temperature=self.temperature, weight=w, backend=self.backend)


class InfoNCELoss(nn.Module):
    """Query/key InfoNCE (MoCo; CLIP with ``symmetric=True``): query i's positive is key i.

    ``memory_bank_size > 0`` keeps a FIFO queue of past keys (detached, newest first) used as extra
    negatives, MoCo-style; it starts as random unit vectors and is refreshed after each call in
    training mode.  With ``gather_distributed=True`` queries and keys come from every rank.
    """

    def __init__(self, temperature: Temperature = 0.2, memory_bank_size: NonNegativeInt = 0, symmetric: bool = False,
                 gather_distributed: bool = False, backend: Backend = "auto"):
        super().__init__()
        temperature = check_value("temperature", temperature, Temperature)
        memory_bank_size = check_value("memory_bank_size", memory_bank_size, NonNegativeInt)
        symmetric = check_value("symmetric", symmetric, bool)
        gather_distributed = check_value("gather_distributed", gather_distributed, bool)
        backend = check_value("backend", backend, Backend)
        if symmetric and memory_bank_size:
            raise ValueError("symmetric=True (CLIP) does not take a memory bank")
        self.temperature, self.symmetric, self.backend = temperature, symmetric, backend
        self.memory_bank_size, self.gather_distributed = memory_bank_size, gather_distributed
        self.register_buffer("queue", torch.empty(0), persistent=True)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        for name, t in (("query", query), ("key", key)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if query.shape != key.shape:
            raise ValueError(f"query and key must have the same shape, got {tuple(query.shape)} and {tuple(key.shape)}")
        if self.gather_distributed:
            query, key = dist.gather(query), dist.gather(key)
        keys = key
        if self.memory_bank_size:
            if self.queue.numel() == 0:
                g = torch.Generator().manual_seed(0)
                init = torch.randn(self.memory_bank_size, key.shape[1], generator=g)
                self.queue = nn.functional.normalize(init, dim=1).to(key.device, key.dtype)
            if self.queue.shape[1] != key.shape[1]:
                raise ValueError(f"key dimension {key.shape[1]} does not match the memory bank's {self.queue.shape[1]}")
            keys = torch.cat([key, self.queue.to(key.dtype)])
        loss = infonce(query, keys, temperature=self.temperature, symmetric=self.symmetric, backend=self.backend)
        if self.memory_bank_size and self.training:
            with torch.no_grad():
                self.queue = torch.cat([key.detach().to(self.queue.dtype), self.queue])[: self.memory_bank_size]
        return loss
