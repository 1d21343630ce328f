"""ContraNorm against oversmoothing: accuracy and representation collapse against depth.

(a) timm ViTs (2x2 patches of the 8x8 digits, width 64) of depth 6/12/24, LayerNorm vs ContraNorm
    in every norm slot, trained supervised for a few epochs;
(b) GCNs of depth 2..64 on a seeded stochastic-block-model graph: plain (conv -> ReLU),
    LayerNorm (conv -> LN -> ReLU) and ContraNorm (conv -> ContraNorm -> ReLU), ContraNorm in the
    authors' GNN form LN((1+s)H - sPH), eps 1e-5; s = 1 is s' = s/(1+s) = 0.5 in the plain form
    LN(H - s'PH) of the ViTs and of earlier runs of this study (docs/methods.md).

For each model: test accuracy and, per layer, the effective rank ``exp(entropy(sigma / sum sigma))``
and the mean pairwise cosine similarity of the tokens (per image, averaged) or of the nodes.
Collapse = cosine -> 1 and rank -> 1.  The tables print the numbers as they come out: accuracy as
mean +- std over 3 model seeds (the GCNs on one graph, from ``--seed``), rank and cosine as means.

    sslcore oversmoothing [--quick] [--out runs/oversmoothing] [--results-out FILE] [--overwrite]
    sslcore oversmoothing --tables docs/results/oversmoothing.json   # re-render a committed run
"""
from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from ..data import digits
from ..data.sbm import stochastic_block_model
from ..layers import ContraNorm
from ..metrics import LayerStats
from ..models.gcn import GCN
from ..train.loop import lr_at
from .report import (
    VERDICT_RULE,
    Progress,
    claim,
    markdown_table,
    mean,
    mean_and_std,
    mean_std,
    read_results,
    results_path,
    save_figure,
    seed_verdict,
    write_results,
)

FULL = dict(vit_depths=(6, 12, 24), vit_epochs=8, vit_seeds=3, gcn_depths=(2, 4, 8, 16, 32, 64), gcn_epochs=200,
            gcn_seeds=3)
QUICK = dict(vit_depths=(2, 6), vit_epochs=1, vit_seeds=1, gcn_depths=(2, 8, 16), gcn_epochs=40, gcn_seeds=1)
VIT = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, num_heads=4, mlp_ratio=2.0)
LABELS = {"none": "plain (conv -> ReLU)", "layernorm": "LayerNorm", "pairnorm": "PairNorm", "contranorm": "ContraNorm"}
GCN_NORMS = ("none", "layernorm", "pairnorm", "contranorm")  # PairNorm: the paper's GNN baseline (s = 1)
GRAPH = dict(num_blocks=5, block_size=100, p_in=0.05, p_out=0.01, num_features=16, signal=0.5)


def train_vit(depth: int, scale: float | None, *, epochs: int, seed: int, backend: str, batch_size: int = 32,
              lr: float = 2e-3) -> dict:
    """A timm ViT on standardised digits (``scale=None``: timm's LayerNorm; else ContraNorm(scale));
    AdamW, one epoch of warm-up, then cosine."""
    x_train, y_train, x_test, y_test = digits.load()
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    torch.manual_seed(seed)
    norm = {} if scale is None else {"norm_layer": partial(ContraNorm, scale=scale, backend=backend)}
    model = timm.create_model("vit_tiny_patch16_224", depth=depth, **VIT, **norm)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = -(-len(y_train) // batch_size)
    total, step = epochs * steps_per_epoch, 0
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y_train), generator=gen).split(batch_size):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, steps_per_epoch, lr)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    with torch.no_grad(), LayerStats(model, [f"blocks.{i}" for i in range(depth)]) as stats:
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return {"accuracy": accuracy, "final_loss": loss.item(), "layers": stats.layers}


def train_gcn(graph, depth: int, norm: str, *, scale: float, epochs: int, seed: int, backend: str,
              hidden: int = 32, lr: float = 0.01) -> dict:
    """Full-batch GCN node classification (Adam, weight decay 5e-4) on ``graph``'s fixed split."""
    torch.manual_seed(seed)
    model = GCN(graph.x.shape[1], graph.num_classes, hidden=hidden, depth=depth, norm=norm,
                contranorm_scale=scale, backend=backend)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=5e-4)
    model.train()
    for _ in range(epochs):
        logits = model(graph.x, graph.edge_index)
        loss = F.cross_entropy(logits[graph.train_mask], graph.y[graph.train_mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad(), LayerStats(model, [f"blocks.{i}" for i in range(depth - 1)]) as stats:
        pred = model(graph.x, graph.edge_index).argmax(1)
    accuracy = (pred[graph.test_mask] == graph.y[graph.test_mask]).float().mean().item()
    return {"accuracy": accuracy, "final_loss": loss.item(), "layers": stats.layers}


def run(*, quick: bool = False, seed: int = 0, vit_scale: float = 0.1, gcn_scale: float = 1.0,
        backend: str = "torch", vit_seeds: int | None = None, gcn_seeds: int | None = None, log=print) -> dict:
    """Train every model of the study (model seeds ``seed, seed + 1, ...``; the graph from ``seed``);
    returns one record per trained model (also what the JSON holds).  ``vit_scale``: s in
    ``LN(H - sPH)``; ``gcn_scale``: s in ``LN((1+s)H - sPH)`` (the authors' conventions for each);
    ``vit_seeds``/``gcn_seeds``: model seeds per ViT/GCN (None: 3, --quick 1)."""
    counts = {k: v for k, v in (("vit_seeds", vit_seeds), ("gcn_seeds", gcn_seeds)) if v is not None}
    cfg = {**(QUICK if quick else FULL), **counts, "quick": quick, "seed": seed, "vit_scale": vit_scale,
           "gcn_scale": gcn_scale, "backend": backend, "vit": VIT, "graph": GRAPH}
    results = {"config": cfg, "vit": [], "gcn": []}
    start = time.perf_counter()

    progress = Progress("oversmoothing", 2 * len(cfg["vit_depths"]) * cfg["vit_seeds"]
                        + len(GCN_NORMS) * len(cfg["gcn_depths"]) * cfg["gcn_seeds"])

    def record(key, depth, norm, s, train):
        progress(f"{key} depth {depth} {norm}, seed {s}")
        t = time.perf_counter()
        r = train()
        results[key].append({"depth": depth, "norm": norm, "seed": s, **r, "seconds": time.perf_counter() - t})
        log(f"  {key.upper():<3} depth {depth:>2} {norm:<10} seed {s}  acc {r['accuracy']:.3f}  "
            f"({time.perf_counter() - t:.0f}s)")

    for depth in cfg["vit_depths"]:
        for s in range(seed, seed + cfg["vit_seeds"]):
            for norm, scale in (("layernorm", None), ("contranorm", vit_scale)):
                record("vit", depth, norm, s, partial(train_vit, depth, scale, epochs=cfg["vit_epochs"], seed=s,
                                                      backend=backend))
    graph = stochastic_block_model(**GRAPH, seed=seed)
    for depth in cfg["gcn_depths"]:
        for s in range(seed, seed + cfg["gcn_seeds"]):
            for norm in GCN_NORMS:
                record("gcn", depth, norm, s, partial(train_gcn, graph, depth, norm, scale=gcn_scale,
                                                      epochs=cfg["gcn_epochs"], seed=s, backend=backend))
    results["total_seconds"] = time.perf_counter() - start
    return results


def aggregate(runs: list[dict]) -> dict[tuple[int, str], dict]:
    """``(depth, norm) ->`` accuracy per seed, and the seed-mean of accuracy and of each layer's metrics."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["depth"], r["norm"]), []).append(r)
    return {key: {"accuracies": [r["accuracy"] for r in rs], "accuracy": mean(r["accuracy"] for r in rs),
                  "layers": [{m: mean(r["layers"][i][m] for r in rs) for m in ("effective_rank", "mean_cosine")}
                             for i in range(len(rs[0]["layers"]))]}
            for key, rs in groups.items()}


NOISE_PTS = 2.0  # about one binomial standard error at 80% accuracy on ~400 test points
# the bar of "helps" per model: the paper's reported effect where it gives one (24-layer DeiT on ImageNet-100,
# 76.76 -> 81.28), else the noise bar (its GCN numbers are not in our sources: docs/methods.md)
BARS = {"vit": (4.52, "ContraNorm: 24-layer DeiT, ImageNet-100 76.76 → 81.28"),
        "gcn": (NOISE_PTS, "no GCN effect in our sources: noise bar")}


def _mean_std(accuracies: list[float]) -> str:
    """``mean +- std`` in percent over seeds (sample std; none for one seed)."""
    m, s = mean_and_std(accuracies)
    return f"{100 * m:5.1f}%" if len(accuracies) < 2 else f"{100 * m:5.1f}+-{100 * s:3.1f}%"


def _verdict(by: dict, depth: int, norms: tuple[str, ...], bar: float = NOISE_PTS) -> tuple[float, list[float], str]:
    """ContraNorm's accuracy change (points) against the best other norm of the same seed at ``depth``:
    the seed mean, each seed's, and the verdict by the paired rule (:func:`~.report.seed_verdict`) against
    ``bar`` -- "helps" / "hurts", else "unclear"."""
    others = zip(*(by[depth, n]["accuracies"] for n in norms if n != "contranorm"))
    deltas = [100 * (c - max(o)) for c, o in zip(by[depth, "contranorm"]["accuracies"], others)]
    return mean(deltas), deltas, seed_verdict(deltas, bar, ("helps", "hurts", "unclear"))


def gcn_norms(results: dict) -> tuple[str, ...]:
    """The GCN norms a results file trained, in :data:`GCN_NORMS` order (files before PairNorm have three)."""
    return tuple(n for n in GCN_NORMS if any(r["norm"] == n for r in results["gcn"]))


def claims(results: dict) -> list[dict]:
    """ContraNorm's claim (deep models keep their accuracy with it) for the README's summary: the deepest ViT,
    and every GCN from depth 8 (where the plain GCN collapses), against the best other norm of the same seed."""
    out = []
    for key, norms, name in (("vit", ("layernorm", "contranorm"), "ViT"),
                             ("gcn", gcn_norms(results), "GCN")):
        by = aggregate(results[key])
        depths = sorted({d for d, _ in by})
        bar, source = BARS[key]
        for depth in ([depths[-1]] if key == "vit" else [d for d in depths if d >= 8]):
            deltas = _verdict(by, depth, norms, bar)[1]
            out.append(claim(f"ContraNorm helps a deep {name} (depth {depth}, vs the best other norm)",
                             "oversmoothing", deltas, bar, source, "pts"))
    return out


def _table(runs: list[dict], norms: tuple[str, ...], labels: dict[str, str]) -> str:
    """One line per depth: seed-mean accuracy, last layer's effective rank and cosine per norm, and
    ContraNorm's accuracy change against the best other norm of the same seed (:func:`_verdict`)."""
    by = aggregate(runs)
    head = "depth | " + " | ".join(f"{labels[n]}: acc (mean+-std)  erank  cos" for n in norms) + \
        " | ContraNorm vs best other"
    lines = [head, "-" * len(head)]
    for depth in sorted({d for d, _ in by}):
        cells = []
        for n in norms:
            r, last = by[depth, n], by[depth, n]["layers"][-1]
            cells.append(f"{' ' * (len(labels[n]) - 4)}{_mean_std(r['accuracies'])} {last['effective_rank']:6.2f} "
                         f"{last['mean_cosine']:5.2f}")
        delta, deltas, verdict = _verdict(by, depth, norms)
        seeds = f"better in {sum(d > 0 for d in deltas)}/{len(deltas)} seeds, " if len(deltas) > 1 else ""
        lines.append(f"{depth:>5} | " + " | ".join(cells) + f" | {delta:+5.1f} pts ({seeds}{verdict})")
    return "\n".join(lines)


def _markdown_table(runs: list[dict], norms: tuple[str, ...], labels: dict[str, str], bar: float) -> str:
    by = aggregate(runs)
    rows = []
    for depth in sorted({d for d, _ in by}):
        delta, deltas, verdict = _verdict(by, depth, norms, bar)
        rows.append([str(depth), *(f"{mean_std(by[depth, n]['accuracies'], scale=100)} · "
                                   f"{by[depth, n]['layers'][-1]['mean_cosine']:.2f}" for n in norms),
                     f"{delta:+.1f} (better in {sum(d > 0 for d in deltas)}/{len(deltas)} seeds)", verdict])
    return markdown_table(["depth", *(labels[n] for n in norms), "ContraNorm − best other, pts", "verdict"], rows,
                          "r" * (len(norms) + 2) + "l")


def markdown(results: dict) -> str:
    """The results block: the command, the budgets, and per depth the test accuracy (mean ± std over seeds,
    %) and the last layer's mean pairwise cosine (→ 1 is collapse) of each norm, with the verdict."""
    cfg = results["config"]
    g = cfg["graph"]
    vit = _markdown_table(results["vit"], ("layernorm", "contranorm"),
                          {"layernorm": "LayerNorm", "contranorm": f"ContraNorm (s = {cfg['vit_scale']:g})"},
                          BARS["vit"][0])
    gcn = _markdown_table(results["gcn"], gcn_norms(results),
                          {"none": "plain", "layernorm": "LayerNorm", "pairnorm": "PairNorm (s = 1)",
                           "contranorm": f"ContraNorm (s = {cfg['gcn_scale']:g})"}, BARS["gcn"][0])
    quick = cfg.get("quick", False)  # results files before the flag was recorded are full runs
    base = QUICK if quick else FULL
    counts = "".join(f" --{k.replace('_', '-')} {cfg[k]}" for k in ("vit_seeds", "gcn_seeds") if cfg[k] != base[k])
    return (f"`sslcore oversmoothing{' --quick' if quick else ''} --seed {cfg['seed']}{counts}` "
            f"({cfg['vit_seeds']} / {cfg['gcn_seeds']} model "
            "seeds). "
            f"Cells: test accuracy, mean ± std over seeds (%) · the last layer's mean pairwise cosine (→ 1: "
            f"collapse). Verdict \"helps\"/\"hurts\" (else \"unclear\"): {VERDICT_RULE}; bar: ViT "
            f"{BARS['vit'][0]:g} points ({BARS['vit'][1]}), GCN {BARS['gcn'][0]:g} ({BARS['gcn'][1]}).\n\n"
            f"ViTs on digits (2×2 patches, width {cfg['vit']['embed_dim']}, {cfg['vit_epochs']} epochs supervised), "
            f"ContraNorm `LN(H − sPH)` in every norm slot:\n\n{vit}\n\n"
            f"GCNs on a stochastic block model ({g['num_blocks']} blocks × {g['block_size']} nodes, p_in {g['p_in']}, "
            f"p_out {g['p_out']}; {cfg['gcn_epochs']} epochs), ContraNorm `LN((1+s)H − sPH)` as the authors' GNN:\n\n"
            f"{gcn}\n\nPlot: [docs/results/oversmoothing.png](results/oversmoothing.png).")


def format_tables(results: dict) -> str:
    cfg = results["config"]
    vit = _table(results["vit"], ("layernorm", "contranorm"),
                 {"layernorm": "LayerNorm", "contranorm": f"ContraNorm s={cfg['vit_scale']}"})
    gcn = _table(results["gcn"], gcn_norms(results),
                 {"none": "plain GCN", "layernorm": "LayerNorm", "pairnorm": "PairNorm s=1",
                  "contranorm": f"ContraNorm s={cfg['gcn_scale']}"})
    s = cfg["gcn_scale"]
    g = cfg["graph"]
    return (f"Means over seeds; ContraNorm \"helps\"/\"hurts\" when a paired t-test over seeds rejects at 0.05 "
            f"and the change reaches {NOISE_PTS:g} pts (its 95 % interval holds it or the mean passes it).\n\n"
            f"(a) ViT on digits (8x8, 2x2 patches, width {cfg['vit']['embed_dim']}), {cfg['vit_epochs']} epochs, "
            f"{cfg['vit_seeds']} seed(s); ContraNorm LN(H - sPH); erank/cos: tokens of the last block, "
            f"test images\n{vit}\n\n"
            f"(b) GCN on an SBM graph ({g['num_blocks']} blocks x {g['block_size']} nodes, p_in {g['p_in']}, "
            f"p_out {g['p_out']}), {cfg['gcn_epochs']} epochs, {cfg['gcn_seeds']} seed(s); ContraNorm "
            f"LN((1+s)H - sPH) as the authors' GNN (= LN(H - s'PH), s' = s/(1+s) = {s / (1 + s):.3g}); erank/cos: "
            f"nodes after the last hidden layer\n{gcn}")


def plot(results: dict, path: Path) -> None:
    """Accuracy and last-layer effective rank against depth (the seed mean as a line, every seed as a point),
    and effective rank per layer of the deepest models (seed mean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for row, (key, title) in zip(axes, (("vit", "ViT on digits"), ("gcn", "GCN on SBM"))):
        by = aggregate(results[key])
        depths = sorted({d for d, _ in by})
        for norm in dict.fromkeys(n for _, n in by):
            mine = [by[d, norm] for d in depths]
            seeds = [r for r in results[key] if r["norm"] == norm]  # every seed as a point: the spread
            for ax, value in ((row[0], lambda r: r["accuracy"]), (row[1], lambda r: r["layers"][-1]["effective_rank"])):
                line, = ax.plot(depths, [value(r) for r in mine], "o-", label=f"{LABELS[norm]} (mean)")
                ax.scatter([r["depth"] for r in seeds], [value(r) for r in seeds], s=14, alpha=0.45,
                           color=line.get_color())
            layers = mine[-1]["layers"]
            row[2].plot(range(1, len(layers) + 1), [s["effective_rank"] for s in layers], label=LABELS[norm])
        row[0].set(title=f"{title}: test accuracy", xlabel="depth", ylabel="accuracy", xscale="log", ylim=(0, 1))
        row[1].set(title=f"{title}: effective rank, last layer", xlabel="depth", ylabel="effective rank",
                   xscale="log")
        row[2].set(title=f"{title}: effective rank per layer (depth {depths[-1]})", xlabel="layer",
                   ylabel="effective rank")
        for ax in row:
            ax.legend()
            ax.grid(alpha=0.3)
        for ax in row[:2]:
            ax.set_xticks(depths, [str(d) for d in depths])
            ax.minorticks_off()
    fig.tight_layout()
    save_figure(fig, path)



def main_from_args(args: argparse.Namespace) -> dict:
    """Run the study, print the tables, write ``results.json`` and ``oversmoothing.png`` under ``args.out``
    (with ``--tables``: re-render a results file instead)."""
    if args.tables:
        path = Path(args.tables)
        results = read_results(path, "--tables")
        if not {"config", "vit", "gcn"} <= results.keys():
            raise ValueError(f"--tables {path} is not an oversmoothing results file (it has no config, vit and gcn)")
        plot(results, path.with_suffix(".png"))
        print(format_tables(results) + f"\n\nwrote {path.with_suffix('.png')}")
        return results
    path = results_path(args.out, args.results_out, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(quick=args.quick, seed=args.seed, vit_seeds=args.vit_seeds, gcn_seeds=args.gcn_seeds,
                  vit_scale=args.vit_scale, gcn_scale=args.gcn_scale,
                  backend=args.backend)
    write_results(path, results)
    figure = Path(args.out) / "oversmoothing.png"  # derived from the results (--tables re-renders it)
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot(results, figure)
    print("\n" + format_tables(results))
    print(f"\n{results['total_seconds']:.0f}s; wrote {path} and {figure}")
    return results
