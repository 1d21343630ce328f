"""Momentum (EMA) target networks shared by BYOL, MoCo v3 and DINO: the cosine schedule and the update."""
from __future__ import annotations

import math

import torch
from torch import nn


def cosine_momentum(base: float, progress: float, final: float = 1.0) -> float:
    """``m = final - (final - base) (cos(pi p) + 1) / 2`` at training progress ``p`` in [0, 1]: ``base`` at the
    start, ``final`` at the end (BYOL's schedule, also MoCo v3's and DINO's)."""
    p = min(max(float(progress), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * p) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``theta_target <- m theta_target + (1 - m) theta_online`` for every parameter (buffers, e.g. BatchNorm
    statistics, stay the target's own, as in lightly's ``update_momentum`` and solo-learn)."""
    for p_t, p in zip(target.parameters(), online.parameters()):
        p_t.mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)
