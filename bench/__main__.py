"""``python -m bench [infonce|contranorm|kmeans|all] [--quick | --goal] [--plot] [--json-dir DIR]``,
``python -m bench data`` (image decoding per worker), ``python -m bench readme [FILE ...]``,
``python -m bench gpu (--out DIR | --resume DIR) [--dry-run] [--rehearse]``.

Runs this machine's rows of each family (GPU rows where CUDA exists, CPU rows otherwise), appends
them to ``<json-dir>/<YYYYMMDD-HHMMSS>-<device>.jsonl`` and prints the markdown table.  ``gpu`` is
the prepared run for a lent GPU (bench/gpu.py).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from datetime import datetime
from pathlib import Path

from bench import report
from bench.harness import environment, off_machine, run_case

# A family is bench/<name>.py with ``cases(quick) -> list[Case]`` (and its pytest test); absent ones are skipped.
FAMILIES = ("infonce", "contranorm", "kmeans")


def load_cases(family: str, quick: bool, goal: bool = False) -> list:
    if importlib.util.find_spec(f"bench.{family}") is None:
        print(f"{family}: skipped, no benchmark yet (bench/{family}.py does not exist)")
        return []
    return importlib.import_module(f"bench.{family}").cases(quick, goal)


def print_skipped(cases: list) -> None:
    """One line per (reason, op): how many rows, which implementations, dtypes and sizes."""
    groups = {}
    for c in cases:
        groups.setdefault((off_machine(c), c.op), []).append(c)
    for (reason, op), cs in groups.items():
        impls = ", ".join(dict.fromkeys(c.impl for c in cs))
        dtypes = ", ".join(dict.fromkeys(str(c.dtype).removeprefix("torch.") for c in cs))
        sizes = "; ".join(f"{k} in {sorted({c.shape[k] for c in cs})}" for k in cs[0].shape)
        print(f"{op}: {len(cs)} rows {reason} ({impls}; {dtypes}; {sizes})")


def _world_sizes(text: str) -> list[int]:
    """``--world-size``: comma-separated positive integers."""
    try:
        sizes = [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected W or W,W,... (positive integers), got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"world sizes must be >= 1, got {text!r}")
    return sizes


def _write(rows: list[dict], args) -> None:
    """Append ``rows`` to the run's JSONL (``--json-dir``/``--file``) and print their table."""
    path = (args.json_dir / args.file if args.file
            else report.results_path(args.json_dir, environment()["device"], datetime.now()))
    for row in rows:
        report.append_jsonl(path, row)
    print(f"\n{report.header(rows)}\n\n{report.markdown(rows)}\n\nwrote {path}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu"]:
        from bench import gpu
        sys.exit(gpu.main(argv[1:]))
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("what", nargs="?", default="all", choices=[*FAMILIES, "all", "readme", "data"])
    parser.add_argument("files", nargs="*", help="readme: results files to render (default: the newest "
                                                 "committed file per device)")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="fewer, smaller shapes: a smoke run")
    grid.add_argument("--goal", action="store_true", help="the GPU run's rows: the goal shapes (bench/gpu.py)")
    parser.add_argument("--plot", action="store_true", help="also write a PNG next to the JSONL")
    parser.add_argument("--json-dir", type=Path, default=report.RESULTS, help="where the JSONL goes "
                                                                              "(default: bench/results)")
    parser.add_argument("--file", help="the JSONL's name in --json-dir (default: <time>-<device>.jsonl); "
                                       "rows are appended")
    parser.add_argument("--world-size", type=_world_sizes, metavar="W[,W...]",
                        help="infonce only: NT-Xent under data parallelism, W processes each (bench/ddp.py)")
    args = parser.parse_args(argv)
    if args.what == "readme":
        print(report.readme(args.files))
        return
    if args.files:
        parser.error("only 'readme' takes files")
    if args.what == "data":  # the image-folder decoders, images/s per worker (bench/data.py)
        from bench import data
        _write(data.rows(args.quick), args)
        return
    if args.world_size:
        if args.what != "infonce" or args.goal:
            parser.error("--world-size goes with infonce (and --quick at most)")
        from bench import ddp
        _write(ddp.rows(args.world_size, args.quick), args)
        return

    cases = [c for family in (FAMILIES if args.what == "all" else [args.what])
             for c in load_cases(family, args.quick, args.goal)]
    print_skipped([c for c in cases if off_machine(c)])
    cases = [c for c in cases if not off_machine(c)]
    if not cases:
        return
    path = (args.json_dir / args.file if args.file
            else report.results_path(args.json_dir, environment()["device"], datetime.now()))
    rows = []
    for case in cases:
        rows.append(run_case(case))
        report.append_jsonl(path, rows[-1])
        print(f"  {case.op} {case.id}: {rows[-1]['status']}, {report.fmt(rows[-1]['median_ms'])} ms", flush=True)
    print(f"\n{report.header(rows)}\n\n{report.markdown(rows)}\n\nwrote {path}")
    if args.plot:
        png = path.with_suffix(".png")
        print(f"wrote {png}" if report.plot(rows, png) else "no plot: no row ran")


if __name__ == "__main__":
    main()
