"""Checkpoints: written atomically, loaded with ``torch.load(weights_only=True)`` and checked whole.

A checkpoint is a plain dict of tensors and Python scalars::

    {"format": "sslcore-checkpoint", "version": 2, "method": str, "config": dict, "epoch": int,
     "model": state_dict, "optimizer": state_dict, "generator": ByteTensor (data RNG state),
     "rng": {"cpu": ByteTensor, "cuda": ByteTensor | None} (torch's global RNG: masks, dropout)}

``epoch`` counts completed epochs.  A run stopped inside an epoch (Ctrl-C) adds
``"position": {"step": int, "perm": LongTensor, "losses": FloatTensor}``: the steps of epoch
``epoch + 1`` already taken, that epoch's data order and its step losses so far.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT, VERSION = "sslcore-checkpoint", 2
KEYS = ("method", "config", "epoch", "model", "optimizer", "generator", "rng")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the run it is loaded into."""


def save_checkpoint(path: str | os.PathLike, **state) -> None:
    """Write ``state`` (the ``KEYS``) to ``path`` atomically: a temp file in the same folder, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, *, method: str | None = None) -> dict:
    """Read and validate a checkpoint (optionally: that it was trained with ``method``); nothing is applied."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load on arbitrary bytes can raise almost any exception type
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted or not a torch file: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an sslcore checkpoint")
    if ckpt.get("version") != VERSION or any(k not in ckpt for k in KEYS):
        missing = [k for k in KEYS if k not in ckpt]
        raise CheckpointError(f"checkpoint {str(path)!r} has version {ckpt.get('version')!r} (expected {VERSION})"
                              + (f" and lacks {missing}" if missing else ""))
    if method is not None and ckpt["method"] != method:
        raise CheckpointError(f"checkpoint {str(path)!r} is from method {ckpt['method']!r}, not {method!r}")
    return ckpt


def check_state_dict(name: str, state: dict, reference: dict) -> None:
    """Raise ``CheckpointError`` unless ``state`` has exactly ``reference``'s keys and tensor shapes.

    ``Module.load_state_dict`` copies what fits before it complains; checking first keeps a bad
    checkpoint from leaving a half-loaded model behind.
    """
    missing, unexpected = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {name} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for key, ref in reference.items():
        if not isinstance(state[key], torch.Tensor) or state[key].shape != ref.shape:
            got = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
            raise CheckpointError(f"checkpoint {name}[{key!r}] has shape {got}, the model expects {tuple(ref.shape)}")
