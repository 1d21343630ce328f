"""What a run records beside its checkpoint: per-epoch and per-step JSON lines, TensorBoard event files,
and the environment it ran in.

* ``metrics.jsonl``: one line per epoch (mean loss, lr, time; the probes of ``--eval-every``).
* ``steps.jsonl``: one line per optimizer step: ``step``, ``epoch``, ``loss``, ``lr``, ``img_s`` (the step's
  images over its own time: from the previous step's end, or the epoch's start, to its end; on CUDA timed by
  events on the stream, so the GPU's time), ``mem_mib`` (CUDA: the peak allocated during the step; CPU: the
  process's peak resident set so far) and ``grad_norm`` (the global norm of the unscaled gradients, before
  any clipping).  The losses, norms and events wait on the device and are read every :data:`FLUSH_EVERY`
  steps in one transfer, so logging does not synchronise every step.
* ``tensorboard/``: the same scalars as event files, when the ``tensorboard`` package is installed
  (``pip install tensorboard``); without it the run says so once and goes on.
* Weights & Biases (``--wandb PROJECT``; ``pip install wandb``): the same scalars and the run's settings, in a
  wandb run named after the run folder.  wandb writes its files where it always does (``./wandb`` or
  ``WANDB_DIR``; ``WANDB_MODE=offline`` to sync later), not in the run folder: they are wandb's, and sslcore
  never touches them.
A resumed run first drops the lines (and event steps) past its checkpoint.  Only rank 0 writes.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..files import append_text, atomic_write

FLUSH_EVERY = 10
TENSORBOARD_DIR = "tensorboard"


def _keep(path: Path, key: str, last: int) -> list[dict]:
    """Keep (and return) the lines of ``path`` whose ``key`` is at most ``last`` (a resume continues from
    ``last``).  A last line cut short (a kill or a full disk during its append) is dropped; any other damage is
    a ``ValueError`` naming the file and the line."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get(key), int):
                raise ValueError(f"not a JSON object with an integer {key!r}")
        except ValueError as e:
            if n == len(lines) and not text.endswith("\n"):  # an append cut short: the epoch's checkpoint decides
                break
            raise ValueError(f"{path} line {n} is damaged ({e}): repair or remove that line to resume") from None
        rows.append(row)
    rows = [r for r in rows if r[key] <= last]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode(), "record")
    return rows


class RunLog:
    """The run's JSON lines and event files (see the module docstring); a no-op unless ``enabled``."""

    def __init__(self, out: Path, device: torch.device, *, enabled: bool, epoch: int = 0, step: int = 0,
                 tensorboard: bool = True, wandb: str | None = None, settings: dict | None = None, say=print,
                 record=lambda *names: None):
        self.out, self.device, self.enabled = Path(out), device, enabled
        self.pending: list[tuple] = []
        self.writer, self.epochs, self.wandb = None, [], None
        self.begin_epoch()
        if not enabled:
            return
        if wandb is not None:
            self.wandb = _wandb_run(wandb, self.out, settings or {})
        self.epochs = _keep(self.out / "metrics.jsonl", "epoch", epoch)
        _keep(self.out / "steps.jsonl", "step", step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                say("tensorboard is not installed: no event files (pip install tensorboard, or sslcore[tensorboard]); "
                    "metrics.jsonl and steps.jsonl are written as always")
            else:
                events = self.out / TENSORBOARD_DIR
                before = set(os.listdir(events)) if events.is_dir() else set()
                self.writer = SummaryWriter(str(events), purge_step=step + 1 if step else None)
                record(*(f"{TENSORBOARD_DIR}/{n}" for n in sorted(set(os.listdir(events)) - before)))

    def _mark(self):
        """A point in time on the device's clock: a recorded CUDA event, or the host's clock on a CPU."""
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin_epoch(self) -> None:
        """Start timing afresh (an epoch's first step is not charged with the probes and checkpoint before it)."""
        self.t_last = self._mark() if self.enabled else None

    def step(self, step: int, epoch: int, loss: torch.Tensor, lr: float, images: int,
             grad_norm: torch.Tensor | None = None) -> None:
        """Record optimizer step ``step`` (``images``: samples it saw, all ranks); written every few steps."""
        if not self.enabled:
            return
        end = self._mark()
        if self.device.type == "cuda":
            mem = torch.cuda.max_memory_allocated(self.device) / 2 ** 20  # the allocator's counters: no sync
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        self.pending.append((step, epoch, loss.detach().float(), lr, images, grad_norm, self.t_last, end, mem))
        self.t_last = end
        if len(self.pending) >= FLUSH_EVERY:
            self.flush()

    @staticmethod
    def _seconds(start, end) -> float:
        if isinstance(end, float):
            return end - start
        return start.elapsed_time(end) / 1000.0

    def flush(self) -> None:
        if not self.enabled or not self.pending:
            return
        if self.device.type == "cuda":
            self.pending[-1][7].synchronize()  # the last event done: every event before it too
        given = [p[5] is not None for p in self.pending]
        norms = [p[5].float() if p[5] is not None else p[2] for p in self.pending]
        losses, norms = torch.stack([torch.stack([p[2] for p in self.pending]),
                                     torch.stack(norms)]).tolist()  # one read of the device per flush
        norms = [n if g else None for n, g in zip(norms, given)]
        lines = []
        for (step, epoch, _, lr, images, _, start, end, mem), loss, norm in zip(self.pending, losses, norms):
            rate = images / max(self._seconds(start, end), 1e-9)
            row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "img_s": round(rate, 1),
                   "mem_mib": round(mem, 1)}
            if norm is not None:
                row["grad_norm"] = norm if math.isfinite(norm) else str(norm)  # fp16's skipped steps: "inf"
            lines.append(json.dumps(row) + "\n")
            scalars = {f"step/{k}": row[k] for k in ("loss", "lr", "img_s", "mem_mib", "grad_norm")
                       if isinstance(row.get(k), (int, float))}
            if self.writer is not None:
                for key, value in scalars.items():
                    self.writer.add_scalar(key, value, step)
            if self.wandb is not None:
                self.wandb.log(scalars, step=step)
        append_text(self.out / "steps.jsonl", "".join(lines))
        self.pending = []

    def last_loss(self, epoch: int) -> float | None:
        """The loss ``metrics.jsonl`` recorded for ``epoch`` before this run started (None if it has none)."""
        return next((r.get("loss") for r in self.epochs if r["epoch"] == epoch), None)

    def epoch(self, row: dict, step: int) -> None:
        """Append the epoch's line to ``metrics.jsonl`` (and its scalars at optimizer step ``step``)."""
        if not self.enabled:
            return
        self.flush()
        append_text(self.out / "metrics.jsonl", json.dumps(row) + "\n")
        scalars = {f"epoch/{k}": v for k, v in row.items() if isinstance(v, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                if key != "epoch/epoch":
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_run(project: str, out: Path, settings: dict):
    """A wandb run in ``project`` named after the run folder, with the run's settings as its config."""
    import wandb  # PretrainConfig checked that it is installed

    return wandb.init(project=project, name=out.resolve().name, config=settings)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        run = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def environment(device: torch.device) -> dict:
    """Versions (python, torch, triton, timm, sslcore), the git commit of the sslcore source tree when it is
    a checkout (``-dirty`` with uncommitted changes to tracked files), and the device by name."""
    from .. import __version__

    commit = _git("rev-parse", "HEAD")
    if commit is not None and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or device.type
    return {"python": sys.version.split()[0], "torch": torch.__version__, "triton": _version("triton"),
            "timm": _version("timm"), "sslcore": __version__, "git_commit": commit, "device_name": name}


__all__ = ["FLUSH_EVERY", "RunLog", "TENSORBOARD_DIR", "environment"]
