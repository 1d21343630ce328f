"""ContraNorm layers over the fused op, and ContraNorm ViTs registered with timm.

``ContraNorm(H) = LayerNorm(H - s * softmax(H_hat H_hat^T / tau) H)`` (H_hat: rows L2-normalised),
a drop-in for ``nn.LayerNorm`` and timm's ``norm_layer``.  ``contranorm_vit_{tiny,small,base}_patch16_224``
are registered with timm as soon as both this module and timm are imported, in either order: importing
this module does not import timm (a few seconds), it registers the models when timm arrives
(:func:`register_timm_models`).  Formulas, variants, conventions and how they differ from the authors'
code: docs/methods.md.
"""
from __future__ import annotations

import math
import sys
from functools import partial

import torch
from torch import nn

from .kernels import BACKENDS, contranorm, contranorm_features_ref
from .kernels._backend import check_finite, validating


def _check_scale_temperature(scale, temperature):
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_dim(dim):
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int (the number of channels), got {type(dim).__name__}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1 (the number of channels), got {dim}")


def _check_input(x, dim, ranks, what):
    """``ranks``: the allowed ``x.dim()`` (None: any >= 1)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0 or (ranks is not None and x.dim() not in ranks):
        raise ValueError(f"x must be {what}, got shape {tuple(x.shape)}")
    if x.shape[-1] != dim:
        raise ValueError(f"x has {x.shape[-1]} channels but the layer was built for dim={dim}")


def _broadcast_mask(key_padding_mask, shape):
    """``key_padding_mask`` broadcast to ``shape`` (the input's shape without its channel axis)."""
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor, got {type(key_padding_mask).__name__}")
    try:
        return key_padding_mask.expand(shape)
    except RuntimeError:
        raise ValueError(f"key_padding_mask of shape {tuple(key_padding_mask.shape)} does not broadcast to "
                         f"{tuple(shape)}, the input's shape without its channel axis") from None


class ContraNorm(nn.LayerNorm):
    """``LayerNorm(H - s * softmax(H_hat H_hat^T / tau) H)``; with ``s = 0`` exactly ``nn.LayerNorm(dim, eps)``.

    A subclass of ``nn.LayerNorm`` (same ``weight``/``bias``, so LayerNorm checkpoints load), usable
    as timm's ``norm_layer``: ``partial(ContraNorm, scale=0.1)``.  Inputs (``D = dim``):

    * ``[B, L, D]`` tokens with an optional ``key_padding_mask`` [B, L] (True = padding): the softmax
      runs over the tokens of each sequence, never across the batch; padding tokens take no part in it
      and are only LayerNorm'ed;
    * ``[..., L, D]`` with more leading axes (timm's ``qk_norm``: ``[B, heads, L, head_dim]``): each
      ``[L, D]`` slice is one sequence (the input is batched as ``[-1, L, D]``); a ``key_padding_mask``
      must broadcast to ``x.shape[:-1]``;
    * ``[B, D]`` or ``[D]``, no token axis (timm's ``fc_norm`` after pooling): exactly
      ``nn.LayerNorm``, for every ``s``.  A token alone has only itself to contrast with (``P = 1``),
      so the update would merely scale it by ``1 - s`` (``identity``: leave it as is), which the
      LayerNorm removes anyway for a scalar ``s < 1``;
    * ``graph=True``: ``x`` [N, D] and ``edge_index`` [2, E] (also positional: ``norm(x, edge_index)``):
      the softmax runs over all nodes except each node itself and its neighbours.

    ``dual``: ``P + P^T`` instead of ``P``.  ``identity``: ``(1 + s) H - s P H``; under the LayerNorm
    this equals the plain form with ``s / (1 + s)`` (up to ``eps``).  ``learnable``: a per-channel scale
    ``[dim]`` initialised to ``scale`` (``positive``: stored as ``log s``, used as ``exp``); with
    ``identity`` too this is ``(1 + s) H - s P H`` per channel, where the authors' ViT code has
    ``s H - s P H`` in that one case.  ``backend`` is the op's (``"auto"``, ``"triton"``, ``"torch"``).
    """

    def __init__(self, dim: int, scale: float = 0.1, temperature: float = 1.0, dual: bool = False,
                 identity: bool = False, learnable: bool = False, positive: bool = False, eps: float = 1e-6,
                 graph: bool = False, backend: str = "auto", *, device=None, dtype=None):
        _check_dim(dim)
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
        """``x`` [..., L, D] with an optional ``key_padding_mask`` broadcastable to ``x.shape[:-1]``
        (True = padding), or ``x`` [B, D] / [D] (LayerNorm only); with ``graph=True``, ``x`` [N, D] and
        ``edge_index`` [2, E], also accepted positionally: ``norm(x, edge_index)``."""
        if self.graph:
            if key_padding_mask is not None and edge_index is not None:
                raise ValueError("graph=True takes edge_index only, not a key_padding_mask")
            edge_index = key_padding_mask if edge_index is None else edge_index
            _check_input(x, self.normalized_shape[0], (2,), "[N, D] node features (graph=True)")
            if edge_index is None:
                raise ValueError("graph=True needs edge_index [2, E]")
            if self._no_update():
                return super().forward(x)
            return contranorm(x, scale=self.effective_scale(), temperature=self.temperature, dual=self.dual,
                              identity=self.identity, edge_index=edge_index, layer_norm=self._layer_norm(),
                              backend=self.backend)
        if edge_index is not None:
            raise ValueError("edge_index needs a graph layer: ContraNorm(dim, graph=True)")
        _check_input(x, self.normalized_shape[0], None, "[..., L, D] tokens, or [B, D] / [D]")
        if x.dim() < 3:  # no token axis: plain LayerNorm (see the class docstring)
            if key_padding_mask is not None:
                raise ValueError(f"key_padding_mask needs tokens [..., L, D], got x of shape {tuple(x.shape)}")
            return super().forward(x)
        if key_padding_mask is not None:
            key_padding_mask = _broadcast_mask(key_padding_mask, x.shape[:-1]).reshape(-1, x.shape[-2])
        if self._no_update():
            return super().forward(x)
        return contranorm(x.reshape(-1, *x.shape[-2:]), scale=self.effective_scale(), temperature=self.temperature,
                          dual=self.dual, identity=self.identity, key_padding_mask=key_padding_mask,
                          layer_norm=self._layer_norm(), backend=self.backend).reshape(x.shape)

    def _no_update(self) -> bool:
        """A fixed ``s = 0``: the update is ``H`` itself, so the layer is its LayerNorm (bit for bit)."""
        return not self.learnable and self.scale == 0

    def _layer_norm(self):
        """The LayerNorm the op fuses after the update (the kernels apply it in the same pass as ``H - s P H``)."""
        return self.weight, self.bias, self.eps

    def extra_repr(self) -> str:
        scale = f"learnable{'(positive)' if self.positive else ''}" if self.learnable else self.scale
        return (f"{super().extra_repr()}, scale={scale}, temperature={self.temperature}, dual={self.dual}, "
                f"identity={self.identity}, graph={self.graph}, backend={self.backend!r}")


class DContraNorm(nn.Module):
    """Feature-wise D-ContraNorm: ``H - s * H P`` (``identity``: ``(1 + s) H - s H P``), no LayerNorm, no parameters.

    ``P = softmax(H_hat^T H_hat / tau)``, the D x D softmax taken row-wise, with ``H_hat`` = each token
    (row) of H L2-normalised; the tokens are the rows of ``x`` [N, D] (a graph's nodes) or of each
    sequence of ``x`` [B, L, D].  The authors' reported ogbn-arxiv run is ``scale=1, temperature=1,
    identity=True``.
    """

    def __init__(self, dim: int, scale: float = 0.1, temperature: float = 1.0, identity: bool = False):
        super().__init__()
        _check_dim(dim)
        _check_scale_temperature(scale, temperature)
        self.dim, self.scale, self.temperature, self.identity = dim, float(scale), float(temperature), identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim, (2, 3), "[N, D] or [B, L, D]")
        if validating(x.device):
            check_finite("x", x)
        return contranorm_features_ref(x, scale=self.scale, temperature=self.temperature, identity=self.identity)

    def extra_repr(self) -> str:
        return f"{self.dim}, scale={self.scale}, temperature={self.temperature}, identity={self.identity}"


# ---------------------------------------------------------------------------------------------
# timm ViTs with every LayerNorm a ContraNorm (norm1, norm2, final norm): timm's own
# VisionTransformer through its norm_layer hook.  ``contranorm=dict(scale=..., ...)`` sets the
# layer's options; everything else goes to timm (img_size, depth, num_classes, pretrained, ...).


def _contranorm_vit(base: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm

    options = {"scale": 0.1, **(kwargs.pop("contranorm", None) or {})}
    return timm.create_model(base, pretrained=pretrained, norm_layer=partial(ContraNorm, **options), **kwargs)


def contranorm_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's ``vit_tiny_patch16_224`` with ContraNorm (default scale 0.1) in place of each LayerNorm."""
    return _contranorm_vit("vit_tiny_patch16_224", pretrained, kwargs)


def contranorm_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's ``vit_small_patch16_224`` with ContraNorm (default scale 0.1) in place of each LayerNorm."""
    return _contranorm_vit("vit_small_patch16_224", pretrained, kwargs)


def contranorm_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's ``vit_base_patch16_224`` with ContraNorm (default scale 0.1) in place of each LayerNorm."""
    return _contranorm_vit("vit_base_patch16_224", pretrained, kwargs)


TIMM_MODELS = (contranorm_vit_tiny_patch16_224, contranorm_vit_small_patch16_224, contranorm_vit_base_patch16_224)


def register_timm_models() -> None:
    """Register :data:`TIMM_MODELS` with timm (imports timm; registering twice is a no-op)."""
    import timm
    from timm.models import register_model

    for fn in TIMM_MODELS:
        if not timm.is_model(fn.__name__):
            register_model(fn)


if "timm" in sys.modules:  # imported after timm (sslcore._imports registers the models when timm comes later)
    register_timm_models()


__all__ = ["ContraNorm", "DContraNorm", "TIMM_MODELS", "contranorm_vit_base_patch16_224",
           "contranorm_vit_small_patch16_224", "contranorm_vit_tiny_patch16_224", "register_timm_models"]
