"""``sslcore report``: the study tables of ``docs/results.md`` and the plots, rendered from the committed results files.

Each study writes one JSON file (``docs/results/<study>.json``: every seed's numbers, the budget and
the command that made it).  Its module renders it: ``markdown(results)`` gives the document's block (a
caption with the command, budget and temperature; tables of mean +- std over seeds; verdicts
computed from the seeds), ``plot(results, path)`` the PNG (its link is relative to ``docs/``).  In a
document each block stands between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``; this
command rewrites those blocks (in ``docs/results.md`` and the README) and the PNGs beside the JSON
files, and ``--check`` only says whether the documents still match them (a test runs it, so their
numbers cannot drift from the files).

    sslcore report [--check] [--readme docs/results.md README.md] [--results docs/results]
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import sys
import time
from pathlib import Path

from ..files import OutputError, atomic_write, check_output

# study name -> (module, its markdown renderer, its plot writer, its claims: results -> [claim(...)])
STUDIES = {
    "benchmark": ("sslcore.experiments.benchmark", "benchmark_markdown", "benchmark_plot", "benchmark_claims"),
    "transfer": ("sslcore.experiments.transfer", "markdown", "plot", "claims"),
    "oversmoothing": ("sslcore.experiments.oversmoothing", "markdown", "plot", "claims"),
    "mim-study": ("sslcore.experiments.clustermim", "study_markdown", "study_plot", "study_claims_summary"),
    "tcas-sweep": ("sslcore.experiments.clustermim", "sweep_markdown", "sweep_plot", "sweep_claims"),
    "ar-vs-mlm": ("sslcore.experiments.ar_vs_mlm", "markdown", "plot", "verdicts"),
}
CLAIMS_BLOCK = "claims"  # the block of every study's claims, one row each (README's "## Results")


def mean(values) -> float:
    """The mean of ``values`` (any iterable of numbers)."""
    values = list(values)
    return sum(values) / len(values)


def mean_and_std(values, *, scale: float = 1.0) -> tuple[float, float]:
    """Mean and sample std over seeds of ``scale * values`` (std 0 for one value): the studies' tables and
    error bars."""
    values = [scale * v for v in values]
    m = mean(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def mean_std(values, *, scale: float = 1.0, digits: int = 1) -> str:
    """``"m ± s"`` over seeds (sample std), ``"m"`` for one value; ``scale=100`` for percentages."""
    values = list(values)
    m, s = mean_and_std(values, scale=scale)
    return f"{m:.{digits}f}" if len(values) < 2 else f"{m:.{digits}f} ± {s:.{digits}f}"


class Progress:
    """A study's overall progress: ``progress(label)`` before each of its ``total`` runs prints
    ``[study] run 3/27: label (12m elapsed, ETA 42m)`` -- the ETA is the mean time per finished run times the
    runs left -- to stderr, on the main process only."""

    def __init__(self, study: str, total: int):
        self.study, self.total, self.done, self.t0 = study, total, 0, time.perf_counter()

    def __call__(self, label: str) -> None:
        elapsed = time.perf_counter() - self.t0
        eta = f", ETA {_duration(elapsed / self.done * (self.total - self.done))}" if self.done else ""
        self.done += 1
        from ..dist import is_main_process  # here: `sslcore report --help` imports no torch

        if is_main_process():
            print(f"[{self.study}] run {self.done}/{self.total}: {label} ({_duration(elapsed)} elapsed{eta})",
                  file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.0f}m" if seconds < 5400 else f"{seconds / 3600:.1f}h"


ALPHA = 0.05  # the paired test's level (two-sided)
VERDICT_RULE = ("a two-sided paired t-test over seeds (α = 0.05) of the per-seed differences; \"reproduced\" when "
                "it rejects no difference, the mean agrees with the claim and the mean or its 95 % confidence interval "
                "reaches the claim's bar (the paper's reported effect, else a stated noise bar); \"contradicted\" the "
                "same against the claim; \"not tested\" where the mechanism never ran; else \"not shown\"")


def paired_test(deltas, alpha: float = ALPHA) -> dict:
    """Two-sided paired t-test of ``mean(deltas) = 0`` (the per-seed differences of two arms run on the same seeds)
    and the ``1 - alpha`` confidence interval of the mean: ``{"n", "mean", "p", "low", "high"}``.  One seed: p = 1
    and an unbounded interval; every difference equal: p = 1 when they are 0, else 0, with a point interval.
    A t-test, not a sign test: with n seeds an exact sign test's smallest two-sided p is 2^(1-n), so it cannot
    reject at 0.05 below 6 seeds; the t-test assumes normal differences, which a handful of seeds cannot check."""
    from scipy.stats import t as student

    deltas = [float(d) for d in deltas]
    n, m = len(deltas), mean(deltas)
    if n < 2:
        return {"n": n, "mean": m, "p": 1.0, "low": -math.inf, "high": math.inf}
    sd = mean_and_std(deltas)[1]
    if sd == 0:
        return {"n": n, "mean": m, "p": 1.0 if m == 0 else 0.0, "low": m, "high": m}
    se = sd / math.sqrt(n)
    half = float(student.ppf(1 - alpha / 2, n - 1)) * se
    return {"n": n, "mean": m, "p": float(2 * student.sf(abs(m) / se, n - 1)), "low": m - half, "high": m + half}


def seed_verdict(deltas: list[float], bar: float,
                 words: tuple[str, str, str] = ("reproduced", "contradicted", "not shown"), *,
                 alpha: float = ALPHA) -> str:
    """A claim checked on paired per-seed differences ``deltas`` (> 0 agrees with it) by :data:`VERDICT_RULE`:
    the first word when the paired t-test (:func:`paired_test`) rejects at ``alpha``, the mean is > 0 and the
    interval's upper end reaches ``bar`` (the claimed effect: the mean is >= it or the interval holds it); the
    second the same way round against the claim (mean < 0, lower end <= -bar); else the third."""
    return _verdict_of(paired_test(deltas, alpha), bar, words, alpha)


def _verdict_of(test: dict, bar: float, words: tuple[str, str, str] = ("reproduced", "contradicted", "not shown"),
                alpha: float = ALPHA) -> str:
    """:func:`seed_verdict` from a :func:`paired_test` already made."""
    if test["p"] < alpha and test["mean"] > 0 and test["high"] >= bar:
        return words[0]
    if test["p"] < alpha and test["mean"] < 0 and test["low"] <= -bar:
        return words[1]
    return words[2]


def claim(text: str, study: str, deltas: list[float], bar: float, bar_source: str, unit: str, *,
          tested: bool = True, why_untested: str = "", digits: int = 1) -> dict:
    """One paper's claim as a study checked it: its per-seed differences (> 0 agrees), the paired test, the bar
    and where it comes from, the verdict (:func:`seed_verdict`, or "not tested" when the mechanism never ran)."""
    test = paired_test(deltas)
    return {"claim": text, "study": study, "deltas": list(deltas), **test, "bar": bar, "bar_source": bar_source,
            "unit": unit, "digits": digits, "why_untested": why_untested,
            "verdict": _verdict_of(test, bar) if tested else "not tested"}


def effect_words(c: dict) -> str:
    """``"+0.4 pts (95 % CI −1.3…+2.1; p = 0.42; seeds +1.0, +0.5, −0.3)"``: a claim's measured effect."""
    d = c["digits"]
    if c["n"] < 2:
        ci = "one seed"
    elif c["low"] == c["high"]:
        ci = "every seed the same"
    else:
        ci = f"95 % CI {c['low']:+.{d}f}…{c['high']:+.{d}f}; p = {c['p']:.2g}"
    return (f"{c['mean']:+.{d}f} {c['unit']} ({ci}; seeds {', '.join(f'{x:+.{d}f}' for x in c['deltas'])})")


def markdown_table(head: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A markdown table; ``align``: one of ``l``/``r`` per column (default: first left, others right)."""
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    return "\n".join("| " + " | ".join(r) + " |" for r in [head, sep, *rows])


def check_ints(name: str, values, low: int = 0) -> tuple[int, ...]:
    """A study's list of integers (seeds, views, cluster counts): at least one, distinct, each >= ``low``;
    otherwise a ValueError naming ``name``, before any work."""
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values) \
            or len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct integers >= {low}, got {','.join(map(str, values)) or 'none'}")
    return values


def ints_arg(name: str, low: int = 0):
    """argparse ``type=`` for ``name``'s comma-separated integers (e.g. ``--seeds 0,1,2``), checked by
    :func:`check_ints`."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = [int(t) for t in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        try:
            return check_ints(name, values, low)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


seeds_arg = ints_arg("--seeds")


def results_path(out, results_out, overwrite: bool) -> Path:
    """A study's results JSON: ``results_out``, else ``OUT/results.json``; checked before any work: an existing
    file is replaced only with ``overwrite`` and only when it is a study's results (:func:`is_results`), never
    through a link; a missing folder is made when the results are written."""
    option = "--results-out" if results_out else "--out"
    path = Path(results_out) if results_out else Path(out) / "results.json"
    if path.parent.is_dir():
        return check_output(path, option=option, overwrite=overwrite, owned=is_results, what="study results file")
    above = next(p for p in path.parents if p.exists() or p.is_symlink())  # its folder is made at the end
    if not above.is_dir():
        raise OutputError(f"{option} {path}: {str(above)!r} is not a folder")
    return path


def is_results(path: Path) -> bool:
    """Whether ``path`` holds a study's results as :func:`write_results` writes them: a JSON object with the
    study's ``config`` and its ``command`` (the oversmoothing study: its ``vit`` and ``gcn`` tables)."""
    try:
        results = read_results(path)
    except ValueError:
        return False
    return isinstance(results.get("config"), dict) and ("command" in results or {"vit", "gcn"} <= results.keys())


PROBE_WORDS = {"torch": "sslcore's probes (logistic regression by L-BFGS; InstDisc's weighted k-NN, k = 200)",
               "scikit-learn": "scikit-learn's probes (logistic regression; distance-weighted k-NN, k = 20)"}


def probe_words(results: dict) -> str:
    """Which probe family a results file's ``linear``/``knn`` come from: ``probe_family`` where the study recorded
    it (``torch`` since 2026-12-07), else scikit-learn's (every earlier file)."""
    return PROBE_WORDS[results.get("probe_family", "scikit-learn")]


def write_results(path: Path, results: dict) -> None:
    """Write a study's results JSON to ``path`` (its folder made), atomically: an interrupted write leaves the
    old file or none, never a half-written one; never through a link."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(results, indent=1) + "\n").encode(), "results file")


def study_of(name: str) -> str | None:
    """The study whose renderers serve results file ``name`` (its stem): the study itself, or ``STUDY-VARIANT``
    for a variant of a study's run (more seeds, another budget), e.g. ``benchmark-simclr-attn``; else None."""
    if name in STUDIES:
        return name
    return max((s for s in STUDIES if name.startswith(s + "-")), key=len, default=None)


def results_files(results_dir: Path) -> list[tuple[str, Path]]:
    """Every results file in ``results_dir`` that a study renders, as (name, path): the studies' own files in
    :data:`STUDIES`' order, each followed by its variants (sorted)."""
    found = {p.stem: p for p in sorted(results_dir.glob("*.json")) if study_of(p.stem)}
    return sorted(found.items(), key=lambda item: (list(STUDIES).index(study_of(item[0])), item[0]))


def _renderer(name: str):
    module, markdown, plot, claims = STUDIES[study_of(name)]
    module = importlib.import_module(module)
    return getattr(module, markdown), getattr(module, plot), getattr(module, claims)


def read_results(path: Path, option: str = "results file") -> dict:
    """A study's results JSON, or a ``ValueError`` naming ``option`` and the file: unreadable, not JSON, not
    an object."""
    try:
        results = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{option} {path} is not a text file (a study's results are JSON)") from None
    except ValueError as e:
        raise ValueError(f"{option} {path} is not valid JSON: {e}") from None
    if not isinstance(results, dict):
        raise ValueError(f"{option} {path} holds a JSON {type(results).__name__}, not a study's results object")
    return results


def render(name: str, results: dict, path: Path | str = "the results") -> str:
    """The results block of study ``name``; a results object that lacks what the study writes is a
    ``ValueError`` naming ``path`` and the key."""
    try:
        text = _renderer(name)[0](results).strip()
    except KeyError as e:
        raise ValueError(f"{path} is not a complete {name} results file: it has no key {e.args[0]!r}") from None
    except (TypeError, IndexError, AttributeError, ValueError) as e:
        raise ValueError(f"{path} is not a well-formed {name} results file: {type(e).__name__}: {e}") from None
    study = study_of(name)  # a variant's plot is written beside its own file (main_from_args)
    return text if study == name else text.replace(f"results/{study}.png", f"results/{name}.png")


def claims_markdown(results_dir: Path) -> str:
    """The claims block: every paper's claim of every study whose results file is in ``results_dir``, one row
    each -- the claim, the study, its measured effect paired over seeds, the bar and the verdict."""
    rows = []
    for name, path in results_files(results_dir):
        try:
            found = _renderer(name)[2](read_results(path))
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
            raise ValueError(f"{path}: its claims cannot be read: {type(e).__name__}: {e}") from None
        for c in found:
            bar = f"{c['bar']:.{c['digits']}f} {c['unit']} ({c['bar_source']})"
            verdict = f"**{c['verdict']}**" + (f" ({c['why_untested']})" if c["verdict"] == "not tested" else "")
            rows.append([c["claim"], f"[{name}](docs/results.md)", effect_words(c), bar, verdict])
    if not rows:
        raise ValueError(f"block results:{CLAIMS_BLOCK}: no results file in {results_dir}")
    return (f"Each row: the new method or condition minus its base in the same seed (> 0 agrees with the claim). "
            f"Verdict: {VERDICT_RULE}. Rendered from `docs/results/*.json` by `sslcore report`.\n\n"
            + markdown_table(["claim", "study", "measured effect", "bar", "verdict"], rows, "lllll"))


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """A study's plot to ``path`` (PNG), atomically and never through a link."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write(path, buffer.getbuffer(), "plot")


BLOCK = re.compile(r"(?P<open><!-- results:(?P<name>[\w-]+) -->)(?P<body>.*?)"
                   r"(?P<close><!-- /results:(?P=name) -->)", re.S)


def update(readme: str, results_dir: Path) -> tuple[str, list[str]]:
    """``readme`` with every results block re-rendered from ``results_dir``; also the names that changed.
    A block whose study has no results file, or a study name not known, is an error."""
    changed = []

    def one(m: re.Match) -> str:
        name = m["name"]
        if name == CLAIMS_BLOCK:
            body = "\n" + claims_markdown(results_dir) + "\n"
        elif study_of(name) is None:
            raise ValueError(f"block results:{name}: no such study (known: {', '.join(STUDIES)}, a variant "
                             f"STUDY-NAME of one, {CLAIMS_BLOCK})")
        else:
            path = results_dir / f"{name}.json"
            if not path.is_file():
                raise ValueError(f"block results:{name}: {path} does not exist")
            body = "\n" + render(name, read_results(path), path) + "\n"
        if body != m["body"]:
            changed.append(name)
        return m["open"] + body + m["close"]

    text = BLOCK.sub(one, readme)
    unclosed = re.search(r"<!-- results:([\w-]+) -->", BLOCK.sub("", readme))
    if unclosed:
        raise ValueError(f"block results:{unclosed[1]} is never closed: add <!-- /results:{unclosed[1]} --> "
                         "after it")
    return text, changed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--readme", nargs="+", default=["docs/results.md", "README.md"], metavar="FILE",
                   help="the documents whose results blocks are rewritten (default: %(default)s)")
    p.add_argument("--results", default="docs/results", help="folder of the <study>.json files (default: %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if a document's block differs from what its results file renders")
    p.add_argument("--no-plots", action="store_true", help="rewrite the documents only, not the PNGs")


def main_from_args(args: argparse.Namespace) -> int:
    docs, results_dir = [Path(d) for d in args.readme], Path(args.results)
    for doc in docs:
        if not doc.is_file():
            raise ValueError(f"--readme {doc}: no such file")
    if not results_dir.is_dir():
        raise ValueError(f"--results {results_dir}: no such folder")
    updates = [(doc, *update(doc.read_text(), results_dir)) for doc in docs]  # every document checked before any write
    if args.check:
        stale = [(doc, changed) for doc, _, changed in updates if changed]
        for doc, changed in stale:
            print(f"{doc}: out of date with {results_dir} in: {', '.join(changed)} (run `sslcore report`)")
        if not stale:
            print(f"{', '.join(map(str, docs))}: every results block matches {results_dir}")
        return 1 if stale else 0
    for doc, text, changed in updates:
        if changed:
            atomic_write(doc, text.encode(), "document", option="--readme")
        print(f"{doc}: {'rewrote ' + ', '.join(changed) if changed else 'already up to date'}")
    if not args.no_plots:
        for name, path in results_files(results_dir):
            _renderer(name)[1](read_results(path), path.with_suffix(".png"))
            print(f"wrote {path.with_suffix('.png')}")
    return 0
