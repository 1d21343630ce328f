"""Results: JSON lines under bench/results/, markdown tables, the PNG, the README section."""
from __future__ import annotations

import json
import math
import subprocess
from datetime import datetime
from pathlib import Path

from bench.harness import slug

RESULTS = Path(__file__).parent / "results"
NUMBERS = {"median ms": "median_ms", "peak extra MiB": "peak_extra_mib", "TFLOP/s": "tflops",
           "% bf16 peak": "frac_bf16_peak"}
OPTIONAL = (("passes", "passes"), ("saved MiB", "saved_mib"), ("compile s", "compile_s"),
            ("img/s per worker", "img_s"))  # columns where counted


def results_path(json_dir: Path, device: str, when: datetime) -> Path:
    return Path(json_dir) / f"{when:%Y%m%d-%H%M%S}-{slug(device)}.jsonl"


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row (so a run cut short keeps the rows it finished)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def fmt(x: float | None) -> str:
    """Three significant digits, never in exponent form; '-' for missing."""
    if x is None:
        return "-"
    digits = max(0, 2 - math.floor(math.log10(abs(x)))) if x else 0
    return f"{x:,.{digits}f}"


def header(rows: list[dict]) -> str:
    r = rows[0]
    return f"{r['device']}, torch {r['torch']}, triton {r['triton']}, commit {r['commit']}, {r['time'][:10]}"


def markdown(rows: list[dict]) -> str:
    """One table per op, rows in run order (each shape's implementations together), notes below."""
    parts = []
    for op in dict.fromkeys(r["op"] for r in rows):
        rs = [r for r in rows if r["op"] == op]
        sizes = list(dict.fromkeys(k for r in rs for k in r["shape"]))
        numbers = {**NUMBERS, **{k: key for k, key in OPTIONAL if any(r.get(key) is not None for r in rs)}}
        head = ["impl", "dtype", *sizes, *numbers, "status"]
        align = ["---"] * 2 + ["---:"] * (len(sizes) + len(numbers)) + ["---"]
        lines = [f"**{op}**", "", "| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
        for r in rs:
            nums = [r.get(key) for key in numbers.values()]
            nums[3] = None if nums[3] is None else 100 * nums[3]  # the fraction of peak, as a percentage
            cells = [r["impl"], r["dtype"], *(str(r["shape"].get(k, "")) for k in sizes), *map(fmt, nums), r["status"]]
            lines.append("| " + " | ".join(cells) + " |")
        notes = dict.fromkeys((r["impl"], r["note"]) for r in rs if r["note"])
        if notes:
            lines += [""] + [f"- {impl}: {note}" for impl, note in notes]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(rows: list[dict], path: Path) -> bool:
    """Median ms (and peak extra memory where measured) against the first size, a panel per other sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return False

    def panel(r):
        rest = list(r["shape"].items())[1:]
        return r["op"] + "".join(f", {k}={v}" for k, v in rest)

    panels = list(dict.fromkeys(map(panel, ok)))
    metrics = [("median_ms", "median ms")]
    if any(r["peak_extra_mib"] is not None for r in ok):
        metrics.append(("peak_extra_mib", "peak extra MiB"))
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(4.2 * len(panels), 3.4 * len(metrics)),
                             squeeze=False)
    for j, title in enumerate(panels):
        rs = [r for r in ok if panel(r) == title]
        x_key = next(iter(rs[0]["shape"]))
        for i, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            for line in dict.fromkeys(f"{r['impl']} {r['dtype']}" for r in rs):
                pts = sorted((r["shape"][x_key], r[key]) for r in rs if f"{r['impl']} {r['dtype']}" == line)
                ax.plot(*zip(*pts), marker="o", label=line)
            ax.set(xscale="log", yscale="log", xlabel=x_key, ylabel=label, title=title)
            ax.set_xticks(sorted({r["shape"][x_key] for r in rs}), minor=False)
            ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%d"))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.yaxis.set_major_formatter(ticker.LogFormatter())
            ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
    fig.suptitle(header(rows), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _committed_results() -> list[Path]:
    """The results files git tracks (all files present where there is no git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "*.jsonl"], capture_output=True, text=True, check=True, cwd=RESULTS)
    except (OSError, subprocess.CalledProcessError):
        return sorted(RESULTS.glob("*.jsonl"))
    return [RESULTS / name for name in out.stdout.split()]


def readme(files: list[str] | None = None) -> str:
    """The benchmark section of docs/benchmarks.md: per device, each op's rows from the newest results file that
    has it (committed files by default), so a run of one family does not hide another's."""
    paths = [Path(f) for f in files] if files else _committed_results()
    newest = {}
    for path in sorted(paths, key=lambda p: p.name):  # names start with the run's timestamp
        by_op = {}
        for row in load_jsonl(path):
            by_op.setdefault(row["op"], []).append(row)
        for op, rows in by_op.items():
            newest[(rows[0]["device"], op)] = (path, rows)
    if not newest:
        return "No results files yet: run `python -m bench all` and commit the file it writes."
    blocks = {}
    for (device, _), (path, rows) in newest.items():
        blocks.setdefault(device, []).append(f"{header(rows)}: `{path.name}`\n\n{markdown(rows)}")
    return "\n\n".join(f"#### {device}\n\n" + "\n\n".join(parts) for device, parts in blocks.items())
