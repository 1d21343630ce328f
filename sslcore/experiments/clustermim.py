"""Tokenizers for ClusterMIM: TCAS/NMI tables, the study "does ClusterMIM beat MAE at equal epochs,
and how do its tokenizers compare at equal K?" and the TCAS sweep "does a lower TCAS give a better
ClusterMIM encoder at constant K?" (docs/methods.md, "ClusterMIM and TCAS").

    sslcore tcas --tokenizer pixel,random --data digits
    sslcore mim-study [--seeds 0,1,2] [--epochs 150] [--n-clusters 50] [--results-out FILE]
    sslcore tcas-sweep [--seeds 0,1,2] [--epochs 150] [--rates 0,0.333,0.667,1] [--results-out FILE]

``tcas`` fits each tokenizer on the training images and scores it on the held-out ones.
``mim-study`` trains, per seed, MAE, then ClusterMIM with pixel k-means and feature k-means (on the
patch tokens of that seed's MAE encoder: a stand-in for the paper's DINO features, which cannot be
downloaded here) at each K, and the random class-blind control; each tokenizer row has its TCAS,
the class-blind TCAS at the same K and N, NMI and the linear / k-NN probes.  ``tcas-sweep`` trains
ClusterMIM on :class:`~sslcore.tokenizers.OracleTokenizer` s at one K: (class, pixel cluster) tokens
whose class part is replaced at random with rate rho -- an alignment knob at constant K and N that
reads the labels, so a controlled experiment, not a usable tokenizer -- and gives the Spearman rank
correlation between TCAS and the probe over rho and seeds.  Every run uses MAE's recipe (crop, no
flip on digits; AdamW (0.9, 0.95); base lr 1e-3 per 256; weight decay 0.05 off norms and biases).
Both write every seed's numbers, the budget and the command to ``--results-out`` (default
``OUT/results.json``); ``sslcore report`` renders them (:func:`study_markdown`, :func:`sweep_markdown`).
"""
from __future__ import annotations

import argparse
import inspect
import math
import time
from pathlib import Path

import torch

from ..checks import Probability, check_value
from ..data import data_kind, load_dataset
from ..data.pipeline import to_float
from ..files import check_output
from ..methods.clustermim import build_tokenizer
from ..methods.mae import MAE, SMALL_VIT, MaskedImageModel
from ..metrics import tcas, tcas_class_blind, tcas_label_permuted, token_class_nmi
from ..tokenizers import OracleTokenizer, PixelTokenizer, is_tokenizer_file
from ..train import PretrainConfig, pretrain
from .arguments import DEFAULT_RATES
from .report import (
    VERDICT_RULE,
    Progress,
    check_ints,
    claim,
    effect_words,
    markdown_table,
    mean,
    mean_and_std,
    mean_std,
    probe_words,
    results_path,
    save_figure,
    write_results,
)

BATCH_SIZE, LR, WEIGHT_DECAY = 128, 1e-3, 0.05  # the authors' base lr 1e-3 per 256 and weight decay 0.05


def _load_images(spec: str):
    """The image dataset ``spec`` names; token data is refused before it is loaded."""
    if data_kind(spec) != "image":
        raise ValueError(f"--data {spec} is token data; the tokenizer studies take image data")
    return load_dataset(spec)


def _patch_size(data, patch_size: int | None) -> int:
    """The patch size ClusterMIM's encoder uses on ``data`` (checked to divide the images)."""
    return MaskedImageModel.encoder_spec(data, "smallcnn", patch_size)[1]["patch_size"]


def score_tokenizer(tok, data, *, batch_size: int = 512) -> dict:
    """TCAS, its two nulls at the same K and N -- the class-blind tokenizer's (tokens dealt to patches at random)
    and the image-label permutation's (each image keeps its tokens) -- and NMI(token, class) of ``tok`` on
    ``data``'s held-out images (a tokenizer that ``needs_index`` gets their positions in the test split)."""
    index = torch.arange(len(data.y_test))
    tokens = torch.cat([tok.encode(to_float(x), **({"index": i} if tok.needs_index else {}))
                        for x, i in zip(data.x_test.split(batch_size), index.split(batch_size))]).cpu()
    n_classes = int(data.y_train.max()) + 1
    return {"tcas": tcas(tokens, data.y_test, tok.n_clusters, n_classes),
            "tcas_blind": tcas_class_blind(tokens, data.y_test, tok.n_clusters, n_classes),
            "tcas_perm": tcas_label_permuted(tokens, data.y_test, tok.n_clusters, n_classes),
            "nmi": token_class_nmi(tokens, data.y_test)}


def tcas_table(specs: list[str], data_spec: str, n_clusters: list[int | None], *, patch_size: int | None = None,
               seed: int = 0) -> list[dict]:
    """One row per (tokenizer, K): fitted on the training images, scored on the held-out ones."""
    data = _load_images(data_spec)
    p = _patch_size(data, patch_size)
    rows = []
    for spec in specs:
        for k in n_clusters:
            tok = build_tokenizer(spec, data, n_clusters=k, patch_size=p, seed=seed)
            rows.append({"tokenizer": spec, "K": tok.n_clusters, **score_tokenizer(tok, data)})
    return rows


COLUMNS = (("K", "K", "{}"), ("tcas", "TCAS (lower=better)", "{:.3f}"), ("tcas_blind", "class-blind TCAS", "{:.3f}"),
           ("nmi", "NMI", "{:.3f}"))


def format_table(rows: list[dict]) -> str:
    """Tokenizer rows as a text table."""
    width = max(len("tokenizer"), *(len(r["tokenizer"]) for r in rows)) + 2
    widths = [max(len(head), 7) + 2 for _, head, _ in COLUMNS]
    lines = [f"{'tokenizer':<{width}}" + "".join(f"{head:>{w}}" for (_, head, _), w in zip(COLUMNS, widths))]
    for r in rows:
        cells = [fmt.format(r[key]) for key, _, fmt in COLUMNS]
        lines.append(f"{r['tokenizer']:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Training runs shared by the study and the sweep.

def _budget(data, spec: str, *, epochs: int, seeds: list[int], limit: int | None, threads: int | None) -> dict:
    """The study's config: data (``spec``), epochs, the recipe every run gets and the model (from the code's
    defaults)."""
    decoder = {k: v.default for k, v in inspect.signature(MaskedImageModel.__init__).parameters.items()
               if k.startswith(("decoder_", "mask_ratio"))}
    return {"data": spec, "n_train": min(limit or len(data.y_train), len(data.y_train)),
            "n_test": len(data.y_test), "flips": data.flips, "seeds": seeds, "epochs": epochs,
            "batch_size": BATCH_SIZE, "lr": LR,
            "weight_decay": WEIGHT_DECAY, "warmup_epochs": max(1, epochs // 10),
            "betas": list(MaskedImageModel.optimizer_defaults["betas"]),
            "encoder": {**SMALL_VIT, "patch_size": _patch_size(data, None)}, **decoder,
            "min_patch_std": inspect.signature(MAE.__init__).parameters["min_patch_std"].default,
            "limit": limit, "threads": threads}


def _train(cfg: dict, method: str, out: Path, seed: int, overwrite: bool, **options) -> dict:
    """One run with the study's budget; its probes and the recipe it really ran (from its summary)."""
    s = pretrain(PretrainConfig(method=method, data=cfg["data"], epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                                lr=cfg["lr"], weight_decay=cfg["weight_decay"], warmup_epochs=cfg["warmup_epochs"],
                                seed=seed, limit=cfg["limit"], baselines=method == "mae", tensorboard=False,
                                out=str(out), overwrite=overwrite, options=options))
    run = {"linear": s["probes"]["trained"]["linear"], "knn": s["probes"]["trained"]["knn"],
           "augment": s["augment"], "peak_lr": s["peak_lr"], "seconds": s["total_time_s"]}
    if method == "mae":
        run.update(random_init_linear=s["probes"]["random_init"]["linear"],
                   raw_pixels_linear=s["probes"]["raw_pixels"]["linear"])
    return run


def _check_outputs(out: str, results_out: str | None, overwrite: bool) -> Path:
    """The results file's path; refuse, before any work, to replace earlier runs or results without
    ``overwrite``."""
    path = results_path(out, results_out, overwrite)
    if not overwrite and Path(out).is_dir() and any(Path(out).iterdir()):
        raise ValueError(f"--out {out} holds earlier runs: give --overwrite to replace them, or another --out")
    return path


def _finish(results: dict, results_out: Path, t0: float, c0: float) -> dict:
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["cpu_seconds"] = round(time.process_time() - c0, 1)  # all of this process's threads
    write_results(results_out, results)
    return results


# ---------------------------------------------------------------------------------------------
# mim-study: ClusterMIM per tokenizer vs MAE.

def study(*, data: str = "digits", seeds: list[int] = (0, 1, 2), epochs: int = 150, ks: list[int] = (50,),
          out: str = "runs/mim-study", results_out: str | None = None, overwrite: bool = False,
          limit: int | None = None, threads: int | None = None, command: str = "", log=print) -> dict:
    """Per seed: MAE, then ClusterMIM with pixel and feature (that seed's MAE encoder) k-means at each K in
    ``ks`` and the random control at ``ks[0]``, all with one budget; every seed's rows and the budget
    are written to ``results_out`` (default ``out/results.json``)."""
    seeds, ks = list(check_ints("--seeds", seeds)), list(check_ints("--n-clusters", ks, 1))
    out_dir = Path(out)
    results_file = _check_outputs(out, results_out, overwrite)
    t0, c0 = time.perf_counter(), time.process_time()
    dataset = _load_images(data)
    p = _patch_size(dataset, None)
    cfg = {**_budget(dataset, data, epochs=epochs, seeds=seeds, limit=limit, threads=threads), "ks": ks,
           "random_k": ks[0]}
    runs = []
    progress = Progress("mim-study", len(seeds) * (2 + 2 * len(ks)))
    for seed in seeds:
        seed_dir = out_dir / f"seed{seed}"
        progress(f"mae, seed {seed}")
        mae = _train(cfg, "mae", seed_dir / "mae", seed, overwrite)
        runs.append({"seed": seed, "tokenizer": "mae", "K": None, **mae})
        log(f"seed {seed} mae: linear {mae['linear']:.2%}")
        specs = [(kind, k) for k in ks for kind in ("pixel", "feature")] + [("random", ks[0])]
        for kind, k in specs:
            spec = f"feature:{seed_dir / 'mae' / 'checkpoint.pt'}" if kind == "feature" else kind
            tok = build_tokenizer(spec, dataset, n_clusters=k, patch_size=p, seed=seed)
            name = f"clustermim-{kind}-{k}"
            tok_path = seed_dir / f"{name}.tokenizer.pt"  # beside the run folder: that holds only the run's files
            tok.save(tok_path)  # fitted once: scored here, loaded by the run
            progress(f"{name}, seed {seed}")
            run = _train(cfg, "clustermim", seed_dir / name, seed, overwrite, tokenizer=str(tok_path))
            runs.append({"seed": seed, "tokenizer": kind, "K": k, **score_tokenizer(tok, dataset), **run})
            log(f"seed {seed} {name}: TCAS {runs[-1]['tcas']:.3f} (class-blind {runs[-1]['tcas_blind']:.3f}), "
                f"linear {run['linear']:.2%}")
    results = {"study": "mim-study", "command": command, "config": cfg, "runs": runs, "probe_family": "torch"}
    return _finish(results, results_file, t0, c0)


LABELS = {"pixel": "pixel k-means", "feature": "feature k-means (MAE encoder)", "random": "random (class-blind)",
          "mae": "MAE (normalised pixels)"}


def _groups(runs: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Runs grouped by ``keys`` in first-seen order, each group sorted by seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in groups.items()}


def _pct(runs, key):
    return mean_std([r[key] for r in runs], scale=100)


def _num(runs, key):
    return mean_std([r[key] for r in runs], digits=3)


def binomial_se(accuracy: float, n: int) -> float:
    """The standard error ``sqrt(a (1 - a) / n)`` of an accuracy ``a`` measured on ``n`` test images."""
    return math.sqrt(accuracy * (1 - accuracy) / n)


BAR_SOURCE = "no linear-probe effect in our sources (fine-tuning: 82.9 → 83.8): one binomial standard error"


def study_claims(results: dict) -> list[dict]:
    """Per tokenizer (pixel, feature) and K: ClusterMIM - MAE linear probe per seed (points), paired by seed, by the
    rule of :func:`~.report.claim` against one binomial standard error of MAE's mean accuracy on the test set."""
    groups = _groups(results["runs"], "tokenizer", "K")
    mae = {r["seed"]: r["linear"] for r in groups["mae", None]}
    se = 100 * binomial_se(mean(mae.values()), results["config"]["n_test"])
    claims = []
    for k in results["config"]["ks"]:
        for kind in ("pixel", "feature"):
            deltas = [100 * (r["linear"] - mae[r["seed"]]) for r in groups[kind, k]]
            c = claim(f"ClusterMIM ({kind}, K = {k}) > MAE", "mim-study", deltas, se, BAR_SOURCE, "pts")
            claims.append({**c, "tokenizer": kind, "K": k, "se": se})
    return claims


def study_claims_summary(results: dict) -> list[dict]:
    """The mim-study's claims for the README's summary (:func:`study_claims`)."""
    return study_claims(results)


def _caption(cfg: dict, command: str, what: str, probes: str) -> str:
    enc = cfg["encoder"]
    return (f"`{command}`: {what} on {cfg['data']} ({cfg['n_train']} training / {cfg['n_test']} held-out images), "
            f"{cfg['epochs']} epochs per run, {len(cfg['seeds'])} seeds ({', '.join(map(str, cfg['seeds']))}; "
            f"each sets the init, masks, data order and k-means); ViT of {enc['depth']} blocks, width "
            f"{enc['embed_dim']}, {enc['patch_size']}×{enc['patch_size']} patches, {cfg['decoder_depth']}-block "
            f"decoder of width {cfg['decoder_dim']}, {cfg['mask_ratio']:.0%} masked; MAE's recipe: crop 20–100 % "
            f"{'with' if cfg['flips'] else 'without'} flips, AdamW ({cfg['betas'][0]}, {cfg['betas'][1]}), "
            f"batch {cfg['batch_size']}, lr "
            f"{cfg['lr']:g} × batch/256, {cfg['warmup_epochs']} warm-up epochs, weight decay {cfg['weight_decay']} "
            f"off norms and biases; MAE's patch-std floor {cfg['min_patch_std']}. No temperature: neither loss "
            f"has one. Cells: mean ± std over seeds. TCAS (lower = more class-aligned) on the "
            f"{cfg['n_test']} held-out images; class-blind TCAS: the exact expected TCAS of tokens dealt at random "
            f"with the same counts, at the same K and N (TCAS is biased low by about K/N, so compare tokenizers only "
            f"at equal K); it deals tokens to patches, so it ignores that an image's patches share its label and "
            f"can overstate alignment for tokens that cluster by image; label-permuted TCAS (where recorded): the "
            f"mean TCAS over 100 permutations of the images' labels, each image keeping its tokens. Probes: "
            f"{probes}, on frozen mean-pooled features, held-out accuracy (%).")


def _score_columns(runs: list[dict]) -> tuple[tuple[str, ...], list[str]]:
    """The tokenizer-score keys and headers a results file has: the image-label permutation null only in files
    made since 2026-12-07."""
    perm = any("tcas_perm" in r for r in runs)
    keys = ("tcas", "tcas_blind", *(("tcas_perm",) if perm else ()), "nmi")
    heads = ["TCAS", "class-blind TCAS", *(["label-permuted TCAS"] if perm else []), "NMI"]
    return keys, heads


def study_markdown(results: dict) -> str:
    """The results block: per tokenizer and K, TCAS, class-blind TCAS, NMI and the probes; MAE and the
    baselines; the verdict on "ClusterMIM (pixel) beats MAE at equal epochs" per K."""
    cfg = results["config"]
    groups = _groups(results["runs"], "tokenizer", "K")
    keys, heads = _score_columns(results["runs"])
    rows = []
    for (kind, k), rs in sorted(groups.items(), key=lambda g: (g[0][1] or 10 ** 9, list(LABELS).index(g[0][0]))):
        scored = kind != "mae"
        rows.append([LABELS[kind], "" if k is None else str(k), *(_num(rs, c) if scored else "" for c in keys),
                     _pct(rs, "linear"), _pct(rs, "knn")])
    mae = groups["mae", None]
    rows.append(["random-init ViT / raw pixels", "", *[""] * len(keys), f"{_pct(mae, 'random_init_linear')} / "
                 f"{_pct(mae, 'raw_pixels_linear')}", ""])
    table = markdown_table(["tokenizer", "K", *heads, "linear", "k-NN"], rows)
    claims = study_claims(results)
    verdicts = markdown_table(["claim", "Δ linear, points", "verdict"],
                              [[c["claim"], effect_words(c), c["verdict"]] for c in claims], "lll")
    return (_caption(cfg, results["command"], "MAE and ClusterMIM per tokenizer", probe_words(results)) +
            f" The feature tokenizer clusters the patch tokens of the same seed's MAE encoder (DINO cannot be "
            f"downloaded here).\n\n{table}\n\nThe paper's claim, at equal epochs, ClusterMIM minus MAE in the same "
            f"seed: {VERDICT_RULE}; bar: one binomial standard error of MAE's accuracy on {cfg['n_test']} images "
            f"({claims[0]['se']:.1f} points): the paper reports fine-tuning (82.9 → 83.8), no linear-probe effect "
            f"in our sources.\n\n{verdicts}\n\n"
            "Plot: [docs/results/mim-study.png](results/mim-study.png).")


def study_plot(results: dict, path: Path) -> None:
    """Linear probe per tokenizer (mean ± std over seeds), and each run's probe against its TCAS margin
    below the class-blind TCAS at the same K."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(results["runs"], "tokenizer", "K")
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    names, means, stds = [], [], []
    for (kind, k), rs in groups.items():
        names.append(kind if k is None else f"{kind}\nK={k}")
        m, s = mean_and_std([r["linear"] for r in rs], scale=100)
        means.append(m)
        stds.append(s)
    a.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue")
    a.set_xticks(range(len(names)), names)
    a.set(title="linear probe (mean ± std over seeds)", ylabel="held-out accuracy, %", ylim=(min(means) - 10, 100))
    for (kind, k), rs in groups.items():
        if kind == "mae":
            continue
        b.scatter([r["tcas_blind"] - r["tcas"] for r in rs], [100 * r["linear"] for r in rs], label=f"{kind} K={k}",
                  marker="o" if k == results["config"]["ks"][0] else "s")
    b.set(title="probe vs alignment beyond chance", xlabel="class-blind TCAS − TCAS (same K, N)",
          ylabel="linear probe, %")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# tcas-sweep: ClusterMIM on oracle tokenizers of controlled alignment at one K.

def sweep(*, data: str = "digits", seeds: list[int] = (0, 1, 2), epochs: int = 150, k: int = 50,
          rates: list[float] = DEFAULT_RATES, out: str = "runs/tcas-sweep", results_out: str | None = None,
          overwrite: bool = False, limit: int | None = None, threads: int | None = None, command: str = "",
          log=print) -> dict:
    """Per seed: a pixel k-means with ``k / C`` clusters, then per rate rho an :class:`OracleTokenizer`
    (token = class part x k/C + pixel cluster, class part replaced at random with rate rho) scored on the
    held-out images (their own random table) and ClusterMIM trained on it."""
    seeds = list(check_ints("--seeds", seeds))
    rates = [check_value("--rates", float(r), Probability) for r in rates]
    if len(set(rates)) < 2:
        raise ValueError(f"--rates needs at least two distinct rates, got {rates}")
    dataset = _load_images(data)
    n_classes = int(dataset.y_train.max()) + 1
    if isinstance(k, bool) or not isinstance(k, int) or k < n_classes or k % n_classes:
        raise ValueError(f"--n-clusters {k!r} must be a multiple of the {n_classes} classes (K = classes × pixel "
                         "clusters)")
    out_dir = Path(out)
    results_file = _check_outputs(out, results_out, overwrite)
    t0, c0 = time.perf_counter(), time.process_time()
    p = _patch_size(dataset, None)
    num_patches = math.prod(s // p for s in dataset.image_shape[1:])
    cfg = {**_budget(dataset, data, epochs=epochs, seeds=seeds, limit=limit, threads=threads), "K": k,
           "pixel_k": k // n_classes, "n_classes": n_classes, "rates": rates}
    runs = []
    progress = Progress("tcas-sweep", len(seeds) * len(rates))
    for seed in seeds:
        seed_dir = out_dir / f"seed{seed}"
        pixel = PixelTokenizer(p, k // n_classes, in_chans=dataset.in_chans, seed=seed).fit(to_float(dataset.x_train))
        for rate in rates:
            oracle = dict(num_patches=num_patches, n_classes=n_classes, rate=rate)
            train_tok = OracleTokenizer(pixel, dataset.y_train, seed=seed, **oracle)
            test_tok = OracleTokenizer(pixel, dataset.y_test, seed=seed + 2 ** 32, **oracle)  # its own table
            name = f"oracle-rate{rate:.3f}"
            tok_path = seed_dir / f"{name}.tokenizer.pt"
            seed_dir.mkdir(parents=True, exist_ok=True)
            train_tok.save(tok_path)
            progress(f"{name}, seed {seed}")
            run = _train(cfg, "clustermim", seed_dir / name, seed, overwrite, tokenizer=str(tok_path))
            runs.append({"seed": seed, "rate": rate, **score_tokenizer(test_tok, dataset), **run})
            log(f"seed {seed} rate {rate:.3f}: TCAS {runs[-1]['tcas']:.3f} (class-blind "
                f"{runs[-1]['tcas_blind']:.3f}), linear {run['linear']:.2%}")
    results = {"study": "tcas-sweep", "command": command, "config": cfg, "runs": runs, "probe_family": "torch"}
    return _finish(results, results_file, t0, c0)


def spearman(x: list[float], y: list[float]) -> tuple[float, float]:
    """Spearman's rank correlation of ``x`` and ``y`` (ties: average ranks) and its two-sided p-value
    (scipy's t approximation); nan when either is constant."""
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan, math.nan
    r = spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


def sweep_verdict(r: float, p: float, alpha: float = 0.05) -> str:
    """What the Spearman correlation of TCAS with the probe shows, at ``alpha``: the oracle's low TCAS comes from
    tokens that carry the label, so r < 0 says "alignment with the label helps", r > 0 "... hurts"."""
    if not p < alpha:
        return "not shown"
    return "alignment with the label helps" if r < 0 else "alignment with the label hurts"


def sweep_claims(results: dict) -> list[dict]:
    """"Lower TCAS, better MIM" as the oracle sweep can show it (alignment with the label helps), paired by seed:
    the linear probe at the lowest ρ (tokens most aligned with the label) minus at the highest (class-blind), by
    the rule of :func:`~.report.claim` against the noise bar (one binomial standard error of the class-blind
    runs' accuracy)."""
    groups = _groups(results["runs"], "rate")
    low, high = min(groups)[0], max(groups)[0]
    by = {rate: {r["seed"]: r["linear"] for r in rs} for (rate,), rs in groups.items()}
    seeds = sorted(set(by[low]) & set(by[high]))
    deltas = [100 * (by[low][s] - by[high][s]) for s in seeds]
    se = 100 * binomial_se(mean(by[high][s] for s in seeds), results["config"]["n_test"])
    return [claim(f"Tokens aligned with the label help MIM (oracle ρ = {low:g} vs class-blind ρ = {high:g}; "
                  "lower TCAS → better)",
                  "tcas-sweep", deltas, se, "no effect size in our sources: one binomial standard error", "pts")]


def sweep_markdown(results: dict) -> str:
    """The results block: per rate rho, TCAS, class-blind TCAS, NMI and the probes; Spearman's rank
    correlation of TCAS with each probe over every (rho, seed) run and its verdict."""
    cfg = results["config"]
    groups = _groups(results["runs"], "rate")
    keys, heads = _score_columns(results["runs"])
    rows = [[f"{rate:.2f}", *(_num(rs, c) for c in keys), _pct(rs, "linear"),
             _pct(rs, "knn")] for (rate,), rs in sorted(groups.items())]
    table = markdown_table(["ρ (class part replaced)", *heads, "linear", "k-NN"], rows)
    runs = results["runs"]
    corr = []
    for key, name in (("linear", "linear probe"), ("knn", "k-NN")):
        r, p = spearman([x["tcas"] for x in runs], [x[key] for x in runs])
        corr.append([f"TCAS vs {name}", f"{r:+.2f}", f"{p:.2g}", sweep_verdict(r, p)])
    spear = markdown_table(["over all runs", f"Spearman ρ_s (n = {len(runs)})", "p", "what it shows"], corr, "lrrl")
    paired = sweep_claims(results)[0]
    return (_caption(cfg, results["command"], f"ClusterMIM on oracle tokenizers at K = {cfg['K']}",
                     probe_words(results)) +
            f"\n\nOracle tokenizer: token = (class, pixel cluster), {cfg['n_classes']} classes × {cfg['pixel_k']} "
            f"pixel k-means clusters; each patch's class part is replaced, with probability ρ, by a class drawn "
            f"uniformly (a fixed per-patch table; ρ = 1 is class-blind). It reads the labels: a controlled "
            f"experiment on alignment at constant K and N, not a usable tokenizer.\n\n{table}\n\nSpearman rank "
            f"correlation between TCAS and the probe over every (ρ, seed) run (p < 0.05 to show anything; the runs "
            f"share seeds across ρ, so they are not independent). At low ρ the tokens carry the image's label: this "
            f"shows that alignment with the label helps, not that TCAS ranks real tokenizers.\n\n{spear}\n\n"
            f"Paired by seed, {paired['claim']}: {effect_words(paired)}; bar {paired['bar']:.1f} pts "
            f"({paired['bar_source']}): **{paired['verdict']}** (verdict: {VERDICT_RULE}).\n\n"
            f"Plot: [docs/results/tcas-sweep.png](results/tcas-sweep.png).")


def sweep_plot(results: dict, path: Path) -> None:
    """Each run's probe against its TCAS (coloured by rho), and TCAS and class-blind TCAS against rho."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, groups = results["runs"], sorted(_groups(results["runs"], "rate").items())
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, marker in (("linear", "o"), ("knn", "^")):
        sc = a.scatter([r["tcas"] for r in runs], [100 * r[key] for r in runs], c=[r["rate"] for r in runs],
                       cmap="viridis", marker=marker, label=key, vmin=0, vmax=1)
    fig.colorbar(sc, ax=a, label="ρ")
    a.set(title=f"probe vs TCAS at K = {results['config']['K']}", xlabel="TCAS (held-out)", ylabel="accuracy, %")
    a.legend()
    rates = [rate for (rate,), _ in groups]
    for key, label in (("tcas", "TCAS"), ("tcas_blind", "class-blind TCAS")):
        line, = b.plot(rates, [mean(r[key] for r in rs) for _, rs in groups], "o-", label=f"{label} (mean)")
        b.scatter([r["rate"] for r in runs], [r[key] for r in runs], s=14, alpha=0.45, color=line.get_color())
    b.set(title="alignment knob", xlabel="ρ (class part replaced)", ylabel="TCAS")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Command line.


def tcas_from_args(args: argparse.Namespace) -> list[dict]:
    rows = tcas_table(args.tokenizer.split(","), args.data, args.n_clusters or [None], patch_size=args.patch_size,
                      seed=args.seed)
    print(f"tokenizers on {args.data} (fitted on the training images, scored on the held-out ones):")
    print(format_table(rows))
    return rows


def tokenize_from_args(args: argparse.Namespace) -> dict:
    """Fit a tokenizer on the training images, save it, and print its TCAS/NMI on the held-out ones."""
    out = check_output(args.out, option="--out", overwrite=args.overwrite, owned=is_tokenizer_file, what="tokenizer")
    data = _load_images(args.data)
    p = _patch_size(data, args.patch_size)
    tok = build_tokenizer(args.tokenizer, data, n_clusters=args.n_clusters, patch_size=p, seed=args.seed)
    tok.save(out, option="--out")
    row = {"tokenizer": args.tokenizer, "K": tok.n_clusters, **score_tokenizer(tok, data)}
    print(format_table([row]))
    print(f"wrote {args.out}")
    return row


def _command(args: argparse.Namespace, name: str, extra: str) -> str:
    """The command line that gives these results (every setting spelled out)."""
    quick = " --quick" if args.quick else ""
    threads = f" --threads {args.threads}" if args.threads else ""
    results = f" --results-out {args.results_out}" if args.results_out else ""
    return (f"sslcore {name} --data {args.data} --seeds {','.join(map(str, args.seeds))} --epochs {args.epochs}"
            f"{extra}{quick}{threads}{results}")


def _run_kwargs(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = dict(epochs=1, limit=128, seeds=args.seeds[:1]) if args.quick else dict(epochs=args.epochs,
                                                                                    seeds=args.seeds)
    return dict(data=args.data, out=args.out, results_out=args.results_out, overwrite=args.overwrite,
                threads=args.threads, **quick)


def study_from_args(args: argparse.Namespace) -> dict:
    command = _command(args, "mim-study", f" --n-clusters {','.join(map(str, args.n_clusters))}")
    result = study(ks=args.n_clusters, command=command, **_run_kwargs(args))
    print("\n" + study_markdown(result))
    print(f"\n{result['seconds']:.0f}s ({result['cpu_seconds']:.0f} CPU-s)")
    return result


def sweep_from_args(args: argparse.Namespace) -> dict:
    rates = "" if args.rates == list(DEFAULT_RATES) else f" --rates {','.join(map(str, args.rates))}"
    command = _command(args, "tcas-sweep", f" --n-clusters {args.n_clusters}{rates}")
    result = sweep(k=args.n_clusters, rates=args.rates, command=command, **_run_kwargs(args))
    print("\n" + sweep_markdown(result))
    print(f"\n{result['seconds']:.0f}s ({result['cpu_seconds']:.0f} CPU-s)")
    return result
