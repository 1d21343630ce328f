"""Checkpoints: written atomically, loaded with ``torch.load(weights_only=True)`` and checked whole.

A checkpoint is a plain dict of tensors and Python scalars::

    {"format": "sslcore-checkpoint", "version": 4, "checksum": str, "method": str, "config": dict,
     "epoch": int, "model": state_dict, "optimizer": state_dict, "generator": ByteTensor (data order and
     augmentation RNG state), "rng": {"cpu": ByteTensor, "cuda": ByteTensor | None} (torch's global RNG:
     masks, dropout), "scaler": dict (the fp16 GradScaler's state; empty otherwise)}

``epoch`` counts completed epochs.  A run stopped inside an epoch (Ctrl-C) adds
``"position": {"step": int, "perm": LongTensor, "losses": FloatTensor}``: the steps of epoch
``epoch + 1`` already taken (a whole number of optimizer steps), that epoch's data order and its
step losses so far.  Version 4 (the streaming pipeline, optimizer parameter groups) reads no older one.

``checksum`` is the SHA-256 of every other entry (:func:`content_digest`: keys, types, shapes and
the bytes of every tensor), so a flipped byte anywhere in the values is caught on load.  The
zip container torch writes carries no checksum of its own that ``torch.load`` verifies.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..files import atomic_torch_save

FORMAT, VERSION = "sslcore-checkpoint", 4
KEYS = ("method", "config", "epoch", "model", "optimizer", "generator", "rng")
# What eval and resume read from a checkpoint's config (a PretrainConfig as a dict).
CONFIG_KEYS = ("method", "data", "encoder", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
               "temperature", "seed", "limit", "backend", "options", "augment", "optimizer", "accumulate",
               "clip_grad", "weight_decay_all")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the run it is loaded into."""


def content_digest(obj) -> str:
    """SHA-256 (hex) of a nest of dicts, lists, tuples, tensors and scalars: keys (sorted), types,
    shapes, dtypes and tensor bytes, so equal contents give equal digests whatever the file layout."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}:".encode())
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"{'L' if isinstance(x, list) else 'U'}{len(x)}:".encode())
            for v in x:
                feed(v)
        elif x is None or isinstance(x, (bool, int, float, str)):
            r = repr(x)
            h.update(f"{type(x).__name__}{len(r)}:{r}".encode())
        else:
            raise TypeError(f"a checkpoint holds tensors, containers and scalars, not {type(x).__name__}")

    feed(obj)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, **state) -> None:
    """Write ``state`` (the ``KEYS``) with its checksum to ``path`` atomically (:func:`atomic_write`)."""
    atomic_torch_save(path, {"format": FORMAT, "version": VERSION, "checksum": content_digest(state), **state},
                      "checkpoint")


def load_checkpoint(path: str | os.PathLike, *, method: str | None = None) -> dict:
    """Read and validate a checkpoint (optionally: that it was trained with ``method``); nothing is applied."""
    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {name} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load on arbitrary bytes can raise almost any exception type
        raise CheckpointError(f"checkpoint {name} is corrupted or not a torch file: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{name} is not an sslcore checkpoint")
    if ckpt.get("version") != VERSION or any(k not in ckpt for k in KEYS + ("checksum",)):
        missing = [k for k in KEYS + ("checksum",) if k not in ckpt]
        raise CheckpointError(f"checkpoint {name} has version {ckpt.get('version')!r} (expected {VERSION})"
                              + (f" and lacks {missing}" if missing else ""))
    state = {k: v for k, v in ckpt.items() if k not in ("format", "version", "checksum")}
    try:
        intact = content_digest(state) == ckpt["checksum"]
    except TypeError as e:
        raise CheckpointError(f"checkpoint {name} is corrupted: {e}") from None
    if not intact:
        raise CheckpointError(f"checkpoint {name} is corrupted: its contents do not match the checksum stored "
                              "in it (a changed byte or an edited value)")
    _check_config(ckpt, name)
    if method is not None and ckpt["method"] != method:
        raise CheckpointError(f"checkpoint {name} is from method {ckpt['method']!r}, not {method!r}")
    return ckpt


def _check_config(ckpt: dict, name: str) -> None:
    """``config``, ``method`` and ``epoch`` of a checkpoint: the types and ranges eval and resume rely on."""
    config = ckpt["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {name} has a config of type {type(config).__name__}, not a dict")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"checkpoint {name} has a config without {', '.join(missing)}")
    bad = [k for k, kind in (("method", str), ("data", str), ("encoder", str), ("backend", str), ("options", dict))
           if not isinstance(config[k], kind)]
    if not isinstance(config["epochs"], int) or isinstance(config["epochs"], bool) or config["epochs"] < 1:
        bad.append("epochs")
    if bad or ckpt["method"] != config["method"]:
        raise CheckpointError(f"checkpoint {name} has a malformed config ({', '.join(bad) or 'method'})")
    epoch = ckpt["epoch"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= config["epochs"]:
        raise CheckpointError(f"checkpoint {name} has epoch {epoch!r}, outside 0..{config['epochs']} "
                              "(the epochs of the run that wrote it)")


def check_state_dict(name: str, state: dict, reference: dict) -> None:
    """Raise ``CheckpointError`` unless ``state`` has exactly ``reference``'s keys and tensor shapes, and
    finite floating-point values.

    ``Module.load_state_dict`` copies what fits before it complains; checking first keeps a bad
    checkpoint from leaving a half-loaded model behind.
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {name} is a {type(state).__name__}, not a state dict")
    missing, unexpected = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {name} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for key, ref in reference.items():
        if not isinstance(state[key], torch.Tensor) or state[key].shape != ref.shape:
            got = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
            raise CheckpointError(f"checkpoint {name}[{key!r}] has shape {got}, the model expects {tuple(ref.shape)}")
        if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
            raise CheckpointError(f"checkpoint {name}[{key!r}] holds NaN or Inf values (saved from a run that "
                                  "diverged?)")


def check_optimizer_state(name: str, state, optimizer: torch.optim.Optimizer) -> None:
    """Raise ``CheckpointError`` unless ``state`` (an optimizer state dict) has one entry per parameter of
    ``optimizer``, in groups of the same sizes, and its per-parameter tensors have the parameters' shapes
    (``Optimizer.load_state_dict`` checks only the counts, and a wrong shape fails at the next step)."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    per_param = state.get("state") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not isinstance(per_param, dict) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(f"checkpoint {name} is not an optimizer state dict")
    sizes = [len(g["params"]) for g in groups]
    expected = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != expected:
        raise CheckpointError(f"checkpoint {name} has parameter groups of sizes {sizes}, the optimizer {expected}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, param in zip((i for g in groups for i in g["params"]), params):
        entry = per_param.get(index, {})
        if not isinstance(entry, dict):
            raise CheckpointError(f"checkpoint {name} has a {type(entry).__name__} as the state of parameter {index}")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                raise CheckpointError(f"checkpoint {name} state {key!r} of parameter {index} has shape "
                                      f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise CheckpointError(f"checkpoint {name} state {key!r} of parameter {index} holds NaN or Inf (the "
                                      "optimizer state is damaged, not the options): resume from an earlier checkpoint "
                                      "or start a new run")
