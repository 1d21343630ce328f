"""Every method on one budget: ``sslcore benchmark`` (one dataset).

Pretrains each method (default: every registered method that trains on the dataset's kind) with
the same options, then prints one table: linear probe and k-NN accuracy on the held-out split,
final loss and training time, with the random-init encoder and raw pixels as baselines.

Runs go to ``OUT/<method>/`` (each a normal pretrain folder: checkpoint, metrics, summary) and
the table to ``OUT/results.json``; ``OUT`` defaults to ``runs/benchmark-<data>``.  ``-o KEY=VALUE``
goes to every method that takes ``KEY``; ``-o METHOD.KEY=VALUE`` to that method only.  ``--seeds``
repeats it per seed into one results file, rendered as the benchmark block of docs/results.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..checks import parse_literal
from ..data import data_spec_arg
from ..methods import METHODS, get_method, method_options
from ..train.config import DEFAULTS, device_arg, setting
from .report import (
    VERDICT_RULE,
    Progress,
    claim,
    effect_words,
    markdown_table,
    mean,
    mean_and_std,
    mean_std,
    probe_words,
    results_path,
    save_figure,
    seeds_arg,
    write_results,
)

BUDGET = dict(epochs=20)  # benchmark's default budget (PretrainConfig's defaults otherwise)


def method_option(text: str) -> tuple[str | None, str, object]:
    """``[METHOD.]KEY=VALUE`` -> (method or None, key, value as a Python literal or else the string)."""
    target, sep, value = text.partition("=")
    method, dot, key = target.rpartition(".")
    if not sep or not key.isidentifier() or (dot and method not in METHODS):
        raise argparse.ArgumentTypeError(f"expected [METHOD.]KEY=VALUE with a known METHOD, got {text!r}")
    return method or None, key, parse_literal(value)


def options_per_method(methods: list[str], options: list[tuple[str | None, str, object]]) -> dict[str, dict]:
    """Each method's ``-o`` options: a plain key goes to the methods that take it (an error if none does)."""
    per = {m: {} for m in methods}
    for target, key, value in options:
        if target is not None:
            if target not in per:
                raise ValueError(f"-o {target}.{key}: method {target!r} is not among --methods {','.join(methods)}")
            per[target][key] = value  # PretrainConfig checks the key against the method's options
            continue
        takers = [m for m in methods if key in method_options(m)]
        if not takers:
            raise ValueError(f"-o {key}: none of {', '.join(methods)} takes option {key!r}")
        for m in takers:
            per[m][key] = value
    return per


def select_methods(names: list[str] | None, data) -> list[str]:
    """``names`` after checking each trains on ``data``; None -> every registered method that does."""
    if names is None:
        names = [m for m, cls in METHODS.items() if data.kind in cls.data_kinds]
        if not names:
            raise ValueError(f"no registered method trains on {data.kind} data")
        return names
    for m in names:
        if data.kind not in get_method(m).data_kinds:
            raise ValueError(f"method {m!r} trains on {' or '.join(get_method(m).data_kinds)} data, "
                             f"not on {data.name} ({data.kind} data)")
    return names


def _train_all(data_spec: str, methods: list[str], out: Path, options: list, train: dict,
               progress=None) -> dict[str, dict]:
    """Pretrain each method into ``out/<method>``; ``train["temperature"]`` (if not None) goes to the methods
    that have one, the others keep their own defaults."""
    from ..train import PretrainConfig, pretrain  # here, not above: `sslcore benchmark --help` imports no torch

    per = options_per_method(methods, options)
    if "simsiam-multi" in per:  # its memory from the same fraction of the run as the authors' (docs/methods.md)
        per["simsiam-multi"].setdefault("mix_epoch", scaled_mix_epoch(train["epochs"]))
    train = dict(train)
    temperature = train.pop("temperature", None)
    configs = {m: PretrainConfig(method=m, data=data_spec, out=str(out / m), options=per[m], baselines=True,
                                 temperature=temperature if "temperature" in method_options(m) else None, **train)
               for m in methods}
    progress = progress or Progress("benchmark", len(configs))
    summaries = {}
    for m, cfg in configs.items():  # all configs checked before the first run
        progress(f"{m}, seed {cfg.seed}")
        summaries[m] = pretrain(cfg)
    return summaries


def run_benchmark(data_spec: str = "digits", methods: list[str] | None = None, *, out: str | None = None,
                  options: list = (), progress=None, **train) -> dict:
    """Pretrain ``methods`` on ``data_spec`` with the same options; ``{"rows": [...], "baselines": [...]}``."""
    from ..data import load_dataset
    from ..dist import is_main_process

    data = load_dataset(data_spec)
    methods = select_methods(methods, data)
    out = Path(out or Path("runs") / f"benchmark-{data.name}")
    train = {**BUDGET, **train}
    summaries = _train_all(data_spec, methods, out, list(options), train, progress)
    rows = [{"method": m, "linear": s["probes"]["trained"]["linear"], "knn": s["probes"]["trained"]["knn"],
             "init_linear": s["probes"]["random_init"]["linear"], "final_loss": s["final_loss"],
             "train_time_s": s["train_time_s"]} for m, s in summaries.items()]
    first = summaries[methods[0]]
    inits = {}  # one random-init row per encoder class trained (MAE's and ClusterMIM's ViT beside the CNN)
    for m, s in summaries.items():
        kind = s.get("encoder_class", s["encoder"])
        label = first["encoder"] if kind == first.get("encoder_class", first["encoder"]) else f"{kind} of {m}"
        inits.setdefault(kind, {"method": f"random init ({label})", **s["probes"]["random_init"]})
    baselines = [*inits.values(), {"method": "raw pixels", **first["probes"]["raw_pixels"]}]
    result = {"data": data_spec, "out": str(out), "n_train": first["n_train"], "n_test": first["n_test"],
              "device": first["device"],
              "config": {k: v for k, v in first["config"].items()
                         if k not in ("method", "out", "options", "temperature")},
              "temperatures": {m: s["temperature"] for m, s in summaries.items()},
              "options": {m: s["config"]["options"] for m, s in summaries.items()}, "rows": rows,
              "baselines": baselines}
    if is_main_process():
        write_results(out / "results.json", result)
    return result


def benchmark_table(result: dict) -> str:
    width = max(len("method"), *(len(r["method"]) for r in result["rows"] + result["baselines"])) + 2
    lines = [f"{'method':<{width}}{'linear probe':>13}{'k-NN':>9}{'final loss':>12}{'train time':>12}"]
    for r in result["rows"]:
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        lines.append(f"{r['method']:<{width}}{r['linear']:>13.2%}{r['knn']:>9.2%}{loss:>12}{r['train_time_s']:>11.1f}s")
    for r in result["baselines"]:
        lines.append(f"{r['method']:<{width}}{r['linear']:>13.2%}{r['knn']:>9.2%}{'':>12}{'':>12}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = " (default: %(default)s)"
    p.add_argument("--data", type=data_spec_arg, default="digits", help="dataset" + d)
    p.add_argument("--methods", type=lambda s: s.split(","),
                   help="comma-separated methods (default: every registered method that trains on the data)")
    p.add_argument("--epochs", type=setting("epochs"), default=BUDGET["epochs"], help="training epochs per method" + d)
    p.add_argument("--encoder", "--backbone", default=DEFAULTS["encoder"], help="smallcnn or a timm spec" + d)
    p.add_argument("--batch-size", type=setting("batch_size"), default=DEFAULTS["batch_size"],
                   help="images per step" + d)
    p.add_argument("--lr", type=setting("lr"), default=DEFAULTS["lr"], help="base learning rate per 256 images" + d)
    p.add_argument("--temperature", type=setting("temperature"),
                   help="loss temperature of the methods that have one (default: each method's own)")
    p.add_argument("--seed", type=setting("seed"), default=DEFAULTS["seed"], help="seed of every run" + d)
    p.add_argument("--seeds", type=seeds_arg, help="run the benchmark once per seed (OUT/seed-S) and write the "
                   "mean +- std table's results file (with --results-out)")
    p.add_argument("--results-out", help="the results file of a --seeds run (default: OUT/results.json), e.g. "
                   "docs/results/benchmark.json; an existing file is kept unless --overwrite")
    p.add_argument("--limit", type=setting("limit"), help="pretrain on the first N training images only")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda, ..." + d)
    p.add_argument("--backend", default="auto", help="the losses' kernel backend" + d)
    p.add_argument("--option", "-o", type=method_option, action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                   help="a method option for every method that takes KEY, or for METHOD only (repeatable)")
    p.add_argument("--out", help="output folder (default: runs/benchmark-<data>)")
    p.add_argument("--overwrite", action="store_true", help="replace the runs already in OUT")


def main_from_args(args: argparse.Namespace) -> dict:
    from ..dist import is_main_process

    train = dict(epochs=args.epochs, encoder=args.encoder, batch_size=args.batch_size, lr=args.lr,
                 temperature=args.temperature, seed=args.seed, limit=args.limit, device=args.device,
                 backend=args.backend, overwrite=args.overwrite)
    if args.seeds:
        train.pop("seed")
        result = run_seeds(args.data, args.methods, seeds=args.seeds, out=args.out, results_out=args.results_out,
                           options=args.option, command=getattr(args, "command_line", None), **train)
        if is_main_process():
            print("\n" + benchmark_markdown(result))
            print(f"wrote {result['results_file']}")
        return result
    result = run_benchmark(args.data, args.methods, out=args.out, options=args.option, **train)
    if is_main_process():
        print(f"\n{result['data']}: {args.epochs} epochs per method on {result['device']}; held-out accuracy "
              f"({result['n_test']} test images):")
        print(benchmark_table(result))
        print(f"wrote {result['out']}/results.json and one run folder per method")
    return result


# ---------------------------------------------------------------------------------------------
# The benchmark over seeds: its table in docs/results.md (``sslcore report``).

# (new method, its base, the claim, the paper's reported effect in linear-probe points, where it is reported):
# MPCL's table, ResNet-18 on CIFAR-10 (docs/methods.md)
CLAIMS = (("simclr-attn", "simclr", "SimCLR-Attn > SimCLR", 0.9, "MPCL: ResNet-18 CIFAR-10 84.5 → 85.4"),
          ("simsiam-multi", "simsiam", "SimSiam-Multi > SimSiam", 1.0, "MPCL: ResNet-18 CIFAR-10 83.8 → 84.8"))
MIX_EPOCH, AUTHORS_EPOCHS = 52, 1000  # SimSiam-Multi's memory mixes in from epoch 52 of the authors' 1000


def scaled_mix_epoch(epochs: int) -> int:
    """SimSiam-Multi's ``mix_epoch`` for a run of ``epochs``: the authors train 51 of their 1000 epochs (5.1 %)
    before the memory mixes in; the same fraction of this run, rounded, and at least one epoch (the memory must
    be written once).  20 epochs -> 2, 100 -> 6, 1000 -> 52."""
    return max(1, round(epochs * (MIX_EPOCH - 1) / AUTHORS_EPOCHS)) + 1


def run_seeds(data_spec: str = "digits", methods: list[str] | None = None, *, seeds: list[int], out: str | None = None,
              results_out: str | None = None, overwrite: bool = False, command: str | None = None, **kwargs) -> dict:
    """:func:`run_benchmark` once per seed into ``OUT/seed-S``; one results file with every seed's rows
    (and ``command``, the command line that made it)."""
    from ..data import load_dataset
    from ..dist import is_main_process

    out = Path(out or Path("runs") / f"benchmark-{load_dataset(data_spec).name}")
    path = results_path(out, results_out, overwrite)
    t0 = time.perf_counter()
    progress = Progress("benchmark", len(seeds) * len(select_methods(methods, load_dataset(data_spec))))
    runs = [run_benchmark(data_spec, methods, out=str(out / f"seed-{seed}"), seed=seed, overwrite=overwrite,
                          progress=progress, **kwargs) for seed in seeds]
    result = {"command": command, "data": data_spec, "seeds": seeds, "probe_family": "torch",
              "config": runs[0]["config"], "temperatures": runs[0]["temperatures"], "n_train": runs[0]["n_train"],
              "n_test": runs[0]["n_test"], "device": runs[0]["device"], "runs": runs,
              "seconds": round(time.perf_counter() - t0, 1), "results_file": str(path)}
    if is_main_process():
        write_results(path, result)
    return result


def _per_method(result: dict, key: str) -> dict[str, list[float]]:
    """``method -> [value per seed]`` for the trained rows and the baselines that have ``key``."""
    values: dict[str, list[float]] = {}
    for run in result["runs"]:
        for r in run["rows"] + run["baselines"]:
            if key in r:
                values.setdefault(r["method"], []).append(r[key])
    return values


def _gains_over_init(result: dict) -> dict[str, list[float]]:
    """``method -> [its linear probe minus its own random-init encoder's, in points, per seed]`` (files written
    since the rows record ``init_linear``; empty for older ones)."""
    linear, inits = _per_method(result, "linear"), _per_method(result, "init_linear")
    return {m: [100 * (a - b) for a, b in zip(linear[m], init)] for m, init in inits.items()}


def mix_epoch(result: dict) -> int:
    """The epoch from which the benchmark's SimSiam-Multi mixed its memory in: its ``mix_epoch`` option, else the
    method's default (52)."""
    return result["runs"][0].get("options", {}).get("simsiam-multi", {}).get("mix_epoch", MIX_EPOCH)


def benchmark_claims(result: dict) -> list[dict]:
    """The papers' claims on the benchmark (:data:`CLAIMS`): the linear-probe gain per seed, by the paired rule
    (:func:`~.report.claim`); SimSiam-Multi is "not tested" when its memory never mixed in (``mix_epoch`` past the
    last epoch: the two runs are then identical by construction)."""
    linear, epochs = _per_method(result, "linear"), result["config"]["epochs"]
    out = []
    for new, old, text, reported, source in CLAIMS:
        if new in linear and old in linear:
            deltas = [100 * (a - b) for a, b in zip(linear[new], linear[old])]
            untested = new == "simsiam-multi" and mix_epoch(result) > epochs
            why = f"memory mixes in from epoch {mix_epoch(result)} of {epochs}: identical to SimSiam" \
                if untested else ""
            out.append(claim(text, "benchmark", deltas, reported, source, "pts", tested=not untested,
                             why_untested=why))
    return out


def benchmark_markdown(result: dict) -> str:
    """The results block: per method the held-out linear-probe and k-NN accuracy (mean ± std over seeds),
    training time and temperature, and the papers' claims checked seed by seed."""
    cfg, n = result["config"], len(result["seeds"])
    linear, knn, secs = _per_method(result, "linear"), _per_method(result, "knn"), _per_method(result, "train_time_s")
    temps, gains = result["temperatures"], _gains_over_init(result)
    rows = [[m, mean_std(linear[m], scale=100), *([mean_std(gains[m]) if m in gains else ""] if gains else []),
             mean_std(knn[m], scale=100), f"{mean(secs[m]):.0f}" if m in secs else "",
             "" if temps.get(m) is None else f"{temps[m]:g}"] for m in linear]
    table = markdown_table(["method", "linear %", *(["over random init, pts"] if gains else []), "k-NN %",
                            "train s", "τ"], rows)
    claims = benchmark_claims(result)
    command = f"`{result['command']}`" if result.get("command") else "`sslcore benchmark --seeds ...`"
    trained = list(secs)  # the methods trained (the baselines have no training time)
    vits = " and ".join(m for m in ("mae", "clustermim") if m in trained)
    vits = f" ({vits}: a ViT on 2×2 patches)" if vits else ""
    caption = (f"{command}: {'each method below' if len(trained) > 3 else ' and '.join(trained)} on "
               f"`{result['data']}` ({result['n_train']} training, {result['n_test']} held-out images), "
               f"{cfg['epochs']} epochs of batch {cfg['batch_size']}, base lr {cfg['lr']:g} per 256, encoder "
               f"`{cfg['encoder']}`{vits}, each method at "
               f"its own temperature τ; {n} seeds ({', '.join(map(str, result['seeds']))}), mean ± std. Linear "
               f"probe and k-NN on the frozen features: {probe_words(result)}."
               + (" Over random init: the linear probe minus that of the same seed's untrained encoder of the "
                  "method's own architecture; below 0, the method's training made its features worse at this "
                  "budget (a collapse, or not yet trained enough)." if gains else ""))
    out = f"{caption}\n\n{table}"
    if claims:
        out += (f"\n\nThe papers' claims, linear probe, the new method minus its base in the same seed (points). "
                f"Verdict: {VERDICT_RULE}.\n\n"
                + markdown_table(["claim", "gain, pts", "bar (the paper's effect)", "verdict"],
                                 [[c["claim"], effect_words(c), f"{c['bar']:g} ({c['bar_source']})",
                                   c["verdict"] + (f" ({c['why_untested']})" if c["why_untested"] else "")]
                                  for c in claims], "llll"))
    return out


def benchmark_plot(result: dict, path: Path) -> None:
    """Linear-probe and k-NN accuracy per method, mean and std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    linear, knn = _per_method(result, "linear"), _per_method(result, "knn")
    names = list(linear)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4.2))
    for shift, (label, values) in zip((-0.2, 0.2), (("linear probe", linear), ("k-NN", knn))):
        means, stds = zip(*(mean_and_std(values[m], scale=100) for m in names))
        ax.bar([i + shift for i in x], means, 0.4, yerr=stds, capsize=3, label=label)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    title = f"{len(result['runs'][0]['rows'])} methods on {result['data']}, {len(result['seeds'])} seeds"
    ax.set(ylabel="held-out accuracy, %", title=title, ylim=(0, 100))
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
