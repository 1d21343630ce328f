"""VLM: variable-length masked pretraining — **[our reading]** of the paper's masked objective with flexible
context lengths; no public code exists (docs/methods.md, "Autoregressive vs masked pretraining")."""
from __future__ import annotations

import torch

from ..checks import Fraction, Probability
from .sequence_base import MaskedSequenceMethod, check_ratio, mask_count, random_mask, suffix_mask


class VLM(MaskedSequenceMethod):
    """**[our reading]** Per sequence a ratio ``r ~ U[min_ratio, max_ratio]`` and ``n = clamp(round(r L), 1, L-1)``;
    with probability ``suffix_prob`` the last n positions are masked (a prompt of L-n tokens), otherwise n
    positions uniformly at random.  ``L = mean over masked t of -log p(x_t | x_visible)``, as MLM.
    """

    name = "vlm"

    def __init__(self, encoder, *, min_ratio: Fraction = 0.15, max_ratio: Fraction = 0.85,
                 suffix_prob: Probability = 0.5):
        super().__init__(encoder)
        self.min_ratio, self.max_ratio = check_ratio("min_ratio", min_ratio), check_ratio("max_ratio", max_ratio)
        if self.min_ratio > self.max_ratio:
            raise ValueError(f"min_ratio ({min_ratio}) must be <= max_ratio ({max_ratio})")
        if isinstance(suffix_prob, bool) or not isinstance(suffix_prob, (int, float)) or not 0 <= suffix_prob <= 1:
            raise ValueError(f"suffix_prob must be a probability in [0, 1], got {suffix_prob!r}")
        self.suffix_prob = float(suffix_prob)

    def targets_per_sequence(self, seq_len: int) -> float:
        """``E_r[clamp(round(r L), 1, L-1)]``: ``round(r L) = n`` for r in ``[(n - 1/2)/L, (n + 1/2)/L)``."""
        lo, hi = self.min_ratio, self.max_ratio
        if lo == hi:
            return float(mask_count(lo, seq_len))
        spans = ((n, min(hi, (n + 0.5) / seq_len) - max(lo, (n - 0.5) / seq_len)) for n in range(seq_len + 1))
        return sum(min(max(n, 1), seq_len - 1) * width for n, width in spans if width > 0) / (hi - lo)

    def draw_mask(self, batch: int, seq_len: int, generator: torch.Generator | None) -> torch.Tensor:
        ratio = self.min_ratio + (self.max_ratio - self.min_ratio) * torch.rand(batch, generator=generator,
                                                                                dtype=torch.float64)
        suffix = torch.rand(batch, generator=generator) < self.suffix_prob
        n = mask_count(ratio, seq_len)
        return torch.where(suffix[:, None], suffix_mask(n, seq_len), random_mask(batch, seq_len, ratio,
                                                                                  generator=generator))
