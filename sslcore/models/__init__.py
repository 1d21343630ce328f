"""Encoders (backbones): ``create_encoder(spec, in_chans)`` -> module mapping images to ``[B, num_features]``.

``spec`` is ``NAME[:OPTION,...]``: ``NAME`` a registered encoder (``smallcnn``) or any timm model
name; the options apply to timm models: ``small`` gives a timm ResNet a small-image stem (3x3
stride-1 ``conv1``, no max-pool, so a 32x32 image is 4x4, not 1x1, at the last stage) and
``KEY=VALUE`` is passed to ``timm.create_model`` (a Python literal or else a string), e.g.
``resnet18:small`` or ``vit_tiny_patch16_224:img_size=32,patch_size=4``.  Given the data's
``image_shape``, the encoder is run once on zeros of that shape before it is returned, so one that
cannot take those images (too small for its strides, a ViT's fixed input size, an option timm only
reads in ``forward``) is refused before any work.
"""
from __future__ import annotations

import ast

import timm
import torch
from torch import nn

from .cnn import SmallCNN
from .gcn import GCN

ENCODERS = {"smallcnn": SmallCNN}


def parse_spec(spec: str) -> tuple[str, bool, dict]:
    """``NAME[:small][,KEY=VALUE...]`` -> ``(name, small, timm kwargs)``."""
    name, _, rest = spec.partition(":")
    small, kwargs = False, {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            if key != "small":
                raise ValueError(f"unknown encoder option {key!r} in {spec!r}; options: small, KEY=VALUE (timm)")
            small = True
            continue
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return name, small, kwargs


def small_stem(model: nn.Module, in_chans: int) -> nn.Module:
    """Replace a timm ResNet's 7x7 stride-2 ``conv1`` by a 3x3 stride-1 one and drop its max-pool."""
    if not isinstance(getattr(model, "conv1", None), nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(f"the 'small' stem is for timm ResNets (a conv1 and a maxpool); "
                         f"{type(model).__name__} has none")
    model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def check_input(model: nn.Module, spec: str, image_shape: tuple[int, int, int]) -> None:
    """Run ``model`` (train mode, no grad) on two zero images of ``image_shape``; its buffers (BatchNorm's
    statistics), mode and the CPU random state are left as they were.  Any failure is a ``ValueError``
    naming ``--encoder``, the images and the reason."""
    c, h, w = image_shape
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.train()(torch.zeros(2, c, h, w))
    except Exception as e:  # the layers say why in their own words: RuntimeError, AssertionError, TypeError, ...
        hint = ""
        if "doesn't match model" in str(e):
            hint = f"; a timm ViT's input size is fixed when it is built: give img_size={h} and a patch_size " \
                   f"dividing it (e.g. --encoder {spec}{',' if ':' in spec else ':'}img_size={h},patch_size=2)"
        elif "too small" in str(e):
            hint = "; the images are too small for its strides and pools: give larger images (imagefolder: size=)"
        reason = str(e).strip().rstrip(".")
        raise ValueError(f"--encoder {spec} cannot take {c}-channel {h}x{w} images: {reason}{hint}") from None
    finally:
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        model.train(was_training)


def create_encoder(spec: str, *, in_chans: int = 1, image_shape: tuple[int, int, int] | None = None) -> nn.Module:
    """A registered encoder by name, else a timm model (``num_classes=0``: pooled features), checked to run on
    ``image_shape`` images where that is given (:func:`check_input`); see the module doc."""
    model = _build(spec, in_chans)
    if image_shape is not None:
        check_input(model, spec, image_shape)
    return model


def _build(spec: str, in_chans: int) -> nn.Module:
    name, small, kwargs = parse_spec(spec)
    if name in ENCODERS:
        if small or kwargs:
            raise ValueError(f"encoder {name!r} takes no options, got {spec!r}")
        return ENCODERS[name](in_chans=in_chans)
    if not timm.is_model(name):
        raise ValueError(f"unknown encoder {name!r}: not one of {', '.join(ENCODERS)} nor a timm model name")
    try:
        model = timm.create_model(name, num_classes=0, in_chans=in_chans, **kwargs)
    except TypeError as e:
        raise ValueError(f"timm model {name!r} does not take {kwargs}: {e}") from None
    return small_stem(model, in_chans) if small else model


__all__ = ["ENCODERS", "GCN", "SmallCNN", "check_input", "create_encoder", "parse_spec", "small_stem"]
