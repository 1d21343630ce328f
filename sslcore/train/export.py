"""``sslcore export``: a checkpoint's backbone as safetensors that others can load without sslcore.

The file holds the encoder's ``state_dict`` under its own key names, which for a timm encoder are
timm's (sslcore builds timm encoders with ``num_classes=0``, so there is no classifier), and its
metadata says how to build the module that takes it (``architecture``, ``model_kwargs``).  Before
writing, the export builds that module afresh and loads the weights into it with ``strict=True``, so a
file that is written loads.  How to load it:

* a timm encoder: ``timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=PATH,
  num_classes=0), **model_kwargs)`` (strict loading; ``load_snippet`` prints the exact call);
* a timm ResNet with sslcore's ``:small`` stem (3x3 ``conv1``, no max-pool), which no timm name
  builds: create the timm model, replace ``conv1`` and ``maxpool`` the same way, then
  ``load_state_dict(safetensors.torch.load_file(PATH), strict=True)``;
* ``smallcnn`` (timm-free): ``sslcore.models.SmallCNN(in_chans=C).load_state_dict(load_file(PATH),
  strict=True)``.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..files import atomic_write, check_output
from .evaluate import load_encoder


def encoder_recipe(model: nn.Module, config: dict, data) -> dict:
    """How to rebuild ``model.encoder``: ``{"format": "timm" | "sslcore", "architecture", "model_kwargs",
    "small_stem"}``."""
    from ..models import ENCODERS, parse_spec

    if hasattr(model, "encoder_name"):  # masked image models build their timm ViT for the data's images
        return {"format": "timm", "architecture": model.encoder_name,
                "model_kwargs": {"num_classes": 0, **model.encoder_kwargs}, "small_stem": False}
    name, small, kwargs = parse_spec(config["encoder"])
    if name in ENCODERS:
        return {"format": "sslcore", "architecture": name, "model_kwargs": {"in_chans": data.in_chans},
                "small_stem": False}
    return {"format": "timm", "architecture": name,
            "model_kwargs": {"num_classes": 0, "in_chans": data.in_chans, **kwargs}, "small_stem": small}


def rebuild(recipe: dict) -> nn.Module:
    """A fresh module of ``recipe`` (:func:`encoder_recipe`), built as a user without sslcore would."""
    from ..models import ENCODERS, small_stem

    if recipe["format"] == "sslcore":
        return ENCODERS[recipe["architecture"]](**recipe["model_kwargs"])
    import timm

    model = timm.create_model(recipe["architecture"], **recipe["model_kwargs"])
    return small_stem(model, recipe["model_kwargs"].get("in_chans", 3)) if recipe["small_stem"] else model


def load_snippet(recipe: dict, path: str, mean=None, std=None) -> str:
    """Python that loads the exported file ``path`` into the right module with ``strict=True``."""
    kwargs = dict(recipe["model_kwargs"])
    if recipe["format"] == "sslcore":
        return (f"from safetensors.torch import load_file\nfrom sslcore.models import SmallCNN\n"
                f"model = SmallCNN(**{kwargs!r})\nmodel.load_state_dict(load_file({path!r}), strict=True)")
    if recipe["small_stem"]:
        c = kwargs.get("in_chans", 3)
        return (f"import timm, torch.nn as nn\nfrom safetensors.torch import load_file\n"
                f"model = timm.create_model({recipe['architecture']!r}, **{kwargs!r})\n"
                f"model.conv1 = nn.Conv2d({c}, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)\n"
                f"model.maxpool = nn.Identity()\nmodel.load_state_dict(load_file({path!r}), strict=True)")
    overlay = {"file": path, "num_classes": 0}
    if mean is not None:
        overlay.update(mean=tuple(mean), std=tuple(std))
    kwargs.pop("num_classes")
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (f"import timm\nmodel = timm.create_model({recipe['architecture']!r}, pretrained=True, "
            f"pretrained_cfg_overlay={overlay!r}{extra})")


def is_export(path: Path) -> bool:
    """Whether ``path`` is a safetensors file sslcore's export wrote (its metadata says ``producer: sslcore``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("producer") == "sslcore"
    except Exception:  # not a safetensors file at all: not ours
        return False


def export_backbone(checkpoint: str, out: str, *, overwrite: bool = False) -> dict:
    """Write the encoder of ``checkpoint`` to ``out`` (safetensors; see the module docstring); returns the
    recipe with ``snippet``, the Python that loads it.  An existing ``out`` is refused unless ``overwrite`` and it is
    an export sslcore wrote (:func:`is_export`; a checkpoint, say, never is), before any work."""
    from safetensors.torch import save

    path = check_output(out, option="--out", overwrite=overwrite, owned=is_export, what="backbone export")
    model, ckpt, data = load_encoder(checkpoint)
    if data.kind != "image":
        raise ValueError(f"sslcore export writes image backbones (timm models, smallcnn); {checkpoint} is a "
                         f"{ckpt['method']} checkpoint of a sequence model on {data.kind} data")
    recipe = encoder_recipe(model, ckpt["config"], data)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
    fresh = rebuild(recipe)
    try:
        fresh.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the encoder of {checkpoint} does not load into {recipe['architecture']} rebuilt from its "
                         f"recipe {recipe}: {e}") from None
    mean, std = getattr(data, "mean", None), getattr(data, "std", None)
    meta = {"producer": "sslcore", "method": ckpt["config"]["method"], "epoch": str(ckpt["epoch"]),
            "data": ckpt["config"]["data"], "normalize_mean": json.dumps(mean), "normalize_std": json.dumps(std),
            **{k: json.dumps(v) if not isinstance(v, str) else v for k, v in recipe.items()}}
    atomic_write(path, save(tensors, metadata=meta), "backbone", option="--out")
    return {**recipe, "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
            "snippet": load_snippet(recipe, str(path), mean, std)}


__all__ = ["encoder_recipe", "export_backbone", "is_export", "load_snippet", "rebuild"]
