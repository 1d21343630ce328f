"""DINO (Caron et al., ICCV 2021): a student matches the centred, sharpened output of an EMA teacher across crops."""
from __future__ import annotations

import copy
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import NonNegativeInt, Range, Temperature, UnitInterval, Width
from ..losses import DINOLoss
from .base import SSLMethod
from .momentum import cosine_momentum, ema_update

PAPER_WIDTH, PAPER_HIDDEN, PAPER_BOTTLENECK, PAPER_PROTOTYPES = 384, 2048, 256, 65536  # ViT-S/16's head
Prototypes = Annotated[int, Range(1, 2 ** 20)]
CropCount = Annotated[int, Range(0, 64)]


def head_widths(width: int) -> tuple[int, int, int]:
    """``(hidden, bottleneck, prototypes)`` for features of ``width``: the paper's head (2048, 256, 65536 on
    ViT-S/16's 384 features) scaled by ``min(1, width / 384)``, so a narrow encoder keeps the paper's ratios and
    a wide one (ResNet-50's 2048) the paper's widths, as the authors use for both (docs/methods.md)."""
    scale = min(1.0, width / PAPER_WIDTH)
    return tuple(max(1, round(w * scale)) for w in (PAPER_HIDDEN, PAPER_BOTTLENECK, PAPER_PROTOTYPES))


class DINOHead(nn.Module):
    """``x -> normalize(mlp(x)) . normalize(V)^T``: a 3-layer MLP (Linear-GELU-Linear-GELU-Linear to the
    bottleneck, weights from N(0, 0.02) truncated, zero biases), L2-normalised, then the prototype layer
    ``V [K, bottleneck]`` with unit-norm rows: the authors' weight-normalised last layer with its norm ``g``
    frozen at 1 (``norm_last_layer=True``), written as the normalisation it is."""

    def __init__(self, dim_in: int, hidden: int, bottleneck: int, n_prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = nn.Linear(bottleneck, n_prototypes, bias=False)  # torch's default init, as the authors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.last_layer.weight, dim=1))


class DINO(SSLMethod):
    """Student ``h(f(x))`` and teacher ``h'(f'(x))``, an EMA of the student (encoder and head).

    Views: 2 global crops then ``local_crops`` smaller ones (the ``dino`` recipe; views of one size go
    through the encoder together, as the authors' multi-crop wrapper).  The teacher sees the global crops,
    the student every crop; :class:`~sslcore.losses.DINOLoss` pairs each teacher view with every other
    student view, its teacher temperature warmed up over the trainer's epochs (``epoch - 1``: lightly and the
    authors count from 0).  Each optimizer update the teacher first moves toward the student,
    ``theta' <- m theta' + (1 - m) theta`` with ``m = cosine_momentum(momentum, progress)`` (0.996 -> 1; once
    per update, also under gradient accumulation).  Head widths default to :func:`head_widths`.  Probe
    features come from the student encoder (the authors evaluate the teacher: docs/methods.md).
    """

    name = "dino"
    recipe = "dino"

    def __init__(self, encoder: nn.Module, *, out_dim: Prototypes | None = None, hidden: Width | None = None,
                 bottleneck: Width | None = None, local_crops: CropCount = 8, teacher_temp: Temperature = 0.07,
                 warmup_teacher_temp: Temperature = 0.04, warmup_teacher_temp_epochs: NonNegativeInt = 30,
                 student_temp: Temperature = 0.1, center_momentum: UnitInterval = 0.9,
                 momentum: UnitInterval = 0.996):
        super().__init__(encoder)
        default = head_widths(encoder.num_features)
        hidden, bottleneck, out_dim = (d if v is None else v for v, d in zip((hidden, bottleneck, out_dim), default))
        self.head = DINOHead(encoder.num_features, hidden, bottleneck, out_dim)
        self.teacher_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.criterion = DINOLoss(out_dim, warmup_teacher_temp=warmup_teacher_temp, teacher_temp=teacher_temp,
                                  warmup_teacher_temp_epochs=warmup_teacher_temp_epochs, student_temp=student_temp,
                                  center_momentum=center_momentum)
        self.n_views, self.momentum = 2 + local_crops, float(momentum)
        self._ema_done_at = None  # the progress of the last teacher update (once per optimizer update)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """The teacher's EMA step at this update's momentum.  A repeat call at the same ``progress`` > 0 (the next
        micro-batch of an accumulated update) does nothing; at 0 (the first update, where teacher = student, or a
        loop of the user's own that never sets ``progress``) every call steps."""
        if self.progress > 0 and self._ema_done_at == self.progress:
            return
        m = cosine_momentum(self.momentum, self.progress)
        ema_update(self.teacher_encoder, self.encoder, m)
        ema_update(self.teacher_head, self.head, m)
        self._ema_done_at = self.progress

    @staticmethod
    def _by_size(encoder: nn.Module, views) -> torch.Tensor:
        """Features of ``views`` in order, each run of equally sized views through ``encoder`` in one batch."""
        out, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape == views[start].shape:
                end += 1
            out.append(encoder(torch.cat(views[start:end])))
            start = end
        return torch.cat(out)

    def loss(self, views, *, index=None, epoch=1) -> torch.Tensor:
        if len(views) != self.n_views:
            raise ValueError(f"DINO was built for {self.n_views} views (2 global + {self.n_views - 2} local crops), "
                             f"got {len(views)}")
        if self.training:
            self.momentum_update()
        with torch.no_grad():
            teacher = self.teacher_head(self._by_size(self.teacher_encoder, views[:2])).chunk(2)
        student = self.head(self._by_size(self.encoder, views)).chunk(self.n_views)
        return self.criterion(list(teacher), list(student), epoch=epoch - 1)
