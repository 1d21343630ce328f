"""Masked image modelling on a timm ViT (MAE, He et al. 2022): encode the visible patches only,
decode all positions with a light transformer, predict a per-patch target."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn


def random_masking(batch: int, length: int, mask_ratio: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample uniform masking (MAE): ``keep`` [B, L_keep] indices of visible patches (in a random
    order) and ``mask`` [B, L] bool, True where masked; ``L_keep = round(L (1 - mask_ratio))`` >= 1."""
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio!r}")
    n_keep = max(1, round(length * (1 - mask_ratio)))
    order = torch.rand(batch, length, device=device).argsort(1)
    keep = order[:, :n_keep]
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    mask.scatter_(1, keep, False)
    return keep, mask


class MaskedAutoencoder(nn.Module):
    """``forward(images, mask_ratio) -> (pred [B, L, out_dim], mask [B, L])``.

    The encoder is a timm ``VisionTransformer`` used through its own parts (patch embedding,
    positional embedding with prefix tokens, blocks, norm) on the prefix + visible tokens.  The
    decoder maps them to ``decoder_dim``, puts a learned mask token at every masked position, adds
    its own positional embedding, runs ``decoder_depth`` timm blocks and a linear head.
    """

    def __init__(self, encoder: VisionTransformer, out_dim: int, *, decoder_dim: int = 64, decoder_depth: int = 2,
                 decoder_heads: int = 4):
        super().__init__()
        if not isinstance(encoder, VisionTransformer):
            raise ValueError(f"masked image modelling needs a timm VisionTransformer, got {type(encoder).__name__}")
        self.encoder = encoder
        self.num_patches = encoder.patch_embed.num_patches
        prefix = encoder.num_prefix_tokens
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, prefix + self.num_patches, decoder_dim))
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, out_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)

    def encode_visible(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = enc._pos_embed(enc.patch_embed(images))
        prefix = enc.num_prefix_tokens
        visible = x[:, prefix:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        x = enc.norm_pre(torch.cat([x[:, :prefix], visible], 1))
        return enc.norm(enc.blocks(x))

    def forward(self, images: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        b, prefix = images.shape[0], self.encoder.num_prefix_tokens
        keep, mask = random_masking(b, self.num_patches, mask_ratio, images.device)
        x = self.decoder_embed(self.encode_visible(images, keep))
        full = self.mask_token.to(x.dtype).expand(b, self.num_patches, -1).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, x.shape[-1]), x[:, prefix:])
        x = torch.cat([x[:, :prefix], full], 1) + self.decoder_pos
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.head(x[:, prefix:]), mask
