"""Datasets for pretraining and probing, by ``--data`` spec (``name`` or ``name:PATH``).

Every dataset gives its splits as item datasets (``items("train")``, read by :mod:`.pipeline`'s
loaders) and says what a model sees (``image_shape``), how its images are normalised (``mean``,
``std``), whether a mirror image is the same class (``flips``) and which augmentation recipe
``--augment auto`` gives view-invariance methods on it (``recipe``).  The bundled sets, CIFAR (uint8
from its pickles) and token data are held in memory; ``imagefolder`` is read from disk per item.

This module itself is light (no torch): the spec checks below serve the CLI's parser; the datasets
(:mod:`.datasets`) are imported on first use of their names.
"""
from __future__ import annotations

import argparse
import importlib

from .._imports import lazy_attributes
from ..checks import suggest

# The names a --data spec may start with (sslcore.data.datasets.DATASETS loads them; tests/test_cli.py keeps the
# two equal), and those that load token sequences (the others are images).
DATA_NAMES = ("digits", "shapes", "cifar10", "cifar100", "imagefolder", "pystdlib", "text", "imagetokens")
TOKEN_DATASETS = ("pystdlib", "text", "imagetokens")
RECIPES = ("simclr", "byol", "dino", "mae", "light", "shifts", "digits", "none")  # sslcore.data.augment's recipes
AUGMENT_CHOICES = ("auto",) + RECIPES


def check_data_spec(spec: str) -> str:
    """``spec`` unchanged if its name is known and, where that needs no loading, its settings are valid;
    else a ``ValueError`` (the valid names, or what is wrong with the settings)."""
    if not isinstance(spec, str):
        raise ValueError(f"--data must be a string, got {spec!r}")
    name, _, arg = spec.partition(":")
    if name not in DATA_NAMES:
        raise ValueError(f"unknown dataset {name!r} for --data; valid: {', '.join(DATA_NAMES)}"
                         f"{suggest(name, DATA_NAMES)}")
    if name == "shapes":  # these settings' checks live beside their loaders (imported here: torch)
        importlib.import_module(".shapes", __name__).parse_spec(arg)
    elif name == "imagefolder":
        importlib.import_module(".imagefolder", __name__).parse_spec(arg)
    elif name == "imagetokens":
        inner = importlib.import_module(".text", __name__).parse_image_tokens(arg)[2]
        if data_kind(check_data_spec(inner)) != "image":
            raise ValueError(f"--data {spec}: {inner!r} is token data; imagetokens tokenizes an image dataset")
    return spec


def data_kind(spec: str) -> str:
    """``"image"`` or ``"tokens"``: the ``kind`` of the data ``spec`` loads, known without loading it."""
    return "tokens" if spec.partition(":")[0] in TOKEN_DATASETS else "image"


def data_spec_arg(text: str) -> str:
    """``argparse`` ``type=`` for ``--data``: the spec, or the ``check_data_spec`` error as a usage error."""
    try:
        return check_data_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def image_data_spec_arg(text: str) -> str:
    """``argparse`` ``type=`` for a ``--data`` that must be images (the tokenizer studies): as
    :func:`data_spec_arg`, and token data refused by name."""
    spec = data_spec_arg(text)
    if data_kind(spec) != "image":
        raise argparse.ArgumentTypeError(f"{spec} is token data; this command takes image data (digits, shapes:..., "
                                         "cifar10:PATH, imagefolder:PATH, ...)")
    return spec


_EXPORTS = {name: ".datasets" for name in ("CIFAR_STATS", "DATASETS", "IMAGENET_MEAN", "IMAGENET_STD",
                                             "MAX_RESIDENT_BYTES", "FolderData", "ImageData", "load_dataset",
                                             "resolve_recipe")}
_EXPORTS.update(RGBAugment=".augment")
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)

__all__ = ["AUGMENT_CHOICES", "DATASETS", "DATA_NAMES", "RECIPES", "TOKEN_DATASETS", "FolderData", "ImageData",
           "RGBAugment", "check_data_spec", "data_kind", "data_spec_arg", "image_data_spec_arg", "load_dataset",
           "resolve_recipe"]
