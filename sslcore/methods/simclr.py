"""SimCLR (Chen et al., 2020): encoder + MLP projector, NT-Xent between two augmented views."""
from __future__ import annotations

import torch
from torch import nn

from ..checks import Backend, Temperature, Width
from ..functional import GatherMode
from ..losses import NTXentLoss
from .base import SSLMethod
from .heads import projection_mlp, sized_head


class SimCLR(SSLMethod):
    """Both views go through the encoder in one batch; the projections feed
    :class:`sslcore.losses.NTXentLoss`.  ``encoder`` must expose ``num_features`` (timm convention)."""

    name = "simclr"
    min_batch_size, min_batch_reason = 2, "NT-Xent's negatives are the other samples of the batch"

    def __init__(self, encoder: nn.Module, *, temperature: Temperature = 0.5, proj_hidden: Width | None = None,
                 proj_dim: Width | None = None, gather_distributed: GatherMode = False, backend: Backend = "auto"):
        super().__init__(encoder)
        width = encoder.num_features  # the paper's head: hidden = the encoder's width, 128 out
        proj_hidden, proj_dim = sized_head(width, (proj_hidden, proj_dim), (256, 64), (width, 128))
        self.projector = projection_mlp(width, proj_hidden, proj_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed, backend=backend)

    def loss(self, views, *, index=None, epoch=None) -> torch.Tensor:
        view0, view1 = views
        z0, z1 = self.projector(self.encoder(torch.cat([view0, view1]))).chunk(2)
        return self.criterion(z0, z1)
