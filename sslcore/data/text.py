"""Token-sequence data: fixed-length byte snippets of text files, labelled by the folder they come from.

``pystdlib`` (the bundled default for the sequence methods; no download): the Python standard
library's own source, ten of its packages as the classes.  ``text:PATH``: any files in class
sub-folders ``PATH/<class>/**``.  Both are split **by file** (whole files go to test, picked by a
hash of their path relative to the class folder, so the split does not depend on where the corpus
lives), then cut into non-overlapping snippets of ``seq_len`` bytes, capped per class.
``imagetokens:[P:K:]DATA``: the images of an image dataset as raster-order token grids of the k-means
``PixelTokenizer`` (patch P, K centres) fitted on the training images.
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .augment import Recipe, build_recipe
from .pipeline import TensorItems, to_float

# Packages present in CPython 3.10-3.13 builds (not split out by distributions as tkinter/idlelib are).
STDLIB_CLASSES = ("asyncio", "email", "http", "importlib", "json", "logging", "multiprocessing", "unittest",
                  "urllib", "xml")
DEFAULT_SEQ_LEN = 128
TEST_FRACTION = 0.25  # of each class's bytes, in whole files
PER_CLASS = 400  # training snippets per class (test: a quarter of that)


def _identity(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token sequences get no augmentation: the objectives draw their own masks and offsets."""
    return x


@dataclass
class TokenData:
    """Train/test token sequences (``LongTensor [N, L]``, ids in ``[0, vocab_size)``) with labels
    (used only by probes).  Same fields as :class:`~sslcore.data.ImageData`; ``augment`` is the identity.
    ``mask_ratio`` is the masked objectives' default for this kind of tokens (0.15 text, 0.75 image)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    vocab_size: int = 256
    mask_ratio: float = 0.15
    classes: tuple[str, ...] = ()
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] = field(default=_identity, repr=False)
    kind = "tokens"
    raw_name = "token histogram"  # what raw_features are, for tables

    @property
    def seq_len(self) -> int:
        return self.x_train.shape[1]

    def describe(self) -> str:
        """What a model for this data must fit, for error messages."""
        return f"{self.name} has sequences of {self.seq_len} tokens over a vocabulary of {self.vocab_size}"

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    def items(self, split: str, limit: int | None = None) -> TensorItems:
        """The ``split`` ("train" or "test") as items, the first ``limit`` only when given."""
        return TensorItems((self.x_train if split == "train" else self.x_test)[:limit])

    @staticmethod
    def model_input(x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def build_recipe(name: str) -> Recipe:
        """Token sequences have one recipe, ``none``: the objectives draw their own masks and offsets."""
        return build_recipe("none", image_size=0)

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """The no-model probe baseline: each sequence's normalised token histogram ``[N, vocab_size]``."""
        counts = torch.zeros(len(x), self.vocab_size, dtype=torch.float64)
        counts.scatter_add_(1, x.long(), torch.ones_like(x, dtype=torch.float64))
        return counts / x.shape[1]


def _file_hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha1(rel.encode()).digest()[:8], "big")


def split_files(files: list[Path], root: Path, *, test_fraction: float = TEST_FRACTION) -> tuple[list, list]:
    """Deterministic by-file split: files in order of the hash of their path relative to ``root`` go to test
    until it holds ``test_fraction`` of the bytes; at least one file on each side when there are two."""
    ordered = sorted(files, key=lambda f: (_file_hash(f.relative_to(root).as_posix()), f.as_posix()))
    total, test_bytes, n_test = sum(f.stat().st_size for f in ordered), 0, 0
    while n_test < len(ordered) - 1 and (n_test == 0 or test_bytes < test_fraction * total):
        test_bytes += ordered[n_test].stat().st_size
        n_test += 1
    return ordered[n_test:], ordered[:n_test]


def _snippets(files: list[Path], seq_len: int, cap: int) -> np.ndarray:
    """Non-overlapping ``seq_len``-byte windows of each file (files in path order), ``cap`` of them evenly spaced."""
    windows = []
    for f in sorted(files):
        raw = np.frombuffer(f.read_bytes(), dtype=np.uint8)
        n = len(raw) // seq_len
        if n:
            windows.append(raw[:n * seq_len].reshape(n, seq_len))
    if not windows:
        return np.zeros((0, seq_len), dtype=np.uint8)
    windows = np.concatenate(windows)
    if len(windows) > cap:
        windows = windows[np.unique(np.linspace(0, len(windows) - 1, cap).round().astype(int))]
    return windows


def load_folders(name: str, folders: dict[str, list[Path]], roots: dict[str, Path], *, seq_len: int,
                 per_class: int = PER_CLASS) -> TokenData:
    """``TokenData`` of byte snippets from ``folders`` (class name -> its files, under ``roots[class]``)."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not isinstance(per_class, int) or per_class < 4:
        raise ValueError(f"per_class must be an integer >= 4, got {per_class!r}")
    if not folders or not any(folders.values()):
        raise ValueError(f"the corpus {name!r} is empty: no files in any class folder")
    parts = {"train": ([], []), "test": ([], [])}
    for label, cls in enumerate(sorted(folders)):
        if len(folders[cls]) < 2:
            raise ValueError(f"class {cls!r} has {len(folders[cls])} file(s); a by-file train/test split needs >= 2")
        train_files, test_files = split_files(folders[cls], roots[cls])
        for part, files, cap in (("train", train_files, per_class), ("test", test_files, max(1, per_class // 4))):
            snippets = _snippets(files, seq_len, cap)
            if not len(snippets):
                raise ValueError(f"class {cls!r} has no {part} snippets of seq_len={seq_len} bytes "
                                 f"(its {part} files are shorter)")
            parts[part][0].append(torch.from_numpy(snippets.astype(np.int64)))
            parts[part][1].append(torch.full((len(snippets),), label, dtype=torch.long))
    (x_tr, y_tr), (x_te, y_te) = ((torch.cat(xs), torch.cat(ys)) for xs, ys in parts.values())
    return TokenData(name, x_tr, y_tr, x_te, y_te, vocab_size=256, mask_ratio=0.15, classes=tuple(sorted(folders)))


def _parse_len(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise ValueError(f"seq_len in --data {spec} must be an integer >= 2, got {text!r}")
    return int(text)


def load_pystdlib(arg: str = "", *, per_class: int = PER_CLASS) -> TokenData:
    """``pystdlib[:LEN[:PER_CLASS]]``: snippets of ``LEN`` bytes (default 128) of the standard library's ``.py``
    files, class = the package (``STDLIB_CLASSES``), at most ``PER_CLASS`` (400) training and a quarter of that
    test snippets per class; the packages' own test folders are left out."""
    length, _, cap = arg.partition(":")
    seq_len = _parse_len(length, f"pystdlib:{arg}") if length else DEFAULT_SEQ_LEN
    if cap:
        if not cap.isdigit():
            raise ValueError(f"per_class in --data pystdlib:{arg} must be an integer >= 4, got {cap!r}")
        per_class = int(cap)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folders, roots = {}, {}
    for cls in STDLIB_CLASSES:
        roots[cls] = stdlib / cls
        folders[cls] = [f for f in roots[cls].rglob("*.py")
                        if not {"test", "tests"} & set(f.relative_to(roots[cls]).parts[:-1])]
    return load_folders("pystdlib", folders, roots, seq_len=seq_len, per_class=per_class)


def load_text(arg: str, *, per_class: int = PER_CLASS) -> TokenData:
    """``text:PATH[:LEN]``: every file under ``PATH/<class>/`` (recursively); ``LEN`` bytes per snippet (128)."""
    path, seq_len = arg, DEFAULT_SEQ_LEN
    head, sep, tail = arg.rpartition(":")
    if sep and tail.isdigit():
        path, seq_len = head, _parse_len(tail, f"text:{arg}")
    if not path:
        raise ValueError("--data text needs a folder: text:PATH (class sub-folders of files)")
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--data text:{path}: no such folder")
    roots = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    folders = {cls: [f for f in d.rglob("*") if f.is_file() and not f.name.startswith(".")] for cls, d in roots.items()}
    return load_folders(f"text:{root.name}", folders, roots, seq_len=seq_len, per_class=per_class)


def parse_image_tokens(arg: str) -> tuple[int | None, int, str]:
    """``[PATCH:K:]DATA`` -> ``(PATCH or None, K, DATA)``."""
    fields = arg.split(":")
    patch, k = None, 50
    if len(fields) > 2 and fields[0].isdigit() and fields[1].isdigit():
        patch, k, arg = int(fields[0]), int(fields[1]), ":".join(fields[2:])
    if not arg:
        raise ValueError("--data imagetokens needs an image dataset: imagetokens:[PATCH:K:]DATA, "
                         "e.g. imagetokens:digits")
    return patch, k, arg


def load_image_tokens(arg: str) -> TokenData:
    """``imagetokens:[PATCH:K:]DATA``: image data spec ``DATA`` (e.g. ``digits``) as ``[N, (H/P)(W/P)]`` tokens of a
    :class:`~sslcore.tokenizers.PixelTokenizer` with K centres fitted on its training images (full-batch Lloyd).
    Default patch: 2 for images up to 16 pixels high, else 4; K = 50.  Masked objectives default to ratio 0.75."""
    from ..tokenizers import PixelTokenizer
    from . import load_dataset

    patch, k, arg = parse_image_tokens(arg)
    images = load_dataset(arg)
    if images.kind != "image":
        raise ValueError(f"--data imagetokens:{arg}: {arg!r} is {images.kind} data, not images")
    height, width = images.image_shape[1:]
    patch = patch or (2 if height <= 16 else 4)
    if height % patch or width % patch or height * width // patch ** 2 < 2:
        raise ValueError(f"patch {patch} must divide the {height}x{width} images into >= 2 patches (seq_len >= 2)")
    tokenizer = PixelTokenizer(patch, k, in_chans=images.in_chans, backend="torch")
    x_train, x_test = to_float(images.x_train), to_float(images.x_test)
    tokenizer.fit(x_train, progress=False)
    return TokenData(f"imagetokens:{images.name}", tokenizer.encode(x_train), images.y_train,
                     tokenizer.encode(x_test), images.y_test, vocab_size=k, mask_ratio=0.75)
