"""AR: autoregressive pretraining, next-token prediction under causal attention.

docs/methods.md, "Autoregressive vs masked pretraining".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .sequence_base import SequenceMethod


class AR(SequenceMethod):
    """``L = mean_{t=0..L-2} -log p(x_{t+1} | x_{<=t})`` with a causal transformer."""

    name = "ar"
    causal = True

    def loss(self, views, *, index=None, epoch=None) -> torch.Tensor:
        x = self._tokens(views)
        logits = self.next_token_logits(self.encoder.hidden(x[:, :-1]))
        return F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
