"""MoCo v2 (He et al., 2020; Chen et al., 2020): query encoder vs a momentum key encoder and a queue of negatives."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..checks import Backend, QueueSize, Temperature, UnitInterval, Width
from ..functional import GatherMode, infonce_pairs
from ..losses import ring_write
from .base import SSLMethod
from .heads import projection_mlp, sized_head
from .momentum import ema_update

LARGE_DATA = 50_000  # training samples from which MoCo keeps the paper's queue and momentum


class MoCo(SSLMethod):
    """Query ``q = g(f(x0))``, key ``k = g'(f'(x1))`` from momentum copies ``f', g'`` of encoder and projector.

    Each step first moves the key networks toward the query networks (EMA, no gradient):
    ``theta' <- m theta' + (1 - m) theta``, then computes the keys, then the query/key InfoNCE of the
    fused op, ``l_i = -s(q_i, k_i) + log sum_{j in [k; queue]} exp s(q_i, k_j)``, whose negatives are the
    batch's other keys plus the queue of past keys.  After the loss the keys are enqueued (FIFO: a
    ring buffer whose oldest ``batch`` rows are overwritten), so ``queue_size`` must be a multiple of
    the (global) batch size.  ``symmetric=True`` averages the loss of (x0 -> x1) and (x1 -> x0); only
    the first direction's keys are enqueued.  With ``gather_distributed`` (lightly's convention,
    :mod:`sslcore.dist`) each rank's queries meet the keys of every rank (gathered, or passed round
    the ring with ``"ring"``) and every rank enqueues every rank's keys, so the queues stay equal.
    Probe features come from the query encoder.
    """

    name = "moco"
    min_batch_size, min_batch_reason = 2, "the projectors' BatchNorm needs 2 samples, the keys come from one view"

    def __init__(self, encoder: nn.Module, *, temperature: Temperature = 0.2, proj_hidden: Width | None = None,
                 proj_dim: Width | None = None, queue_size: QueueSize = 1024, momentum: UnitInterval = 0.99,
                 symmetric: bool = False, gather_distributed: GatherMode = False, backend: Backend = "auto"):
        if not isinstance(queue_size, int) or isinstance(queue_size, bool) or queue_size <= 0:
            raise ValueError(f"queue_size must be a positive integer, got {queue_size!r}")
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        super().__init__(encoder)
        width = encoder.num_features  # MoCo v2's head: hidden = the encoder's width, 128 out
        proj_hidden, proj_dim = sized_head(width, (proj_hidden, proj_dim), (256, 64), (width, 128))
        self.projector = projection_mlp(width, proj_hidden, proj_dim)
        self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.temperature, self.momentum, self.symmetric = temperature, float(momentum), symmetric
        self.gather_distributed, self.backend = gather_distributed, backend
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @classmethod
    def create(cls, data, *, encoder: str, **options) -> "MoCo":
        """Queue and momentum sized for the data: MoCo v2's 65,536 keys and 0.999 on data of at least
        :data:`LARGE_DATA` training samples (CIFAR, ImageNet), 1,024 and 0.99 on the bundled small sets."""
        large = data.n_train >= LARGE_DATA
        options = {"queue_size": 65536 if large else 1024, "momentum": 0.999 if large else 0.99, **options}
        return super().create(data, encoder=encoder, **options)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Query projections ``g(f(x))`` (with gradient)."""
        return self.projector(self.encoder(x))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``theta' <- m theta' + (1 - m) theta`` for every parameter of the key encoder and projector."""
        ema_update(self.key_encoder, self.encoder, self.momentum)
        ema_update(self.key_projector, self.projector, self.momentum)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm key projections ``g'(f'(x))`` of this rank's images."""
        return F.normalize(self.key_projector(self.key_encoder(x)), dim=1)

    def contrast(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """InfoNCE of this rank's queries ``q`` against the keys of every rank and the queue, positive of
        q_i its own key k_i."""
        return infonce_pairs(q, k.to(q.dtype), queue=self.queue, temperature=self.temperature,
                             gather_distributed=self.gather_distributed, backend=self.backend)

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor) -> None:
        """Write ``k`` over the oldest rows of the ring buffer and advance its pointer."""
        ring_write(self.queue, self.queue_ptr, k, wrap=True)

    def contrast_pairs(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Mean loss over ``(queries, key images)`` pairs: momentum update, keys, InfoNCE, then enqueue the
        first pair's keys (training mode only)."""
        n_keys = pairs[0][1].shape[0] * (dist.world_size() if self.gather_distributed else 1)
        if self.queue.shape[0] % n_keys:
            raise ValueError(f"queue_size ({self.queue.shape[0]}) must be divisible by the batch size ({n_keys})")
        if self.training:
            self.momentum_update()
        keys = [self.keys(x) for _, x in pairs]
        loss = torch.stack([self.contrast(q, k) for (q, _), k in zip(pairs, keys)]).mean()
        if self.training:
            self.enqueue(dist.gather(keys[0], check=False) if self.gather_distributed else keys[0])
        return loss

    def loss(self, views, *, index=None, epoch=None) -> torch.Tensor:
        x0, x1 = views
        if self.symmetric:
            q0, q1 = self.project(torch.cat([x0, x1])).chunk(2)
            return self.contrast_pairs([(q0, x1), (q1, x0)])
        return self.contrast_pairs([(self.project(x0), x1)])
