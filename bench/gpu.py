"""``python -m bench gpu --out DIR [--budget MIN] [--dry-run]``: the prepared run for a lent GPU.

A GPU is at hand only now and then, for minutes.  This one command, on a CUDA machine where torch
and triton are installed (``pip install --no-deps --no-build-isolation -e .`` first; it installs
nothing itself), runs in order, each step capped and all within ``--budget`` minutes (default 8):

1. the environment: device, torch, triton, CUDA, the peers found (inf-cl, flash-kmeans);
2. every ``-m gpu`` test (their ops run under ``torch.cuda.set_sync_debug_mode("error")``);
3. the pipelining evidence of one kernel per family, from the TTGIR the device's Triton builds for
   the binary a launch would build: is the row tile loaded before the loop, how many async copies,
   how many wgmma;
4. the benchmark at the goal shapes, InfoNCE, k-means and ContraNorm (the slowest last), each kernel
   beside its anchors (eager, ``torch.compile``, SDPA; inf-cl and flash-kmeans where importable).

Into DIR it writes ``results.jsonl`` (the bench rows, appended as each finishes, so a step cut short
keeps what it measured), ``results.md`` (the tables) and ``log.txt`` (everything printed).  Copy
``results.jsonl`` to ``bench/results/<time>-<device>.jsonl``, commit it, and ``python -m bench
readme`` renders it into the README.  ``--dry-run`` prints the plan and exits (any machine).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAMILY_STEPS = [("infonce", 80), ("kmeans", 100), ("contranorm", 150)]  # (family, seconds), slowest last
TEST_STEP_S = 170
TTGIR_STEP_S = 45
RESULTS, TABLE, LOG = "results.jsonl", "results.md", "log.txt"
# One kernel per family for the TTGIR evidence: (module, spec index, dtype, D).
EVIDENCE = [("sslcore.kernels.infonce", 0, "bf16", 256), ("sslcore.kernels.kmeans", 0, "bf16", 128),
            ("sslcore.kernels.contranorm", 2, "bf16", 0)]


class Log:
    """Prints and appends to DIR/log.txt."""

    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        if self.path:
            with self.path.open("a") as f:
                f.write(text + "\n")


def plan(out: Path) -> list[tuple[str, float, list[str] | None]]:
    """The steps: (name, cap in seconds, command or None for an in-process step)."""
    py = sys.executable
    steps = [("gpu tests", TEST_STEP_S, [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
                                         str(ROOT / "tests")]),
             ("ttgir evidence", TTGIR_STEP_S, None)]
    steps += [(f"bench {family}", cap, [py, "-m", "bench", family, "--goal", "--json-dir", str(out), "--file", RESULTS])
              for family, cap in FAMILY_STEPS]
    return steps


def goal_shapes() -> dict[str, list[str]]:
    """Each family's goal rows, as ``op impl dtype shape`` lines (for the dry run)."""
    out = {}
    for family, _ in FAMILY_STEPS:
        cases = importlib.import_module(f"bench.{family}").cases(goal=True)
        out[family] = [f"{c.op} {c.impl} {str(c.dtype).removeprefix('torch.')} {c.shape}" for c in cases]
    return out


def environment(log: Log) -> None:
    import torch
    import triton
    log(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}")
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, python "
        f"{sys.version.split()[0]}")
    from bench.harness import COMMIT_ENV, commit
    log(f"sslcore commit: {commit() or f'unknown (no .git here: set {COMMIT_ENV}=<commit> where the copy is made)'}")
    for peer in ("inf_cl", "flash_kmeans"):
        log(f"{peer}: {'importable' if importlib.util.find_spec(peer) else 'not installed (its rows are skipped)'}")


def ttgir_evidence(log: Log, target=None) -> None:
    """Compile one kernel per family for ``target`` (this device's by default), as launched, and read
    its TTGIR."""
    import triton
    from triton.compiler import ASTSource
    from triton.runtime import driver

    sys.path.insert(0, str(ROOT / "tests"))
    import aot

    target = target or driver.active.get_current_target()
    for module, index, dtype, d in EVIDENCE:
        spec = importlib.import_module(module).aot_specs(dtype, d, 90 if target.arch >= 90 else 80)[index]
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


def run_step(name: str, cap: float, command: list[str] | None, log: Log) -> str:
    """Run one step within ``cap`` seconds; its output goes to the terminal and the log."""
    start = time.perf_counter()
    log(f"\n=== {name} (cap {cap:.0f} s) ===")
    if command is None:
        try:
            ttgir_evidence(log)
            status = "ok"
        except Exception as e:  # evidence is a report, not a gate: the run goes on
            status = f"error: {type(e).__name__}: {e}"
    else:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
        timer = threading.Timer(cap, proc.kill)  # the cap: the step is killed, its finished rows stay
        timer.start()
        for line in proc.stdout:  # streamed: progress shows as it happens
            log(line.rstrip())
        proc.wait()
        timer.cancel()
        if proc.returncode == 0:
            status = "ok"
        else:
            status = (f"stopped at its cap of {cap:.0f} s" if time.perf_counter() - start >= cap
                      else f"exit {proc.returncode}")
    log(f"--- {name}: {status} after {time.perf_counter() - start:.0f} s")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.jsonl, results.md, log.txt")
    parser.add_argument("--budget", type=float, default=8.0, help="minutes for the whole run (default 8)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be > 0 minutes, got {args.budget}")
    budget_s = 60 * args.budget
    steps = plan(args.out)
    if args.dry_run:
        print(f"python -m bench gpu: the plan within {args.budget:g} min, into {args.out}/ ({RESULTS}, {TABLE}, {LOG})")
        for name, cap, command in steps:
            print(f"- {name}, at most {cap} s: {' '.join(command) if command else 'in process'}")
        for family, rows in goal_shapes().items():
            print(f"  {family} goal rows:\n    " + "\n    ".join(rows))
        return 0
    import torch
    if not torch.cuda.is_available():
        parser.error("no CUDA device here: `python -m bench gpu --dry-run` shows the plan")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in (RESULTS, TABLE, LOG):
        if (args.out / name).exists():
            parser.error(f"{args.out / name} exists: give an empty folder (runs never overwrite each other)")
    log = Log(args.out / LOG)
    start = time.perf_counter()
    environment(log)
    statuses = []
    for name, cap, command in steps:
        left = budget_s - (time.perf_counter() - start)
        if left < 20:
            statuses.append((name, "not run: the budget is spent"))
            continue
        statuses.append((name, run_step(name, min(cap, left), command, log)))
    from bench import report
    rows = report.load_jsonl(args.out / RESULTS) if (args.out / RESULTS).exists() else []
    table = f"{report.header(rows)}\n\n{report.markdown(rows)}" if rows else "no bench rows"
    (args.out / TABLE).write_text(table + "\n")
    log("\n=== summary ===")
    for name, status in statuses:
        log(f"{name}: {status}")
    log(f"{len(rows)} bench rows in {time.perf_counter() - start:.0f} s; tables in {args.out / TABLE}\n\n{table}")
    return 0
