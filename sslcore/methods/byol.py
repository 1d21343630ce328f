"""BYOL (Grill et al., 2020): an online network predicts an EMA target network's projection of the other view."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from ..checks import UnitInterval, Width
from ..losses import NegativeCosineSimilarity
from .base import SSLMethod
from .heads import paper_widths, projection_mlp
from .momentum import cosine_momentum, ema_update

RESNET50_WIDTH = 2048  # the encoder the paper's 4096 -> 256 heads were sized for


class MomentumTarget(SSLMethod):
    """An online encoder, projector and predictor, and a target: EMA copies of encoder and projector (BYOL's
    structure, also MoCo v3's).  :meth:`update_target` moves the target before a training step,
    ``theta' <- m theta' + (1 - m) theta`` with ``m = cosine_momentum(base_momentum, progress)``; the target
    networks are submodules, so a checkpoint holds them.  Probe features come from the online encoder."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, predictor: nn.Module, base_momentum: float):
        if not isinstance(base_momentum, (int, float)) or isinstance(base_momentum, bool) \
                or not 0.0 <= base_momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {base_momentum!r}")
        super().__init__(encoder)
        self.projector, self.predictor = projector, predictor
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.base_momentum = float(base_momentum)

    @property
    def target_momentum(self) -> float:
        """This step's EMA momentum: the cosine schedule from ``base_momentum`` to 1 at ``self.progress``."""
        return cosine_momentum(self.base_momentum, self.progress)

    @torch.no_grad()
    def update_target(self) -> None:
        """Move the target networks toward the online ones (training mode only)."""
        if self.training:
            m = self.target_momentum
            ema_update(self.target_encoder, self.encoder, m)
            ema_update(self.target_projector, self.projector, m)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Online predictions ``q(g(f(x)))`` (with gradient)."""
        return self.predictor(self.projector(self.encoder(x)))

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """Target projections ``g'(f'(x))`` (no gradient)."""
        return self.target_projector(self.target_encoder(x))


class BYOL(MomentumTarget):
    """Online ``q(g(f(x)))`` (predictor on projector on encoder), target ``g'(f'(x))``: EMA copies of encoder
    and projector.  Before each training step the target moves, ``theta' <- m theta' + (1 - m) theta`` with
    ``m = cosine_momentum(momentum, progress)`` (``momentum`` at the start, 1 at the end); the loss is
    the authors' symmetrised regression (docs/methods.md, "BYOL")

        L = mean_i [2 - 2 cos(q(z0_i), sg(z'1_i))] + mean_i [2 - 2 cos(q(z1_i), sg(z'0_i))]

    through :class:`~sslcore.losses.NegativeCosineSimilarity`.  Each view passes the networks on its own
    (BatchNorm statistics per view, as the authors).  Heads: Linear-BN-ReLU-Linear, by default at the
    paper's ratios to a ResNet-50 (2048 -> 4096 -> 256) scaled to ``encoder.num_features``; the predictor
    ``proj_dim -> pred_hidden -> proj_dim``.  No negatives: nothing to gather under DDP (each rank's loss
    is its rows' mean; SyncBatchNorm and DDP's average make it the global batch's).  Probe features come
    from the online encoder.
    """

    name = "byol"
    recipe = "byol"
    min_batch_size, min_batch_reason = 2, "the heads' BatchNorm needs 2 samples per view"

    def __init__(self, encoder: nn.Module, *, proj_hidden: Width | None = None, proj_dim: Width | None = None,
                 pred_hidden: Width | None = None, momentum: UnitInterval = 0.996):
        hidden, dim = paper_widths(encoder.num_features, RESNET50_WIDTH)
        proj_hidden = hidden if proj_hidden is None else proj_hidden
        proj_dim = dim if proj_dim is None else proj_dim
        super().__init__(encoder, projection_mlp(encoder.num_features, proj_hidden, proj_dim),
                         projection_mlp(proj_dim, proj_hidden if pred_hidden is None else pred_hidden, proj_dim),
                         momentum)
        self.criterion = NegativeCosineSimilarity()

    def loss(self, views: Sequence[torch.Tensor], *, index=None, epoch=None) -> torch.Tensor:
        x0, x1 = views
        self.update_target()
        p0, p1 = self.predict(x0), self.predict(x1)
        t0, t1 = self.targets(x0), self.targets(x1)
        return 4.0 + 2.0 * (self.criterion(p0, t1) + self.criterion(p1, t0))
