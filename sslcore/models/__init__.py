"""Encoders (backbones): ``create_encoder(name, in_chans)`` -> module mapping images to ``[B, num_features]``."""
from __future__ import annotations

import timm
from torch import nn

from .cnn import SmallCNN
from .gcn import GCN

ENCODERS = {"smallcnn": SmallCNN}


def create_encoder(name: str, *, in_chans: int = 1) -> nn.Module:
    """A registered encoder by name, else a timm model (``num_classes=0``: pooled features)."""
    if name in ENCODERS:
        return ENCODERS[name](in_chans=in_chans)
    if not timm.is_model(name):
        raise ValueError(f"unknown encoder {name!r}: not one of {', '.join(ENCODERS)} nor a timm model name")
    return timm.create_model(name, num_classes=0, in_chans=in_chans)


__all__ = ["ENCODERS", "GCN", "SmallCNN", "create_encoder"]
