"""``imagefolder:PATH[,size=32][,seed=0]``: images in class sub-folders, decoded by Pillow, resized to ``size``.

``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` (or ``test/``) give the two splits; without
them ``PATH/<class>/*`` is split per class into 80 % train / 20 % test by a ``seed``-ed shuffle of
the sorted file names.  Classes are the sorted training sub-folder names.  Each image is read as
RGB, its shorter side resized to ``size`` (antialiased) and the centre ``size x size`` cut out.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import center_crop, resize

EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp")
DEFAULTS = dict(size=32, seed=0)
TEST_FRACTION = 0.2


def parse_spec(spec: str) -> tuple[str, dict[str, int]]:
    """``"/data/pets,size=64"`` -> ``("/data/pets", {"size": 64, "seed": 0})``: trailing ``,key=value`` settings."""
    path, settings = spec, dict(DEFAULTS)
    while True:
        head, sep, item = path.rpartition(",")
        key, eq, value = item.partition("=")
        if not sep or not eq or key not in DEFAULTS:
            break
        try:
            settings[key] = int(value)
        except ValueError:
            raise ValueError(f"imagefolder setting {key} must be an integer, got {value!r}") from None
        path = head
    if not path:
        raise ValueError("--data imagefolder needs a folder: --data imagefolder:PATH[,size=N]")
    if settings["size"] < 1:
        raise ValueError(f"imagefolder size must be >= 1, got {settings['size']}")
    return path, settings


def _listing(root: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"imagefolder {str(root)!r} has no class sub-folders")
    files = {c.name: sorted(f for f in c.iterdir() if f.suffix.lower() in EXTENSIONS) for c in classes}
    empty = [name for name, fs in files.items() if not fs]
    if empty:
        raise ValueError(f"imagefolder {str(root)!r}: class folder(s) {', '.join(empty)} hold no images "
                         f"({', '.join(EXTENSIONS)})")
    return files


def _decode(files: list[Path], size: int) -> torch.Tensor:
    out = torch.empty(len(files), 3, size, size)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as pil:
                img = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"imagefolder: cannot decode {str(f)!r}: {e}") from None
        img = center_crop(resize(img, [size], antialias=True), [size, size])
        out[i] = img.float() / 255.0
    return out


def load(spec: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x_train, y_train, x_test, y_test`` from ``PATH[,size=N][,seed=S]``; images ``[N, 3, size, size]`` in [0, 1]."""
    path, settings = parse_spec(spec)
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--data imagefolder:{spec}: {path!r} is not a folder")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
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
        splits += [_decode(files, settings["size"]), torch.tensor(labels, dtype=torch.long)]
    if not len(splits[3]):
        raise ValueError(f"imagefolder {path!r} gives no test images: add a val/ folder or more images per class")
    return tuple(splits)
