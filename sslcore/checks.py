"""Typed, ranged values: one checker for method options, the trainer's settings and the CLI.

A value's domain is its annotation: ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
``tuple[X, ...]``, unions (``X | None``) and ``Annotated[int | float, Range(...)]``.
:func:`check_value` raises a ``ValueError`` that names the value and states its domain;
:func:`cli_type` turns an annotation into an ``argparse`` ``type=``.  The named domains below
are the ones the methods and the trainer share.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Literal, Union

# sslcore.kernels' backends, spelled out so that the CLI's parser need not import the kernels (torch, triton);
# tests/test_cli.py keeps the two equal.
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Range:
    """Bounds of a number (``None``: unbounded); ``open`` ends exclude the bound itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = (f"{v:g}" if isinstance(v, float) else v for v in (self.low, self.high))
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}" if self.low is not None else "finite"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


# Layer widths (projector, predictor, decoder): up to 2**14.  SSL heads are at most 8192 wide (VICReg);
# the widest square layer this allows, 16384 x 16384, is 1 GiB of fp32 weights and 4 GiB with its
# gradient and AdamW's two moments, so no single width can ask for more memory than a GPU has.
MAX_WIDTH = 16384
MIN_TEMPERATURE = 1e-8  # below it exp(s/t) overflows for any similarity; lightly's losses refuse it too
MAX_QUEUE = 2 ** 20  # queued vectors (MoCo: 65536); 2**20 x 64 fp32 is 256 MiB
MAX_LAYERS = 64  # blocks or heads of a (decoder) transformer

Width = Annotated[int, Range(1, MAX_WIDTH)]
QueueSize = Annotated[int, Range(1, MAX_QUEUE)]
LayerCount = Annotated[int, Range(1, MAX_LAYERS)]
PositiveInt = Annotated[int, Range(1)]
Views = Annotated[int, Range(2, MAX_LAYERS)]  # ArCL's views per sample m
NonNegativeInt = Annotated[int, Range(0)]
NonNegative = Annotated[float, Range(0)]
Temperature = Annotated[float, Range(MIN_TEMPERATURE)]
Fraction = Annotated[float, Range(0, 1, low_open=True, high_open=True)]  # strictly inside (0, 1)
Probability = Annotated[float, Range(0, 1)]
UnitInterval = Annotated[float, Range(0, 1, high_open=True)]  # [0, 1): momenta, mixing weights, smoothing
Seed = Annotated[int, Range(-2 ** 63, 2 ** 64 - 1)]  # what torch.manual_seed accepts
Backend = Literal[BACKENDS]


def _parts(annotation) -> tuple:
    origin = typing.get_origin(annotation)
    return typing.get_args(annotation) if origin in (Union, types.UnionType) else (annotation,)


def describe(annotation) -> str:
    """The domain of ``annotation`` in words, e.g. ``an integer in [1, 16384] or None``."""
    words = []
    for part in _parts(annotation):
        origin, args = typing.get_origin(part), typing.get_args(part)
        if part is type(None):
            words.append("None")
        elif origin is Annotated:
            words.append(f"{describe(args[0])} {args[1]}")
        elif origin is Literal:
            words.append("one of " + ", ".join(map(repr, args)))
        elif origin is tuple:
            words.append(f"a non-empty tuple, each {describe(args[0])}")
        else:
            words.append({int: "an integer", float: "a number", bool: "True or False", str: "a string"}[part])
    return " or ".join(words)


def _convert(value, annotation):
    """``value`` as ``annotation`` (an int is a float, a list a tuple), or raise ``ValueError``."""
    parts = _parts(annotation)
    if len(parts) > 1:
        for part in parts:
            try:
                return _convert(value, part)
            except (ValueError, OverflowError):
                continue
        raise ValueError
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        value = _convert(value, args[0])
        if value not in args[1]:
            raise ValueError
        return value
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ValueError
        return value
    if origin is tuple:
        if not isinstance(value, (tuple, list)) or not value:
            raise ValueError
        return tuple(_convert(v, args[0]) for v in value)
    if annotation is type(None):
        if value is not None:
            raise ValueError
        return None
    if annotation not in (int, float, bool, str):
        raise TypeError(f"no check for values annotated {annotation!r}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, annotation) or (annotation in (int, float) and isinstance(value, bool)):
        raise ValueError
    if annotation is float and not math.isfinite(value):
        raise ValueError
    return value


def check_value(name: str, value, annotation):
    """``value`` if it lies in ``annotation``'s domain (ints widened to floats, lists to tuples), else a
    ``ValueError`` naming ``name``."""
    try:
        return _convert(value, annotation)
    except (ValueError, OverflowError):
        got = repr(value)
        got = got if len(got) <= 80 else got[:77] + "..."
        raise ValueError(f"{name} must be {describe(annotation)}, got {got}") from None


def parse_literal(text: str):
    """A command-line value: a Python literal (number, bool, None, tuple, ...) or else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def cli_type(annotation):
    """``argparse`` ``type=`` for ``annotation``: parse the text, check it, report a usage error.  ``None``
    is left out of the domain: on a command line, None is a flag not given."""
    parts = [p for p in _parts(annotation) if p is not type(None)]
    annotation = Union[tuple(parts)] if len(parts) > 1 else parts[0]

    def parse(text: str):
        try:
            return check_value("value", parse_literal(text), annotation)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {describe(annotation)}, got {text!r}") from None
    return parse


def suggest(word: str, choices) -> str:
    """``"; did you mean 'x'?"`` naming the choices closest to the unknown ``word`` (difflib), or ``""``."""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def check_temperature(temperature, name: str = "temperature") -> float:
    """A loss temperature: a finite number >= ``MIN_TEMPERATURE``."""
    return check_value(name, temperature, Temperature)


__all__ = ["BACKENDS", "MAX_LAYERS", "MAX_QUEUE", "MAX_WIDTH", "MIN_TEMPERATURE", "Backend", "Fraction", "LayerCount",
           "NonNegative", "NonNegativeInt", "PositiveInt", "Probability", "QueueSize", "Range", "Seed", "Temperature",
           "UnitInterval", "Width", "check_temperature", "check_value", "cli_type", "describe", "parse_literal",
           "suggest"]
