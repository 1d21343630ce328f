"""Measuring one benchmark case: the machine, the timers, peak memory, and the row a case yields."""
from __future__ import annotations

import contextlib
import functools
import gc
import os
import platform
import re
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import torch

MACHINE = "cuda" if torch.cuda.is_available() else "cpu"  # a machine runs the rows of its own kind
REHEARSE_ENV = "SSLCORE_BENCH_REHEARSE"  # "1": the GPU run's rows at tiny shapes on CPU tensors (bench/gpu.py)

# Dense bf16 tensor-core peak in TFLOP/s by a substring of the device name (first match wins).
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))

BUDGET_S = 2.0  # seconds of timed runs per row, for the CPU timer and under pytest (at least 5 runs)
REHEARSAL_BUDGET_S = 0.02  # the CPU timer's in a rehearsal (at least 1 run): the flow is tested, not the time
SLOW_CALL_S = 0.2  # a GPU step slower than this is timed by a few CUDA-event runs, not do_bench's 8 or more
SLOW_RUNS = 5  # at most this many timed calls of a slow step
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Skip(Exception):
    """Raised when a row cannot run; the message is the row's status."""


class Overrun(BaseException):
    """Raised (by SIGALRM) when a row passes its bound; the message says which."""


@dataclass(frozen=True)
class Bound:
    """A row's time bound in the GPU run: ``warmup_s`` for the setup and first call (compile, autotune),
    ``total_s`` for the whole row; the timed runs are as many as fit in what is left."""

    warmup_s: float
    total_s: float


def rehearsing() -> bool:
    """``python -m bench gpu --rehearse`` (``$SSLCORE_BENCH_REHEARSE=1``): the GPU run's rows at tiny shapes on
    CPU tensors, the Triton interpreter standing in for the GPU, so that the whole run is tested without one."""
    return os.environ.get(REHEARSE_ENV) == "1"


def goal_device() -> str:
    """Where the GPU run's rows put their tensors: CUDA, or the CPU in a rehearsal."""
    return "cpu" if rehearsing() else "cuda"


def compile_backend() -> str:
    """``torch.compile``'s backend for the torch-compile rows: Inductor; in a rehearsal ``aot_eager`` (the same
    Dynamo trace and AOT autograd, without Inductor's C++ builds on the CPU)."""
    return "aot_eager" if rehearsing() else "inductor"


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
    goal: bool = False  # a headline row of the GPU run: sslcore or its strongest peer at the goal shape

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


def median_ms(fn, budget_s: float = BUDGET_S, lo: int = 5, hi: int = 100) -> float:
    """Median wall time of ``fn`` over runs until ``budget_s`` is spent: at least ``lo``, at most ``hi`` (CPU timer)."""
    times = []
    while len(times) < lo or (len(times) < hi and sum(times) < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def events_median_ms(fn, first_ms: float, runs: int) -> float:
    """Median of ``first_ms`` (an earlier synchronised call) and ``runs`` more calls timed by CUDA events: the
    timer of steps too slow for do_bench's eight or more calls (no L2 flush: they take over SLOW_CALL_S)."""
    times = [first_ms]
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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


@contextlib.contextmanager
def deadline(seconds: float | None, message: str):
    """Raise :class:`Overrun` (``message``) in the block once ``seconds`` have passed (SIGALRM; None, or off the
    main thread: no deadline).  The signal lands between Python bytecodes: a compile, an autotune, a Lloyd
    loop are stopped, one long C call is not (the GPU run's step cap is the backstop)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise Overrun(message)
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _time(step, case: Case, timer, left: float | None) -> tuple[float, float | None, str]:
    """(median ms, peak extra MiB, how it was timed) of a warmed-up step, within ``left`` seconds."""
    if case.device != "cuda":
        if timer:
            return timer(step), None, "pytest-benchmark"
        budget, lo = (REHEARSAL_BUDGET_S, 1) if rehearsing() else (BUDGET_S, 5)
        return median_ms(step, budget, lo), None, "wall-clock median"
    t = time.perf_counter()
    peak = peak_extra_mib(step, case.device)  # one synchronised call: also the step's time, roughly
    once = time.perf_counter() - t
    if timer:
        return timer(step), peak, "pytest-benchmark"
    if once < SLOW_CALL_S and (left is None or 8 * once + 0.5 < 0.8 * left):
        return do_bench_ms(step), peak, "triton do_bench median"
    runs = SLOW_RUNS - 1 if left is None else int(min(SLOW_RUNS - 1, max(0.0, 0.8 * left / once - 1)))
    return events_median_ms(step, once * 1e3, runs), peak, f"median of {runs + 1} calls (CUDA events)"


def _measure(case: Case, timer, bound: Bound | None) -> tuple[float, float | None, float, str]:
    """(median ms, peak extra MiB, compile s, timer) of ``case``; raises Skip or Overrun as its status."""
    reason = off_machine(case)
    if reason:
        raise Skip(reason)
    if case.device == "cuda" and case.min_bytes > (free := torch.cuda.mem_get_info()[0]):
        raise Skip(f"skipped: needs over {case.min_bytes / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
    sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)
    start = time.perf_counter()
    warm = f"stopped: warm-up over its bound of {bound.warmup_s:g} s" if bound else ""
    with deadline(bound and bound.warmup_s, warm):
        step = case.setup()
        step()  # warm-up: compilation, autotuning, allocator caches
        sync()
    first = time.perf_counter() - start
    left = bound.total_s - first if bound else None
    with deadline(left, f"stopped: over its bound of {bound.total_s:g} s (warm-up {first:.1f} s)" if bound else ""):
        ms, peak, how = _time(step, case, timer, left)
    return ms, peak, None if ms is None else max(0.0, first - ms * 1e-3), how


def row(case: Case, status: str, ms: float | None = None, peak: float | None = None, compile_s: float | None = None,
        timer: str | None = None) -> dict:
    """The JSON row of ``case``: where it ran (:func:`environment`), what it measured, its status."""
    env = environment()
    tflops = case.flops / (ms * 1e-3) / 1e12 if ms else None
    peak_tflops = bf16_peak_tflops(env["device"])
    return {
        "time": datetime.now().isoformat(timespec="seconds"), **env,
        "op": case.op, "impl": case.impl, "dtype": DTYPE_NAMES[case.dtype], "shape": dict(case.shape),
        "flops": case.flops, "median_ms": ms, "peak_extra_mib": peak, "tflops": tflops, "passes": case.passes,
        "frac_bf16_peak": tflops / peak_tflops if tflops and peak_tflops else None,
        "compile_s": compile_s, "timer": timer, "status": status, "note": case.note,
    }


def run_case(case: Case, timer=None, bound: Bound | None = None) -> dict:
    """Measure ``case`` and return its row; a failure or an overrun of ``bound`` becomes the row's status.

    ``compile_s`` is the warm-up's wall time (``setup()``, which builds the inputs, plus the first call)
    minus the timed median: compile, autotune and allocator warm-up, kept out of the median."""
    ms = peak = compile_s = how = None
    try:
        ms, peak, compile_s, how = _measure(case, timer, bound)
        status = "ok"
    except (Skip, Overrun) as e:
        status = str(e)
    except Exception as e:  # one broken row must not end a run on a lent GPU
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        status = "oom" if oom else " ".join(f"error: {type(e).__name__}: {e}".split())[:300]
    gc.collect()
    if case.device == MACHINE == "cuda":
        with contextlib.suppress(Exception):  # after an overrun: let the queued work drain before the next row
            torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return row(case, status, ms, peak, compile_s, how)


def pytest_case(benchmark, case: Case) -> None:
    """Body of a family's pytest-benchmark test: the row goes to extra_info (and --benchmark-json)."""
    import pytest

    row = run_case(case, pytest_timer(benchmark, case.device))
    benchmark.extra_info.update(row)
    if row["status"].startswith("error"):
        pytest.fail(row["status"])
    if row["status"] != "ok":
        pytest.skip(row["status"])
