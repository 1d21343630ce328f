"""The contract between the trainer and every SSL method."""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import nn

from ..models import create_encoder


class SSLMethod(nn.Module):
    """An encoder (``forward(x)`` gives the features probes read) and a training objective.

    Each step the trainer draws ``n_views`` augmented views of a batch of samples and calls
    ``loss(views, index=..., epoch=...)``: ``index`` holds the samples' positions in the training
    set (for per-sample memories), ``epoch`` counts from 1.  Methods keep their own extra state
    (queues, momentum encoders, memories) as buffers, so it is checkpointed with the model.
    ``create`` builds the method for a dataset; override it when the encoder depends on the data.
    ``data_kinds`` lists the ``data.kind`` values the method trains on; ``evaluate(data)`` may add
    method-specific held-out metrics to the run's summary (besides the probes every run gets).
    A (global) batch needs at least ``min_batch_size`` samples, for ``min_batch_reason``.
    ``progress`` is the fraction of the run's optimizer updates done before this step (0 at the first,
    set by the trainer; schedules such as BYOL's target momentum read it; 0 outside a training run).
    ``recipe`` names the augmentation ``--augment auto`` gives the method (None: the data's own choice
    for view-invariance methods, e.g. ``simclr``); ``optimizer_defaults`` are keyword arguments for
    the optimizer (e.g. AdamW's betas) where it takes them.
    Keyword options are annotated with their domains (:mod:`sslcore.checks`): the trainer checks
    them against these before any work.
    """

    name = ""
    n_views = 2
    data_kinds: tuple[str, ...] = ("image",)
    min_batch_size, min_batch_reason = 1, ""
    recipe: str | None = None
    optimizer_defaults: dict = {}

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.progress = 0.0

    @classmethod
    def create(cls, data, *, encoder: str, **options) -> "SSLMethod":
        return cls(create_encoder(encoder, in_chans=data.in_chans, image_shape=data.image_shape), **options)

    @classmethod
    def default_temperature(cls, options: dict) -> float | None:
        """The temperature a run with ``options`` gets when none is given: the constructor's default
        (None for a method without one)."""
        for base in cls.__mro__:  # a subclass's **kwargs reach its bases' options
            params = inspect.signature(base.__init__).parameters if issubclass(base, SSLMethod) else {}
            param = params.get("temperature")
            if param is not None:
                return param.default
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def evaluate(self, data) -> dict[str, float]:
        return {}

    def loss(self, views: Sequence[torch.Tensor], *, index: torch.Tensor, epoch: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines no loss")
