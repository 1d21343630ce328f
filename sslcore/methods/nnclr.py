"""Graph rewiring (MPCL, ICLR 2023), NNCLR-style: a view's nearest neighbour in a support queue is an extra positive."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..checks import Backend, QueueSize, Temperature, Width
from ..functional import infonce
from ..kernels import nearest_cosine
from .base import SSLMethod
from .heads import projection_mlp


class NNCLR(SSLMethod):
    """SimCLR on a rewired augmentation graph **[our reading]** (METHODS.md section 1, "graph rewiring").

    A FIFO support queue ``Q`` (ring buffer, ``queue_size`` rows) keeps the unit-norm view-0
    projections of past batches.  For each of the 2N rows ``z_i`` of the batch ``[z0; z1]`` its
    nearest neighbour ``nn_i = Q[argmax_q cos(z_i, Q_q)]`` (top-1 cosine search of the k-means
    kernel, no gradient) joins its positive set:

        l_i = -1/2 (s(z_i, z_p(i)) + s(z_i, nn_i)) + log sum_{j != i} exp s(z_i, r_j),   r = [z0; z1; nn]

    i.e. the fused InfoNCE over the rows ``[z; nn]`` with ``pos_index`` ``[p(i), 2N + i]``, averaged
    over the 2N batch rows only (the neighbours are constants that also serve as negatives).  While
    the queue is empty (first step) the loss is SimCLR's.  After the loss the batch's view-0
    projections are enqueued.  With ``gather_distributed=True`` every rank uses the global batch
    and keeps the same queue.
    """

    name = "nnclr"
    min_batch_size, min_batch_reason = 2, "its first step is SimCLR's, whose negatives are the other samples"

    def __init__(self, encoder: nn.Module, *, temperature: Temperature = 0.5, proj_hidden: Width = 256,
                 proj_dim: Width = 64, queue_size: QueueSize = 1024, gather_distributed: bool = False,
                 backend: Backend = "auto"):
        if not isinstance(queue_size, int) or isinstance(queue_size, bool) or queue_size <= 0:
            raise ValueError(f"queue_size must be a positive integer, got {queue_size!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        super().__init__(encoder)
        self.projector = projection_mlp(encoder.num_features, proj_hidden, proj_dim)
        self.temperature, self.gather_distributed, self.backend = temperature, gather_distributed, backend
        self.register_buffer("support", torch.zeros(queue_size, proj_dim))
        self.register_buffer("support_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("support_len", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index [M], rows [M, D])``: each row's top-1 cosine neighbour among the filled support rows."""
        bank = self.support[:int(self.support_len)]
        idx, _ = nearest_cosine(z.detach().to(bank.dtype), bank, backend=self.backend)
        return idx, bank[idx]

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor) -> None:
        """Write the unit-norm rows of ``z`` over the oldest support rows (wrapping around)."""
        size, n = self.support.shape[0], z.shape[0]
        slots = (int(self.support_ptr) + torch.arange(n, device=z.device)) % size
        self.support[slots] = F.normalize(z.to(self.support.dtype), dim=1)
        self.support_ptr.fill_((int(self.support_ptr) + n) % size)
        self.support_len.fill_(min(size, int(self.support_len) + n))

    def loss(self, views, *, index=None, epoch=None) -> torch.Tensor:
        view0, view1 = views
        n = view0.shape[0] * (dist.world_size() if self.gather_distributed else 1)
        if n > self.support.shape[0]:
            raise ValueError(f"queue_size ({self.support.shape[0]}) must be at least the batch size ({n})")
        z0, z1 = self.projector(self.encoder(torch.cat([view0, view1]))).chunk(2)
        if self.gather_distributed:
            z0, z1 = dist.gather(z0), dist.gather(z1)
        z = torch.cat([z0, z1])
        if int(self.support_len) == 0:
            loss = infonce(z, temperature=self.temperature, backend=self.backend)
        else:
            m = z.shape[0]
            rows = torch.arange(m, device=z.device)
            pos = torch.cat([torch.stack([(rows + n) % m, rows + m], 1),  # batch rows: partner view, neighbour
                             torch.stack([rows, torch.full_like(rows, -1)], 1)])  # neighbour rows: their sample
            nn_rows = self.nearest(z)[1].to(z.dtype)
            loss = infonce(torch.cat([z, nn_rows]), temperature=self.temperature, pos_index=pos,
                           reduction="none", backend=self.backend)[:m].mean()
        if self.training:
            self.enqueue(z0.detach())
        return loss
