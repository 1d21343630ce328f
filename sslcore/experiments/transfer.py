"""ArCL's transfer claim on ``shapes``: ``sslcore transfer`` (docs/methods.md, ArCL).

SimCLR and ArCL (worst pair of m views, SimCLR base) pretrain on one ``shapes`` domain with the same
``shifts`` augmentation: crop, flip and colour jitter, then an edge map, stripes, lightness inversion
and Gaussian noise, each drawn with a probability at a random strength.  Every target domain
(:data:`TARGETS`) is the source images under *one fixed setting* of those ops for every image (an
unseen strength or mixture of the family: the paper's setting, where a domain is an augmentation).
Per trained model (and the random-init encoder and raw pixels as baselines):

* ``source``: a linear probe fit on the source's training features, tested on its test images;
* ``transfer``: that same probe (not refit) tested on every target's test images; the claim is about
  their average and worst;
* ``refit``: a probe fit and tested on each target (whether the class survives in the features);
* ``worst_pair``: the held-out worst-pair distance ``E_x max_{a,b} |h_a - h_b|^2`` over ``metric_views``
  views of each test image drawn from the training family, ``h`` the L2-normalised representation
  (``representation``, what the probes read) or projection (``projection``, what ArCL's loss sees).
  ArCL must lower it; the same views for every model.  ``between``: the same distance between two
  different images' views (the scale: a collapsed encoder lowers both).

    sslcore transfer [--views 2,4,8] [--seeds 0,1,2] [--epochs N] [--results-out docs/results/transfer.json]

Runs go to ``OUT/<method>-seed<S>/`` (normal pretrain folders); the results file holds every seed's
numbers, the budget and the command.  ``markdown`` and ``plot`` render it for ``sslcore report``.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import load_dataset, shapes
from ..data.augment import Compose, EdgeMap, GaussianNoise, Invert, StripeOverlay, shift_ops
from ..data.pipeline import to_float
from ..methods.arcl import max_pair_distance
from ..train import PretrainConfig, load_encoder, pretrain
from ..train.evaluate import build_model, fit_linear_probe, linear_probe
from .arguments import TRANSFER_DATA, TRANSFER_EPOCHS, TRANSFER_SEEDS, TRANSFER_VIEWS
from .report import (
    VERDICT_RULE,
    Progress,
    check_ints,
    claim,
    markdown_table,
    mean,
    mean_and_std,
    mean_std,
    results_path,
    save_figure,
    seed_verdict,
    write_results,
)

RECIPE = "shifts"
NOISE_PTS = 2.0  # a gain must pass this (and hold in every seed): ~1.5 pts is one binomial s.e. at 50% of 1000 images

_EDGE, _INVERT = EdgeMap(1.0, (1.0, 1.0)), Invert(1.0)
_STRIPES = StripeOverlay(1.0, (0.6, 0.6), (0.25, 0.25))
_NOISE = GaussianNoise(1.0, (0.2, 0.2), (0.6, 0.6))
# target -> (what it is, the ops at fixed settings, applied to every image); orientation, phase and colour of
# the stripes and the noise itself are still drawn per image
TARGETS = {
    "outline": ("edge map at strength 1", Compose(_EDGE)),
    "striped": ("stripes at strength 0.6, period 0.25 of the side", Compose(_STRIPES)),
    "inverted": ("lightness inverted", Compose(_INVERT)),
    "noisy": ("contrast 0.6, noise sigma 0.2 (the shapes 'noisy' domain)", Compose(_NOISE)),
    "inverted outline": ("edge map at strength 1, then inverted", Compose(_EDGE, _INVERT)),
    "noisy stripes": ("stripes as 'striped', then noise as 'noisy'", Compose(_STRIPES, _NOISE)),
}


def runs_of(views) -> list[tuple[str, str, dict]]:
    """``(key, method, options)`` of the study's models: SimCLR, then ArCL at each m of ``views``."""
    return [("simclr", "simclr", {})] + [(f"arcl-m{m}", "arcl", {"views": m}) for m in views]


def render_targets(data, generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every target's ``(train, test)`` images: :data:`TARGETS`' ops on ``data``'s images (float in [0, 1])."""
    return {name: tuple(ops(to_float(x), generator) for x in (data.x_train, data.x_test))
            for name, (_, ops) in TARGETS.items()}


@torch.no_grad()
def embed(model, x: torch.Tensor, *, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Representation ``h = f(x)`` and projection ``z = g(h)`` of model-ready images ``x`` (eval mode); raw
    pixels when ``model`` is None (``h``: the flattened images, no ``z``)."""
    if model is None:
        return x.flatten(1), None
    projector = getattr(model, "base", model).projector  # ArCL holds its base (SimCLR) by composition
    hs, zs = [], []
    for chunk in x.split(batch):
        h = model.encoder(chunk).flatten(1)
        hs.append(h)
        zs.append(projector(h))
    return torch.cat(hs), torch.cat(zs)


def evaluate(model, data, targets: dict, views: list[torch.Tensor]) -> dict:
    """``source``, ``transfer`` and ``refit`` accuracies and the ``worst_pair`` distances (module docstring) of
    ``model`` (None: raw pixels) on ``data``, its rendered ``targets`` and the held-out ``views``."""
    def features(x):
        return embed(model, data.model_input(x))[0].double().numpy()

    y_train, y_test = data.y_train.numpy(), data.y_test.numpy()
    head = fit_linear_probe(features(data.x_train), y_train)
    out = {"source": float(head.score(features(data.x_test), y_test)), "transfer": {}, "refit": {}}
    for name, (x_train, x_test) in targets.items():
        f_train, f_test = features(x_train), features(x_test)
        out["transfer"][name] = float(head.score(f_test, y_test))
        out["refit"][name] = linear_probe(f_train, y_train, f_test, y_test)
    h, z = zip(*(embed(model, v) for v in views))
    spaces = {"representation": torch.stack(h), "projection": None if model is None else torch.stack(z)}
    out["worst_pair"] = {k: None if e is None else max_pair_distance(e).mean().item() for k, e in spaces.items()}
    out["between"] = {k: None if e is None else between_distance(e) for k, e in spaces.items()}
    return out


def between_distance(e: torch.Tensor) -> float:
    """``E_i |e_hat_i - e_hat_{i-1}|^2`` over the first view of each image (``e``: ``[m, N, D]``; ``e_hat``:
    L2-normalised): the distance between different images, the scale of :func:`max_pair_distance`."""
    e = F.normalize(e[0], dim=-1)
    return (e - e.roll(1, 0)).pow(2).sum(-1).mean().item()


def command_line(cfg: dict) -> str:
    """The ``sslcore transfer`` command that runs the study of ``cfg`` (the results file's ``config``)."""
    tau = "" if cfg["temperature"] is None else f" --temperature {cfg['temperature']:g}"
    return (f"sslcore transfer --data {cfg['data']} --views {','.join(map(str, cfg['views']))} "
            f"--seeds {','.join(map(str, cfg['seeds']))} --epochs {cfg['epochs']} --batch-size {cfg['batch_size']} "
            f"--lr {cfg['lr']:g}{tau} --encoder {cfg['encoder']} --metric-views {cfg['metric_views']} "
            f"--threads {cfg['threads']}")


def run(data: str = TRANSFER_DATA, *, views=TRANSFER_VIEWS, seeds=TRANSFER_SEEDS, epochs: int = TRANSFER_EPOCHS,
        batch_size: int = 256, lr: float = PretrainConfig.lr, temperature: float | None = None,
        encoder: str = "smallcnn", metric_views: int | None = None, device: str = "auto", backend: str = "auto",
        out: str = "runs/transfer", overwrite: bool = False, log=print) -> dict:
    """Train SimCLR and ArCL at each m of ``views`` for every seed on the ``shapes`` domain of ``data`` (the
    ``shifts`` augmentation for both; ``temperature`` None: each method's own), then evaluate every model
    (:func:`evaluate`); returns the results (also what the JSON holds)."""
    name, _, spec = data.partition(":")
    if name != "shapes":
        raise ValueError(f"--data: the transfer study trains on a shapes domain (shapes:DOMAIN[,...]), got {data}")
    settings = shapes.parse_spec(spec)[1]
    views, seeds = check_ints("--views", views, 2), check_ints("--seeds", seeds)
    metric_views = max(views) if metric_views is None else metric_views
    check_ints("--metric-views", (metric_views,), 2)
    out = Path(out)
    configs = {(key, s): PretrainConfig(method=method, data=data, options=options, augment=RECIPE, epochs=epochs,
                                        batch_size=batch_size, lr=lr, temperature=temperature, encoder=encoder,
                                        seed=s, device=device, backend=backend, tensorboard=False,
                                        out=str(out / f"{key}-seed{s}"), overwrite=overwrite)
               for s in seeds for key, method, options in runs_of(views)}  # every config checked before any run
    held = [c.out for c in configs.values() if Path(c.out).is_dir() and any(Path(c.out).iterdir())]
    if held and not overwrite:
        raise ValueError(f"--out {out} already holds the runs {', '.join(held)}: give --overwrite to replace them, "
                         "or choose another --out")
    start = time.perf_counter()
    source = load_dataset(data)
    generator = torch.Generator().manual_seed(settings["seed"])
    targets = render_targets(source, generator)
    metric_views_x = source.build_recipe(RECIPE).views(to_float(source.x_test), generator, metric_views)
    runs, baselines = [], []
    progress = Progress("transfer", len(configs))
    for (key, s), cfg in configs.items():
        progress(f"{key}, seed {s}")
        summary = pretrain(cfg)
        device = summary["device"]
        model = load_encoder(Path(cfg.out) / "checkpoint.pt", source)[0]
        runs.append({"method": key, "seed": s, "train_time_s": summary["train_time_s"],
                     "final_loss": summary["final_loss"], "temperature": summary["temperature"],
                     **evaluate(model, source, targets, metric_views_x)})
        r = runs[-1]
        log(f"{key} seed {s}: source {r['source']:.3f}, transfer avg {mean(r['transfer'].values()):.3f} "
            f"worst {min(r['transfer'].values()):.3f}, worst-pair {r['worst_pair']['representation']:.3f} "
            f"({r['train_time_s']:.0f}s training)")
    for s in seeds:  # the initial state of seed s's runs: pretrain seeds torch before building the model
        torch.manual_seed(s)
        model = build_model(vars(configs["simclr", s]), source).eval()
        baselines.append({"method": "random init", "seed": s, **evaluate(model, source, targets, metric_views_x)})
    baselines.append({"method": "raw pixels", **evaluate(None, source, targets, metric_views_x)})
    config = {"data": data, "views": list(views), "seeds": list(seeds), "epochs": epochs, "batch_size": batch_size,
              "lr": lr, "temperature": temperature, "encoder": encoder, "metric_views": metric_views,
              "threads": torch.get_num_threads(), "augment": RECIPE,
              "shift_ops": [type(op).__name__ for op in shift_ops()], "n_train": settings["n"],
              "n_test": settings["test"], "size": settings["size"], "device": device,
              "targets": {name: what for name, (what, _) in TARGETS.items()}}
    return {"command": command_line(config), "config": config, "runs": runs, "baselines": baselines,
            "total_seconds": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------------------------------------------------------------
# Rendering: tables of mean +- std over seeds, verdicts from the seeds.

def summarise(r: dict) -> dict:
    """One run's (or baseline's) headline numbers: source, target average and worst (transfer and refit),
    the worst target's name and the two worst-pair distances."""
    worst = min(r["transfer"], key=r["transfer"].get)
    return {"source": r["source"], "average": mean(r["transfer"].values()), "worst": r["transfer"][worst],
            "worst_domain": worst, "refit_average": mean(r["refit"].values()),
            "refit_worst": min(r["refit"].values()), "distance": r["worst_pair"]["representation"],
            "projection_distance": r["worst_pair"]["projection"], "between": r["between"]["representation"],
            "projection_between": r["between"]["projection"], "final_loss": r.get("final_loss")}


def _groups(results: dict) -> dict[str, list[dict]]:
    """Label -> its runs in seed order: SimCLR, ArCL per m, random init, raw pixels."""
    groups: dict[str, list[dict]] = {}
    for r in results["runs"] + results["baselines"]:
        groups.setdefault(_label(r["method"]), []).append(r)
    return groups


def _label(key: str) -> str:
    return {"simclr": "SimCLR"}.get(key, f"ArCL m = {key[6:]}" if key.startswith("arcl-m") else key)


BAR_SOURCE = "no effect size in our sources: noise bar"


def _verdict(deltas: list[float], *, lower_is_better: bool = False) -> str:
    """"identical" when every seed's change is 0 (m = 2 is SimCLR: the mechanism never ran); else the paired rule
    (:func:`~.report.seed_verdict`) against :data:`NOISE_PTS` points, or for a distance (``lower_is_better``)
    "lower" / "higher" when the paired t-test rejects at 0.05 in that direction, else "mixed"."""
    if all(d == 0 for d in deltas):
        return "identical"
    if lower_is_better:
        return seed_verdict([-d for d in deltas], 0.0, ("lower", "higher", "mixed"))
    return seed_verdict(deltas, NOISE_PTS)


def claims(results: dict) -> list[dict]:
    """ArCL's claims per m > 2 (worst-target and average transfer against SimCLR, paired by seed) for the README's
    summary; m = 2 is SimCLR by construction (a check, not a claim: its table says "identical")."""
    return [claim(f"ArCL (m = {c['views']}) > SimCLR, {what} transfer", "transfer", c[key], NOISE_PTS, BAR_SOURCE,
                  "pts") for c in comparisons(results) if c["views"] > 2
            for key, what in (("worst", "worst-target"), ("average", "average-target"))]


def comparisons(results: dict) -> list[dict]:
    """Per ArCL m, the paired (same seed) changes against SimCLR: worst and average target accuracy (points)
    and the worst-pair distance of the representation, with their verdicts."""
    by = {(r["method"], r["seed"]): summarise(r) for r in results["runs"]}
    seeds = results["config"]["seeds"]
    rows = []
    for m in results["config"]["views"]:
        pairs = [(by[f"arcl-m{m}", s], by["simclr", s]) for s in seeds]
        worst = [100 * (a["worst"] - b["worst"]) for a, b in pairs]
        average = [100 * (a["average"] - b["average"]) for a, b in pairs]
        distance = [a["distance"] - b["distance"] for a, b in pairs]
        rows.append({"views": m, "worst": worst, "average": average, "distance": distance,
                     "worst_verdict": _verdict(worst), "average_verdict": _verdict(average),
                     "distance_verdict": _verdict(distance, lower_is_better=True)})
    return rows


def _cell(values, scale=100.0, digits=1) -> str:
    return "—" if any(v is None for v in values) else mean_std(values, scale=scale, digits=digits)


def _deltas(values: list[float], digits: int) -> str:
    return f"{mean(values):+.{digits}f} (" + ", ".join(f"{v:+.{digits}f}" for v in values) + ")"


def markdown(results: dict) -> str:
    """The results block: caption (command, budget, temperature, rule), the headline table, the per-target
    table and the verdicts, all from the seeds."""
    cfg = results["config"]
    groups = _groups(results)
    temperatures = sorted({(r["method"].split("-")[0], r["temperature"]) for r in results["runs"]})
    tau = ", ".join(f"{'SimCLR' if m == 'simclr' else 'ArCL'} {t:g}" for m, t in temperatures)
    seconds = sum(r["train_time_s"] for r in results["runs"])
    head = ["model", "source", "target avg", "target worst", "refit avg", "refit worst",
            "worst-pair dist. (repr.)", "(proj.)", "between images (repr.)", "(proj.)", "final loss"]
    rows = []
    for label, rs in groups.items():
        s = [summarise(r) for r in rs]
        rows.append([label, *(_cell([x[k] for x in s]) for k in ("source", "average", "worst", "refit_average",
                                                                  "refit_worst")),
                     *(_cell([x[k] for x in s], scale=1, digits=3)
                       for k in ("distance", "projection_distance", "between", "projection_between",
                                 "final_loss"))])
    main = markdown_table(head, rows)
    names = list(cfg["targets"])
    per_target = markdown_table(["model", *names], [
        [label, *(_cell([r["transfer"][n] for r in rs]) for n in names)] for label, rs in groups.items()])
    verdicts = markdown_table(
        ["ArCL vs SimCLR", "target worst, pts (per seed)", "verdict", "target avg, pts (per seed)", "verdict",
         "worst-pair dist. (repr.)", "mechanism"],
        [[f"m = {c['views']}", _deltas(c["worst"], 1), c["worst_verdict"], _deltas(c["average"], 1),
          c["average_verdict"], _deltas(c["distance"], 3), c["distance_verdict"]] for c in comparisons(results)],
        "lrlrlrl")
    targets = "; ".join(f"*{n}*: {what}" for n, what in cfg["targets"].items())
    n_seeds = len(cfg["seeds"])
    chosen = "each method's default" if cfg["temperature"] is None else "given by --temperature"
    return (f"`{results['command']}` — {n_seeds} seed{'s' * (n_seeds > 1)}, mean ± std. Budget: {cfg['epochs']} "
            f"epoch{'s' * (cfg['epochs'] > 1)}, "
            f"batch {cfg['batch_size']}, encoder `{cfg['encoder']}`, `shapes` {cfg['size']}×{cfg['size']} px, "
            f"{cfg['n_train']} training and {cfg['n_test']} test images of the source domain "
            f"({cfg['data']}); {seconds / 60:.0f} CPU-minutes of training on {cfg['threads']} thread(s) "
            f"({results['total_seconds'] / 60:.0f} in all). Temperature: {chosen} ({tau}). Both "
            f"methods train with the `{cfg['augment']}` augmentation (crop, flip, jitter, then "
            f"{', '.join(cfg['shift_ops'])}, each with a probability at a random strength); each target applies "
            f"one fixed setting to every source image: {targets}. *Source*/*target*: a linear probe fit on the "
            f"source's training features, tested on each domain (not refit, the paper's setting); *refit*: a "
            f"probe fit and tested on each target. *Worst-pair dist.*: E_x max_(a,b) ‖ĥ(ax) − ĥ(bx)‖² over "
            f"m = {cfg['metric_views']} views from the training family of each test image, ĥ the normalised "
            f"representation (repr.) or projection (proj.), the same views for every model; *between images*: the same "
            f"distance between two test images' views (its scale). *Final loss*: the last logged training loss; "
            f"NT-Xent is ln(2·batch − 1) = {math.log(2 * cfg['batch_size'] - 1):.3f} when every projection is the "
            f"same (a collapsed projection). Accuracies in %.\n\n"
            f"{main}\n\nTransfer accuracy per target (probe fit on the source):\n\n{per_target}\n\n"
            f"Verdicts, paired by seed: {VERDICT_RULE}; bar {NOISE_PTS:g} points ({BAR_SOURCE}); *identical* when "
            f"every seed's change is 0. The mechanism: the worst-pair distance *lower* (or *higher*) when the same "
            f"paired test rejects at 0.05, else *mixed*.\n\n{verdicts}\n\n"
            f"Plot: [docs/results/transfer.png](results/transfer.png).")


def plot(results: dict, path: Path) -> None:
    """Target average and worst accuracy, the worst-pair distance, and accuracy per target, per model
    (mean over seeds, error bars one std)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(results)
    labels = list(groups)
    names = list(results["config"]["targets"])

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    xs = range(len(labels))
    for i, (key, title) in enumerate((("source", "source"), ("average", "target avg"), ("worst", "target worst"))):
        m, s = zip(*(mean_and_std([100 * summarise(r)[key] for r in groups[lb]]) for lb in labels))
        axes[0].errorbar([x + 0.2 * (i - 1) for x in xs], m, yerr=s, fmt="o", capsize=3, label=title)
    axes[0].set(title="Linear probe fit on the source", ylabel="accuracy (%)")
    runs_only = [lb for lb in labels if groups[lb][0]["worst_pair"]["projection"] is not None]
    for i, (key, title) in enumerate((("distance", "representation"), ("projection_distance", "projection"))):
        m, s = zip(*(mean_and_std([summarise(r)[key] for r in groups[lb]]) for lb in runs_only))
        axes[1].errorbar([x + 0.15 * (2 * i - 1) for x in range(len(runs_only))], m, yerr=s, fmt="o", capsize=3,
                         label=title)
    axes[1].set(title=f"Held-out worst-pair distance (m = {results['config']['metric_views']})",
                ylabel="E max ‖ĥ(ax) − ĥ(bx)‖²")
    axes[1].set_xticks(range(len(runs_only)), runs_only, rotation=20)
    width = 0.8 / len(labels)
    for i, lb in enumerate(labels):
        m, s = zip(*(mean_and_std([100 * r["transfer"][n] for r in groups[lb]]) for n in names))
        axes[2].bar([j + width * (i - (len(labels) - 1) / 2) for j in range(len(names))], m, width, yerr=s,
                    capsize=2, label=lb)
    axes[2].set(title="Transfer accuracy per target (probe fit on the source)", ylabel="accuracy (%)")
    axes[2].set_xticks(range(len(names)), names, rotation=15)
    axes[0].set_xticks(list(xs), labels, rotation=20)
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def main_from_args(args: argparse.Namespace) -> dict:
    """Run the study, write the results JSON (refused if it exists, unless ``--overwrite``) and print the tables."""
    results_out = results_path(args.out, args.results_out, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.data, views=args.views, seeds=args.seeds, epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, temperature=args.temperature, encoder=args.encoder, metric_views=args.metric_views,
                  device=args.device, backend=args.backend, out=args.out, overwrite=args.overwrite)
    write_results(results_out, results)
    print("\n" + markdown(results) + f"\n\nwrote {results_out} and one run folder per model and seed in {args.out}")
    return results
