"""Graph rewiring (MPCL, ICLR 2023), NNCLR-style: a view's nearest neighbour in a support queue is an extra positive."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..checks import Backend, QueueSize, Temperature, Width
from ..functional import GatherMode, infonce, nt_xent
from ..kernels import nearest_cosine
from ..losses import ring_write
from .base import SSLMethod
from .heads import projection_mlp, sized_head


class NNCLR(SSLMethod):
    """SimCLR on a rewired augmentation graph **[our reading]** (docs/methods.md, "The methods").

    A FIFO support queue ``Q`` (ring buffer, ``queue_size`` rows) keeps the unit-norm view-0
    projections of past batches.  For each of the 2N rows ``z_i`` of the batch ``[z0; z1]`` its
    nearest neighbour ``nn_i = Q[argmax_q cos(z_i, Q_q)]`` (top-1 cosine search of the k-means
    kernel, no gradient) joins its positive set:

        l_i = -1/2 (s(z_i, z_p(i)) + s(z_i, nn_i)) + log sum_{j != i} exp s(z_i, r_j),   r = [z0; z1; nn]

    i.e. the fused InfoNCE over the rows ``[z; nn]`` with ``pos_index`` ``[p(i), 2N + i]``, averaged
    over the 2N batch rows only (the neighbours are constants that also serve as negatives).  While
    the queue is empty (first step) the loss is SimCLR's.  After the loss the batch's view-0
    projections are enqueued.  With ``gather_distributed=True`` (lightly's convention,
    :mod:`sslcore.dist`) each rank's rows meet the rows and neighbours of every rank, gathered, and
    every rank enqueues every rank's projections, so the support queues stay equal.
    """

    name = "nnclr"
    min_batch_size, min_batch_reason = 2, "its first step is SimCLR's, whose negatives are the other samples"

    def __init__(self, encoder: nn.Module, *, temperature: Temperature = 0.5, proj_hidden: Width | None = None,
                 proj_dim: Width | None = None, queue_size: QueueSize = 1024, gather_distributed: GatherMode = False,
                 backend: Backend = "auto"):
        if not isinstance(queue_size, int) or isinstance(queue_size, bool) or queue_size <= 0:
            raise ValueError(f"queue_size must be a positive integer, got {queue_size!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        super().__init__(encoder)
        width = encoder.num_features  # NNCLR's head: hidden = the encoder's width, 256 out
        proj_hidden, proj_dim = sized_head(width, (proj_hidden, proj_dim), (256, 64), (width, 256))
        self.projector = projection_mlp(width, proj_hidden, proj_dim)
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
        ring_write(self.support, self.support_ptr, F.normalize(z.to(self.support.dtype), dim=1), wrap=True)
        self.support_len.copy_((self.support_len + z.shape[0]).clamp_max(self.support.shape[0]))

    def loss(self, views, *, index=None, epoch=None) -> torch.Tensor:
        view0, view1 = views
        mode = self.gather_distributed and dist.world_size() > 1
        n = view0.shape[0] * (dist.world_size() if mode else 1)
        if n > self.support.shape[0]:
            raise ValueError(f"queue_size ({self.support.shape[0]}) must be at least the batch size ({n})")
        if self.gather_distributed == "ring":
            raise ValueError("NNCLR's neighbours join the keys: use gather_distributed=True, not 'ring'")
        z0, z1 = self.projector(self.encoder(torch.cat([view0, view1]))).chunk(2)
        if int(self.support_len) == 0:
            loss = nt_xent(z0, z1, temperature=self.temperature, gather_distributed=self.gather_distributed,
                           backend=self.backend)
        else:
            z = torch.cat([z0, z1])
            m = z.shape[0]
            rows = torch.arange(m, device=z.device)
            block = torch.cat([z, self.nearest(z)[1].to(z.dtype)])  # this rank's rows, then their neighbours
            off = dist.rank() * 2 * m if mode else 0  # the rows' place among every rank's blocks
            pos = off + torch.stack([(rows + m // 2) % m, rows + m], 1)  # the partner view, the neighbour
            loss = infonce(z, dist.gather(block) if mode else block, self_offset=off, pos_index=pos,
                           temperature=self.temperature, backend=self.backend)
        if self.training:
            self.enqueue(dist.gather(z0.detach(), check=False) if mode else z0.detach())
        return loss
