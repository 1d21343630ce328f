"""Autoregressive vs masked pretraining ("Look Ahead or Look Around?", ICML 2024; design: docs/methods.md).

ar, mlm, dear and vlm pretrain the same transformer on the same token data with the same batch size,
learning rate and seeds through ``sslcore.train.pretrain``.  ``--equalise targets`` (the default) gives
every objective the supervised targets AR sees in ``--epochs E``: an objective with ``t`` targets per
sequence (``L - 1`` for ar and dear, the masked count for mlm, its expectation for vlm) trains
``round(E (L - 1) / t)`` epochs; ``--equalise epochs`` trains all for E.  Per seed and objective: the
linear-probe and k-NN accuracy of the frozen, mean-pooled features (and of the same model untrained),
and the generation loss (nats per token) of held-out continuations after prompts of 25/50/75 % of the
sequence -- chain rule for the causal models; for the masked ones the suffix masked and predicted in
one pass and left to right (the chain rule again: the verdicts' measure).  Position-aware probes read the
hidden states concatenated over positions; the no-model baselines are the token histogram and the
position-wise one-hot of the tokens.  ``--objectives`` trains a subset (e.g. ``ar,mlm`` for one claim).

    sslcore ar-vs-mlm [--seeds 0,1,2] [--epochs 20] [--objectives ar,mlm] [--results-out FILE] [--quick]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..data import load_dataset
from ..methods import create_model
from ..methods.sequence_base import PROMPTS, prompt_lengths
from ..train import PretrainConfig, pretrain
from ..train.evaluate import linear_classifier, load_encoder, probe, weighted_knn
from .arguments import AR_DATA as DATA, AR_EPOCHS as EPOCHS, EQUALISE, OBJECTIVES, QUICK_EPOCHS, QUICK_LIMIT
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

# study objective -> (method, its options): vlm-nosuffix is the suffix_prob = 0 ablation of vlm (random masks only)
VARIANTS = {"vlm-nosuffix": ("vlm", {"suffix_prob": 0.0})}
WARMUP = 0.05  # of each run's epochs, rounded
PROBE_PTS, GEN_NATS = 1.0, 0.02  # the bars: the paper's abstract gives no effect sizes, so a stated noise bar
BAR_SOURCE = "no effect size in the paper's abstract: noise bar"
# claim -> (measure, the objectives (a, b) whose difference a - b it takes): > 0 agrees with the claim.  Measures:
# linear (mean-pooled features), pos_linear (hidden states concatenated over positions), l2r (generation loss by
# the chain rule, masked models left to right: the fair one; falls back to gen, one pass, in files without it)
CLAIMS = {"MLM > AR on classification": ("linear", ("mlm", "ar")),
          "MLM > AR on classification (position-aware probe)": ("pos_linear", ("mlm", "ar")),
          "AR > MLM on generation": ("l2r", ("mlm", "ar")),
          "dear narrows AR's classification gap (dear > ar)": ("linear", ("dear", "ar")),
          "vlm narrows MLM's generation gap (vlm < mlm)": ("l2r", ("mlm", "vlm")),
          "vlm narrows it without suffix masks (vlm, suffix_prob = 0, < mlm)": ("l2r", ("mlm", "vlm-nosuffix"))}


def plan(data, epochs: int, equalise: str, *, encoder: str = "transformer-tiny", batch_size: int = 64,
         limit: int | None = None, objectives: tuple[str, ...] = OBJECTIVES) -> dict[str, dict]:
    """Per objective: its ``method`` and ``options`` (:func:`method_of`), ``causal``, supervised
    ``targets_per_sequence`` t, ``epochs`` (``round(E (L-1) / t)`` with ``equalise="targets"``, else E), optimizer
    ``steps`` and ``targets_seen`` (t x sequences x epochs); ``objectives``: a subset of :data:`OBJECTIVES`."""
    if equalise not in EQUALISE:
        raise ValueError(f"equalise must be one of {EQUALISE}, got {equalise!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not objectives or not set(objectives) <= set(OBJECTIVES) or len(set(objectives)) != len(objectives):
        raise ValueError(f"objectives must be distinct names of {', '.join(OBJECTIVES)}, got {objectives!r}")
    per_epoch = min(limit or data.n_train, data.n_train) // batch_size  # the trainer drops the last partial batch
    out = {}
    for name in (n for n in OBJECTIVES if n in objectives):
        method, options = method_of(name)
        model = create_model(method, data, encoder=encoder, **options)
        t = model.targets_per_sequence(data.seq_len)
        e = max(1, round(epochs * (data.seq_len - 1) / t)) if equalise == "targets" else epochs
        out[name] = {"method": method, "options": options, "causal": model.causal, "targets_per_sequence": t,
                     "epochs": e, "steps": e * per_epoch,
                     "targets_seen": t * e * per_epoch * batch_size}
    return out


def method_of(objective: str) -> tuple[str, dict]:
    """The method and options that train ``objective`` (a method name, or a :data:`VARIANTS` ablation)."""
    return VARIANTS.get(objective, (objective, {}))


def position_features(data, encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Position-aware features of the train and test sequences: ``encoder=None`` the position-wise one-hot of the
    tokens ``[N, L * vocab]``, else the sequence encoder's hidden states concatenated over positions ``[N, L * D]``
    (no pooling: what a probe loses to mean pooling shows beside it)."""
    def one(x: torch.Tensor) -> torch.Tensor:
        if encoder is None:
            return torch.nn.functional.one_hot(x.long(), data.vocab_size).flatten(1).float()
        with torch.no_grad():
            return torch.cat([encoder.hidden(b).flatten(1).float() for b in x.split(512)])
    return one(data.x_train), one(data.x_test)


def position_probe(data, encoder) -> dict[str, float]:
    """Held-out linear-probe and k-NN accuracy of :func:`position_features` (sslcore's torch probes)."""
    f_train, f_test = position_features(data, encoder)
    lin = linear_classifier(f_train, data.y_train, f_test, data.y_test)
    knn = weighted_knn(f_train, data.y_train, f_test, data.y_test)
    return {"linear": lin["linear_top1"], "knn": knn["knn_top1"]}


def run(*, data: str = DATA, encoder: str = "transformer-tiny", epochs: int | None = None, quick: bool = False,
        equalise: str = "targets", batch_size: int = 64, lr: float = 8e-3, seeds: tuple[int, ...] = (0, 1, 2),
        eval_samples: int = 256, left_to_right: bool = True, device: str = "auto", out: str = "runs/ar-vs-mlm",
        results_out: str = "runs/ar-vs-mlm/results.json", overwrite: bool = False,
        objectives: tuple[str, ...] = OBJECTIVES) -> dict:
    """Pretrain each objective for each seed (run folders ``out/seed<S>/<objective>``); returns the results dict
    that :func:`markdown` and :func:`plot` render (every seed's numbers, the plan, the budget and the command,
    which names ``results_out``; this function writes no results file)."""
    seeds = check_ints("--seeds", seeds)
    epochs = (QUICK_EPOCHS if quick else EPOCHS) if epochs is None else epochs
    limit = QUICK_LIMIT if quick else None
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = load_dataset(data)
    objectives = plan(tokens, epochs, equalise, encoder=encoder, batch_size=batch_size, limit=limit,
                      objectives=tuple(objectives))
    histogram, onehot = probe(tokens, None), position_probe(tokens, None)
    config = dict(data=data, encoder=encoder, epochs=epochs, equalise=equalise, batch_size=batch_size, lr=lr,
                  weight_decay=0.05, warmup=WARMUP, limit=limit, seeds=list(seeds), eval_samples=eval_samples,
                  prompts=list(PROMPTS), left_to_right=left_to_right, threads=torch.get_num_threads(), quick=quick,
                  objectives=list(objectives))
    runs = []
    progress = Progress("ar-vs-mlm", len(seeds) * len(objectives))
    for seed in seeds:
        for name, p in objectives.items():
            progress(f"{name}, seed {seed}")
            method, variant = method_of(name)
            options = {"eval_samples": eval_samples, "prompts": PROMPTS, "left_to_right": left_to_right, **variant}
            run_out = Path(out) / f"seed{seed}" / name
            s = pretrain(PretrainConfig(method=method, data=data, encoder=encoder, epochs=p["epochs"], limit=limit,
                                        batch_size=batch_size, lr=lr, weight_decay=0.05, seed=seed, device=device,
                                        warmup_epochs=round(WARMUP * p["epochs"]), baselines=True, tensorboard=False,
                                        out=str(run_out), overwrite=overwrite, options=options))
            trained, init = s["probes"]["trained"], s["probes"]["random_init"]
            model = load_encoder(run_out / "checkpoint.pt", tokens)[0]
            torch.manual_seed(seed)  # an untrained model of the same kind, for the position-aware init probe
            untrained = create_model(method, tokens, encoder=encoder, **variant).eval()
            pos, pos_init = position_probe(tokens, model.encoder), position_probe(tokens, untrained.encoder)
            runs.append({"seed": seed, "objective": name, "linear": trained["linear"], "knn": trained["knn"],
                         "init_linear": init["linear"], "init_knn": init["knn"],
                         "pos_linear": pos["linear"], "pos_knn": pos["knn"],
                         "init_pos_linear": pos_init["linear"], "init_pos_knn": pos_init["knn"],
                         "final_loss": s["final_loss"], "train_s": s["train_time_s"], "eval": s["eval"]})
    return {"study": "ar-vs-mlm", "command": command(config, results_out), "config": config,
            "data": {"name": tokens.name, "n_train": tokens.n_train, "n_test": len(tokens.y_test),
                     "seq_len": tokens.seq_len, "vocab_size": tokens.vocab_size, "mask_ratio": tokens.mask_ratio},
            "objectives": objectives, "histogram": {"linear": histogram["linear"], "knn": histogram["knn"]},
            "position_onehot": onehot,
            "runs": runs, "probe_family": "torch", "wall_seconds": round(time.perf_counter() - wall, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1)}


def command(config: dict, results_out: str) -> str:
    """The ``sslcore ar-vs-mlm`` command line that runs ``config`` (options at their default left out)."""
    parts = ["sslcore ar-vs-mlm"]
    if config["quick"]:
        parts.append("--quick")
    for flag, key, default in (("--data", "data", DATA), ("--encoder", "encoder", "transformer-tiny"),
                               ("--epochs", "epochs", QUICK_EPOCHS if config["quick"] else EPOCHS),
                               ("--equalise", "equalise", "targets"), ("--batch-size", "batch_size", 64),
                               ("--lr", "lr", 8e-3), ("--eval-samples", "eval_samples", 256)):
        if config[key] != default:
            parts.append(f"{flag} {config[key]}")
    if not config["left_to_right"]:
        parts.append("--no-left-to-right")
    if tuple(config.get("objectives", OBJECTIVES)) != OBJECTIVES:
        parts.append(f"--objectives {','.join(config['objectives'])}")
    parts += [f"--seeds {','.join(map(str, config['seeds']))}", f"--threads {config['threads']}",
              f"--results-out {results_out}"]
    return " ".join(parts)


def _labels(results: dict) -> list[str]:
    return [label for label, _ in prompt_lengths(tuple(results["config"]["prompts"]), results["data"]["seq_len"])]


def _values(results: dict, name: str, key: str) -> list[float]:
    """``key`` of ``name``'s runs in seed order; ``gen`` is the one-pass generation loss averaged over the prompts,
    ``gen@25%``/``l2r@25%`` one prompt's."""
    rows = sorted((r for r in results["runs"] if r["objective"] == name), key=lambda r: r["seed"])
    if key == "gen":
        labels = _labels(results)
        return [mean(r["eval"][f"gen_loss@{lab}"] for lab in labels) for r in rows]
    if key.startswith(("gen@", "l2r@")):
        kind, _, label = key.partition("@")
        return [r["eval"][f"gen_loss{'_l2r' if kind == 'l2r' else ''}@{label}"] for r in rows]
    return [r[key] for r in rows]


def _has_l2r(results: dict, name: str) -> bool:
    """Whether ``name``'s runs scored left-to-right generation (masked models, unless ``--no-left-to-right``)."""
    return all(any(k.startswith("gen_loss_l2r@") for k in r["eval"]) for r in results["runs"] if r["objective"] == name)


def _measure(results: dict, name: str, measure: str) -> list[float]:
    """Per seed: probe accuracy, or for ``l2r``/``gen`` the generation loss averaged over the prompts (``l2r``: the
    chain-rule loss -- AR's own, the masked models' left to right; one pass where a file has no left-to-right)."""
    if measure in ("l2r", "gen"):
        labels = _labels(results)
        kind = "l2r" if measure == "l2r" and _has_l2r(results, name) else "gen"
        per = [_values(results, name, f"{kind}@{lab}") for lab in labels]
        return [mean(v) for v in zip(*per)]
    return _values(results, name, measure)


def verdicts(results: dict) -> list[dict]:
    """Per claim the file can check (both objectives ran, the measure recorded): each seed's difference (probe points
    or nats, > 0 agrees with the claim) and the verdict by the paired rule (:func:`~.report.claim`) against the
    noise bar (PROBE_PTS / GEN_NATS)."""
    out, ran = [], set(results["objectives"])
    for text, (measure, (a, b)) in CLAIMS.items():
        if not {a, b} <= ran or (measure == "pos_linear" and "pos_linear" not in results["runs"][0]):
            continue
        gen = measure in ("l2r", "gen")
        scale, bar = (1, GEN_NATS) if gen else (100, PROBE_PTS)
        deltas = [scale * (x - y) for x, y in zip(_measure(results, a, measure), _measure(results, b, measure))]
        c = claim(text, "ar-vs-mlm", deltas, bar, BAR_SOURCE, "nats" if gen else "pts", digits=3 if gen else 1)
        c.update(measure=measure, pair=(a, b))
        out.append(c)
    return out


def markdown(results: dict) -> str:
    """The results block: caption (command, budget, target counts, rule), the probe and generation tables
    (mean ± std over seeds) and the verdicts."""
    cfg, d, plan_ = results["config"], results["data"], results["objectives"]
    seeds, labels = cfg["seeds"], _labels(results)
    budget = ", ".join(f"{n} {p['epochs']} epoch(s) × {p['targets_per_sequence']:g} targets/sequence"
                       for n, p in plan_.items())
    equal = ("equal supervised targets per run (`--equalise targets`: each trains round(E·(L−1)/t) epochs)"
             if cfg["equalise"] == "targets" else "equal epochs (`--equalise epochs`)")
    caption = (f"`{results['command']}` ({len(seeds)} seeds: {', '.join(map(str, seeds))}). "
               f"{d['name']}: {d['n_train']} train / {d['n_test']} test sequences of L = {d['seq_len']} tokens "
               f"(vocabulary {d['vocab_size']}, masked ratio {d['mask_ratio']:g}); {cfg['encoder']}, batch "
               f"{cfg['batch_size']}, AdamW lr {cfg['lr']:g}·batch/256, weight decay {cfg['weight_decay']:g}; {equal}: "
               f"{budget}. No temperature (softmax cross-entropy over the vocabulary). "
               f"{results['cpu_seconds'] / 60:.1f} CPU-minutes ({cfg['threads']} thread(s)). "
               f"Mean ± std over seeds. Probes ({probe_words(results)}): held-out accuracy (%) of the frozen "
               "mean-pooled features (pos.: the hidden states concatenated over the positions, where recorded); "
               "init: the same model untrained; vlm-nosuffix: vlm with `suffix_prob=0` (random masks only). "
               "Generation: held-out loss of the continuation (nats/token) after a "
               "prompt of the first 25/50/75 % of the tokens; masked models predict the masked suffix in one pass "
               "(gen) or left to right (l2r); train loss: the objective's own loss in its last epoch (a held-out gen "
               "far above it would mean memorising; compare within a row only).")
    pos = "pos_linear" in results["runs"][0]  # files before 2026-12-07 have the mean-pooled probes only
    keys = ("linear", "knn", "init_linear", "init_knn") + (("pos_linear", "pos_knn", "init_pos_linear",
                                                            "init_pos_knn") if pos else ())
    probe_rows = [[n, *(mean_std(_values(results, n, k), scale=100) for k in keys),
                   f"{plan_[n]['targets_seen'] / 1e3:,.0f}k"] for n in plan_]
    h = results["histogram"]
    blank = [""] * (len(keys) - 1)
    probe_rows.append(["token histogram (no model)", *(mean_std([h[k]], scale=100) for k in keys[:2]), *blank])
    if "position_onehot" in results:
        o = results["position_onehot"]
        probe_rows.append(["position-wise one-hot (no model)", "", "", "", "",
                           *(mean_std([o[k]], scale=100) for k in ("linear", "knn")), "", "", ""])
    head = ["objective", "linear", "k-NN", "init linear", "init k-NN"]
    if pos:
        head += ["pos. linear", "pos. k-NN", "init pos. linear", "init pos. k-NN"]
    probes = markdown_table([*head, "targets seen"], probe_rows)
    gen_rows = []
    for n in plan_:
        gen_rows.append([n, *(mean_std(_values(results, n, f"gen@{lab}"), digits=3) for lab in labels),
                         *((mean_std(_values(results, n, f"l2r@{lab}"), digits=3) for lab in labels)
                           if _has_l2r(results, n) else ("—",) * len(labels)),
                         mean_std(_values(results, n, "final_loss"), digits=3)])
    gen = markdown_table(["objective", *(f"gen@{lab}" for lab in labels), *(f"l2r@{lab}" for lab in labels),
                          "train loss"], gen_rows)
    what = {"linear": "linear probe (mean-pooled), pts", "pos_linear": "linear probe (position-aware), pts",
            "l2r": "chain-rule gen loss (mean over prompts), nats",
            "gen": "one-pass gen loss (mean over prompts), nats"}
    verdict_rows = [[v["claim"], f"{v['pair'][0]} − {v['pair'][1]}, {what[v['measure']]}", effect_words(v),
                     v["verdict"]] for v in verdicts(results)]
    verdict_table = markdown_table(["claim", "measure (> 0 agrees with the claim)", "effect", "verdict"],
                                   verdict_rows, "llll")
    rule = (f"Verdict: {VERDICT_RULE}; bar: {PROBE_PTS:g} probe point / {GEN_NATS:g} nats ({BAR_SOURCE}). "
            "Generation claims are judged by the chain-rule loss (l2r; AR's own), not the one-pass gen, which "
            "favours AR by construction.")
    return (f"{caption}\n\n{probes}\n\n{gen}\n\n{rule}\n\n{verdict_table}\n\n"
            "Plot: [docs/results/ar-vs-mlm.png](results/ar-vs-mlm.png).")


def plot(results: dict, path: Path) -> None:
    """Left: linear-probe and k-NN accuracy per objective (mean, std bars over seeds) with the token-histogram
    and untrained-model baselines; right: generation loss against the prompt length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, labels = list(results["objectives"]), _labels(results)

    def stats(name, key, scale=1.0):
        return mean_and_std(_values(results, name, key), scale=scale)

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = torch.arange(len(names)).tolist()
    for offset, key, label in ((-0.2, "linear", "linear probe"), (0.2, "knn", "k-NN")):
        m, s = zip(*(stats(n, key, 100) for n in names))
        left.bar([i + offset for i in x], m, 0.4, yerr=s, capsize=3, label=label)
    init = [stats(n, "init_linear", 100)[0] for n in names]
    left.scatter([i - 0.2 for i in x], init, marker="_", s=400, color="black", zorder=3, label="untrained, linear")
    left.axhline(100 * results["histogram"]["linear"], color="grey", ls="--", label="token histogram, linear")
    left.set(xticks=x, xticklabels=names, ylabel="held-out accuracy (%)", ylim=(0, 100),
             title=f"classification ({results['data']['name']})")
    left.legend(loc="lower right", fontsize=8)
    steps = [float(lab.rstrip("%")) for lab in labels]
    for n in names:
        m, s = zip(*(stats(n, f"gen@{lab}") for lab in labels))
        one_pass = "" if results["objectives"][n]["causal"] else " (one pass)"
        line = right.errorbar(steps, m, yerr=s, marker="o", capsize=3, label=n + one_pass)
        if _has_l2r(results, n):
            m, s = zip(*(stats(n, f"l2r@{lab}") for lab in labels))
            right.errorbar(steps, m, yerr=s, marker="s", ls="--", capsize=3, color=line[0].get_color(),
                           label=f"{n} (left to right)")
    right.set(xlabel="prompt (% of the sequence)", ylabel="continuation loss (nats/token)", title="generation")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)



def main_from_args(args: argparse.Namespace) -> dict:
    """Run the study, write the results JSON (refusing to replace one without ``--overwrite``), print the block."""
    path = results_path(args.out, args.results_out, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(data=args.data, encoder=args.encoder, epochs=args.epochs, quick=args.quick, equalise=args.equalise,
                  batch_size=args.batch_size, lr=args.lr, seeds=args.seeds, eval_samples=args.eval_samples,
                  left_to_right=not args.no_left_to_right, device=args.device, out=args.out, results_out=str(path),
                  overwrite=args.overwrite, objectives=args.objectives)
    write_results(path, results)
    print("\n" + markdown(results))
    print(f"\n{results['cpu_seconds']:.0f} CPU-s ({results['wall_seconds']:.0f} s); wrote {path}")
    return results
