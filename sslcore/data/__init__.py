"""Datasets for pretraining and probing, by ``--data`` spec (``name`` or ``name:PATH``)."""
from __future__ import annotations

import argparse

from dataclasses import dataclass
from typing import Callable

import torch

from . import cifar, digits, imagefolder, shapes, text
from .augment import RGBAugment


@dataclass
class ImageData:
    """Train/test images (float, ``[N, C, H, W]``) with labels (used only by probes) and the view augmentation."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    kind = "image"
    raw_name = "raw pixels"  # what raw_features are, for tables

    @property
    def in_chans(self) -> int:
        return self.x_train.shape[1]

    def describe(self) -> str:
        """What a model for this data must fit, for error messages."""
        return f"{self.name} has {self.in_chans}-channel {tuple(self.x_train.shape[2:])} images"

    @staticmethod
    def raw_features(x: torch.Tensor) -> torch.Tensor:
        """The baseline features a probe reads without any model: the flattened pixels."""
        return x.flatten(1)


def _digits(path: str) -> ImageData:
    if path:
        raise ValueError(f"--data digits is bundled with scikit-learn and takes no path, got {path!r}")
    return ImageData("digits", *digits.load(), augment=digits.DigitsAugment())


def _shapes(spec: str) -> ImageData:
    domain, settings = shapes.parse_spec(spec)
    return ImageData(f"shapes-{domain}", *shapes.load(domain, **settings), augment=RGBAugment())


def _cifar(name: str) -> Callable[[str], ImageData]:
    return lambda path: ImageData(name, *cifar.load(name, path), augment=RGBAugment())


def _imagefolder(spec: str) -> ImageData:
    return ImageData("imagefolder", *imagefolder.load(spec), augment=RGBAugment())


DATASETS: dict[str, Callable[[str], ImageData]] = {"digits": _digits, "shapes": _shapes, "cifar10": _cifar("cifar10"),
                                                   "cifar100": _cifar("cifar100"), "imagefolder": _imagefolder}
DATASETS.update({"pystdlib": text.load_pystdlib, "text": text.load_text,  # token sequences (TokenData)
                 "imagetokens": text.load_image_tokens})
TOKEN_DATASETS = ("pystdlib", "text", "imagetokens")  # the others are images


def check_data_spec(spec: str) -> str:
    """``spec`` unchanged if its name is known and, where that needs no loading, its settings are valid;
    else a ``ValueError`` (the valid names, or what is wrong with the settings)."""
    if not isinstance(spec, str):
        raise ValueError(f"--data must be a string, got {spec!r}")
    name, _, arg = spec.partition(":")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} for --data; valid: {', '.join(DATASETS)}")
    if name == "shapes":
        shapes.parse_spec(arg)
    elif name == "imagetokens":
        inner = text.parse_image_tokens(arg)[2]
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


def load_dataset(spec: str) -> ImageData:
    name, _, path = check_data_spec(spec).partition(":")
    return DATASETS[name](path)


__all__ = ["data_spec_arg", "DATASETS", "ImageData", "check_data_spec", "data_kind", "load_dataset"]
