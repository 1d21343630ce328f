"""MLM: masked-token pretraining with a bidirectional transformer.

docs/methods.md, "Autoregressive vs masked pretraining".
"""
from __future__ import annotations

import torch

from ..checks import Fraction
from .sequence_base import MaskedSequenceMethod, check_ratio, mask_count, random_mask


class MLM(MaskedSequenceMethod):
    """Each sequence gets ``round(mask_ratio L)`` masked positions, uniformly at random, replaced by the learned
    mask token (no BERT 80/10/10 replacement); ``L = mean over masked t of -log p(x_t | x_visible)``.

    ``mask_ratio`` defaults to the data's (``data.mask_ratio``: 0.15 for text, 0.75 for image tokens).
    """

    name = "mlm"

    @classmethod
    def data_defaults(cls, data) -> dict:
        return {"mask_ratio": data.mask_ratio}

    def __init__(self, encoder, *, mask_ratio: Fraction | None = None):
        super().__init__(encoder)
        self.mask_ratio = check_ratio("mask_ratio", 0.15 if mask_ratio is None else mask_ratio)

    def targets_per_sequence(self, seq_len: int) -> float:
        return float(mask_count(self.mask_ratio, seq_len))

    def draw_mask(self, batch: int, seq_len: int, generator: torch.Generator | None) -> torch.Tensor:
        return random_mask(batch, seq_len, self.mask_ratio, generator=generator)
