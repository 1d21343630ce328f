"""SimSiam-Multi (MPCL, ICLR 2023): SimSiam whose target also aggregates last epoch's projection of the sample."""
from __future__ import annotations

import torch
from torch import nn

from .. import dist
from ..checks import PositiveInt, UnitInterval, Width
from ..models import create_encoder
from .simsiam import SimSiam


class SimSiamMulti(SimSiam):
    """Multi-stage aggregation (like jumping knowledge in GNNs) on top of :class:`SimSiam`.

    A per-sample memory ``M`` (a buffer of ``n_train`` rows) holds each training sample's second-view
    projection from the last time it was seen, i.e. the previous epoch: after every step ``M[n] <- z1_n``
    (as the authors' code stores view 2's).  From epoch ``mix_epoch`` on (52, counted from 1: the authors
    mix once their 0-based epoch exceeds 50; docs/methods.md) the stop-gradient target of each view becomes

        t_v = (1 - mix) z_v + mix M[n]       (mix = 0.5)

    before that epoch the targets are SimSiam's.  Unwritten rows are zero, and mixing in zero only
    rescales the target, which the cosine ignores: such a sample keeps SimSiam's target.  With
    ``gather_distributed=True`` every rank writes every rank's samples, so the memories stay equal
    (the loss itself is each rank's own samples' mean, as SimSiam's).
    """

    name = "simsiam-multi"

    def __init__(self, encoder: nn.Module, n_train: int, *, mix_epoch: PositiveInt = 52, mix: UnitInterval = 0.5,
                 proj_hidden: Width | None = None, proj_dim: Width | None = None, pred_hidden: Width | None = None,
                 gather_distributed: bool = False):
        if not isinstance(n_train, int) or n_train <= 0:
            raise ValueError(f"n_train must be a positive integer, got {n_train!r}")
        if not isinstance(mix_epoch, int) or isinstance(mix_epoch, bool) or mix_epoch < 1:
            raise ValueError(f"mix_epoch must be an integer >= 1, got {mix_epoch!r}")
        if not isinstance(mix, (int, float)) or not 0.0 <= mix < 1.0:
            raise ValueError(f"mix must lie in [0, 1), got {mix!r}")
        super().__init__(encoder, proj_hidden=proj_hidden, proj_dim=proj_dim, pred_hidden=pred_hidden)
        self.mix_epoch, self.mix, self.gather_distributed = mix_epoch, float(mix), gather_distributed
        self.register_buffer("memory", torch.zeros(n_train, self.proj_dim))

    @classmethod
    def create(cls, data, *, encoder: str, **options) -> "SimSiamMulti":
        """The memory has one row per training sample: ``data.n_train``."""
        encoder = create_encoder(encoder, in_chans=data.in_chans, image_shape=data.image_shape)
        return cls(encoder, data.n_train, **options)

    def _check_step(self, index, epoch, batch: int) -> None:
        if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.shape != (batch,):
            got = f"{index.dtype} {tuple(index.shape)}" if isinstance(index, torch.Tensor) else repr(index)
            raise ValueError(f"index must be an int64 tensor of shape [{batch}] (the samples' training-set "
                             f"positions), got {got}")
        if int(index.min()) < 0 or int(index.max()) >= self.memory.shape[0]:
            raise ValueError(f"index values must lie in [0, {self.memory.shape[0]}) (the training set size)")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise ValueError(f"epoch must be an integer >= 1 (counted from 1), got {epoch!r}")

    def loss(self, views, *, index=None, epoch=None) -> torch.Tensor:
        self._check_step(index, epoch, views[0].shape[0])
        return super().loss(views, index=index, epoch=epoch)

    @torch.no_grad()
    def targets(self, z0, z1, index, epoch):
        """Mix the memory into the detached projections (from ``mix_epoch`` on), then write this step's projections."""
        t0, t1 = z0.detach(), z1.detach()
        if epoch >= self.mix_epoch:
            past = self.memory[index].to(t0.dtype)
            t0, t1 = ((1 - self.mix) * t + self.mix * past for t in (t0, t1))
        if self.training:
            z, idx = z1.detach(), index
            if self.gather_distributed:
                z, idx = dist.gather(z, check=False), dist.gather(idx, check=False)
            self.memory[idx] = z.to(self.memory.dtype)
        return t0, t1
