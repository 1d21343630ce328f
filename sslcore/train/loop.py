"""The pretraining loop: plain PyTorch, timm's optimizers with warm-up + cosine, atomic per-epoch
checkpoints, JSON-lines metrics, then frozen-feature probes of the trained encoder.

Data (:mod:`sslcore.data.pipeline`): a ``DataLoader`` per rank (``--workers`` processes, pinned memory,
prefetch) reads only this rank's shard of each global batch; the epoch's order is a permutation drawn
from the run's generator, and the augmentation parameters of the whole global batch are drawn from the
same generator in the main process, each rank applying its own rows on the device.  A rank's views
are therefore those one process would make on the whole batch, whatever the workers, and the
checkpoint's generator state plus mid-epoch ``position`` (the permutation and the step) resume the
run bit for bit.

Ctrl-C (SIGINT, or SIGTERM as torchrun sends it) stops at the end of the current optimizer step:
the checkpoint then holds the state after that step and its place in the epoch (``position``, see
:mod:`.checkpoint`), ``--resume`` continues bit-for-bit from there, and :class:`TrainingInterrupted`
is raised.  A second Ctrl-C aborts at once, without a checkpoint.

Distributed (``torchrun --nproc_per_node N -m sslcore pretrain ...``): DDP over gloo (CPU) or
nccl (CUDA).  Every rank draws the same global data order and the same augmented global batch
(one generator, as in one process) and trains on its contiguous ``1/N`` shard; methods that take
``gather_distributed`` get it: each rank's loss is its own rows' mean against every rank's keys,
and DDP's gradient average is the single-process gradient, with no scaling (lightly's convention,
:mod:`sslcore.dist`); BatchNorm is synchronised.  The batch size is the global one; the logged
epoch loss is the mean over ranks.  Only rank 0 writes files, shows progress and runs the probes.

An optimizer step: ``--accumulate K`` sums the gradients of K batches (each loss divided by the
batches in its group); the learning rate is ``--lr`` scaled by ``batch x K / 256``; norms and biases
get no weight decay (``--weight-decay-all`` puts it back); ``--clip-grad`` clips the global norm;
``--precision fp16`` scales the loss with a ``GradScaler``.

Before any work: every setting is checked (:class:`PretrainConfig`), the run directory is locked
and refused if it holds another run (:mod:`.rundir`), and a checkpoint to resume is checked whole.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed
import yaml
from torch import nn
from tqdm import tqdm

from .. import dist
from ..data import FolderData, load_dataset, resolve_recipe
from ..data.pipeline import ShardBatchSampler, loader, to_float
from ..files import atomic_write
from ..methods import get_method, method_options
from .checkpoint import CheckpointError, check_optimizer_state, check_state_dict, load_checkpoint, save_checkpoint
from .config import RUN_KEYS, PretrainConfig, resolve_device, resolve_precision
from .evaluate import build_model, probe
from .online import online_head
from .rundir import RunDirectory
from .tracking import RunLog, environment

# --optimizer -> timm's name: timm's "sgd" is Nesterov; the SSL papers' SGD is plain momentum SGD.
TIMM_OPTIMIZERS = {"adamw": "adamw", "sgd": "momentum", "lars": "lars", "lamb": "lamb"}
TAKES_BETAS = ("adamw", "lamb")
MOMENTUM = 0.9  # SGD's and LARS's
MAX_AUTO_WORKERS = 8


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


class ProbesInterrupted(TrainingInterrupted):
    """Stopped by a signal after the last checkpoint, before or during the probes: ``--resume`` runs them."""

    def __init__(self, path: str, epoch: int):
        KeyboardInterrupt.__init__(self, f"stopped before the probes of epoch {epoch} finished; the checkpoint "
                                         f"{path} is complete")
        self.path, self.epoch, self.step = path, epoch, 0


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _install(handler) -> dict:
    """``handler`` for SIGINT and SIGTERM; the handlers it replaced (none outside the main thread, where signal
    handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in SIGNALS}


def _restore(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


@contextlib.contextmanager
def _stop_now(path: str, epoch: int):
    """While active (the probes: no step to finish), SIGINT or SIGTERM stops at once with :class:`ProbesInterrupted`."""
    def handle(signum, frame):
        raise ProbesInterrupted(path, epoch)

    previous = _install(handle)
    try:
        yield
    finally:
        _restore(previous)


class _StopRequest:
    """While active: the first SIGINT/SIGTERM sets ``requested``; a second SIGINT raises KeyboardInterrupt."""

    def __init__(self):
        self.requested, self._previous = False, {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if dist.is_main_process():
            tqdm.write("stopping after this step to save a checkpoint (Ctrl-C again aborts without one)")

    def __enter__(self):
        self._previous = _install(self._handle)
        return self

    def __exit__(self, *exc):
        _restore(self._previous)

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
    finished = ckpt["epoch"] == cfg.epochs and not ckpt.get("position")
    if ckpt["epoch"] > cfg.epochs or (finished and (Path(cfg.out) / "summary.json").exists()):
        raise CheckpointError(f"checkpoint {cfg.resume!r} has already trained {ckpt['epoch']} epochs, and --epochs "
                              f"{cfg.epochs} leaves nothing to train: pass --epochs above {ckpt['epoch']} to train on, "
                              f"or probe it with: sslcore eval --checkpoint {cfg.resume}")
    if not isinstance(ckpt["generator"], torch.Tensor):
        raise CheckpointError(f"checkpoint {cfg.resume!r} has a malformed generator state")
    return ckpt


def _resume_state(cfg: PretrainConfig, ckpt: dict, model, optimizer, scaler, generator, steps_per_epoch: int,
                  n_train: int) -> tuple[int, dict | None]:
    """Load ``ckpt`` into model/optimizer/scaler/generator after checking all of it against them; returns
    its epoch and its mid-epoch position (or None)."""
    check_state_dict("model", ckpt["model"], model.state_dict())
    check_optimizer_state("optimizer", ckpt["optimizer"], optimizer)
    position = _check_position(ckpt.get("position"), steps_per_epoch, n_train, cfg.resume)
    try:
        generator.set_state(ckpt["generator"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {cfg.resume!r} has an unusable optimizer/generator state: {e}") from None
    model.load_state_dict(ckpt["model"])
    set_global_rng_state(ckpt["rng"], cfg.resume)
    return ckpt["epoch"], position


def build_optimizer(cfg: PretrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``--optimizer`` through timm's factory at the peak learning rate, over two parameter groups: weight
    decay on the weights of dimension >= 2, none on norms, biases and the encoder's ``no_weight_decay()``
    (a timm ViT's position embedding and class token), unless ``--weight-decay-all``.  The method's
    ``optimizer_defaults`` (MAE: betas (0.9, 0.95)) apply where the optimizer takes them."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    trained = [p for p in model.parameters() if p.requires_grad]
    if cfg.weight_decay_all or not cfg.weight_decay:
        groups = [{"params": trained, "weight_decay": cfg.weight_decay}]
    else:
        skip = getattr(model.encoder, "no_weight_decay", set)()
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=[f"encoder.{n}" for n in skip])
    extra = {k: v for k, v in model.optimizer_defaults.items() if k != "betas" or cfg.optimizer in TAKES_BETAS}
    if cfg.optimizer in ("sgd", "lars"):
        extra["momentum"] = MOMENTUM
    return create_optimizer_v2(groups, opt=TIMM_OPTIMIZERS[cfg.optimizer], lr=cfg.peak_lr,
                               weight_decay=cfg.weight_decay, **extra)


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
    """Restore torch's CPU (and CUDA) generators from a checkpoint's state; ``CheckpointError`` if unusable."""
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
    if cfg.warmup_epochs and cfg.epochs <= cfg.warmup_epochs:
        warnings.warn(f"--epochs {cfg.epochs} <= --warmup-epochs {cfg.warmup_epochs}: the learning rate rises for the "
                      f"whole run (to {cfg.epochs / cfg.warmup_epochs:.2g} x its peak) and never decays; lower "
                      "--warmup-epochs for a short run", stacklevel=2)
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


def _workers(cfg: PretrainConfig, data, world: int) -> int:
    """``--workers``, or by default: none for data in memory or decoded on the GPU (``decoder=nvjpeg``), else up
    to 8 per rank on this host's cores."""
    if cfg.workers is not None:
        return cfg.workers
    if not isinstance(data, FolderData) or data.decoder == "nvjpeg":  # nvjpeg: on the GPU, in this process
        return 0
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 1) // world))


def _check_raw_pixels(data) -> None:
    """``--baselines`` probes raw pixels, held as features on the device: refuse sizes that cannot be held."""
    from ..data import MAX_RESIDENT_BYTES

    if data.kind != "image":
        return
    need = (len(data.y_train) + len(data.y_test)) * math.prod(data.image_shape) * 4
    if need > MAX_RESIDENT_BYTES:
        raise ValueError(f"--baselines probes raw pixels: {data.describe()}, {need / 2 ** 30:.1f} GiB of features "
                         f"(more than {MAX_RESIDENT_BYTES / 2 ** 30:.0f} GiB); leave out --baselines on data this "
                         "large")


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _run(cfg: PretrainConfig, device: torch.device, t_start: float, run: RunDirectory) -> dict:
    """The run itself, in the locked run directory ``run``."""
    world, rank, main = dist.world_size(), dist.rank(), dist.is_main_process()
    ckpt = _load_resume(cfg) if cfg.resume is not None else None
    data = load_dataset(cfg.data)
    n_train = min(cfg.limit or data.n_train, data.n_train)
    if cfg.batch_size > n_train:
        raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training set ({n_train} images)")
    if cfg.baselines:
        _check_raw_pixels(data)
    recipe_name = resolve_recipe(cfg.augment, get_method(cfg.method).recipe, data)
    recipe = data.build_recipe(recipe_name)
    workers = _workers(cfg, data, world)

    torch.manual_seed(cfg.seed)
    config = dataclasses.asdict(cfg)
    model, step_loss = build_training_model(config, data, device)
    init_state = {k: v.clone() for k, v in model.state_dict().items()} if cfg.baselines else None
    online = online_head(cfg.online_linear, model, data, device)
    labels = data.y_train.to(device) if online else None
    optimizer = build_optimizer(cfg, model)
    amp_dtype = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    generator = torch.Generator().manual_seed(cfg.seed)  # the data order and the augmentations
    start_epoch, position = 0, None
    steps_per_epoch = n_train // cfg.batch_size  # drop_last: every step sees a full batch
    if ckpt is not None:
        start_epoch, position = _resume_state(cfg, ckpt, model, optimizer, scaler, generator, steps_per_epoch,
                                              n_train)
        if online:
            online.load_state_dict(ckpt.get("online_linear"), cfg.resume)
    ddp = step_loss if isinstance(step_loss, nn.parallel.DistributedDataParallel) else None
    forward = torch.compile(step_loss) if cfg.compile else step_loss
    shard = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    updates_per_epoch = math.ceil(steps_per_epoch / cfg.accumulate)  # optimizer steps; the last group may be short
    total_updates, warmup = cfg.epochs * updates_per_epoch, cfg.warmup_epochs * updates_per_epoch
    first_step = position["step"] if position else 0
    update = start_epoch * updates_per_epoch + first_step // cfg.accumulate  # a position is a group boundary

    run.set_aside_previous()  # --overwrite: the old run steps aside only now, and returns if this one fails early
    run.begin()
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if main:
        atomic_write(out / "config.yaml", yaml.safe_dump(cfg.settings(), sort_keys=False).encode(), "config")
    log = RunLog(out, device, enabled=main, epoch=start_epoch, step=update, tensorboard=cfg.tensorboard,
                 wandb=cfg.wandb, settings=cfg.settings(),
                 say=tqdm.write, record=run.record)

    def save(epoch, **extra):
        if main:
            save_checkpoint(ckpt_path, method=cfg.method, config=config, epoch=epoch, model=model.state_dict(),
                            optimizer=optimizer.state_dict(), generator=generator.get_state(),
                            rng=global_rng_state(device), scaler=scaler.state_dict(),
                            **({"online_linear": online.state_dict()} if online else {}), **extra)
            run.committed()  # the previous run (--overwrite) is gone only now

    amp = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    # features in batches of the images a training step encodes on a rank: a size known to fit
    probing = dict(device=device, workers=workers, batch_size=cfg.batch_size // world * model.n_views)
    final_probing = dict(probing, sklearn=cfg.sklearn_probes)
    sampler = ShardBatchSampler(n_train, cfg.batch_size, world=world, rank=rank)
    batches_of = loader(data.items("train", cfg.limit), sampler, workers=workers, device=device)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch + first_step,
               desc=f"{cfg.method}/{data.name}", unit="step", dynamic_ncols=True, disable=not main)
    # the temperature the loss uses: the config's, or one the method resolved itself (MoCo v3: by encoder type)
    temperature = cfg.temperature if cfg.temperature is not None else getattr(model, "temperature", None)
    if main:
        tau = f"temperature {temperature:g}, " if temperature is not None else ""
        tqdm.write(f"{cfg.method}: {tau}augment {recipe_name}, {cfg.optimizer} at lr {cfg.peak_lr:g} (--lr "
                   f"{cfg.lr:g} x {cfg.effective_batch}/256), {PRECISION_NAMES[amp_dtype]}, {workers} data workers")
    final_loss = None
    model.train()
    with _StopRequest() as stop:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            if position:
                perm, losses, first = position["perm"], list(position["losses"].to(device)), position["step"]
                position = None
            else:
                perm, losses, first = torch.randperm(n_train, generator=generator), [], 0
            sampler.set_epoch(perm, first)
            batches = iter(batches_of)
            log.begin_epoch()
            for i in range(first, steps_per_epoch):
                group_start = i - i % cfg.accumulate
                group = min(cfg.accumulate, steps_per_epoch - group_start)  # batches summed into this update
                last = i == group_start + group - 1
                if i == group_start:
                    lr = lr_at(update, total_updates, warmup, cfg.peak_lr)
                    for param_group in optimizer.param_groups:
                        param_group["lr"] = lr
                    model.progress = update / total_updates
                index, x = next(batches)  # this rank's shard of global batch i
                index, x = index.to(device, non_blocking=True), to_float(x.to(device, non_blocking=True))
                views = recipe.views(x, generator, model.n_views, batch=cfg.batch_size, rows=shard)
                with contextlib.nullcontext() if last or ddp is None else ddp.no_sync():
                    try:
                        with amp:
                            loss = forward(views, index=index, epoch=epoch)
                    except ValueError as e:  # e.g. "z contains NaN or Inf" once the weights have blown up
                        if not _finite(model):
                            raise _diverged(cfg, epoch, f"the weights hold NaN or Inf at step {i + 1}") from e
                        raise
                    scaler.scale(loss / group).backward()
                if online:  # its own optimizer, on detached features: the backbone's step is untouched
                    online.step(model, views[0], labels[index], update / total_updates, amp=amp)
                losses.append(loss.detach().float())
                bar.update()
                if not last:
                    continue
                scaler.unscale_(optimizer)  # the norm of the true gradients (scaler.step does not unscale twice)
                if cfg.clip_grad is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                else:
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                update += 1
                log.step(update, epoch, torch.stack(losses[-group:]).mean(), lr, group * cfg.batch_size, grad_norm)
                if i == steps_per_epoch - 1 or bar.n % 5 < group:
                    rate = (i + 1 - first) * cfg.batch_size / (time.perf_counter() - t0)
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                if i < steps_per_epoch - 1 and stop.any_rank(device):
                    log.close()
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
            final_loss = row["loss"]
            if online:
                row.update(online.epoch_metrics(*((model, data) if main else ()), **probing))
            if main and cfg.eval_every and epoch % cfg.eval_every == 0:
                row.update(probe(data, model, **probing))
            log.epoch(row, update)  # before the checkpoint: a resume drops lines past its epoch
            save(epoch)
            if epoch < cfg.epochs and stop.any_rank(device):
                log.close()
                bar.close()
                raise TrainingInterrupted(str(ckpt_path), epoch + 1, 0)
        requested = stop.any_rank(device)  # a signal in the last step: the checkpoint is written, stop here
    bar.close()
    log.close()
    if requested:
        raise ProbesInterrupted(str(ckpt_path), cfg.epochs)
    train_time = time.perf_counter() - t_start
    if final_loss is None:  # a resumed run that had only its probes left
        final_loss = log.last_loss(cfg.epochs)

    summary = None
    if main:
        with _stop_now(str(ckpt_path), cfg.epochs):
            probes = {"trained": probe(data, model, **final_probing)}
            if cfg.baselines:
                random_model = build_model(config, data).to(device)
                random_model.load_state_dict(init_state)
                probes["random_init"] = probe(data, random_model, **final_probing)
                probes["raw_pixels"] = probe(data, None, **final_probing)
            model.eval()
            method_eval = model.evaluate(data)
        summary = {"method": cfg.method, "data": cfg.data, "encoder": cfg.encoder,
                   "encoder_class": type(model.encoder).__name__, "raw_features": data.raw_name, "epochs": cfg.epochs,
                   "temperature": temperature, "augment": recipe_name, "optimizer": cfg.optimizer,
                   "base_lr": cfg.lr, "peak_lr": cfg.peak_lr, "effective_batch": cfg.effective_batch,
                   "precision": PRECISION_NAMES[amp_dtype], "workers": workers, "final_loss": final_loss,
                   "n_train": len(data.y_train), "n_test": len(data.y_test), "device": str(device), "world_size": world,
                   "train_time_s": round(train_time, 2), "total_time_s": round(time.perf_counter() - t_start, 2),
                   "probes": probes, "eval": method_eval, "environment": environment(device), "config": config}
        atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode(), "summary")
    if world > 1:
        shared = [summary]
        torch.distributed.broadcast_object_list(shared, src=0)
        summary = shared[0]
    return summary
