"""ArCL (ICLR 2023): contrastive learning aligned on the worst-case augmentation pair of each sample."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import Backend, NonNegative, QueueSize, Temperature, UnitInterval, Views, Width
from ..functional import GatherMode
from .base import SSLMethod
from .moco import MoCo
from .simclr import SimCLR

BASES = ("simclr", "moco")
MODES = ("worst_pair", "penalty")


def worst_pair(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the views ``(a, b)``, a < b, whose projections have the lowest cosine similarity.

    ``z`` is ``[m, N, D]`` (m views of N samples); returns two int64 ``[N]`` tensors.  Ties go to the
    first pair in row-major (a, b) order.  No gradient.
    """
    with torch.no_grad():
        zn = F.normalize(z.float(), dim=-1)
        cos = torch.einsum("and,bnd->nab", zn, zn)  # [N, m, m]
        m = z.shape[0]
        upper = torch.ones(m, m, dtype=torch.bool, device=z.device).triu(1)
        flat = cos.masked_fill(~upper, float("inf")).flatten(1).argmin(1)
        return flat // m, flat % m


def max_pair_distance(z: torch.Tensor) -> torch.Tensor:
    """Per sample, ``max_{a,b} |z_hat_a - z_hat_b|^2`` over its views (``z_hat``: L2-normalised): ``z`` is
    ``[m, N, D]``, the result ``[N]``, with gradient.  The penalty's term, and the transfer study's
    worst-pair distance (docs/methods.md, ArCL)."""
    zn = F.normalize(z, dim=-1)
    return (zn[:, None] - zn[None, :]).pow(2).sum(-1).flatten(0, 1).amax(0)


class ArCL(SSLMethod):
    """ArCL **[our reading]** (docs/methods.md, "ArCL") over a SimCLR or MoCo base, held by composition.

    Each step draws ``views`` = m >= 2 views per sample and projects all of them (query encoder).
    * ``mode="worst_pair"``: without gradient, pick per sample the pair (a*, b*) of views with the
      lowest cosine similarity of their projections (:func:`worst_pair`), then apply the base's
      two-view loss to (z_a*, z_b*) across the batch (MoCo: queries z_a*, keys from view b*).
    * ``mode="penalty"``: base loss on views 0 and 1 (two random augmentations) plus
      ``penalty * mean_n max_{a,b} |z_hat_a - z_hat_b|^2`` (:func:`max_pair_distance`, with gradient).
    Options other than ``views``/``base``/``mode``/``penalty`` go to the base (``queue_size``,
    ``momentum``, ``symmetric``: only with ``base="moco"``, MoCo's defaults when unset).  Probe features
    come from the shared encoder.
    """

    name = "arcl"
    min_batch_size, min_batch_reason = 2, "both bases need it (SimCLR's negatives, MoCo's BatchNorm)"

    def __init__(self, encoder: nn.Module, *, views: Views = 4, base: Literal[BASES] = "simclr",
                 mode: Literal[MODES] = "worst_pair", penalty: NonNegative = 1.0,
                 temperature: Temperature | None = None,
                 proj_hidden: Width | None = None, proj_dim: Width | None = None, queue_size: QueueSize | None = None,
                 momentum: UnitInterval | None = None, symmetric: bool | None = None,
                 gather_distributed: GatherMode = False, backend: Backend = "auto"):
        if not isinstance(views, int) or isinstance(views, bool) or views < 2:
            raise ValueError(f"views must be an integer >= 2 (views per sample), got {views!r}")
        if base not in BASES:
            raise ValueError(f"base must be one of {', '.join(BASES)}, got {base!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not isinstance(penalty, (int, float)) or not penalty >= 0:
            raise ValueError(f"penalty must be a number >= 0, got {penalty!r}")
        moco_options = {k: v for k, v in dict(queue_size=queue_size, momentum=momentum, symmetric=symmetric).items()
                        if v is not None}
        if base == "simclr" and moco_options:
            raise ValueError(f"option {', '.join(moco_options)} is for base='moco', not base='simclr'")
        super().__init__(encoder)
        if temperature is None:
            temperature = self.default_temperature({"base": base})
        common = dict(temperature=temperature, proj_hidden=proj_hidden, proj_dim=proj_dim,
                      gather_distributed=gather_distributed, backend=backend)
        if base == "simclr":
            self.base = SimCLR(encoder, **common)
        else:
            self.base = MoCo(encoder, **moco_options, **common)
        self.n_views, self.mode, self.penalty = views, mode, float(penalty)

    @classmethod
    def default_temperature(cls, options: dict) -> float:
        """The base's own: SimCLR's 0.5, MoCo's 0.2."""
        return (MoCo if options.get("base") == "moco" else SimCLR).default_temperature({})

    def _base_loss(self, z0: torch.Tensor, z1: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """The base's two-view loss on projections z0, z1 of images x0, x1 (MoCo recomputes keys from x1/x0)."""
        if isinstance(self.base, SimCLR):
            return self.base.criterion(z0, z1)
        pairs = [(z0, x1), (z1, x0)] if self.base.symmetric else [(z0, x1)]
        return self.base.contrast_pairs(pairs)

    def loss(self, views, *, index=None, epoch=None) -> torch.Tensor:
        if len(views) != self.n_views:
            raise ValueError(f"ArCL was built for {self.n_views} views per sample, got {len(views)}")
        x = torch.stack(list(views))  # [m, N, ...]
        m, n = x.shape[:2]
        z = self.base.projector(self.encoder(x.flatten(0, 1))).unflatten(0, (m, n))  # [m, N, D]
        if self.mode == "worst_pair":
            a, b = worst_pair(z)
            rows = torch.arange(n, device=z.device)
            return self._base_loss(z[a, rows], z[b, rows], x[a, rows], x[b, rows])
        return self._base_loss(z[0], z[1], x[0], x[1]) + self.penalty * max_pair_distance(z).mean()
