"""ContraNorm layers over the fused op, and ContraNorm ViTs registered with timm.

``ContraNorm(H) = LayerNorm(H - s * softmax(H_hat H_hat^T / tau) H)`` (H_hat: rows L2-normalised),
a drop-in for ``nn.LayerNorm`` and timm's ``norm_layer``.  Importing this module registers
``contranorm_vit_{tiny,small,base}_patch16_224`` with timm.
"""
from __future__ import annotations

import math
from functools import partial

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from .kernels import BACKENDS, contranorm, contranorm_features_ref


def _check_scale_temperature(scale, temperature):
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_input(x, dim, ranks, what):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() not in ranks:
        raise ValueError(f"x must be {what}, got shape {tuple(x.shape)}")
    if x.shape[-1] != dim:
        raise ValueError(f"x has {x.shape[-1]} channels but the layer was built for dim={dim}")


class ContraNorm(nn.LayerNorm):
    """``LayerNorm(H - s * softmax(H_hat H_hat^T / tau) H)``; with ``s = 0`` exactly ``nn.LayerNorm(dim, eps)``.

    A subclass of ``nn.LayerNorm`` (same ``weight``/``bias``, so LayerNorm checkpoints load), usable
    as timm's ``norm_layer``: ``partial(ContraNorm, scale=0.1)``.

    * sequences (default): ``forward(x [B, L, D], key_padding_mask [B, L] = None)`` -- the softmax
      runs over the tokens of each sequence, padding keys excluded, padding rows only LayerNorm'ed;
    * ``graph=True``: ``forward(x [N, D], edge_index [2, E])`` -- over all nodes except each node
      itself and its neighbours (pass ``temperature=1``, the paper's graph setting).

    ``dual``: ``P + P^T`` instead of ``P``; ``identity``: ``(1 + s) H - s P H``.  ``learnable``: a
    per-channel scale ``[dim]`` initialised to ``scale`` (``positive``: stored as ``log s``, used as
    ``exp``).  ``backend`` is the op's (``"auto"``, ``"triton"``, ``"torch"``).
    """

    def __init__(self, dim: int, scale: float = 0.1, temperature: float = 1.0, dual: bool = False,
                 identity: bool = False, learnable: bool = False, positive: bool = False, eps: float = 1e-6,
                 graph: bool = False, backend: str = "auto", *, device=None, dtype=None):
        _check_scale_temperature(scale, temperature)
        if positive and not learnable:
            raise ValueError("positive=True applies to a learnable scale: pass learnable=True too")
        if positive and scale == 0:
            raise ValueError("positive=True stores log(scale): scale must be > 0")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__(dim, eps=eps, device=device, dtype=dtype)
        self.temperature, self.dual, self.identity = float(temperature), dual, identity
        self.learnable, self.positive, self.graph, self.backend = learnable, positive, graph, backend
        if positive:
            self.log_scale = nn.Parameter(torch.full((dim,), math.log(scale), device=device, dtype=dtype))
        elif learnable:
            self.scale = nn.Parameter(torch.full((dim,), float(scale), device=device, dtype=dtype))
        else:
            self.scale = float(scale)

    def effective_scale(self):
        """``s`` as the op sees it: a float, or the per-channel ``[dim]`` tensor."""
        return self.log_scale.exp() if self.positive else self.scale

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                edge_index: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, L, D] with an optional ``key_padding_mask`` [B, L] (True = padding); with
        ``graph=True``, ``x`` [N, D] and ``edge_index`` [2, E], also accepted positionally: ``norm(x, edge_index)``."""
        if self.graph:
            if key_padding_mask is not None and edge_index is not None:
                raise ValueError("graph=True takes edge_index only, not a key_padding_mask")
            edge_index = key_padding_mask if edge_index is None else edge_index
            key_padding_mask = None
            _check_input(x, self.normalized_shape[0], (2,), "[N, D] node features (graph=True)")
            if edge_index is None:
                raise ValueError("graph=True needs edge_index [2, E]")
        else:
            if edge_index is not None:
                raise ValueError("edge_index needs a graph layer: ContraNorm(dim, graph=True)")
            _check_input(x, self.normalized_shape[0], (3,),
                         "[B, L, D] tokens (for [N, D] graph nodes build ContraNorm(dim, graph=True))")
        h = contranorm(x, scale=self.effective_scale(), temperature=self.temperature, dual=self.dual,
                       identity=self.identity, key_padding_mask=key_padding_mask, edge_index=edge_index,
                       backend=self.backend)
        return F.layer_norm(h, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        scale = f"learnable{'(positive)' if self.positive else ''}" if self.learnable else self.scale
        return (f"{super().extra_repr()}, scale={scale}, temperature={self.temperature}, dual={self.dual}, "
                f"identity={self.identity}, graph={self.graph}, backend={self.backend!r}")


class DContraNorm(nn.Module):
    """Feature-wise D-ContraNorm: ``H - s * H softmax(H_hat^T H_hat / tau)``, columns of H L2-normalised.

    The D x D softmax runs over the rows of ``x`` [N, D] (a graph's nodes) or of each sequence of
    ``x`` [B, L, D]; no LayerNorm, no parameters.
    """

    def __init__(self, dim: int, scale: float = 0.1, temperature: float = 1.0):
        super().__init__()
        _check_scale_temperature(scale, temperature)
        self.dim, self.scale, self.temperature = dim, float(scale), float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim, (2, 3), "[N, D] or [B, L, D]")
        return contranorm_features_ref(x, scale=self.scale, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"{self.dim}, scale={self.scale}, temperature={self.temperature}"


# ---------------------------------------------------------------------------------------------
# timm ViTs with every LayerNorm a ContraNorm (norm1, norm2, final norm): timm's own
# VisionTransformer through its norm_layer hook.  ``contranorm=dict(scale=..., ...)`` sets the
# layer's options; everything else goes to timm (img_size, depth, num_classes, pretrained, ...).


def _contranorm_vit(base: str, pretrained: bool, kwargs: dict) -> nn.Module:
    options = {"scale": 0.1, **(kwargs.pop("contranorm", None) or {})}
    return timm.create_model(base, pretrained=pretrained, norm_layer=partial(ContraNorm, **options), **kwargs)


@register_model
def contranorm_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's ``vit_tiny_patch16_224`` with ContraNorm (default scale 0.1) in place of each LayerNorm."""
    return _contranorm_vit("vit_tiny_patch16_224", pretrained, kwargs)


@register_model
def contranorm_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's ``vit_small_patch16_224`` with ContraNorm (default scale 0.1) in place of each LayerNorm."""
    return _contranorm_vit("vit_small_patch16_224", pretrained, kwargs)


@register_model
def contranorm_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's ``vit_base_patch16_224`` with ContraNorm (default scale 0.1) in place of each LayerNorm."""
    return _contranorm_vit("vit_base_patch16_224", pretrained, kwargs)


__all__ = ["ContraNorm", "DContraNorm", "contranorm_vit_tiny_patch16_224", "contranorm_vit_small_patch16_224",
           "contranorm_vit_base_patch16_224"]
