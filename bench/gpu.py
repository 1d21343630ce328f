"""``python -m bench gpu (--out DIR | --resume DIR) [--budget MIN] [--dry-run] [--rehearse]``: the prepared run
for a lent GPU.

A GPU is at hand only now and then, for minutes.  This one command, on a CUDA machine where torch and
triton are installed (``pip install --no-deps --no-build-isolation -e .`` first; it installs nothing
itself), runs these steps in order, each a process of its own under a cap, the caps adding up to at most
``--budget`` minutes (default 8; ``CAPS``):

1. goal rows: each family's sslcore row at the goal shape and its strongest peer's (inf-cl, flash-kmeans,
   SDPA): InfoNCE M = 65,536, D = 256; k-means N = 10^7, K = 8192, D = 128, an assignment and a
   20-iteration fit; ContraNorm B = 32, L = 4096, D = 768 and the graph N = 131,072, D = 256;
2. GPU smoke tests: ``SMOKE_TESTS``, one case per op family and dtype (ops under sync debug mode);
3. TTGIR evidence: one kernel per family compiled for this device as launched (pipelining, wgmma);
4. other rows: the eager, chunked and faiss anchors, sslcore's fp16 k-means, the smaller shapes;
5. torch.compile rows (an Inductor compile each);
6. every other ``-m gpu`` test, with the time that is left.

A step that ends early leaves its time to the next; a step past its cap is killed with its whole process
group.  Every row is bounded (``bound``: its warm-up, and the whole row) and records its compile time
apart from the kernel time (``compile_s``).  Into DIR go ``results.jsonl`` (the rows, appended as each
finishes), ``results.md`` (the steps and the tables), ``log.txt`` (everything printed) and ``steps.jsonl``
(how each step ended).  ``--resume DIR`` continues a run cut short: rows already in results.jsonl and
steps already done are skipped.  ``--dry-run`` prints the plan with each step's cap and an estimate of its
time (``ASSUMED_*``: a model, not a measurement).  ``--rehearse`` runs the same steps without a GPU, at
tiny shapes on CPU tensors with the Triton interpreter (tests/test_bench.py).  Copy ``results.jsonl`` to
``bench/results/<time>-<device>.jsonl``, commit it, and ``python -m bench readme`` renders it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS, TABLE, LOG, STEPS, CURRENT = "results.jsonl", "results.md", "log.txt", "steps.jsonl", "current-row.json"
BUDGET_MIN = 8.0
MIN_STEP_S = 20.0  # a step given less is not started (a process start and its imports take about 10 s)
READER_GRACE_S = 5.0  # after a step's group is gone, how long its output reader may take to reach the end
FAMILIES = ("infonce", "kmeans", "contranorm")
# the slow fits last of the goal rows; k-means++ (no goal) after them
OP_ORDER = ("infonce", "kmeans-assign", "contranorm", "contranorm-graph", "kmeans-fit", "kmeans-init")
GROUPS = ("goal", "other", "compile")
# Each step's cap at the default budget, in run order, in seconds (None: all that is left).  They add up to
# the default budget; a smaller budget cuts the later steps, a larger one goes to the last.
CAPS = {"goal rows": 180, "gpu smoke tests": 60, "ttgir evidence": 30, "other rows": 110, "torch.compile rows": 100,
        "all gpu tests": None}
# One case per op family and dtype; tests/test_bench.py checks that each id collects and is marked gpu.
SMOKE_TESTS = (
    "tests/test_infonce.py::test_gpu_real_sizes[256-dtype0]",  # fp32 (DTYPES = fp32, fp16, bf16)
    "tests/test_infonce.py::test_gpu_real_sizes[256-dtype1]",  # fp16
    "tests/test_infonce.py::test_gpu_real_sizes[256-dtype2]",  # bf16
    "tests/test_kmeans.py::test_gpu_assignment_and_update_without_sync[dtype0]",  # bf16
    "tests/test_kmeans.py::test_gpu_assignment_and_update_without_sync[dtype1]",  # fp16
    "tests/test_kmeans.py::test_gpu_assignment_and_update_without_sync[dtype2]",  # fp32
    "tests/test_contranorm.py::test_gpu_vit_sizes[768]",  # bf16 sequences
    "tests/test_contranorm.py::test_gpu_graph_matches_reference",  # bf16 graph
    "tests/test_cluster.py::test_gpu_fit_within_one_percent_of_scikit_learn[dtype0]",  # KMeans.fit, bf16
    "tests/test_dino.py::test_dino_step_on_cuda_in_bf16_without_host_synchronisation",  # a method's step, bf16
)
# One kernel per family for the TTGIR evidence: (module, kernel name prefix in its aot_specs, dtype, D).
EVIDENCE = [("sslcore.kernels.infonce", "infonce_lse_fwd", "bf16", 256),
            ("sslcore.kernels.kmeans", "kmeans_assign", "bf16", 128),
            ("sslcore.kernels.contranorm", "contranorm_grads", "bf16", 0)]

# --dry-run's estimates: a model with ASSUMED constants, not measurements (no GPU has run this yet).  A row:
# ROW_OVERHEAD_S + its compile + two calls (warm-up, peak memory) + the timed calls (do_bench: about 8 calls
# and 0.13 s; a slow step: SLOW_RUNS calls), a call being the row's FLOPs at ASSUMED_TFLOPS; at most its bound.
ASSUMED_TFLOPS = {"sslcore-triton": 300, "inf-cl": 200, "flash-kmeans": 300, "torch-sdpa": 300,
                  "torch-chunked": 400, "torch-compile": 150, "torch-eager": 60, "faiss-gpu": 20}
ASSUMED_COMPILE_S = {"sslcore-triton": 8, "inf-cl": 8, "flash-kmeans": 8, "torch-compile": 45}  # others: 1
ASSUMED_OP_TFLOPS = {"kmeans-init": 20}  # memory-bound: a pass over x (2.56 GB at N = 10^7) per centre
ROW_OVERHEAD_S = 1.0  # inputs, gc, the allocator
ASSUMED_FREE_BYTES = 75 * 2**30  # an H100's free memory: a row that needs more is skipped up front
PROCESS_START_S = 10.0  # python, torch, sslcore, the CUDA context
TEST_S = 5.0  # one GPU test: its kernels' cold compiles and its run
GPU_TESTS = 24  # tests `pytest -m gpu` collects today (the last step's estimate only)
TTGIR_S = 15.0  # three compiles for the device


def bound(case):
    """A row's bound (warm-up, whole row), by kind: an Inductor compile; a 20-iteration fit; any other row."""
    from bench.harness import Bound
    if case.impl == "torch-compile":
        return Bound(75, 90)
    if case.op == "kmeans-fit":
        return Bound(45, 75)
    return Bound(30, 45)


def estimate_s(case) -> float:
    from bench.harness import SLOW_CALL_S, SLOW_RUNS
    if case.min_bytes > ASSUMED_FREE_BYTES:
        return ROW_OVERHEAD_S
    call = case.flops / (ASSUMED_OP_TFLOPS.get(case.op) or ASSUMED_TFLOPS.get(case.impl, 100)) / 1e12
    timed = 8 * call + 0.13 if call < SLOW_CALL_S else SLOW_RUNS * call
    return min(bound(case).total_s, ROW_OVERHEAD_S + ASSUMED_COMPILE_S.get(case.impl, 1) + 2 * call + timed)


def describe(case) -> str:
    from bench.harness import DTYPE_NAMES
    return f"{case.op} {case.impl} {DTYPE_NAMES[case.dtype]} " + " ".join(f"{k}={v}" for k, v in case.shape.items())


def key(op: str, impl: str, dtype: str, shape: dict) -> tuple:
    """What makes a row the same row on --resume."""
    return op, impl, dtype, json.dumps(shape, sort_keys=True)


def case_key(case) -> tuple:
    from bench.harness import DTYPE_NAMES
    return key(case.op, case.impl, DTYPE_NAMES[case.dtype], case.shape)


def read_jsonl(path: Path) -> list[dict]:
    """The JSON lines of ``path`` ([] where it does not exist yet)."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def done_rows(out: Path) -> dict[tuple, str]:
    """The rows already in ``out/results.jsonl``: key -> status."""
    return {key(r["op"], r["impl"], r["dtype"], r["shape"]): r["status"] for r in read_jsonl(out / RESULTS)}


def run_rows() -> dict[str, list]:
    """The GPU run's rows by group: goal (sslcore and its strongest peer at the goal shapes), other, compile
    (the torch.compile anchors).  Within a group the goal shapes come first, then each op's next shape (its
    order in the family's list), the ops in OP_ORDER, and within an op and shape the family's order."""
    cases = [c for family in FAMILIES for c in importlib.import_module(f"bench.{family}").cases(goal=True)]
    shapes = {}  # op -> its shapes in the family's order
    for c in cases:
        shapes.setdefault(c.op, {}).setdefault(tuple(c.shape.items()), len(shapes[c.op]))

    def group(c):
        return "compile" if c.impl == "torch-compile" else "goal" if c.goal else "other"

    def rank(c):
        return shapes[c.op][tuple(c.shape.items())], OP_ORDER.index(c.op)
    return {g: sorted((c for c in cases if group(c) == g), key=rank) for g in GROUPS}


def gpu_test_files() -> list[str]:
    """The test files that mark tests gpu (only they are collected: importing the others takes seconds)."""
    return [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py")) if "mark.gpu" in p.read_text()]


@dataclass
class Step:
    """One step of the run: a process (``command``, run in the repository with ``env`` changed: None unsets)."""

    name: str
    command: list[str]
    estimate_s: float
    what: str
    env: dict[str, str | None] = field(default_factory=dict)
    rows: list = field(default_factory=list)
    cap_s: float = 0.0  # its share of the budget (allot); 0: it runs only with time left over
    done: bool = False  # done in an earlier run (--resume)


def plan(out: Path, budget_s: float, done_steps: set[str] = frozenset()) -> list[Step]:
    """The steps, their caps allotted in run order from ``budget_s`` (they add up to at most that)."""
    py = sys.executable
    groups, done = run_rows(), done_rows(out)
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-m", "gpu"]

    def rows_step(name, group):
        rows = groups[group]
        todo = [c for c in rows if case_key(c) not in done]
        return Step(name, [py, "-m", "bench", "gpu", "--rows", group, "--out", str(out)],
                    PROCESS_START_S + sum(map(estimate_s, todo)), f"{len(rows)} rows ({len(rows) - len(todo)} done)",
                    rows=rows)
    steps = [
        rows_step("goal rows", "goal"),
        Step("gpu smoke tests", [*pytest, *SMOKE_TESTS], PROCESS_START_S + TEST_S * len(SMOKE_TESTS),
             f"{len(SMOKE_TESTS)} tests: one per op family and dtype"),
        Step("ttgir evidence", [py, "-m", "bench", "gpu", "--ttgir"], PROCESS_START_S + TTGIR_S,
             "; ".join(name for _, name, _, _ in EVIDENCE), env={"TRITON_INTERPRET": None}),
        rows_step("other rows", "other"),
        rows_step("torch.compile rows", "compile"),
        Step("all gpu tests", [*pytest, *gpu_test_files(), *(f"--deselect={t}" for t in SMOKE_TESTS)],
             PROCESS_START_S + TEST_S * (GPU_TESTS - len(SMOKE_TESTS)), "every other -m gpu test"),
    ]
    left = budget_s
    for step in steps:
        step.done = step.name in done_steps
        if step.done:
            continue
        cap = left if CAPS[step.name] is None else min(CAPS[step.name], left)
        step.cap_s = cap if cap >= MIN_STEP_S else 0.0
        left -= step.cap_s
    return steps


def print_plan(steps: list[Step], budget_s: float, out: Path, log=print) -> None:
    from bench.harness import rehearsing
    caps = sum(s.cap_s for s in steps)
    log(f"python -m bench gpu{' --rehearse' if rehearsing() else ''}: the plan within {budget_s / 60:g} min "
        f"({budget_s:.0f} s), into {out}/ ({RESULTS}, {TABLE}, {LOG}, {STEPS})")
    log(f"The caps add up to {caps:.0f} s; a step that ends early leaves its time to the next, and one left "
        f"under {MIN_STEP_S:.0f} s is not started.  Estimates: a model with assumed rates and compile times "
        "(bench/gpu.py ASSUMED_*), not measurements.\n")
    log("| # | step | cap s | estimate s | what |\n| ---: | --- | ---: | ---: | --- |")
    for i, s in enumerate(steps, 1):
        cap = "done" if s.done else f"{s.cap_s:.0f}" if s.cap_s else "time left over"
        log(f"| {i} | {s.name} | {cap} | {s.estimate_s:.0f} | {s.what} |")
    for s in steps:
        log(f"\n{s.name}: {' '.join(s.command)}")
        for c in s.rows:
            b = bound(c)
            log(f"  {describe(c)}: bound {b.warmup_s:g} s warm-up, {b.total_s:g} s in all; estimate "
                f"{estimate_s(c):.0f} s{' (goal)' if c.goal else ''}")


# ---------------------------------------------------------------------------------------------
# The steps' own work (each in its process): the rows of a group, the TTGIR evidence.


def measure_rows(group: str, out: Path) -> int:
    """Measure ``group``'s rows into ``out/results.jsonl``, skipping those already there.  The row under way
    is in ``out/current-row.json``, so that a step killed at its cap still leaves that row's status."""
    from bench import report
    from bench.harness import COMMIT_ENV, environment, row, run_case
    env = environment()
    print(f"{env['device']}: torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, commit "
          f"{env['commit'] or f'unknown (no .git here: set {COMMIT_ENV})'}; " +
          ", ".join(f"{p} {'importable' if importlib.util.find_spec(p) else 'not installed'}"
                    for p in ("inf_cl", "flash_kmeans")), flush=True)
    done = done_rows(out)
    cases = run_rows()[group]
    for i, case in enumerate(cases, 1):
        label = f"[{i}/{len(cases)}] {describe(case)}"
        if case_key(case) in done:
            print(f"{label}: already in {RESULTS} ({done[case_key(case)]})", flush=True)
            continue
        (out / CURRENT).write_text(json.dumps(row(case, "running")))
        start = time.perf_counter()
        r = run_case(case, bound=bound(case))
        report.append_jsonl(out / RESULTS, r)
        (out / CURRENT).unlink()
        print(f"{label}: {r['status']}; {report.fmt(r['median_ms'])} ms, compile {report.fmt(r['compile_s'])} s "
              f"({r['timer']}); the row took {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def ttgir_evidence(log=print, target=None) -> None:
    """Compile one kernel per family for ``target`` (this device's; sm_90a without one), as launched, and
    report its TTGIR: loads before the loop, async copies, TMA loads, wgmma."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime import driver

    sys.path.insert(0, str(ROOT / "tests"))
    import aot

    if target is None:
        target = driver.active.get_current_target() if torch.cuda.is_available() else GPUTarget("cuda", 90, 32)
    for module, prefix, dtype, d in EVIDENCE:
        specs = importlib.import_module(module).aot_specs(dtype, d, 90 if target.arch >= 90 else 80)
        spec = next((s for s in specs if s.name.startswith(prefix)), None)
        if spec is None:
            log(f"{prefix}: no such kernel in {module}.aot_specs ({', '.join(s.name for s in specs)})")
            continue
        signature, constexprs, attrs = aot.launch_signature(spec)
        kernel = triton.compile(ASTSource(spec.fn, signature, constexprs, attrs), target=target,
                                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        ttgir = kernel.asm["ttgir"]
        lines = ttgir.splitlines()
        first_loop = next((i for i, x in enumerate(lines) if "scf.for" in x), len(lines))
        loads_before = sum(bool(re.search(r"\btt\.load\b|async_copy_global_to_local", x)) for x in lines[:first_loop])
        log(f"{spec.name} ({dtype}{f', D={d}' if d else ''}): loads before the first loop {loads_before}; "
            f"async copies {ttgir.count('async_copy_global_to_local')}; TMA loads "
            f"{len(re.findall(r'descriptor_load|async_tma', ttgir))}; wgmma {ttgir.count('warp_group_dot ')}; "
            f"shared {kernel.metadata.shared} B; {spec.num_warps} warps, {spec.num_stages} stages")
        log("  " + "\n  ".join(x.strip() for x in lines if re.search(r"scf\.for|warp_group_dot |tt\.load|"
                                                                         r"async_copy_global", x))[:4000])


# ---------------------------------------------------------------------------------------------
# The runner: each step a process group under its cap.


class Log:
    """Prints and appends to DIR/log.txt (from the runner and its output readers alike)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.lock = threading.Lock()

    def __call__(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)
            if self.path:
                with self.path.open("a") as f:
                    f.write(text + "\n")


def _pump(stream, log: Log, last: list[str]) -> None:
    for line in stream:
        log(line.rstrip("\n"))
        if line.strip():
            last[:] = [line.strip()]


def _exited(pid: int, until: float) -> bool:
    """Wait until ``pid`` exits or ``until`` (perf_counter) passes; the process is left unreaped, so its
    group id cannot be taken by another process before the group is killed."""
    while time.perf_counter() < until:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return True
        time.sleep(0.05)
    return False


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def run_step(name: str, command: list[str], cap: float, log: Log, env: dict[str, str | None] | None = None
             ) -> tuple[str, bool, str]:
    """Run ``command`` in a new process group within ``cap`` seconds, its output streamed to ``log``.
    Returns (status, done: it ended by itself, its last line of output).  Past the cap the whole group is
    killed (compile workers and any other child with it); so is whatever the step leaves behind."""
    start = time.perf_counter()
    log(f"\n=== {name} (cap {cap:.0f} s) ===")
    environ = dict(os.environ, PYTHONUNBUFFERED="1")
    for k, v in (env or {}).items():
        if v is None:
            environ.pop(k, None)
        else:
            environ[k] = v
    proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", env=environ, start_new_session=True)
    last: list[str] = []
    reader = threading.Thread(target=_pump, args=(proc.stdout, log, last), daemon=True)
    reader.start()
    capped = True
    try:
        capped = not _exited(proc.pid, start + cap)
    finally:  # also on SIGTERM or Ctrl-C of the runner: no step outlives it
        _kill_group(proc.pid)
        proc.wait()
    reader.join(READER_GRACE_S)
    if reader.is_alive():  # a process that left the group still holds the pipe: do not wait for it
        log(f"(the output of {name} is still held open by a process outside its group: not read further)")
    rc = proc.returncode
    status = (f"stopped at its cap of {cap:.0f} s" if capped else "ok" if rc == 0
              else f"exit {rc}" if rc > 0 else f"killed by signal {-rc}")
    log(f"--- {name}: {status} after {time.perf_counter() - start:.0f} s")
    return status, not capped and rc >= 0, last[0] if last else ""


def _close_row(out: Path, cap: float, status: str) -> None:
    """A row left under way by a step that did not end by itself gets the step's end as its status."""
    from bench import report
    current = out / CURRENT
    if not current.exists():
        return
    r = json.loads(current.read_text())
    r["time"] = datetime.now().isoformat(timespec="seconds")
    r["status"] = (f"stopped: its step reached its cap of {cap:.0f} s during this row" if status.startswith("stopped")
                   else f"error: its step ended ({status}) during this row")
    report.append_jsonl(out / RESULTS, r)
    current.unlink()


def execute(steps: list[Step], out: Path, budget_s: float, log: Log) -> None:
    """Run the steps not done, each under its share: what is left of the budget less the later steps' caps."""
    def terminate(signum, frame):
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, terminate)
    start = time.perf_counter()
    try:
        for i, step in enumerate(steps):
            if step.done:
                log(f"\n=== {step.name}: done in an earlier run ===")
                continue
            cap = budget_s - (time.perf_counter() - start) - sum(s.cap_s for s in steps[i + 1:] if not s.done)
            if cap < MIN_STEP_S:
                status, done, last, seconds = "not run: the budget is spent", False, "", 0.0
                log(f"\n=== {step.name}: {status} ===")
            else:
                t = time.perf_counter()
                status, done, last = run_step(step.name, step.command, cap, log, step.env)
                seconds = time.perf_counter() - t
                _close_row(out, cap, status)
            with (out / STEPS).open("a") as f:
                f.write(json.dumps({"time": datetime.now().isoformat(timespec="seconds"), "step": step.name,
                                    "cap_s": round(cap), "seconds": round(seconds, 1), "status": status,
                                    "done": done, "last_line": last}) + "\n")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _steps_done(out: Path) -> set[str]:
    return {s["step"] for s in read_jsonl(out / STEPS) if s["done"]}


def write_table(steps: list[Step], out: Path) -> str:
    """results.md: how each step ended (every invocation), the rows' tables, the planned rows without a row."""
    from bench import report
    rows = read_jsonl(out / RESULTS)
    lines = ["## Steps", "", "| time | step | cap s | seconds | status | last line |",
             "| --- | --- | ---: | ---: | --- | --- |"]
    lines += [f"| {e['time']} | {e['step']} | {e['cap_s']} | {e['seconds']} | {e['status']} | "
              f"{e['last_line'][:100].replace('|', '/')} |" for e in read_jsonl(out / STEPS)]
    done = done_rows(out)
    missing = [describe(c) for s in steps for c in s.rows if case_key(c) not in done]
    lines += ["", "## Rows", "", f"{report.header(rows)}\n\n{report.markdown(rows)}" if rows else "No rows."]
    if missing:
        lines += ["", "## Planned rows without a result", ""] + [f"- {m}" for m in missing]
    text = "\n".join(lines) + "\n"
    (out / TABLE).write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="a new or empty folder for results.jsonl, results.md, log.txt")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR: its rows and its "
                                                                   "finished steps are skipped")
    parser.add_argument("--budget", type=float, default=BUDGET_MIN, help=f"minutes (default {BUDGET_MIN:g})")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--rehearse", action="store_true", help="the whole run without a GPU: tiny shapes on CPU "
                                                                "tensors, the Triton interpreter (for tests)")
    parser.add_argument("--rows", choices=GROUPS, help="(a step of the run) measure this group's rows into --out")
    parser.add_argument("--ttgir", action="store_true", help="(a step of the run) print the TTGIR evidence")
    args = parser.parse_args(argv)
    from bench.harness import REHEARSE_ENV, rehearsing
    if args.rehearse:
        os.environ[REHEARSE_ENV] = "1"
        os.environ.setdefault("TRITON_INTERPRET", "1")  # for the steps' processes (the TTGIR step unsets it)
    if args.ttgir:
        ttgir_evidence()
        return 0
    if (args.out is None) == (args.resume is None):
        parser.error("give --out DIR (a new run) or --resume DIR (continue one)")
    out = (args.out or args.resume).resolve()  # the steps run in the repository root
    if args.rows:
        return measure_rows(args.rows, out)
    if args.budget <= 0:
        parser.error(f"--budget must be > 0 minutes, got {args.budget}")
    if args.resume and not args.resume.is_dir():
        parser.error(f"--resume {args.resume}: no such folder")
    budget_s = 60 * args.budget
    steps = plan(out, budget_s, _steps_done(out) if args.resume else set())
    if args.dry_run:
        print_plan(steps, budget_s, out)
        return 0
    import torch
    if not (torch.cuda.is_available() or rehearsing()):
        parser.error("no CUDA device here: --dry-run shows the plan, --rehearse runs it without a GPU")
    if args.out:
        taken = [name for name in (RESULTS, TABLE, LOG, STEPS) if (out / name).exists()]
        if taken:
            parser.error(f"{out} holds {', '.join(taken)}: give an empty folder, or --resume {out} to continue")
        out.mkdir(parents=True, exist_ok=True)
    log = Log(out / LOG)
    log(f"=== {'resumed' if args.resume else 'started'} {datetime.now().isoformat(timespec='seconds')} ===")
    print_plan(steps, budget_s, out, log)
    start = time.perf_counter()
    execute(steps, out, budget_s, log)
    table = write_table(steps, out)
    log(f"\n=== summary, after {time.perf_counter() - start:.0f} s ===\n\n{table}")
    return 0
