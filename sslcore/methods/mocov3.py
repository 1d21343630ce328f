"""MoCo v3 (Chen, Xie & He, 2021): BYOL's online/momentum networks with a symmetric InfoNCE and no queue."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..checks import Backend, PositiveInt, Temperature, UnitInterval, Width
from ..functional import GatherMode, infonce_pairs
from .byol import RESNET50_WIDTH, MomentumTarget
from .heads import mocov3_mlp, paper_widths

VITB_WIDTH = 768  # the ViT the paper's ViT heads (768 -> 4096 -> 4096 -> 256) were sized for


def is_vit(encoder: nn.Module) -> bool:
    """Whether ``encoder`` is a transformer over image patches (timm's ``patch_embed``: ViT, DeiT, ...)."""
    return hasattr(encoder, "patch_embed")


class MoCoV3(MomentumTarget):
    """Queries ``q = h(g(f(x)))`` (predictor, projector, encoder), keys ``k = g'(f'(x))`` from momentum copies of
    encoder and projector, moved before each training step with ``m = cosine_momentum(momentum, progress)``;

        L = 2 tau [ctr(q0, k1) + ctr(q1, k0)],    ctr(q, k) = mean_i -log softmax_j(cos(q_i, k_j) / tau)_i

    over the keys of every rank (``gather_distributed``, lightly's convention; the keys carry no gradient),
    on the fused InfoNCE op (:func:`sslcore.functional.infonce_pairs`); the factor 2 tau is the authors'.
    As the authors' code: ViTs (:func:`is_vit`) get tau = 0.2, a 3-layer projector and heads scaled from
    ViT-B's 768 -> 4096 -> 256; other encoders tau = 1.0, a 2-layer projector, scaled from ResNet-50's
    2048 -> 4096 -> 256.  Linear layers without bias, BN-ReLU between, a BatchNorm without affine after the
    projector (and after a ViT's predictor).  Each view passes the networks on its own.  See
    docs/methods.md, "MoCo v3".
    """

    name = "mocov3"
    recipe = "byol"  # the authors' augmentation is BYOL's asymmetric pair
    min_batch_size, min_batch_reason = 2, "the heads' BatchNorm needs 2 samples per view"

    def __init__(self, encoder: nn.Module, *, temperature: Temperature | None = None, proj_hidden: Width | None = None,
                 proj_dim: Width | None = None, proj_layers: PositiveInt | None = None, momentum: UnitInterval = 0.99,
                 gather_distributed: GatherMode = False, backend: Backend = "auto"):
        vit = is_vit(encoder)
        temperature = (0.2 if vit else 1.0) if temperature is None else temperature
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        layers = (3 if vit else 2) if proj_layers is None else proj_layers
        if layers < 2:
            raise ValueError(f"proj_layers must be at least 2, got {layers!r}")
        hidden, dim = paper_widths(encoder.num_features, VITB_WIDTH if vit else RESNET50_WIDTH)
        hidden = hidden if proj_hidden is None else proj_hidden
        dim = dim if proj_dim is None else proj_dim
        super().__init__(encoder, mocov3_mlp(layers, encoder.num_features, hidden, dim),
                         mocov3_mlp(2, dim, hidden, dim, last_bn=vit), momentum)
        self.temperature, self.gather_distributed, self.backend = temperature, gather_distributed, backend

    def contrast(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``ctr(q, k)``: this rank's queries against every rank's keys, positive of q_i its own key k_i."""
        return infonce_pairs(q, k.to(q.dtype), temperature=self.temperature,
                             gather_distributed=self.gather_distributed, backend=self.backend)

    def loss(self, views: Sequence[torch.Tensor], *, index=None, epoch=None) -> torch.Tensor:
        x0, x1 = views
        self.update_target()
        q0, q1 = self.predict(x0), self.predict(x1)
        k0, k1 = self.targets(x0), self.targets(x1)
        return 2.0 * self.temperature * (self.contrast(q0, k1) + self.contrast(q1, k0))
