"""Autoregressive vs masked pretraining ("Look Ahead or Look Around?", METHODS.md section 5).

Trains ar, mlm, dear and vlm with one budget (same transformer size, data, epochs, batch size,
learning rate and seed) through ``sslcore.train.pretrain`` and prints one table: the linear-probe
and k-NN accuracy of the frozen, mean-pooled features, and the generation loss (nats per token;
per byte on text) of held-out continuations given prompts of 25/50/75 % of the sequence — chain
rule for the causal models, one pass (the whole suffix masked) and left to right for the masked ones.
The paper's claims: MLM > AR on classification, AR > MLM on generation, dear and vlm narrow the gaps.

    sslcore ar-vs-mlm [--epochs N] [--quick] [--out runs/ar-vs-mlm]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..methods.sequence_base import PROMPTS
from ..train import PretrainConfig, pretrain

OBJECTIVES = ("ar", "mlm", "dear", "vlm")
DATA = "pystdlib:64:200"  # 64-byte snippets, 200 train / 50 test per class: the probes take seconds, not minutes
FULL = dict(epochs=6, limit=None)
QUICK = dict(epochs=1, limit=512)


def run(*, data: str = DATA, encoder: str = "transformer-tiny", epochs: int | None = None,
        quick: bool = False, batch_size: int = 64, lr: float = 8e-3, seed: int = 0, eval_samples: int = 256,
        left_to_right: bool = True, device: str = "auto", out: str = "runs/ar-vs-mlm",
        overwrite: bool = False) -> dict:
    """Pretrain each objective with the same settings; returns ``{"settings", "runs": {name: summary}}``
    (``overwrite``: replace the runs already in ``out``)."""
    settings = dict(QUICK if quick else FULL)
    if epochs is not None:
        settings["epochs"] = epochs
    settings.update(data=data, encoder=encoder, batch_size=batch_size, lr=lr, seed=seed, device=device,
                    warmup_epochs=min(1, settings["epochs"] - 1), weight_decay=0.05)
    t0, runs = time.perf_counter(), {}
    for name in OBJECTIVES:
        options = {"eval_samples": eval_samples, "prompts": PROMPTS, "left_to_right": left_to_right}
        runs[name] = pretrain(PretrainConfig(method=name, out=str(Path(out) / name), options=options, baselines=True,
                                             overwrite=overwrite, **settings))
    return {"settings": settings, "runs": runs, "total_seconds": round(time.perf_counter() - t0, 1)}


def format_table(results: dict) -> str:
    """One row per objective (plus the random-init and byte-histogram probe baselines)."""
    labels = [f"{round(100 * p)}%" for p in PROMPTS]
    header = (f"{'objective':<10}{'linear':>8}{'k-NN':>8}{'init lin':>9}  "
              + "".join(f"{'gen@' + lab:>9}" for lab in labels) + "  "
              + "".join(f"{'l2r@' + lab:>9}" for lab in labels) + f"{'train s':>9}")
    lines = [header]
    for name, s in results["runs"].items():
        ev, p = s["eval"], s["probes"]["trained"]
        gen = "".join(f"{ev[f'gen_loss@{lab}']:>9.3f}" for lab in labels)
        l2r = "".join(f"{ev[f'gen_loss_l2r@{lab}']:>9.3f}" if f"gen_loss_l2r@{lab}" in ev else f"{'-':>9}"
                      for lab in labels)
        init = s["probes"]["random_init"]["linear"]
        lines.append(f"{name:<10}{p['linear']:>8.1%}{p['knn']:>8.1%}{init:>9.1%}  {gen}  {l2r}"
                     f"{s['train_time_s']:>9.0f}")
    raw = next(iter(results["runs"].values()))["probes"]["raw_pixels"]
    lines.append(f"{'tokens':<10}{raw['linear']:>8.1%}{raw['knn']:>8.1%}  (histogram of the sequence's tokens, no model)")
    st = results["settings"]
    subset = "" if st["limit"] is None else f" on the first {st['limit']} snippets"
    lines.append(f"\n{st['data']}, {st['encoder']}, {st['epochs']} epochs of batch {st['batch_size']}{subset}, "
                 f"lr {st['lr']}.  linear/k-NN: probes on the held-out split (init lin: the same model untrained); "
                 "gen: continuation loss in nats/token (causal: chain rule; masked: suffix masked, one pass); "
                 "l2r: masked models left to right.")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    """argparse ``type=``: a positive integer."""
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = " (default: %(default)s)"
    p.add_argument("--epochs", type=_positive_int, help=f"epochs per objective (default: {FULL['epochs']}, "
                   f"--quick: {QUICK['epochs']})")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK['epochs']} epoch on "
                   f"{QUICK['limit']} training snippets")
    p.add_argument("--data", default=DATA, help="token data: pystdlib[:LEN[:PER_CLASS]] or text:PATH[:LEN]" + d)
    p.add_argument("--encoder", default="transformer-tiny", help="transformer-tiny | -small | -base" + d)
    p.add_argument("--batch-size", type=_positive_int, default=64, help="sequences per step" + d)
    p.add_argument("--lr", type=float, default=8e-3, help="base learning rate per 256 sequences (peak: lr x batch "
                   "/ 256)" + d)
    p.add_argument("--seed", type=int, default=0, help="seeds the inits, the batches, masks and offsets" + d)
    p.add_argument("--eval-samples", type=_positive_int, default=256, help="held-out sequences for generation" + d)
    p.add_argument("--no-left-to-right", action="store_true",
                   help="skip the masked models' left-to-right generation loss (one pass per position)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ..." + d)
    p.add_argument("--out", default="runs/ar-vs-mlm", help="folder for results.json and one run folder per objective" + d)
    p.add_argument("--overwrite", action="store_true", help="replace the runs already in OUT")


def main_from_args(args: argparse.Namespace) -> dict:
    """Run the study, print the table, write ``results.json`` under ``args.out``."""
    results = run(data=args.data, encoder=args.encoder, epochs=args.epochs, quick=args.quick,
                  batch_size=args.batch_size, lr=args.lr, seed=args.seed, eval_samples=args.eval_samples,
                  left_to_right=not args.no_left_to_right, device=args.device, out=args.out,
                  overwrite=args.overwrite)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n" + format_table(results))
    print(f"\n{results['total_seconds']:.0f}s; wrote {out / 'results.json'}")
    return results
