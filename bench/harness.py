"""Measuring one benchmark case: the machine, the timers, peak memory, and the row a case yields."""
from __future__ import annotations

import functools
import gc
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import torch

MACHINE = "cuda" if torch.cuda.is_available() else "cpu"  # a machine runs the rows of its own kind

# Dense bf16 tensor-core peak in TFLOP/s by a substring of the device name (first match wins).
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))

BUDGET_S = 2.0  # seconds of timed runs per row, for the CPU timer and under pytest (at least 5 runs)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Skip(Exception):
    """Raised when a row cannot run; the message is the row's status."""


@dataclass
class Case:
    """One row of a benchmark: ``setup()`` builds the inputs on ``device`` and returns the step to time."""

    op: str
    impl: str
    dtype: torch.dtype
    shape: dict[str, int]
    flops: float
    setup: Callable[[], Callable[[], object]]
    device: str  # "cuda" or "cpu"
    min_bytes: float = 0.0  # lower bound on the step's extra memory: skipped up front above free memory
    note: str = ""
    passes: float | None = None  # matmul passes one step performs, where the family's setup counts them

    @property
    def id(self) -> str:
        sizes = (f"{k}{v}" for k, v in self.shape.items())
        return "-".join([self.device, self.impl, DTYPE_NAMES[self.dtype], *sizes])


def off_machine(case: Case) -> str | None:
    """Why this machine does not run ``case`` (None when it does)."""
    if case.device == MACHINE:
        return None
    if case.device == "cuda":
        return "skipped: no CUDA device"
    return "skipped: CPU rows run only where there is no CUDA device"


# ---------------------------------------------------------------------------------------------
# The machine and the software it runs.


def slug(name: str) -> str:
    name = re.sub(r"\((r|tm)\)|nvidia", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return found.group(1).strip() if found else (platform.processor() or "unknown")


def device_name() -> str:
    if MACHINE == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {_cpu_model()} ({torch.get_num_threads()} threads)"


def bf16_peak_tflops(device: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in device), None)


def package_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


COMMIT_ENV = "SSLCORE_COMMIT"  # the commit of a copy without .git (the GPU machine's): set where the copy is made


def commit() -> str | None:
    """The sslcore commit the rows measure: ``$SSLCORE_COMMIT`` where set, else ``git describe`` of this
    checkout (``-dirty`` with uncommitted changes); None where neither is known."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).parent)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


@functools.cache
def environment() -> dict:
    """What every row records about where it ran: the device, the torch, Triton and CUDA versions, the
    commit."""
    return {"device": device_name(), "torch": torch.__version__, "triton": package_version("triton"),
            "cuda": torch.version.cuda, "commit": commit()}


# ---------------------------------------------------------------------------------------------
# Timers: each takes the step (already warmed up) and returns its median time in ms.


def _runs(fn, budget_s: float, lo: int = 5, hi: int = 100) -> int:
    """How many runs of ``fn`` fit in ``budget_s``, judged by one (extra, untimed) run."""
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    return int(min(hi, max(lo, budget_s / max(dt, 1e-9))))


def median_ms(fn, budget_s: float = BUDGET_S) -> float:
    """Median wall time of ``fn`` over the runs that fit in about ``budget_s`` (CPU timer)."""
    times = []
    for _ in range(_runs(fn, budget_s)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def do_bench_ms(fn) -> float:
    """Median by ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs)."""
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


def pytest_timer(benchmark, device: str):
    """A timer that hands the runs to pytest-benchmark (the GPU step synchronises before returning)."""
    def timer(fn):
        call = fn if device == "cpu" else lambda: (fn(), torch.cuda.synchronize())
        benchmark.pedantic(call, rounds=_runs(call, BUDGET_S))
        return benchmark.stats.stats.median * 1e3 if benchmark.stats else None  # None: --benchmark-disable
    return timer


def peak_extra_mib(fn, device: str) -> float | None:
    """CUDA memory peak of one call of ``fn`` above what was allocated before it (None on CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---------------------------------------------------------------------------------------------
# A case -> its row.


def _measure(case: Case, timer) -> tuple[float | None, float | None]:
    reason = off_machine(case)
    if reason:
        raise Skip(reason)
    if case.device == "cuda" and case.min_bytes > (free := torch.cuda.mem_get_info()[0]):
        raise Skip(f"skipped: needs over {case.min_bytes / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
    step = case.setup()
    step()  # warm-up: compilation, autotuning, allocator caches
    peak = peak_extra_mib(step, case.device)
    return timer(step), peak


def run_case(case: Case, timer=None) -> dict:
    """Measure ``case`` (warm-up excluded) and return its row; a failure becomes the row's status."""
    timer = timer or (do_bench_ms if case.device == "cuda" else median_ms)
    ms = peak = None
    try:
        ms, peak = _measure(case, timer)
        status = "ok"
    except Skip as e:
        status = str(e)
    except Exception as e:  # one broken row must not end a run on a lent GPU
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        status = "oom" if oom else " ".join(f"error: {type(e).__name__}: {e}".split())[:300]
    gc.collect()
    if case.device == MACHINE == "cuda":
        torch.cuda.empty_cache()
    env = environment()
    tflops = case.flops / (ms * 1e-3) / 1e12 if ms else None
    peak_tflops = bf16_peak_tflops(env["device"])
    return {
        "time": datetime.now().isoformat(timespec="seconds"), **env,
        "op": case.op, "impl": case.impl, "dtype": DTYPE_NAMES[case.dtype], "shape": dict(case.shape),
        "flops": case.flops, "median_ms": ms, "peak_extra_mib": peak, "tflops": tflops, "passes": case.passes,
        "frac_bf16_peak": tflops / peak_tflops if tflops and peak_tflops else None,
        "status": status, "note": case.note,
    }


def pytest_case(benchmark, case: Case) -> None:
    """Body of a family's pytest-benchmark test: the row goes to extra_info (and --benchmark-json)."""
    import pytest

    row = run_case(case, pytest_timer(benchmark, case.device))
    benchmark.extra_info.update(row)
    if row["status"].startswith("error"):
        pytest.fail(row["status"])
    if row["status"] != "ok":
        pytest.skip(row["status"])
