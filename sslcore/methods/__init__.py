"""SSL methods, one file each: an :class:`SSLMethod` whose ``loss(views, index=, epoch=)`` is its objective.

``METHODS`` maps the ``--method`` name to the class, registered as ``"module:Class"`` (a module of this
package) and imported on first use; :data:`~sslcore.methods.options.OPTIONS` holds every registered method's
options and their domains for the CLI, which reads them without importing torch.  A new method: its line in
``METHODS`` below, then ``python -m sslcore.methods.options`` (tests/test_cli.py fails until it is rerun).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import types
import typing
from collections.abc import MutableMapping

from .._imports import lazy_attributes
from ..checks import check_value, suggest


class Registry(MutableMapping):
    """name -> method class; a value given as ``"module:Class"`` (``module`` of this package) is imported when
    the name is first looked up, so that listing the names imports nothing."""

    def __init__(self, entries: dict):
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> type:
        value = self._entries[name]
        if isinstance(value, str):
            module, _, cls = value.partition(":")
            value = self._entries[name] = getattr(importlib.import_module(f".{module}", __name__), cls)
        return value

    def __setitem__(self, name: str, value) -> None:
        self._entries[name] = value

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self._entries!r})"


METHODS = Registry({"simclr": "simclr:SimCLR", "mae": "mae:MAE", "clustermim": "clustermim:ClusterMIM"})
METHODS.update({"moco": "moco:MoCo", "simsiam": "simsiam:SimSiam", "arcl": "arcl:ArCL",  # contrastive (MPCL, ArCL)
                "simclr-attn": "simclr_attn:SimCLRAttn", "simsiam-multi": "simsiam_multi:SimSiamMulti",
                "nnclr": "nnclr:NNCLR"})
METHODS.update({"byol": "byol:BYOL", "mocov3": "mocov3:MoCoV3", "dino": "dino:DINO",  # baselines (issue 22)
                "barlowtwins": "barlowtwins:BarlowTwins", "vicreg": "vicreg:VICReg"})
METHODS.update({"ar": "ar:AR", "mlm": "mlm:MLM", "dear": "dear:DEAR", "vlm": "vlm:VLM"})  # token sequences

# clustermim's tokenizer option (and the CLI's --tokenizer)
TOKENIZER_HELP = ("pixel | feature:CHECKPOINT (an mae/clustermim run's checkpoint.pt) | feature:TIMM_VIT_NAME "
                  "(randomly initialised: nothing is downloaded) | random (class-blind control) | "
                  "a saved tokenizer file")

# Options the trainer passes to every method; a method whose constructor lacks one just does not get it.
COMMON_OPTIONS = ("temperature", "backend", "gather_distributed")


def get_method(name: str) -> type:
    """The method class registered as ``name``; a clear error listing the valid names otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}{suggest(str(name), METHODS)}")
    return METHODS[name]


@functools.cache
def option_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keyword options of method ``name`` (name -> parameter: default and annotated domain), from its signatures."""
    from .base import SSLMethod

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


def check_options(name: str, options: dict, domains: dict | None = None) -> dict:
    """``options`` without the common ones ``name`` does not take, each checked against its annotated domain
    (ints widened to floats, lists to tuples); ``ValueError`` naming any unknown key or bad value.  ``domains``
    (option -> annotation, as :data:`~sslcore.methods.options.OPTIONS` holds them) spares the method's import."""
    if domains is None:
        domains = {k: p.annotation for k, p in option_parameters(name).items()}
    unknown = sorted(k for k in options if k not in domains and k not in COMMON_OPTIONS)
    if unknown:
        hint = suggest(unknown[0], domains) if len(unknown) == 1 else ""
        raise ValueError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(sorted(domains)) or 'none'}{hint}")
    return {k: check_value(f"option {k!r} of method {name!r}", v, domains[k]) for k, v in options.items()
            if k in domains}


def create_model(method: str, data, *, encoder: str, **options):
    """``METHODS[method].create(data, encoder=encoder, **options)`` after checking the option names."""
    return get_method(method).create(data, encoder=encoder, **check_options(method, options))


def _source(annotation, named: dict, used: set) -> str:
    """Python source for ``annotation`` over ``typing`` and the named domains of :mod:`sslcore.checks`."""
    for key, value in named.items():
        if annotation == value:
            used.add(key)
            return key
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_source(a, named, used) for a in args)
    if origin is typing.Annotated:
        used.update(("Annotated", "Range"))
        return f"Annotated[{_source(args[0], named, used)}, {args[1]!r}]"
    if origin is typing.Literal:
        used.add("Literal")
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin is tuple:
        return f"tuple[{_source(args[0], named, used)}, ...]"
    if annotation is type(None):
        return "None"
    if annotation in (int, float, bool, str):
        return annotation.__name__
    raise TypeError(f"no source for the option domain {annotation!r}")


def option_table_source() -> str:
    """The text of :mod:`sslcore.methods.options`: every registered method's options (name -> domain), read from
    the methods' signatures (imports every method)."""
    from .. import checks

    named = {k: getattr(checks, k) for k in checks.__all__ if k[0].isupper() and not k.isupper() and k != "Range"}
    used: set = set()
    lines = []
    for name in METHODS:
        lines.append(f"    {name!r}: {{")
        lines += [f"        {key!r}: {_source(p.annotation, named, used)}," for key, p in
                  sorted(option_parameters(name).items())]
        lines.append("    },")
    from_typing = sorted(used & {"Annotated", "Literal"})
    names = sorted(used - {"Annotated", "Literal"}, key=lambda k: (not k.isupper(), k))
    head = ['"""Every registered method\'s options and their domains (option -> annotation), for the CLI to check',
            "``-o KEY=VALUE`` without importing the methods.  Generated from their signatures by",
            "``python -m sslcore.methods.options`` (tests/test_cli.py says when it is stale); do not edit.", '"""']
    if from_typing:
        head.append(f"from typing import {', '.join(from_typing)}\n")
    line = f"from ..checks import {', '.join(names)}"
    head.append(line if len(line) <= 120 else "from ..checks import (\n" + "".join(f"    {k},\n" for k in names) + ")")
    foot = ["", "if __name__ == \"__main__\":  # regenerate this file", "    from pathlib import Path", "",
            "    from sslcore.methods import option_table_source", "",
            "    Path(__file__).write_text(option_table_source())"]
    return "\n".join([*head, "", "OPTIONS = {", *lines, "}", *foot]) + "\n"


_CLASSES = {"SSLMethod": ".base", **{value.partition(":")[2]: "." + value.partition(":")[0]
                                     for value in METHODS._entries.values()}}
__getattr__, __dir__ = lazy_attributes(__name__, _CLASSES)

__all__ = ["AR", "COMMON_OPTIONS", "ClusterMIM", "DEAR", "MAE", "METHODS", "MLM", "ArCL", "MoCo", "NNCLR",
           "Registry", "SSLMethod", "TOKENIZER_HELP", "SimCLR", "SimCLRAttn", "SimSiam", "SimSiamMulti", "VLM",
           "check_options", "create_model", "get_method", "method_options", "option_parameters", "option_table_source",
           "BYOL", "MoCoV3", "DINO", "BarlowTwins", "VICReg"]
