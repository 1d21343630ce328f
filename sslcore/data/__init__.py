"""Datasets for pretraining and probing, by ``--data`` spec (``name`` or ``name:PATH``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import digits


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

    @property
    def in_chans(self) -> int:
        return self.x_train.shape[1]

    @staticmethod
    def raw_features(x: torch.Tensor) -> torch.Tensor:
        """The baseline features a probe reads without any model: the flattened pixels."""
        return x.flatten(1)


def _digits(path: str) -> ImageData:
    if path:
        raise ValueError(f"--data digits is bundled with scikit-learn and takes no path, got {path!r}")
    return ImageData("digits", *digits.load(), augment=digits.DigitsAugment())


DATASETS: dict[str, Callable[[str], ImageData]] = {"digits": _digits}


def check_data_spec(spec: str) -> str:
    """``spec`` unchanged if its name is known, else a ``ValueError`` listing the valid names."""
    name = spec.partition(":")[0]
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} for --data; valid: {', '.join(DATASETS)}")
    return spec


def load_dataset(spec: str) -> ImageData:
    name, _, path = check_data_spec(spec).partition(":")
    return DATASETS[name](path)


__all__ = ["DATASETS", "ImageData", "check_data_spec", "load_dataset"]
