"""SSL methods, one file each: an :class:`SSLMethod` whose ``loss(views, index=, epoch=)`` is its objective.

``METHODS`` maps the ``--method`` name to the class; a new method registers itself here.
"""
from __future__ import annotations

import functools
import inspect

from ..checks import check_value
from .ar import AR
from .arcl import ArCL
from .barlowtwins import BarlowTwins
from .base import SSLMethod
from .byol import BYOL
from .clustermim import ClusterMIM
from .dear import DEAR
from .dino import DINO
from .mae import MAE
from .mlm import MLM
from .moco import MoCo
from .mocov3 import MoCoV3
from .nnclr import NNCLR
from .simclr import SimCLR
from .simclr_attn import SimCLRAttn
from .simsiam import SimSiam
from .simsiam_multi import SimSiamMulti
from .vicreg import VICReg
from .vlm import VLM

METHODS: dict[str, type[SSLMethod]] = {"simclr": SimCLR, "mae": MAE, "clustermim": ClusterMIM}
METHODS.update({"moco": MoCo, "simsiam": SimSiam, "arcl": ArCL, "simclr-attn": SimCLRAttn,  # contrastive (MPCL, ArCL)
                "simsiam-multi": SimSiamMulti, "nnclr": NNCLR})
METHODS.update({"dino": DINO, "byol": BYOL, "mocov3": MoCoV3})  # baselines (issue 22)
METHODS.update({"barlowtwins": BarlowTwins, "vicreg": VICReg})  # redundancy reduction (issue 22)
METHODS.update({"ar": AR, "mlm": MLM, "dear": DEAR, "vlm": VLM})  # token sequences (sequence_base.py)

# Options the trainer passes to every method; a method whose constructor lacks one just does not get it.
COMMON_OPTIONS = ("temperature", "backend", "gather_distributed")


def get_method(name: str) -> type[SSLMethod]:
    """The method class registered as ``name``; a clear error listing the valid names otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


@functools.cache
def option_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keyword options of method ``name`` (name -> parameter: default and annotated domain), from its signatures."""
    options = {}
    for base in get_method(name).__mro__:  # a subclass's **kwargs reach its bases' options
        if issubclass(base, SSLMethod):
            for fn in (base.__init__, base.create):
                for p in inspect.signature(fn, eval_str=True).parameters.values():
                    if p.kind is p.KEYWORD_ONLY and p.name != "encoder":
                        options.setdefault(p.name, p)
    return options


def method_options(name: str) -> dict[str, object]:
    """The keyword options (name -> default) that method ``name`` accepts."""
    return {k: p.default for k, p in option_parameters(name).items()}


def check_options(name: str, options: dict) -> dict:
    """``options`` without the common ones ``name`` does not take, each checked against its annotated domain
    (ints widened to floats, lists to tuples); ``ValueError`` naming any unknown key or bad value."""
    valid = option_parameters(name)
    unknown = sorted(k for k in options if k not in valid and k not in COMMON_OPTIONS)
    if unknown:
        raise ValueError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(sorted(valid)) or 'none'}")
    return {k: check_value(f"option {k!r} of method {name!r}", v, valid[k].annotation)
            for k, v in options.items() if k in valid}


def create_model(method: str, data, *, encoder: str, **options) -> SSLMethod:
    """``METHODS[method].create(data, encoder=encoder, **options)`` after checking the option names."""
    return get_method(method).create(data, encoder=encoder, **check_options(method, options))


__all__ = ["AR", "BarlowTwins", "COMMON_OPTIONS", "ClusterMIM", "DEAR", "MAE", "METHODS", "MLM", "ArCL", "MoCo",
           "NNCLR", "SSLMethod", "SimCLR", "SimCLRAttn", "SimSiam", "SimSiamMulti", "VICReg", "VLM", "check_options",
           "create_model", "get_method", "method_options", "option_parameters"]
__all__ += ["BYOL", "DINO", "MoCoV3"]  # issue 22
