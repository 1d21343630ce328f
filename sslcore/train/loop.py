"""The pretraining loop: plain PyTorch, AdamW with warm-up + cosine, atomic per-epoch checkpoints,
JSON-lines metrics, then linear/k-NN probes of the trained encoder against two baselines.

Ctrl-C (SIGINT, or SIGTERM as torchrun sends it) stops at the end of the current step: the
checkpoint then holds the state after that step and its place in the epoch (``position``, see
:mod:`.checkpoint`), ``--resume`` continues bit-for-bit from there, and :class:`TrainingInterrupted`
is raised.  A second Ctrl-C aborts at once, without a checkpoint.

Distributed (``torchrun --nproc_per_node N -m sslcore pretrain ...``): DDP over gloo (CPU) or
nccl (CUDA).  Every rank draws the same global data order and the same augmented global batch
(one generator, as in one process) and trains on its contiguous ``1/N`` shard; methods that take
``gather_distributed`` get it: each rank's loss is its own rows' mean against every rank's keys,
and DDP's gradient average is the single-process gradient, with no scaling (lightly's convention,
:mod:`sslcore.dist`); BatchNorm is synchronised.  The batch size is the global one; the logged
epoch loss is the mean over ranks.  Only rank 0 writes files, shows progress and runs the probes.

Before any work: every setting is checked (:class:`PretrainConfig`), the run directory is locked
and refused if it holds another run (:mod:`.rundir`), and a checkpoint to resume is checked whole.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.distributed
from torch import nn
from tqdm import tqdm

from .. import dist
from ..checks import Backend, NonNegative, NonNegativeInt, PositiveInt, Range, Seed, Temperature, check_value
from ..data import check_data_spec, data_kind, load_dataset
from ..kernels import resolve_backend
from ..methods import check_options, get_method, method_options, option_parameters
from .checkpoint import (CheckpointError, atomic_write, check_optimizer_state, check_state_dict, load_checkpoint,
                         save_checkpoint)
from .evaluate import build_model, probe
from .rundir import RunDirectory

# Options that define a run: resuming with different values is refused (epochs may be extended).
RUN_KEYS = ("method", "data", "encoder", "batch_size", "lr", "weight_decay", "warmup_epochs", "temperature",
            "seed", "limit", "options")
# AdamW moves every weight by about lr per step: above 1 that is noise, not a learning rate.
LearningRate = Annotated[float, Range(0, 1, low_open=True)]
# Method options the trainer sets itself (from --backend, and under torchrun).
TRAINER_OPTIONS = {"backend": "--backend", "gather_distributed": "torchrun"}


@dataclass
class PretrainConfig:
    """One run's settings: the ``sslcore pretrain`` options (``--batch-size`` is ``batch_size``).

    Each is checked on creation against its annotated domain (the CLI parses with the same
    annotations), and so are the cross-checks that need no data: the data kind against the
    method, the method's options, the batch size against the method's minimum, the device and
    backend.  ``temperature=None`` means the method's own default (then stored here); a method
    without a temperature takes none.  ``-o temperature=`` is the same as ``--temperature``, not both.
    """

    method: str = "simclr"
    data: str = "digits"
    encoder: str = "smallcnn"
    epochs: PositiveInt = 100
    batch_size: PositiveInt = 256
    lr: LearningRate = 2e-3
    weight_decay: NonNegative = 1e-4
    warmup_epochs: NonNegativeInt = 3
    temperature: Temperature | None = None
    seed: Seed = 0
    limit: PositiveInt | None = None  # pretrain on the first `limit` training images only (smoke tests)
    device: str = "auto"
    backend: Backend = "auto"  # the loss's backend: auto | triton | torch
    out: str | None = None  # default runs/<method>-<data>
    resume: str | None = None  # checkpoint to continue from; "" = OUT/checkpoint.pt
    overwrite: bool = False  # replace the run in OUT (deleted only when this run is ready to train)
    options: dict = dataclasses.field(default_factory=dict)  # the method's own options (``--option KEY=VALUE``)

    def __post_init__(self):
        cls = get_method(self.method)
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a dict, got {self.options!r}")
        options = dict(self.options)
        for key, flag in TRAINER_OPTIONS.items():
            if key in options:
                raise ValueError(f"-o {key} is set by the trainer ({flag}), not as a method option")
        if "temperature" in options:
            if self.temperature is not None:
                raise ValueError(f"the temperature is given twice, --temperature {self.temperature} and "
                                 f"-o temperature={options['temperature']!r}: give one")
            self.temperature = check_value("-o temperature", options.pop("temperature"), Temperature)
        hints = typing.get_type_hints(type(self), include_extras=True)
        for f in dataclasses.fields(self):
            if f.name != "options":
                setattr(self, f.name, check_value(_flag(f.name), getattr(self, f.name), hints[f.name]))
        self.options = check_options(self.method, options)
        check_data_spec(self.data)
        if data_kind(self.data) not in cls.data_kinds:
            raise ValueError(f"method {self.method!r} trains on {' or '.join(cls.data_kinds)} data; --data {self.data} "
                             f"is {data_kind(self.data)} data")
        params = option_parameters(self.method)
        if "temperature" in params:
            if self.temperature is None:
                self.temperature = params["temperature"].default
        elif self.temperature is not None:
            raise ValueError(f"method {self.method!r} has no temperature (its loss has no softmax over negatives); "
                             "leave out --temperature")
        if self.lr * self.weight_decay >= 1:
            raise ValueError(f"--lr {self.lr:g} x --weight-decay {self.weight_decay:g} must be < 1: AdamW multiplies "
                             "every weight by 1 - lr x weight_decay each step")
        if self.batch_size < cls.min_batch_size:
            raise ValueError(f"--batch-size {self.batch_size} is too small for {self.method}: it needs at least "
                             f"{cls.min_batch_size} samples per batch ({cls.min_batch_reason})")
        if self.resume is not None and self.overwrite:
            raise ValueError("--resume continues a run and --overwrite starts a new one: give one")
        device = resolve_device(self.device)
        try:
            resolve_backend(self.backend, device)
        except RuntimeError as e:
            raise ValueError(f"--backend {self.backend} on --device {self.device}: {e}") from None
        if self.out is None:
            self.out = str(Path("runs") / f"{self.method}-{self.data.partition(':')[0]}")
        if self.resume == "":
            self.resume = str(Path(self.out) / "checkpoint.pt")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def cli_domain(field: str):
    """The annotated domain of a ``PretrainConfig`` field, for the CLI's parser."""
    return typing.get_type_hints(PretrainConfig, include_extras=True)[field]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else must name a device this machine has
    (cpu, cuda[:N], mps) or a ``ValueError`` says why not."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device!r}: this torch build or machine has no MPS device")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r}: training and probes run on cpu, cuda or mps, not {dev.type} "
                         "(meta tensors, for one, hold no values)")
    return dev


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C after writing a resumable checkpoint to ``path``."""

    def __init__(self, path: str, epoch: int, step: int):
        super().__init__(f"interrupted in epoch {epoch} after step {step}; checkpoint {path}")
        self.path, self.epoch, self.step = path, epoch, step


class _StopRequest:
    """While active: the first SIGINT/SIGTERM sets ``requested``; a second SIGINT raises KeyboardInterrupt."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self._previous = False, {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if dist.is_main_process():
            tqdm.write("stopping after this step to save a checkpoint (Ctrl-C again aborts without one)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def any_rank(self, device) -> bool:
        """Whether any rank was asked to stop (all ranks must stop at the same step)."""
        if dist.world_size() == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


class _MethodLoss(nn.Module):
    """``forward`` = the method's loss, so that DDP sees the whole training step as its forward."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, views, *, index, epoch):
        return self.method.loss(views, index=index, epoch=epoch)


def build_training_model(config: dict, data, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """``(model, step_loss)`` for a run's config: the method on ``device``, and the module whose
    ``forward(views, index=, epoch=)`` is the training loss (DDP-wrapped, BatchNorm synchronised,
    ``gather_distributed=True`` for methods that take it, when several processes run)."""
    world = dist.world_size()
    gathers = world > 1 and "gather_distributed" in method_options(config["method"])
    model = build_model(config, data, **({"gather_distributed": True} if gathers else {})).to(device)
    if world == 1:
        return model, _MethodLoss(model)
    model = dist.convert_sync_batchnorm(model, device.type)
    step_loss = nn.parallel.DistributedDataParallel(
        _MethodLoss(model), device_ids=[device.index] if device.type == "cuda" else None)
    return model, step_loss


def _check_position(pos, steps_per_epoch: int, n_train: int, path: str) -> dict | None:
    """A checkpoint's mid-epoch ``position`` (or None) after checking it fits this run."""
    if pos is None:
        return None
    ok = (isinstance(pos, dict) and isinstance(pos.get("step"), int) and 0 < pos["step"] < steps_per_epoch
          and isinstance(pos.get("perm"), torch.Tensor) and pos["perm"].shape == (n_train,)
          and isinstance(pos.get("losses"), torch.Tensor) and pos["losses"].shape == (pos["step"],))
    if not ok:
        raise CheckpointError(f"checkpoint {path!r} has a malformed mid-epoch position")
    return pos


def _load_resume(cfg: PretrainConfig) -> dict:
    """The checkpoint ``cfg.resume``, checked whole against ``cfg`` before any data or model exists."""
    ckpt = load_checkpoint(cfg.resume, method=cfg.method)
    saved = ckpt["config"]
    diff = [f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in RUN_KEYS if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise CheckpointError(f"checkpoint {cfg.resume!r} was trained with {', '.join(diff)}; "
                              "resume with the same options")
    if ckpt["epoch"] >= cfg.epochs:
        raise CheckpointError(f"checkpoint {cfg.resume!r} has already trained {ckpt['epoch']} epochs, and --epochs "
                              f"{cfg.epochs} leaves nothing to train: pass --epochs above {ckpt['epoch']} to train on, "
                              f"or probe it with: sslcore eval --checkpoint {cfg.resume}")
    if not isinstance(ckpt["generator"], torch.Tensor):
        raise CheckpointError(f"checkpoint {cfg.resume!r} has a malformed generator state")
    return ckpt


def _resume_state(cfg: PretrainConfig, ckpt: dict, model, optimizer, generator, steps_per_epoch: int,
                  n_train: int) -> tuple[int, dict | None]:
    """Load ``ckpt`` into model/optimizer/generator after checking all of it against them; returns its
    epoch and its mid-epoch position (or None)."""
    check_state_dict("model", ckpt["model"], model.state_dict())
    check_optimizer_state("optimizer", ckpt["optimizer"], optimizer)
    position = _check_position(ckpt.get("position"), steps_per_epoch, n_train, cfg.resume)
    try:
        generator.set_state(ckpt["generator"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {cfg.resume!r} has an unusable optimizer/generator state: {e}") from None
    model.load_state_dict(ckpt["model"])
    set_global_rng_state(ckpt["rng"], cfg.resume)
    return ckpt["epoch"], position


def _diverged(cfg: PretrainConfig, epoch: int, what: str) -> FloatingPointError:
    """The error for a run whose loss or weights stopped being finite, naming the options that cause it."""
    hint = f"lower --lr (now {cfg.lr:g})"
    if cfg.temperature is not None:
        hint += f" or raise --temperature (now {cfg.temperature:g})"
    return FloatingPointError(f"training diverged in epoch {epoch}: {what}; {hint}")


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def global_rng_state(device: torch.device) -> dict:
    """torch's global RNG states (CPU, and the CUDA device's): what masking, dropout and init draw from."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_global_rng_state(state, path: str) -> None:
    try:
        torch.set_rng_state(state["cpu"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())
    except (TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path!r} has an unusable global RNG state: {e}") from None


def pretrain(cfg: PretrainConfig) -> dict:
    """Pretrain, probe, and write ``metrics.jsonl``, ``checkpoint.pt`` and ``summary.json`` to ``cfg.out``.

    Returns the summary: probe accuracies of the trained encoder, of its random initialisation and
    of raw pixels on the held-out split.  Under torchrun, joins (and afterwards leaves) the process
    group; every rank returns rank 0's summary.
    """
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    created = dist.init_from_env(device.type)
    try:
        if dist.world_size() > 1 and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", dist.local_rank())
            torch.cuda.set_device(device)
        return _pretrain(cfg, device, t_start)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _pretrain(cfg: PretrainConfig, device: torch.device, t_start: float) -> dict:
    world, main = dist.world_size(), dist.is_main_process()
    if world > 1 and (cfg.batch_size < 2 * world or cfg.batch_size % world):
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of the number of processes ({world}) "
                         f"and at least 2 x {world}: it is the global batch, split evenly across the processes")
    out = Path(cfg.out)
    continuing = cfg.resume is not None and Path(cfg.resume).resolve().parent == out.resolve()
    with RunDirectory(out, continuing=continuing, overwrite=cfg.overwrite, enabled=main) as run:
        return _run(cfg, device, t_start, run)


def _run(cfg: PretrainConfig, device: torch.device, t_start: float, run: RunDirectory) -> dict:
    """The run itself, in the locked run directory ``run``."""
    world, rank, main = dist.world_size(), dist.rank(), dist.is_main_process()
    ckpt = _load_resume(cfg) if cfg.resume is not None else None
    data = load_dataset(cfg.data)
    x_train = data.x_train[:cfg.limit].to(device)
    if cfg.batch_size > len(x_train):
        raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training set ({len(x_train)} images)")

    torch.manual_seed(cfg.seed)
    config = dataclasses.asdict(cfg)
    model, step_loss = build_training_model(config, data, device)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)  # shuffling and augmentations
    start_epoch, position = 0, None
    steps_per_epoch = len(x_train) // cfg.batch_size  # drop_last: every step sees a full batch
    if ckpt is not None:
        start_epoch, position = _resume_state(cfg, ckpt, model, optimizer, generator, steps_per_epoch, len(x_train))
    shard = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)

    run.replace_previous()  # --overwrite: the old run goes only now, with the new one ready to train
    out = Path(cfg.out)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    metrics = []
    if main:
        if start_epoch and metrics_path.exists():  # keep the lines of the epochs the checkpoint holds
            metrics = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r["epoch"] <= start_epoch]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in metrics))

    def save(epoch, **extra):
        if main:
            save_checkpoint(ckpt_path, method=cfg.method, config=config, epoch=epoch, model=model.state_dict(),
                            optimizer=optimizer.state_dict(), generator=generator.get_state(),
                            rng=global_rng_state(device), **extra)

    total_steps, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    first_step = position["step"] if position else 0
    bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch + first_step, desc=f"{cfg.method}/{data.name}",
               unit="step", dynamic_ncols=True, disable=not main)
    if main and cfg.temperature is not None:
        tqdm.write(f"{cfg.method}: temperature {cfg.temperature:g}")
    model.train()
    with _StopRequest() as stop:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            if position:
                perm, losses, first = position["perm"], list(position["losses"].to(device)), position["step"]
                position = None
            else:
                perm, losses, first = torch.randperm(len(x_train), generator=generator), [], 0
            for i in range(first, steps_per_epoch):
                step = (epoch - 1) * steps_per_epoch + i
                lr = lr_at(step, total_steps, warmup, cfg.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                index = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size].to(device)
                x = x_train[index]
                views = [data.augment(x, generator)[shard] for _ in range(model.n_views)]
                try:
                    with amp:
                        loss = step_loss(views, index=index[shard], epoch=epoch)
                except ValueError as e:  # e.g. "z contains NaN or Inf" once the weights have blown up
                    if not _finite(model):
                        raise _diverged(cfg, epoch, f"the weights hold NaN or Inf at step {i + 1}") from e
                    raise
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach().float())
                bar.update()
                if i == steps_per_epoch - 1 or bar.n % 5 == 0:
                    rate = (i + 1 - first) * cfg.batch_size / (time.perf_counter() - t0)
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                if i < steps_per_epoch - 1 and stop.any_rank(device):
                    save(epoch - 1, position={"step": i + 1, "perm": perm, "losses": torch.stack(losses).cpu()})
                    bar.close()
                    raise TrainingInterrupted(str(ckpt_path), epoch, i + 1)
            mean_loss = torch.stack(losses).mean()
            if world > 1:  # the mean of the ranks' losses: the global batch's mean loss
                torch.distributed.all_reduce(mean_loss)
                mean_loss /= world
            row = {"epoch": epoch, "loss": mean_loss.item(), "lr": lr, "time": round(time.perf_counter() - t0, 3)}
            if not math.isfinite(row["loss"]):
                raise _diverged(cfg, epoch, f"its mean loss is {row['loss']}")
            metrics.append(row)
            if main:
                with metrics_path.open("a") as f:  # before the checkpoint: a resume drops lines past its epoch
                    f.write(json.dumps(row) + "\n")
            save(epoch)
            if epoch < cfg.epochs and stop.any_rank(device):
                bar.close()
                raise TrainingInterrupted(str(ckpt_path), epoch + 1, 0)
    bar.close()
    train_time = time.perf_counter() - t_start

    summary = None
    if main:
        random_model = build_model(config, data).to(device)
        random_model.load_state_dict(init_state)
        probes = {"trained": probe(data, model), "random_init": probe(data, random_model),
                  "raw_pixels": probe(data, None)}
        model.eval()
        method_eval = model.evaluate(data)
        summary = {"method": cfg.method, "data": cfg.data, "encoder": cfg.encoder,
                   "encoder_class": type(model.encoder).__name__, "raw_features": data.raw_name, "epochs": cfg.epochs,
                   "temperature": cfg.temperature,
                   "final_loss": metrics[-1]["loss"] if metrics else None, "n_train": len(data.y_train),
                   "n_test": len(data.y_test), "device": str(device), "world_size": world,
                   "train_time_s": round(train_time, 2), "total_time_s": round(time.perf_counter() - t_start, 2),
                   "probes": probes, "eval": method_eval, "config": config}
        atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode(), "summary")
    if world > 1:
        shared = [summary]
        torch.distributed.broadcast_object_list(shared, src=0)
        summary = shared[0]
    return summary
