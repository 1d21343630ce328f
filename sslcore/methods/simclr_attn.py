"""SimCLR-Attn (MPCL, ICLR 2023): SimCLR with graph-attention weights on the positive pairs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dist
from .simclr import SimCLR


class SimCLRAttn(SimCLR):
    """NT-Xent whose alignment term of pair i is weighted by attention on *backbone* features h:

        w_i = exp(cos(h0_i, h1_i)) / mean_j exp(cos(h0_j, h1_j))      (no gradient)
        l_i = -w_i s(z_i, z_p(i)) + log sum_{j != i} exp s(z_i, z_j)

    (both rows of a pair carry the same weight; negatives are unchanged).  The weights reach the
    fused loss through its ``weight`` argument.  With ``gather_distributed=True`` the mean runs over
    the global batch, so the loss equals the single-process one.
    """

    name = "simclr-attn"

    @torch.no_grad()
    def attention_weights(self, h0: torch.Tensor, h1: torch.Tensor) -> torch.Tensor:
        """``exp(cos(h0_i, h1_i))`` normalised to average 1 over the (global) batch, fp32."""
        w = torch.exp(F.cosine_similarity(h0.float(), h1.float(), dim=1))
        return w / (dist.gather(w) if self.criterion.gather_distributed else w).mean()

    def loss(self, views, *, index=None, epoch=None) -> torch.Tensor:
        view0, view1 = views
        h = self.encoder(torch.cat([view0, view1]))
        z0, z1 = self.projector(h).chunk(2)
        return self.criterion(z0, z1, weight=self.attention_weights(*h.chunk(2)))
