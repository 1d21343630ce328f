"""The evaluation protocols papers report, on a pretraining checkpoint (``sslcore eval --protocol ...``).

* ``linear``: the standard linear evaluation.  The backbone is frozen in eval mode (its BatchNorm statistics
  too); a linear classifier on its features is trained with random resized crops (area 8-100 %) and
  flips (where the data allows them), SGD with momentum 0.9, a cosine schedule to 0, no weight decay
  by default.  The features pass a BatchNorm without affine parameters first (MAE's linear probe): a
  linear map at test time that makes one learning rate fit every backbone's feature scale.
* ``finetune``: the whole network (the backbone, in train mode, and the same head) trained with AdamW and
  a cosine schedule on the same augmentation, for any encoder (timm ViTs and ResNets, the digits CNN).
  No layer-wise learning-rate decay.

Both report top-1 and top-5 on the test split (centre view, eval mode) and write ``eval-<protocol>.json``
into the checkpoint's run folder (never over another file: :func:`sslcore.files.check_output`).
docs/architecture.md, "Evaluation".
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import Seed, check_value
from ..data.augment import Normalize, RandomResizedCrop, Recipe
from ..data.pipeline import ShardBatchSampler, loader, to_float
from ..files import atomic_write, check_output
from .config import PROTOCOL_DEFAULTS, PROTOCOLS
from .evaluate import _topk_hits, extract_features, load_encoder

MOMENTUM = 0.9


def check_protocol_args(protocol: str, *, epochs=None, lr=None, batch_size=None, weight_decay=None) -> dict:
    """The protocol's settings with its defaults filled in; a ValueError naming the option when one is bad."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    given = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay}
    if protocol == "probe":
        extra = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)} set the training of --protocol linear or finetune; the probes "
                             "(--protocol probe) train nothing")
        return {}
    settings = dict(zip(given, PROTOCOL_DEFAULTS[protocol]))
    settings.update({k: v for k, v in given.items() if v is not None})
    for key, kind, ok in (("epochs", int, lambda v: v >= 1), ("batch_size", int, lambda v: v >= 1),
                          ("lr", float, lambda v: 0 < v <= 10), ("weight_decay", float, lambda v: 0 <= v < 1)):
        v = settings[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)) \
                or not math.isfinite(v) or not ok(v):
            domain = {"epochs": "an integer >= 1", "batch_size": "an integer >= 1", "lr": "a number in (0, 10]",
                      "weight_decay": "a number in [0, 1)"}[key]
            raise ValueError(f"--{key.replace('_', '-')} must be {domain}, got {v!r}")
    return settings


def results_path(checkpoint, protocol: str, data: str | None = None) -> Path:
    """``eval-<protocol>[-<data name>].json`` beside the checkpoint (``data``: a transfer's ``--data`` spec)."""
    suffix = "" if data is None else "-" + "".join(c if c.isalnum() else "-" for c in data.partition(":")[0])
    return Path(checkpoint).resolve().parent / f"eval-{protocol}{suffix}.json"


def is_eval_results(path: Path, protocol: str) -> bool:
    """Whether ``path`` holds what :func:`evaluate_protocol` writes for ``protocol`` (``--overwrite`` replaces only
    that)."""
    try:
        if path.stat().st_size > 1 << 20:
            return False
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(results, dict) and results.get("protocol") == protocol and {"top1", "checkpoint"} <= set(results)


def train_augment(data) -> Recipe:
    """The protocols' training views: a random resized crop of 8-100 % of the area, a flip where the data
    allows it, the data's normalisation."""
    return Recipe("linear-eval", [RandomResizedCrop((0.08, 1.0), flip_p=0.5 if data.flips else 0.0)],
                  Normalize(data.mean, data.std) if data.mean is not None else None)


class Classifier(nn.Module):
    """``encoder`` then ``Linear(BatchNorm(affine=False)(features))`` (zero-initialised: no random draw)."""

    def __init__(self, encoder: nn.Module, num_features: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        linear = nn.utils.skip_init(nn.Linear, num_features, num_classes)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(num_features, affine=False), linear)

    def forward(self, x):
        return self.head(self.encoder(x).float().flatten(1))


def evaluate_protocol(checkpoint, protocol: str, *, epochs: int | None = None, lr: float | None = None,
                      batch_size: int | None = None, weight_decay: float | None = None, data: str | None = None,
                      device: torch.device | str = "cpu", workers: int = 0, seed: int = 0, overwrite: bool = False,
                      write: bool = True, progress: bool = False) -> dict:
    """Train ``protocol`` ("linear" or "finetune", see the module docstring) on ``checkpoint``'s encoder for its
    dataset (or ``data``) and return the test accuracies with the settings; written atomically to
    :func:`results_path` when ``write`` (an existing file is refused unless ``overwrite``)."""
    if protocol == "probe":
        raise ValueError("--protocol probe trains nothing: use evaluate_checkpoint")
    settings = check_protocol_args(protocol, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay)
    seed = check_value("--seed", seed, Seed)
    out = results_path(checkpoint, protocol, data)
    if write:
        check_output(out, option=f"--protocol {protocol}'s results file", overwrite=overwrite,
                     owned=lambda path: is_eval_results(path, protocol), what=f"eval-{protocol} results file")
    t0 = time.perf_counter()
    device = torch.device(device)
    model, ckpt, dataset = load_encoder(checkpoint, data)
    if dataset.kind != "image":
        raise ValueError(f"--protocol {protocol} trains on augmented images; {dataset.name} is {dataset.kind} data")
    n_train = len(dataset.y_train)
    if settings["batch_size"] > n_train:
        raise ValueError(f"--batch-size {settings['batch_size']} is larger than the training split ({n_train})")
    torch.manual_seed(seed)
    encoder = model.to(device)
    with torch.random.fork_rng(devices=[]):
        num_features = extract_features(dataset, "test", encoder, device=device, batch_size=1, limit=1).shape[1]
    classes = int(max(dataset.y_train.max(), dataset.y_test.max())) + 1
    net = Classifier(encoder, num_features, classes).to(device)
    finetune = protocol == "finetune"
    encoder.requires_grad_(False)  # the method's projectors and momentum copies are no part of the classifier
    encoder.encoder.requires_grad_(finetune)
    from timm.optim import param_groups_weight_decay  # timm on use: the CLI starts without it

    # the trained parameters; weight decay on weights of dimension >= 2 only, not on norms, biases and a ViT's
    # position embedding and class token (the encoder's no_weight_decay())
    skip = [f"encoder.encoder.{n}" for n in getattr(encoder.encoder, "no_weight_decay", set)()]
    groups = param_groups_weight_decay(net, settings["weight_decay"], no_weight_decay_list=skip)
    if finetune:
        peak = settings["lr"] * settings["batch_size"] / 256
        optimizer = torch.optim.AdamW(groups, lr=peak)
    else:
        peak = settings["lr"]
        optimizer = torch.optim.SGD(groups, lr=peak, momentum=MOMENTUM)
    recipe, generator = train_augment(dataset), torch.Generator().manual_seed(seed)
    labels = dataset.y_train.to(device)
    steps = n_train // settings["batch_size"]
    sampler = ShardBatchSampler(n_train, settings["batch_size"], world=1, rank=0)
    batches_of = loader(dataset.items("train"), sampler, workers=workers, device=device)
    total = settings["epochs"] * steps
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=f"eval {protocol}", unit="step", dynamic_ncols=True)
    step = 0
    for epoch in range(1, settings["epochs"] + 1):
        finite = torch.ones((), dtype=torch.bool, device=device)  # read once per epoch: no sync per step
        sampler.set_epoch(torch.randperm(n_train, generator=generator))
        net.train()
        if not finetune:
            encoder.eval()  # frozen: BatchNorm statistics, dropout off
        for index, x in batches_of:
            x = to_float(x.to(device, non_blocking=True))
            (view,) = recipe.views(x, generator, 1)
            for group in optimizer.param_groups:
                group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * step / total))
            with torch.set_grad_enabled(True):
                if finetune:
                    logits = net(view)
                else:
                    with torch.no_grad():
                        f = encoder(view).float().flatten(1)
                    logits = net.head(f)
                loss = F.cross_entropy(logits, labels[index.to(device)])
            finite &= torch.isfinite(loss.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if bar is not None:
                bar.update()
        if not finite.item():
            raise FloatingPointError(f"--protocol {protocol} diverged in epoch {epoch}: lower --lr (now "
                                     f"{settings['lr']:g})")
    if bar is not None:
        bar.close()
    net.eval()
    with torch.no_grad():
        f_test = extract_features(dataset, "test", encoder, device=device, workers=workers)
        top1, top5 = _topk_hits(net.head(f_test), dataset.y_test.to(device))
    cfg = ckpt["config"]
    result = {"protocol": protocol, "method": cfg["method"], "encoder": cfg["encoder"], "data": data or cfg["data"],
              "trained_on": cfg["data"], "checkpoint": str(Path(checkpoint).resolve()), "epoch": ckpt["epoch"],
              **settings, "seed": seed, "optimizer": "adamw" if finetune else "sgd", "peak_lr": peak,
              "n_train": n_train, "n_test": len(dataset.y_test), "top1": top1 / len(f_test), "top5": top5 / len(f_test),
              "time_s": round(time.perf_counter() - t0, 2)}
    if write:
        atomic_write(out, (json.dumps(result, indent=2) + "\n").encode(), f"eval-{protocol} results")
    return result


__all__ = ["PROTOCOL_DEFAULTS", "PROTOCOLS", "check_protocol_args", "evaluate_protocol", "results_path"]
