"""MAE (He et al., 2022): reconstruct the masked patches' normalised pixels; ClusterMIM's baseline.

:class:`MaskedImageModel` is the part MAE and ClusterMIM share: a timm ViT encoder (for images
of the data's size), per-sample random masking, a light decoder and a per-patch loss.
"""
from __future__ import annotations

import timm
import torch

from ..checks import Fraction, LayerCount, NonNegative, PositiveInt, Width, check_value
from ..models.mae import MaskedAutoencoder
from ..tokenizers import patchify
from .base import SSLMethod

# The ViT the trainer's default ``--encoder smallcnn`` becomes for MIM: small enough for 2 CPU cores.
SMALL_VIT = dict(embed_dim=64, depth=4, num_heads=4)


def default_patch_size(image_size: int) -> int:
    """2 for digits' 8x8, 4 up to 64x64 (CIFAR: 8x8 patches), else 16 (ImageNet)."""
    return 2 if image_size <= 16 else 4 if image_size <= 64 else 16


class MaskedImageModel(SSLMethod):
    """Encoder ``timm.create_model(encoder_name, **encoder_kwargs)`` (a ViT with mean-pooled features
    for probes) inside a :class:`~sslcore.models.mae.MaskedAutoencoder`; subclasses give ``out_dim``
    and ``patch_loss(pred, images, mask, index)`` (``index``: the images' positions in the training set).
    MAE's recipe: crop and flip only, AdamW betas (0.9, 0.95), fixed sin-cos position embeddings."""

    n_views = 1
    recipe = "mae"
    optimizer_defaults = {"betas": (0.9, 0.95)}

    def __init__(self, encoder_name: str, encoder_kwargs: dict, out_dim: int, *, mask_ratio: Fraction = 0.75,
                 decoder_dim: Width = 64, decoder_depth: LayerCount = 2, decoder_heads: LayerCount = 4):
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio!r}")
        if decoder_dim % decoder_heads:
            raise ValueError(f"decoder_dim ({decoder_dim}) must be a multiple of decoder_heads ({decoder_heads})")
        encoder = timm.create_model(encoder_name, num_classes=0, **encoder_kwargs)
        super().__init__(encoder)
        self.encoder_name, self.encoder_kwargs, self.mask_ratio = encoder_name, dict(encoder_kwargs), mask_ratio
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.mae = MaskedAutoencoder(encoder, out_dim, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                                     decoder_heads=decoder_heads)

    @staticmethod
    def encoder_spec(data, encoder: str, patch_size: int | None = None) -> tuple[str, dict]:
        """The timm name and kwargs of the ViT for ``data``'s images (``smallcnn``, the trainer's
        default, means :data:`SMALL_VIT`)."""
        c, h, w = data.image_shape
        p = default_patch_size(min(h, w)) if patch_size is None else patch_size
        if h % p or w % p:
            raise ValueError(f"images of size {h}x{w} are not a multiple of patch_size={p}")
        # fc_norm=False: the final LayerNorm stays on the tokens (timm would move it after the pooling for
        # global_pool="avg"), so the decoder and the feature tokenizer get normalised tokens, as in MAE
        kwargs = dict(img_size=(h, w), patch_size=p, in_chans=c, global_pool="avg", fc_norm=False)
        if encoder == "smallcnn":
            return "vit_tiny_patch16_224", {**kwargs, **SMALL_VIT}
        if not timm.is_model(encoder) or not encoder.startswith(("vit_", "deit")):
            raise ValueError(f"masked image modelling needs a timm ViT encoder (e.g. vit_tiny_patch16_224), "
                             f"got {encoder!r}")
        return encoder, kwargs

    def loss(self, views, *, index=None, epoch=None) -> torch.Tensor:
        (images,) = views
        pred, mask = self.mae(images, self.mask_ratio)
        return self.patch_loss(pred, images, mask, index)


class MAE(MaskedImageModel):
    """``loss = mean over masked patches of |pred - norm(patch)|^2 / (p*p*C)``, MAE's ``norm_pix_loss``
    with a floor: ``norm(x) = (x - mean(x)) / max(sqrt(var(x) + 1e-6), min_patch_std)`` over each target
    patch, so a near-constant patch's interpolation residue is not blown up to unit variance
    (``min_patch_std=0``: MAE's exact target; docs/methods.md, "Near-constant patches")."""

    name = "mae"

    def __init__(self, encoder_name: str, encoder_kwargs: dict, *, norm_pix_loss: bool = True,
                 min_patch_std: NonNegative = 0.02, **kwargs):
        check_value("min_patch_std", min_patch_std, NonNegative)
        p, c = encoder_kwargs["patch_size"], encoder_kwargs["in_chans"]
        super().__init__(encoder_name, encoder_kwargs, p * p * c, **kwargs)
        self.norm_pix_loss, self.min_patch_std = norm_pix_loss, min_patch_std

    @classmethod
    def create(cls, data, *, encoder: str, patch_size: PositiveInt | None = None, **options) -> "MAE":
        return cls(*cls.encoder_spec(data, encoder, patch_size), **options)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, L, p*p*C]`` fp32: each patch's pixels, ``norm``-ed (class docstring) when ``norm_pix_loss``."""
        target = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt().clamp_min(self.min_patch_std)
        return target

    def patch_loss(self, pred, images, mask, index=None):
        per_patch = (pred.float() - self.targets(images)).pow(2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()
