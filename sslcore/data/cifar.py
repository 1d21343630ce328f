"""CIFAR-10 / CIFAR-100 from the standard python-pickle archives already on disk (nothing is downloaded).

``cifar10:PATH``: a folder with ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` (the
contents of ``cifar-10-python.tar.gz``; ``PATH/cifar-10-batches-py`` is also looked into).
``cifar100:PATH``: a folder with ``train`` and ``test`` (``cifar-100-python``), fine labels.
Each file is a pickled dict with ``b"data"`` (uint8 ``[N, 3072]``, channel-major 32x32) and
``b"labels"`` / ``b"fine_labels"`` (integers in range).  The unpickler rebuilds numpy arrays and
nothing else: of pickle protocols 2 to 5 (protocol 2 carries bytes as ``_codecs.encode(str, "latin1")``,
protocol 5 arrays as ``numpy._core.numeric._frombuffer``; both stand-ins below are checked).
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np
import torch

LAYOUTS = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    labels=b"labels", classes=10),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], labels=b"fine_labels", classes=100),
}
_NUMPY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                  ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "scalar")}


def _latin1(text, encoding="utf-8"):
    """``_codecs.encode`` as protocol 2 uses it for bytes: a str to latin-1 bytes, nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): a CIFAR file "
                                     "encodes bytes as latin1 text only")
    return codecs.encode(text, "latin1")


def _frombuffer(buffer, dtype, shape, order):
    """numpy's protocol-5 array constructor, for plain (non-object) dtypes and byte buffers only."""
    if not isinstance(buffer, (bytes, bytearray, pickle.PickleBuffer)) or not isinstance(dtype, np.dtype) or \
            dtype.hasobject or order not in ("C", "F"):
        raise pickle.UnpicklingError("refusing numpy _frombuffer of anything but a plain array from bytes")
    return np.frombuffer(buffer, dtype).reshape(shape, order=order)


_STAND_INS = {("_codecs", "encode"): _latin1, ("numpy.core.numeric", "_frombuffer"): _frombuffer,
              ("numpy._core.numeric", "_frombuffer"): _frombuffer}


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _STAND_INS:
            return _STAND_INS[module, name]
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR file holds numpy arrays only")
        return super().find_class(module, name)


def _read(path: Path, labels_key: bytes, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            batch = _NumpyUnpickler(f, encoding="bytes").load()
    except Exception as e:  # unpickling arbitrary bytes can raise almost anything
        raise ValueError(f"CIFAR file {str(path)!r} is not a readable python-pickle batch: {e}") from None
    if not isinstance(batch, dict) or b"data" not in batch or labels_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"CIFAR file {str(path)!r} lacks b'data' or {labels_key!r} (has {keys})")
    data = np.asarray(batch[b"data"])
    try:
        labels = np.asarray(batch[labels_key])
    except ValueError:  # ragged nested lists
        labels = np.asarray(batch[labels_key], dtype=object)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"CIFAR file {str(path)!r} has {labels_key!r} of dtype {labels.dtype} (e.g. "
                         f"{labels.flat[0] if labels.size else None!r}); expected integers in 0..{classes - 1}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(f"CIFAR file {str(path)!r} holds data {data.dtype}{list(data.shape)} and "
                         f"{labels.shape[0] if labels.ndim else 0} labels; expected uint8 [N, 3072] and N labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"CIFAR file {str(path)!r} has labels outside 0..{classes - 1}")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return x, torch.from_numpy(labels.astype(np.int64))


def load(name: str, path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x_train, y_train, x_test, y_test`` of ``name`` (``cifar10`` | ``cifar100``); images uint8 ``[N, 3, 32, 32]``
    as stored (a quarter of float32's memory; the pipeline makes them float on the device)."""
    layout = LAYOUTS[name]
    if not path:
        raise ValueError(f"--data {name} needs the folder of the python-pickle archive: --data {name}:PATH")
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--data {name}:{path}: {path!r} is not a folder")
    if (root / layout["folder"]).is_dir():
        root = root / layout["folder"]
    missing = [f for f in layout["train"] + layout["test"] if not (root / f).is_file()]
    if missing:
        raise ValueError(f"--data {name}:{path}: {str(root)!r} lacks {', '.join(missing)} "
                         f"(expected the python-pickle files {', '.join(layout['train'] + layout['test'])})")
    splits = []
    for files in (layout["train"], layout["test"]):
        parts = [_read(root / f, layout["labels"], layout["classes"]) for f in files]
        splits += [torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])]
    return tuple(splits)
