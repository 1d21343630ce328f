"""SimCLR-Attn (MPCL, ICLR 2023): SimCLR with graph-attention weights on the pairs."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .. import dist
from ..functional import nt_xent
from .simclr import SimCLR

WEIGHTINGS = ("row", "alignment")


class SimCLRAttn(SimCLR):
    """NT-Xent whose pairs are weighted by attention on *backbone* features h (no gradient):

        w_i = exp(1 + cos(h0_i, h1_i)),    L = sum_i w_i l_i / sum_i w_i

    over the 2N rows (both rows of a pair carry its weight), ``l_i`` the NT-Xent of row i: the whole
    row loss is weighted, as in the authors' ``losses.py`` (``weighting="row"``, the default).
    ``weighting="alignment"`` weights only the alignment term, ``l_i = -w_i s(z_i, z_p(i)) + LSE_i``
    with ``w`` normalised to mean 1 (sslcore's earlier form; docs/methods.md).  With
    ``gather_distributed`` the weights are normalised over the global batch (an all-reduce of their
    sum), so the mean over ranks of the ranks' losses is the single-process loss.
    """

    name = "simclr-attn"

    def __init__(self, encoder, *, weighting: Literal[WEIGHTINGS] = "row", **options):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        super().__init__(encoder, **options)
        self.weighting = weighting

    @torch.no_grad()
    def attention_weights(self, h0: torch.Tensor, h1: torch.Tensor) -> torch.Tensor:
        """``exp(1 + cos(h0_i, h1_i))`` over the mean of all ranks' weights (fp32 or wider): mean 1 over the
        global batch."""
        wide = torch.promote_types(h0.dtype, torch.float32)
        w = torch.exp(1 + F.cosine_similarity(h0.to(wide), h1.to(wide), dim=1))
        total = torch.stack([w.sum(), torch.tensor(float(w.numel()), device=w.device)])
        if self.criterion.gather_distributed:
            total = dist.all_reduce_sum(total)
        return w / (total[0] / total[1])

    def loss(self, views, *, index=None, epoch=None) -> torch.Tensor:
        view0, view1 = views
        h = self.encoder(torch.cat([view0, view1]))
        z0, z1 = self.projector(h).chunk(2)
        w = self.attention_weights(*h.chunk(2))
        c = self.criterion
        if self.weighting == "alignment":
            return c(z0, z1, weight=w)
        rows = nt_xent(z0, z1, temperature=c.temperature, gather_distributed=c.gather_distributed,
                       reduction="none", backend=c.backend)
        return (rows * torch.cat([w, w]).to(rows.dtype)).mean()
