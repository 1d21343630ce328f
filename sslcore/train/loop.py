"""The pretraining loop: plain PyTorch, AdamW with warm-up + cosine, atomic per-epoch checkpoints,
JSON-lines metrics, then linear/k-NN probes of the trained encoder against two baselines."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import check_data_spec, load_dataset
from ..kernels import BACKENDS
from ..methods import check_options, get_method
from .checkpoint import CheckpointError, check_state_dict, load_checkpoint, save_checkpoint
from .evaluate import build_model, probe

# Options that define a run: resuming with different values is refused (epochs may be extended).
RUN_KEYS = ("method", "data", "encoder", "batch_size", "lr", "weight_decay", "warmup_epochs", "temperature",
            "seed", "limit", "options")


@dataclass
class PretrainConfig:
    method: str = "simclr"
    data: str = "digits"
    encoder: str = "smallcnn"
    epochs: int = 100
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 3
    temperature: float = 0.1
    seed: int = 0
    limit: int | None = None  # pretrain on the first `limit` training images only (smoke tests)
    device: str = "auto"
    backend: str = "auto"  # the loss's backend: auto | triton | torch
    out: str | None = None  # default runs/<method>-<data>
    resume: str | None = None  # checkpoint to continue from; "" = OUT/checkpoint.pt
    options: dict = dataclasses.field(default_factory=dict)  # the method's own options (``--option KEY=VALUE``)

    def __post_init__(self):
        get_method(self.method)
        check_options(self.method, self.options)
        check_data_spec(self.data)
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("weight_decay", "warmup_epochs"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be a positive integer, got {self.limit!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.out is None:
            self.out = str(Path("runs") / f"{self.method}-{self.data.partition(':')[0]}")
        if self.resume == "":
            self.resume = str(Path(self.out) / "checkpoint.pt")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else must name a usable torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _resume_state(cfg: PretrainConfig, model, optimizer, generator) -> int:
    """Load ``cfg.resume`` into model/optimizer/generator after checking all of it; returns its epoch."""
    ckpt = load_checkpoint(cfg.resume, method=cfg.method)
    saved = ckpt["config"]
    diff = [f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in RUN_KEYS if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise CheckpointError(f"checkpoint {cfg.resume!r} was trained with {', '.join(diff)}; "
                              "resume with the same options")
    check_state_dict("model", ckpt["model"], model.state_dict())
    if not isinstance(ckpt["generator"], torch.Tensor) or not isinstance(ckpt["epoch"], int):
        raise CheckpointError(f"checkpoint {cfg.resume!r} has a malformed generator state or epoch")
    try:
        generator.set_state(ckpt["generator"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {cfg.resume!r} has an unusable optimizer/generator state: {e}") from None
    model.load_state_dict(ckpt["model"])
    return ckpt["epoch"]


def pretrain(cfg: PretrainConfig) -> dict:
    """Pretrain, probe, and write ``metrics.jsonl``, ``checkpoint.pt`` and ``summary.json`` to ``cfg.out``.

    Returns the summary: probe accuracies of the trained encoder, of its random initialisation and
    of raw pixels on the held-out split.
    """
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data)
    x_train = data.x_train[:cfg.limit].to(device)
    if cfg.batch_size > len(x_train):
        raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training set ({len(x_train)} images)")

    torch.manual_seed(cfg.seed)
    config = dataclasses.asdict(cfg)
    model = build_model(config, data).to(device)
    if data.kind not in model.data_kinds:
        raise ValueError(f"method {cfg.method!r} trains on {' or '.join(model.data_kinds)} data; "
                         f"--data {cfg.data} is {data.kind} data")
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)  # shuffling and augmentations
    start_epoch = 0 if cfg.resume is None else _resume_state(cfg, model, optimizer, generator)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    metrics = []
    if start_epoch and metrics_path.exists():  # keep the lines of the epochs the checkpoint holds
        metrics = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r["epoch"] <= start_epoch]
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in metrics))

    steps_per_epoch = len(x_train) // cfg.batch_size  # drop_last: every step sees a full batch
    total_steps, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch, desc=f"{cfg.method}/{data.name}",
               unit="step", dynamic_ncols=True)
    model.train()
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0, losses = time.perf_counter(), []
        perm = torch.randperm(len(x_train), generator=generator)
        for i in range(steps_per_epoch):
            step = (epoch - 1) * steps_per_epoch + i
            lr = lr_at(step, total_steps, warmup, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size].to(device)
            x = x_train[index]
            views = [data.augment(x, generator) for _ in range(model.n_views)]
            with amp:
                loss = model.loss(views, index=index, epoch=epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            bar.update()
            if i == steps_per_epoch - 1 or bar.n % 5 == 0:
                rate = (i + 1) * cfg.batch_size / (time.perf_counter() - t0)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        row = {"epoch": epoch, "loss": torch.stack(losses).mean().item(), "lr": lr,
               "time": round(time.perf_counter() - t0, 3)}
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"loss became {row['loss']} in epoch {epoch}; try a lower --lr")
        metrics.append(row)
        with metrics_path.open("a") as f:  # before the checkpoint: a resume drops lines past its epoch
            f.write(json.dumps(row) + "\n")
        save_checkpoint(ckpt_path, method=cfg.method, config=config, epoch=epoch, model=model.state_dict(),
                        optimizer=optimizer.state_dict(), generator=generator.get_state())
    bar.close()
    train_time = time.perf_counter() - t_start

    random_model = build_model(config, data).to(device)
    random_model.load_state_dict(init_state)
    probes = {"trained": probe(data, model), "random_init": probe(data, random_model), "raw_pixels": probe(data, None)}
    model.eval()
    method_eval = model.evaluate(data)
    summary = {"method": cfg.method, "data": cfg.data, "encoder": cfg.encoder, "epochs": cfg.epochs,
               "final_loss": metrics[-1]["loss"] if metrics else None, "n_train": len(data.y_train),
               "n_test": len(data.y_test), "device": str(device), "train_time_s": round(train_time, 2),
               "total_time_s": round(time.perf_counter() - t_start, 2), "probes": probes, "eval": method_eval,
               "config": config}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
