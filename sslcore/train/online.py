"""The online linear head (solo-learn's online classifier): a linear classifier trained during pretraining on the
frozen features of each batch's first view and its labels, so a run reports a linear accuracy every epoch.

Per training batch: ``f = model(view0)`` in eval mode without autograd (the probes' features: BatchNorm's
running statistics, no dropout, no random draw), then one SGD step (momentum 0.9, no weight decay, lr
``0.1 x (1 + cos(pi progress)) / 2``) on ``cross_entropy(W bn(f) + b, y)``, ``bn`` a BatchNorm without
affine parameters (synchronised across ranks).  The backbone's parameters, gradients, modes, BatchNorm
statistics and random state are untouched, so a run with the head trains the same weights as one without.
Under DDP each rank steps on its shard and the head's gradients are averaged over ranks (the global
batch's gradient).  Cost: one forward of a batch per step without autograd, about a sixth of a two-view
step (an estimate: forward ~ 1/3 of forward + backward), plus a pass over the test split at each epoch's
end.  docs/architecture.md, "Evaluation".
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from .checkpoint import CheckpointError, check_state_dict
from .evaluate import extract_features

MOMENTUM = 0.9
LR = 0.1


@contextlib.contextmanager
def untouched(model: nn.Module):
    """``model`` in eval mode; afterwards every submodule's mode and torch's CPU RNG are as they were (a loader
    draws its seed from that RNG)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for m, mode in modes:
            m.training = mode


class OnlineLinear:
    """A linear head on ``num_features`` standardised features for ``num_classes`` classes (zero init: no random
    draw), with its own SGD optimizer; :meth:`step` per batch, :meth:`epoch_metrics` at each epoch's end."""

    def __init__(self, num_features: int, num_classes: int, device: torch.device, *, lr: float = LR):
        linear = nn.utils.skip_init(nn.Linear, num_features, num_classes)  # no draw from torch's RNG
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        # features standardised by their batch statistics (running ones in eval), as MAE's linear probe: the
        # backbones' feature scales differ by orders of magnitude, one learning rate fits them all this way
        head = nn.Sequential(nn.BatchNorm1d(num_features, affine=False), linear)
        self.head = (dist.convert_sync_batchnorm(head, device.type) if dist.world_size() > 1 else head).to(device)
        self.lr = lr
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=MOMENTUM)
        self.hits = torch.zeros((), dtype=torch.long, device=device)  # this epoch's training hits and samples
        self.seen = torch.zeros((), dtype=torch.long, device=device)

    @torch.no_grad()
    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` in eval mode (float32, no autograd)."""
        with untouched(model):
            return model(x).float().flatten(1)

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float,
             amp=contextlib.nullcontext()) -> None:
        """One SGD step of the head on ``model``'s features of ``x`` (this rank's first views; under ``amp``) and
        labels ``y``, at learning rate ``lr x (1 + cos(pi progress)) / 2``."""
        with amp:
            f = self.features(model, x)
        with torch.enable_grad():
            logits = self.head(f)
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if dist.world_size() > 1:
            for p in self.head.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= dist.world_size()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * progress))
        self.optimizer.step()
        self.hits += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)

    def epoch_metrics(self, model: nn.Module | None = None, data=None, **probing) -> dict[str, float]:
        """``online_linear_train_top1`` (the epoch's batches, all ranks, each predicted before its step), then
        the counts restart; with ``model`` and ``data`` also ``online_linear_top1`` on the test split."""
        counts = torch.stack([self.hits, self.seen])
        if dist.world_size() > 1:
            torch.distributed.all_reduce(counts)
        hits, seen = counts.tolist()
        self.hits.zero_()
        self.seen.zero_()
        row = {"online_linear_train_top1": hits / max(seen, 1)}
        if model is not None:
            with untouched(model):
                f_test = extract_features(data, "test", model, **probing)
            self.head.eval()
            with torch.no_grad():
                pred = self.head(f_test).argmax(1).cpu()
            self.head.train()
            row["online_linear_top1"] = (pred == data.y_test).float().mean().item()
        return row

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "hits": self.hits.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, state, path: str) -> None:
        """Restore a checkpoint's head (``path`` names it in errors)."""
        if not isinstance(state, dict) or not {"head", "optimizer", "hits", "seen"} <= set(state):
            raise CheckpointError(f"checkpoint {path!r} has no usable online linear head state; resume it with "
                                  "online_linear: false (a --config file)")
        check_state_dict("online linear head", state["head"], self.head.state_dict())
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path!r} has an unusable online linear head optimizer: {e}") from None
        self.head.load_state_dict(state["head"])
        self.hits.copy_(state["hits"])
        self.seen.copy_(state["seen"])


def online_head(enabled: bool | None, model: nn.Module, data, device: torch.device) -> OnlineLinear | None:
    """The run's head: ``enabled`` None (auto) means on for image data; off where the data has no labels."""
    labels = getattr(data, "y_train", None)
    if enabled is False or (enabled is None and data.kind != "image") or labels is None or not len(labels):
        return None
    classes = int(max(labels.max(), data.y_test.max())) + 1
    with untouched(model):
        num_features = extract_features(data, "test", model, device=device, batch_size=1, limit=1).shape[1]
    return OnlineLinear(num_features, classes, device)
