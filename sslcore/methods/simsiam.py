"""SimSiam (Chen & He, 2021): projector + predictor, negative cosine against a stop-gradient target."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import Width
from .base import SSLMethod
from .heads import prediction_mlp, simsiam_projector, sized_head


class SimSiam(SSLMethod):
    """``z = h(f(x))`` (projector), ``p = q(z)`` (predictor); symmetric loss

        L = 1/2 D(p0, sg(t1)) + 1/2 D(p1, sg(t0)),    D(p, t) = -mean_i cos(p_i, t_i)

    with the target ``t = z`` of the other view (``sg`` = stop-gradient; :meth:`targets` is the hook
    SimSiam-Multi overrides).  No negatives, so no temperature, and nothing to gather under DDP:
    each rank's loss is its own samples' mean, and DDP's gradient average is the global batch's.
    """

    name = "simsiam"

    def __init__(self, encoder: nn.Module, *, proj_hidden: Width | None = None, proj_dim: Width | None = None,
                 pred_hidden: Width | None = None):
        super().__init__(encoder)
        width = encoder.num_features  # SimSiam's heads: projector width = the encoder's, predictor bottleneck 1/4
        proj_hidden, proj_dim, pred_hidden = sized_head(width, (proj_hidden, proj_dim, pred_hidden), (256, 64, 32),
                                                        (width, width, max(1, width // 4)))
        self.projector = simsiam_projector(width, proj_hidden, proj_dim)
        self.predictor = prediction_mlp(proj_dim, pred_hidden)
        self.proj_dim = proj_dim

    def targets(self, z0: torch.Tensor, z1: torch.Tensor, index, epoch) -> tuple[torch.Tensor, torch.Tensor]:
        """The (detached) targets of the two views: their projections."""
        return z0.detach(), z1.detach()

    def loss(self, views, *, index=None, epoch=None) -> torch.Tensor:
        view0, view1 = views
        z = self.projector(self.encoder(torch.cat([view0, view1])))
        p0, p1 = self.predictor(z).chunk(2)
        t0, t1 = self.targets(*z.chunk(2), index, epoch)
        return -0.5 * (F.cosine_similarity(p0, t1, dim=1).mean() + F.cosine_similarity(p1, t0, dim=1).mean())
