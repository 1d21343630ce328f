"""DEAR: diversity-enhanced autoregressive pretraining — **[our reading]** of the paper's AR variant with more
diverse targets per context; no public code exists (docs/methods.md, "Autoregressive vs masked pretraining")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from ..checks import PositiveInt
from .sequence_base import SequenceMethod, step_generator


class DEAR(SequenceMethod):
    """**[our reading]** Causal transformer; each position t (0..L-2) draws an offset
    ``k_t ~ U{1..min(max_offset, L-1-t)}`` and predicts ``x_{t+k_t}`` from ``x_{<=t}``:
    ``L = mean_t -log p(x_{t+k_t} | x_{<=t}, k_t)``.  The offset enters the head through a learned
    offset embedding: ``z = h_t + E[k_t];  z = z + MLP(LN(z));  logits = LMhead(z)`` (the MLP makes the offset
    change the prediction, not just add a per-offset bias).  ``max_offset = 1`` is AR with this head; the
    generation metrics use ``k = 1``.
    """

    name = "dear"
    causal = True

    def __init__(self, encoder, *, max_offset: PositiveInt = 4):
        super().__init__(encoder)
        if isinstance(max_offset, bool) or not isinstance(max_offset, int) or not 1 <= max_offset < encoder.seq_len:
            raise ValueError(f"max_offset must be an integer in [1, seq_len={encoder.seq_len}), got {max_offset!r}")
        dim = encoder.num_features
        self.max_offset = max_offset
        self.offset_embed = nn.Embedding(max_offset, dim)
        self.offset_norm = nn.LayerNorm(dim)
        self.offset_mlp = Mlp(dim, 4 * dim)

    def offset_logits(self, h: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Logits for the token ``offsets`` (1..max_offset, shaped like ``h[..., 0]``) after each hidden state."""
        z = h + self.offset_embed(offsets - 1)
        return self.encoder.logits(z + self.offset_mlp(self.offset_norm(z)))

    def next_token_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.offset_logits(h, torch.ones(h.shape[:-1], dtype=torch.long, device=h.device))

    def draw_offsets(self, batch: int, seq_len: int, generator: torch.Generator | None) -> torch.Tensor:
        """``[batch, seq_len-1]`` offsets: position t gets ``k ~ U{1..min(max_offset, L-1-t)}``."""
        limit = (seq_len - 1 - torch.arange(seq_len - 1)).clamp(max=self.max_offset)
        return 1 + (torch.rand(batch, seq_len - 1, generator=generator) * limit).long().clamp(max=limit - 1)

    def targets(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``x[b, t + offsets[b, t]]`` for t = 0..L-2."""
        return x.gather(1, torch.arange(x.shape[1] - 1, device=x.device) + offsets)

    def loss(self, views, *, index=None, epoch=None) -> torch.Tensor:
        x = self._tokens(views)
        offsets = self.draw_offsets(len(x), x.shape[1], step_generator(index, epoch)).to(x.device)
        logits = self.offset_logits(self.encoder.hidden(x[:, :-1]), offsets)
        return F.cross_entropy(logits.flatten(0, 1).float(), self.targets(x, offsets).flatten())
