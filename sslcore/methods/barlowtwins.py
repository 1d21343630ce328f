"""Barlow Twins (Zbontar et al., 2021): a wide projector and the cross-correlation of the two views' embeddings
driven to the identity (facebookresearch/barlowtwins; docs/methods.md)."""
from __future__ import annotations

import torch
from torch import nn

from ..checks import NonNegative, Width, check_value
from ..losses import BarlowTwinsLoss
from .base import SSLMethod
from .heads import expander_mlp


class BarlowTwins(SSLMethod):
    """``z = h(f(x))`` for each view in its own pass (the BatchNorm statistics are each view's, as the authors'),
    then :class:`sslcore.losses.BarlowTwinsLoss` with the authors' ``lambda_param`` 0.0051.  The projector is
    the authors' 8192-8192-8192 on ResNet-50's 2048 features as a ratio: every width 4x ``encoder.num_features``
    unless ``proj_hidden``/``proj_dim`` say otherwise.  Views: BYOL's asymmetric recipe, as the authors'."""

    name = "barlowtwins"
    recipe = "byol"
    min_batch_size, min_batch_reason = 2, "the projector's and the loss's BatchNorm need 2 samples per view"

    def __init__(self, encoder: nn.Module, *, lambda_param: NonNegative = 0.0051, proj_hidden: Width | None = None,
                 proj_dim: Width | None = None, gather_distributed: bool = False):
        super().__init__(encoder)
        hidden, out = (4 * encoder.num_features if w is None else check_value(name, w, Width)
                       for name, w in (("proj_hidden", proj_hidden), ("proj_dim", proj_dim)))
        self.projector = expander_mlp(encoder.num_features, hidden, out, bias=False)
        self.criterion = BarlowTwinsLoss(lambda_param, gather_distributed=gather_distributed)

    def loss(self, views, *, index=None, epoch=None) -> torch.Tensor:
        view0, view1 = views
        return self.criterion(self.projector(self.encoder(view0)), self.projector(self.encoder(view1)))
