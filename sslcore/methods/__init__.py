"""SSL methods, one file each: a model (encoder + heads) whose ``loss(batch)`` is its objective.

``METHODS`` maps the ``--method`` name to the class; a new method registers itself here.
"""
from __future__ import annotations

from torch import nn

from ..models import create_encoder
from .simclr import SimCLR

METHODS: dict[str, type[nn.Module]] = {"simclr": SimCLR}


def get_method(name: str) -> type[nn.Module]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def create_model(method: str, *, encoder: str, in_chans: int, **kwargs) -> nn.Module:
    """``METHODS[method]`` around ``create_encoder(encoder)``; ``kwargs`` go to the method."""
    return get_method(method)(create_encoder(encoder, in_chans=in_chans), **kwargs)


__all__ = ["METHODS", "SimCLR", "create_model", "get_method"]
