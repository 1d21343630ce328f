"""A small pre-norm transformer over token sequences, causal or bidirectional (SDPA attention).

Input: token embedding (a learned mask token replaces masked positions) + learned positional
embedding -> ``depth`` blocks ``x + Attn(LN(x))``, ``x + MLP(LN(x))`` -> LayerNorm = hidden states
``[B, L, D]``.  The LM head maps hidden states to ``[..., vocab_size]`` logits (tied to the token
embedding by default).  Only bidirectional models have the mask token (a causal model never sees
masks, and an unused parameter would trouble DDP).  ``SIZES`` names the sizes ``--encoder`` picks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

POOLS = ("mean", "first", "last")
SIZES = {"transformer-tiny": dict(dim=64, depth=2, heads=4), "transformer-small": dict(dim=128, depth=4, heads=4),
         "transformer-base": dict(dim=256, depth=6, heads=8)}
DEFAULT_SIZE = "transformer-small"


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (``is_causal`` for causal runs)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, *, causal: bool) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` (timm's ``Mlp``, GELU)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, *, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=causal)
        return x + self.mlp(self.norm2(x))


class SequenceTransformer(nn.Module):
    """Transformer over ``[B, L]`` token ids; ``forward`` pools the hidden states to ``[B, dim]``
    (``pool``: mean over positions, the first or the last position) for probes."""

    def __init__(self, vocab_size: int, seq_len: int, *, dim: int = 128, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 4.0, causal: bool = False, tie_head: bool = True, pool: str = "mean"):
        super().__init__()
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.vocab_size, self.seq_len, self.causal, self.pool = vocab_size, seq_len, causal, pool
        self.num_features = dim
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, dim))
        self.mask_token = None if causal else nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = None if tie_head else nn.Linear(dim, vocab_size, bias=False)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))
        for p in (self.tok_embed.weight, self.pos_embed, self.mask_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def hidden(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[B, L, dim]``; positions where ``mask`` (bool ``[B, L]``) is True see the mask token."""
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.seq_len:
            raise ValueError(f"tokens must be [B, L] with 1 <= L <= {self.seq_len}, got {tuple(tokens.shape)}")
        h = self.tok_embed(tokens)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("mask given to a causal model, which has no mask token")
            h = torch.where(mask.unsqueeze(-1), self.mask_token.to(h.dtype), h)
        h = h + self.pos_embed[:, :tokens.shape[1]]
        for block in self.blocks:
            h = block(h, causal=self.causal)
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM-head logits ``[..., vocab_size]`` of hidden states ``[..., dim]``."""
        weight = self.tok_embed.weight if self.head is None else self.head.weight
        return F.linear(h, weight, self.head_bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.hidden(tokens)
        if self.pool == "mean":
            return h.mean(1)
        return h[:, 0] if self.pool == "first" else h[:, -1]


def create_sequence_encoder(name: str, vocab_size: int, seq_len: int, *, causal: bool,
                            pool: str = "mean") -> SequenceTransformer:
    """The ``SIZES[name]`` transformer; ``"smallcnn"`` (the trainer's default ``--encoder``, an image CNN)
    means the default size ``transformer-small`` for token data."""
    size = DEFAULT_SIZE if name == "smallcnn" else name
    if size not in SIZES:
        raise ValueError(f"encoder {name!r} is not a sequence model; token data takes --encoder {', '.join(SIZES)}")
    return SequenceTransformer(vocab_size, seq_len, causal=causal, pool=pool, **SIZES[size])
