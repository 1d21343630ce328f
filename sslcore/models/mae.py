"""Masked image modelling on a timm ViT (MAE, He et al. 2022): encode the visible patches only,
decode all positions with a light transformer, predict a per-patch target.  Both position
embeddings are MAE's fixed 2-D sin-cos ones (:func:`sincos_pos_embed`), not learned."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding ``[grid_h * grid_w, dim]`` in raster order: the first
    half of the channels encodes the column, the second the row, each as
    ``[sin(pos * w_i), cos(pos * w_i)]`` with ``w_i = 10000^(-i / (dim/4))``, ``i < dim/4``."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                                indexing="ij")

    def one(pos):
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], 1)

    return torch.cat([one(cols), one(rows)], 1).float()


def _fixed_pos(num_rows: int, grid: tuple[int, int], dim: int) -> torch.Tensor:
    """``[1, num_rows, dim]``: zeros for the prefix (CLS) rows, then :func:`sincos_pos_embed` of the grid."""
    pos = sincos_pos_embed(dim, *grid)
    return torch.cat([torch.zeros(num_rows - len(pos), dim), pos])[None]


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
    position embedding with prefix tokens, blocks, norm) on the prefix + visible tokens; its position
    embedding is set to MAE's fixed sin-cos one and frozen (zeros on the CLS token), as is the decoder's.  The
    decoder maps them to ``decoder_dim``, puts a learned mask token at every masked position, adds
    its own position embedding, runs ``decoder_depth`` timm blocks and a linear head.
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
        grid = tuple(encoder.patch_embed.grid_size)
        with torch.no_grad():
            encoder.pos_embed.copy_(_fixed_pos(encoder.pos_embed.shape[1], grid, encoder.embed_dim))
        encoder.pos_embed.requires_grad_(False)
        self.register_buffer("decoder_pos", _fixed_pos(prefix + self.num_patches, grid, decoder_dim))
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, out_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

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
