"""The datasets a ``--data`` spec names (see :mod:`sslcore.data`): in-memory images (:class:`ImageData`), image
folders read per item (:class:`FolderData`) and token sequences (:mod:`.text`), and :func:`load_dataset`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import check_data_spec, cifar, digits, imagefolder, shapes, text
from .augment import AUGMENT_CHOICES, Augment, build_recipe
from .pipeline import ItemError, TensorItems, to_float

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
MAX_RESIDENT_BYTES = 2 * 2 ** 30  # imagefolder images decoded into memory on request (tokenizers, raw pixels)


class _Images:
    """What every image dataset shares: shape, description, raw-pixel features, eval transform, recipes."""

    kind = "image"
    raw_name = "raw pixels"  # what raw_features are, for tables
    mean: tuple | None = None
    std: tuple | None = None
    flips = True  # a mirrored image shows the same class
    recipe = "simclr"  # --augment auto for view-invariance methods
    augment: Augment | None = None  # the data's own augmentation (the `digits` recipe)

    @property
    def in_chans(self) -> int:
        return self.image_shape[0]

    def describe(self) -> str:
        """What a model for this data must fit, for error messages."""
        return f"{self.name} has {self.in_chans}-channel {tuple(self.image_shape[1:])} images"

    @staticmethod
    def raw_features(x: torch.Tensor) -> torch.Tensor:
        """The baseline features a probe reads without any model: the flattened pixels (float in [0, 1])."""
        return to_float(x).flatten(1)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Stored images as the model sees them without augmentation (features for probes): float, centre
        crop to ``image_shape``, normalised."""
        x = to_float(x)
        h, w = self.image_shape[1:]
        if x.shape[-2:] != (h, w):
            top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
            x = x[..., top:top + h, left:left + w]
        if self.mean is not None:
            x = (x - torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)) / torch.tensor(
                self.std, device=x.device).view(1, -1, 1, 1)
        return x

    def build_recipe(self, name: str):
        """The augmentation recipe ``name`` (:func:`~sslcore.data.augment.build_recipe`) for this data."""
        return build_recipe(name, image_size=min(self.image_shape[1:]), flips=self.flips, own=self.augment,
                            mean=self.mean, std=self.std)


@dataclass
class ImageData(_Images):
    """In-memory train/test images (float in [0, 1] or uint8, ``[N, C, H, W]``) with labels (used only by
    probes), the data's own augmentation, normalisation and recipe (see the module docstring)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    augment: Augment | None = None
    recipe: str = "simclr"
    flips: bool = True
    mean: tuple | None = None
    std: tuple | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    def items(self, split: str, limit: int | None = None) -> TensorItems:
        """The ``split`` ("train" or "test") as items, the first ``limit`` only when given."""
        return TensorItems((self.x_train if split == "train" else self.x_test)[:limit])


@dataclass
class FolderData(_Images):
    """An image folder read from disk per item (:mod:`.imagefolder`): file lists and labels only.
    ``x_train``/``x_test`` decode a whole split on request (tokenizer fits, ``imagetokens``), refused when
    that would pass :data:`MAX_RESIDENT_BYTES`; the trainer and the probes never ask for them."""

    name: str
    files_train: list
    y_train: torch.Tensor
    files_test: list
    y_test: torch.Tensor
    size: int
    crop: int
    decoder: str = "auto"
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self.crop, self.crop

    @property
    def n_train(self) -> int:
        return len(self.files_train)

    def items(self, split: str, limit: int | None = None) -> imagefolder.FolderItems:
        files = (self.files_train if split == "train" else self.files_test)[:limit]
        return imagefolder.FolderItems(files, self.size, self.decoder)

    def _resident(self, split: str) -> torch.Tensor:
        items = self.items(split)
        need = len(items) * 3 * self.size ** 2 * 4
        if need > MAX_RESIDENT_BYTES:
            raise ValueError(f"{self.name}: holding the {len(items)} {split} images in memory would take "
                             f"{need / 2 ** 30:.1f} GiB (more than {MAX_RESIDENT_BYTES / 2 ** 30:.0f} GiB); training "
                             "streams them, but this use needs them resident: lower size or use a smaller folder")
        batch = items.__getitems__(list(range(len(items))))
        if isinstance(batch, ItemError):
            raise ValueError(batch.message)
        return to_float(batch[1])

    @property
    def x_train(self) -> torch.Tensor:
        return self._resident("train")

    @property
    def x_test(self) -> torch.Tensor:
        return self._resident("test")


def _digits(path: str) -> ImageData:
    if path:
        raise ValueError(f"--data digits is bundled with scikit-learn and takes no path, got {path!r}")
    return ImageData("digits", *digits.load(), augment=digits.DigitsAugment(), recipe="digits", flips=False)


def _shapes(spec: str) -> ImageData:
    domain, settings = shapes.parse_spec(spec)
    return ImageData(f"shapes-{domain}", *shapes.load(domain, **settings), recipe="light")


def _cifar(name: str) -> Callable[[str], ImageData]:
    mean, std = CIFAR_STATS[name]
    return lambda path: ImageData(name, *cifar.load(name, path), mean=mean, std=std)


def _imagefolder(spec: str) -> FolderData:
    files_train, y_train, files_test, y_test, settings = imagefolder.load(spec)
    return FolderData("imagefolder", files_train, y_train, files_test, y_test, settings["size"], settings["crop"],
                      settings["decoder"])


DATASETS: dict[str, Callable[[str], ImageData]] = {"digits": _digits, "shapes": _shapes, "cifar10": _cifar("cifar10"),
                                                   "cifar100": _cifar("cifar100"), "imagefolder": _imagefolder}
DATASETS.update({"pystdlib": text.load_pystdlib, "text": text.load_text,  # token sequences (TokenData)
                 "imagetokens": text.load_image_tokens})


def resolve_recipe(choice: str, method_recipe: str | None, data) -> str:
    """The recipe ``--augment choice`` means for a method (``method_recipe``: its own, e.g. MAE's ``mae``; None:
    the data's ``recipe``) on ``data``; token data takes no image augmentation."""
    if choice not in AUGMENT_CHOICES:
        raise ValueError(f"--augment {choice!r}: valid: {', '.join(AUGMENT_CHOICES)}")
    if data.kind != "image":
        if choice not in ("auto", "none"):
            raise ValueError(f"--augment {choice}: {data.name} is token data, which takes no image augmentation")
        return "none"
    return (method_recipe or data.recipe) if choice == "auto" else choice


def load_dataset(spec: str) -> ImageData:
    """The dataset a ``--data`` spec names (``digits``, ``shapes:...``, ``folder:PATH``, ...), checked first."""
    name, _, path = check_data_spec(spec).partition(":")
    return DATASETS[name](path)


__all__ = ["CIFAR_STATS", "DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "MAX_RESIDENT_BYTES", "FolderData", "ImageData",
           "load_dataset", "resolve_recipe"]
