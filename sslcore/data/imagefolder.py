"""``imagefolder:PATH[,size=32][,crop=SIZE][,seed=0][,decoder=auto]``: images in class sub-folders, decoded per item.

``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` (or ``test/``) give the two splits; without
them ``PATH/<class>/*`` is split per class into 80 % train / 20 % test by a ``seed``-ed shuffle of
the sorted file names.  Classes are the sorted training sub-folder names.  Nothing is decoded up
front: :class:`FolderItems` reads one file per item (in the loader's workers), as RGB, its shorter
side resized to ``size`` (antialiased) and the centre ``size x size`` cut out, as uint8.  The model
sees ``crop x crop`` images: random crops of that size in training, the centre crop for features
(``size=256,crop=224`` is the usual ImageNet evaluation); ``crop`` defaults to ``size``.

Decoding (``decoder``): ``torchvision`` is ``torchvision.io.decode_image`` (libjpeg-turbo, libpng, libwebp,
giflib) straight to a uint8 tensor; ``pillow`` is Pillow with JPEG draft mode (the DCT scaled by 1/2, 1/4 or
1/8 while decoding, where that still leaves ``size`` pixels); ``auto`` takes Pillow's draft for JPEGs at
least twice ``size`` on their shorter side and torchvision otherwise, the faster of the two in each case on
this machine (``python -m bench data`` measures both).  ``nvjpeg`` decodes the JPEGs of a batch together on
the GPU (``torchvision.io.decode_jpeg`` on a list, nvJPEG), resizes them there and hands the uint8 batch back to
the host pipeline; other formats in the batch take the torchvision path.  It needs CUDA and decodes in the main
process (``--workers 0``: CUDA cannot start in forked loader workers).  Either way Pillow reads the header
first, so a decompression bomb is refused before any pixel is decoded, and 16-bit images keep their full range.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms.v2.functional import center_crop, resize

from .pipeline import ItemError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp")
DEFAULTS = dict(size=32, crop=0, seed=0, decoder="auto")  # crop 0: the same as size
DECODERS = ("auto", "torchvision", "pillow", "nvjpeg")
TEST_FRACTION = 0.2
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's 16-bit (and 32-bit int) greyscale


def parse_spec(spec: str) -> tuple[str, dict[str, int]]:
    """``"/data/pets,size=64"`` -> ``("/data/pets", {"size": 64, "seed": 0})``: trailing ``,key=value`` settings."""
    path, settings = spec, dict(DEFAULTS)
    while True:
        head, sep, item = path.rpartition(",")
        key, eq, value = item.partition("=")
        if not sep or not eq or key not in DEFAULTS:
            break
        if key == "decoder":
            if value not in DECODERS:
                raise ValueError(f"imagefolder setting decoder must be one of {', '.join(DECODERS)}, got {value!r}")
            settings[key] = value
        else:
            try:
                settings[key] = int(value)
            except ValueError:
                raise ValueError(f"imagefolder setting {key} must be an integer, got {value!r}") from None
        path = head
    tail = re.search(r",([A-Za-z_]\w*)=[^,]*$", path)
    if tail and not Path(path).is_dir():  # a folder whose own name ends in ",x=1" is read as it is
        raise ValueError(f"unknown imagefolder setting {tail.group(1)!r} in {spec!r}; settings: "
                         f"{', '.join(DEFAULTS)}")
    if not path:
        raise ValueError("--data imagefolder needs a folder: --data imagefolder:PATH[,size=N]")
    if settings["size"] < 1:
        raise ValueError(f"imagefolder size must be >= 1, got {settings['size']}")
    settings["crop"] = settings["crop"] or settings["size"]
    if not 1 <= settings["crop"] <= settings["size"]:
        raise ValueError(f"imagefolder crop must lie in [1, size={settings['size']}], got {settings['crop']}")
    return path, settings


def _listing(root: Path) -> dict[str, list[Path]]:
    """Class name -> image files; hidden entries (``.git``, ``.ipynb_checkpoints``, ``._x.png``) are skipped."""
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"imagefolder {str(root)!r} has no class sub-folders")
    seen = {}
    for c in classes:
        real = c.resolve()
        if real in seen:
            raise ValueError(f"imagefolder {str(root)!r}: class folders {seen[real]} and {c.name} are the same "
                             "folder (a link): each class needs its own images")
        seen[real] = c.name
    files = {c.name: sorted(f for f in c.iterdir() if f.suffix.lower() in EXTENSIONS and not f.name.startswith("."))
             for c in classes}
    empty = [name for name, fs in files.items() if not fs]
    if empty:
        raise ValueError(f"imagefolder {str(root)!r}: class folder(s) {', '.join(empty)} hold no images "
                         f"({', '.join(EXTENSIONS)})")
    return files


def _rgb8(pil: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` uint8.  16-bit greyscale is scaled to 8 bits (``v / 257``, rounded): Pillow's own
    conversion clips it at 255, which turns a full-range image almost all white."""
    if pil.mode in WIDE_MODES:
        grey = np.rint(np.clip(np.asarray(pil, dtype=np.float64), 0, 65535) / 257).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(pil.convert("RGB"))


def _pillow(pil: Image.Image, size: int) -> torch.Tensor:
    pil.draft("RGB", (size, size))
    return torch.from_numpy(_rgb8(pil)).permute(2, 0, 1)


@contextmanager
def _quiet():
    """torchvision >= 0.29 points each decoding call to TorchCodec: nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
        yield


def _torchvision(path: Path) -> torch.Tensor:
    with _quiet():
        img = decode_image(str(path), mode=ImageReadMode.RGB)
    if img.dtype == torch.uint16:  # 16-bit PNG: to 8 bits as Pillow's path does (v / 257, rounded)
        img = torch.div(img.to(torch.int32) * 2 + 257, 514, rounding_mode="floor").to(torch.uint8)
    return img


def decode(path: Path, size: int, decoder: str = "auto") -> torch.Tensor:
    """One image file as uint8 ``[3, size, size]``: RGB, shorter side resized to ``size``, centre cut out, by
    ``decoder`` (module docstring).  Any failure, a decompression bomb (Pillow's pixel limit, checked on the
    header) included, is a ``ValueError`` naming the file."""
    try:
        with Image.open(path) as pil:  # the header only: format, size, the bomb check
            if decoder == "pillow" or (decoder == "auto" and pil.format == "JPEG" and min(pil.size) >= 2 * size):
                img = _pillow(pil, size)
            else:
                img = None
        if img is None:
            img = _torchvision(path)
    except Exception as e:  # decoders raise OSError, ValueError, DecompressionBombError, RuntimeError, ...
        raise ValueError(f"imagefolder: cannot decode {str(path)!r}: {e}") from None
    return _fit(img, size)


def _fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """``[3, H, W]`` -> ``[3, size, size]``: the shorter side resized to ``size`` (antialiased), the centre cut."""
    return center_crop(resize(img, [size], antialias=True), [size, size]).contiguous()


def decode_batch(paths: list[Path], size: int, device: str | torch.device = "cuda") -> torch.Tensor:
    """Files as uint8 ``[b, 3, size, size]`` on the host, as :func:`decode` gives them one by one: the JPEGs
    decoded together by ``decode_jpeg`` on ``device`` (nvJPEG on CUDA) and resized there, the other formats by
    torchvision on the host.  Pillow reads every header first (format, the bomb check); a file that fails is
    a ``ValueError`` naming it (the batch is retried file by file to find it)."""
    jpegs, images = [], [None] * len(paths)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as pil:  # the header only: format, the bomb check
                jpeg = pil.format == "JPEG"
            if not jpeg:
                images[i] = _fit(_torchvision(path), size)
        except Exception as e:  # as decode(): any failure names the file
            raise ValueError(f"imagefolder: cannot decode {str(path)!r}: {e}") from None
        if jpeg:
            jpegs.append(i)
    if jpegs:
        with _quiet():
            images = _decode_jpegs(paths, jpegs, images, size, device)
    return torch.stack(images)


def _decode_jpegs(paths: list[Path], jpegs: list[int], images: list, size: int, device) -> list:
    """``images`` with the files at ``jpegs`` decoded together on ``device`` (:func:`decode_batch`)."""
    try:
        decoded = decode_jpeg([read_file(str(paths[i])) for i in jpegs], mode=ImageReadMode.RGB, device=device)
    except Exception:  # find the file, and say which
        decoded = []
        for i in jpegs:
            try:
                decoded += decode_jpeg([read_file(str(paths[i]))], mode=ImageReadMode.RGB, device=device)
            except Exception as e:
                raise ValueError(f"imagefolder: cannot decode {str(paths[i])!r}: {e}") from None
    for i, img in zip(jpegs, decoded):
        images[i] = _fit(img, size).cpu()
    return images


class FolderItems(Dataset):
    """The files of one split as items: ``__getitems__(indices)`` decodes those files (:func:`decode`, or
    :func:`decode_batch` for ``nvjpeg``) and gives ``(index, uint8 [b, 3, size, size])``, or an
    :class:`~.pipeline.ItemError` with the message of a file that fails (raised as it is by the loader).
    Holds the file list only, never decoded images.  ``device``: where ``nvjpeg`` decodes (CUDA; the tests
    run the same batched path on the CPU)."""

    def __init__(self, files: list[Path], size: int, decoder: str = "auto", device: str = "cuda"):
        if decoder == "nvjpeg" and str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("imagefolder setting decoder=nvjpeg decodes on a CUDA GPU (nvJPEG) and this machine "
                             "has none: use decoder=auto")
        self.files, self.size, self.decoder, self.device = files, size, decoder, device

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode(self.files[i], self.size, self.decoder)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor] | ItemError:
        try:
            if self.decoder == "nvjpeg":
                batch = decode_batch([self.files[i] for i in indices], self.size, self.device)
            else:
                batch = torch.stack([self[i] for i in indices])
        except ValueError as e:
            return ItemError(str(e))
        return torch.as_tensor(indices, dtype=torch.long), batch


def load(spec: str) -> tuple[list[Path], torch.Tensor, list[Path], torch.Tensor, dict[str, int]]:
    """``files_train, y_train, files_test, y_test, settings`` from ``PATH[,size=N][,crop=C][,seed=S]``; the files
    are listed and checked to exist, not decoded."""
    path, settings = parse_spec(spec)
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--data imagefolder:{spec}: {path!r} is not a folder")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is None and not any(
            f.suffix.lower() in EXTENSIONS for f in (root / "train").iterdir() if f.is_file()):
        raise ValueError(f"imagefolder {path!r} has train/ but no val/ or test/ beside it: add one (the held-out "
                         f"images), or put the class folders directly in {path!r} to split them")
    if (root / "train").is_dir() and test_dir is not None:
        train, test = _listing(root / "train"), _listing(test_dir)
        unknown = sorted(set(test) - set(train))
        if unknown:
            raise ValueError(f"imagefolder {str(test_dir)!r} has classes {unknown} that {str(root / 'train')!r} lacks")
        classes = sorted(train)
    else:
        listing = _listing(root)
        classes, train, test = sorted(listing), {}, {}
        g = torch.Generator().manual_seed(settings["seed"])
        for name, files in listing.items():
            order = torch.randperm(len(files), generator=g).tolist()
            n_test = int(round(TEST_FRACTION * len(files))) if len(files) > 1 else 0
            test[name] = [files[i] for i in order[:n_test]]
            train[name] = [files[i] for i in order[n_test:]]
    splits = []
    for split in (train, test):
        files = [f for name in classes for f in split.get(name, [])]
        labels = [k for k, name in enumerate(classes) for _ in split.get(name, [])]
        splits += [files, torch.tensor(labels, dtype=torch.long)]
    if not len(splits[3]):
        raise ValueError(f"imagefolder {path!r} gives no test images: add a val/ folder or more images per class")
    return (*splits, settings)
