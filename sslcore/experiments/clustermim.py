"""Tokenizers for ClusterMIM: TCAS/NMI tables, and the study "does a better (lower) TCAS give a
better ClusterMIM encoder, and does ClusterMIM beat MAE at equal epochs?" (METHODS.md §4).

``sslcore tcas --tokenizer pixel,random --data digits`` fits each tokenizer on the training
images and scores it on the held-out ones.  ``sslcore mim-study`` trains MAE, then ClusterMIM
with pixel k-means, feature k-means (on the patch tokens of the MAE encoder just trained: a
stand-in for the paper's DINO features, which cannot be downloaded here) and the random control,
all with the same epochs, and prints tokenizer, K, TCAS, NMI and linear-probe accuracy.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..data import data_spec_arg, load_dataset
from ..data.pipeline import to_float
from ..metrics import tcas, tcas_class_blind, token_class_nmi
from ..methods.clustermim import TOKENIZER_HELP, build_tokenizer  # noqa: F401 - TOKENIZER_HELP for the CLI
from ..methods.mae import MaskedImageModel
from ..train import PretrainConfig, pretrain


def _patch_size(data, patch_size: int | None) -> int:
    """The patch size ClusterMIM's encoder uses on ``data`` (checked to divide the images)."""
    return MaskedImageModel.encoder_spec(data, "smallcnn", patch_size)[1]["patch_size"]


def score_tokenizer(tok, data, *, batch_size: int = 512) -> dict:
    """TCAS, the class-blind tokenizer's TCAS at the same K and N, and NMI(token, class) of ``tok`` on
    ``data``'s held-out images."""
    tokens = torch.cat([tok.encode(to_float(x)) for x in data.x_test.split(batch_size)]).cpu()
    n_classes = int(data.y_train.max()) + 1
    return {"tcas": tcas(tokens, data.y_test, tok.n_clusters, n_classes),
            "tcas_blind": tcas_class_blind(tokens, data.y_test, tok.n_clusters, n_classes),
            "nmi": token_class_nmi(tokens, data.y_test)}


def tcas_table(specs: list[str], data_spec: str, n_clusters: list[int | None], *, patch_size: int | None = None,
               seed: int = 0) -> list[dict]:
    """One row per (tokenizer, K): fitted on the training images, scored on the held-out ones."""
    data = load_dataset(data_spec)
    p = _patch_size(data, patch_size)
    rows = []
    for spec in specs:
        for k in n_clusters:
            tok = build_tokenizer(spec, data, n_clusters=k, patch_size=p, seed=seed)
            rows.append({"tokenizer": spec, "K": tok.n_clusters, **score_tokenizer(tok, data)})
    return rows


COLUMNS = (("K", "K", "{}"), ("tcas", "TCAS (lower=better)", "{:.3f}"), ("tcas_blind", "class-blind TCAS", "{:.3f}"),
           ("nmi", "NMI", "{:.3f}"),
           ("clustermim_linear", "ClusterMIM probe", "{:.2%}"), ("clustermim_knn", "ClusterMIM k-NN", "{:.2%}"),
           ("mae_linear", "MAE probe", "{:.2%}"))


def format_table(rows: list[dict]) -> str:
    """Rows as a text table; columns no row has are left out, missing cells stay blank."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    width = max(len("tokenizer"), *(len(r["tokenizer"]) for r in rows)) + 2
    widths = [max(len(head), 7) + 2 for _, head, _ in cols]
    lines = [f"{'tokenizer':<{width}}" + "".join(f"{head:>{w}}" for (_, head, _), w in zip(cols, widths))]
    for r in rows:
        cells = ["" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in cols]
        lines.append(f"{r['tokenizer']:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def study(*, data: str = "digits", epochs: int = 100, batch_size: int = 128, lr: float = 2e-3,
          pixel_k: tuple[int, ...] = (16, 50), feature_k: tuple[int, ...] = (50, 200), seed: int = 0,
          out: str = "runs/mim-study", overwrite: bool = False) -> dict:
    """Train MAE, then ClusterMIM per tokenizer with the same budget; rows of the study table
    (``overwrite``: replace the runs already in ``out``)."""
    t0, out_dir = time.perf_counter(), Path(out)
    common = dict(data=data, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=0.05, seed=seed,
                  warmup_epochs=max(1, epochs // 10), overwrite=overwrite)
    mae = pretrain(PretrainConfig(method="mae", out=str(out_dir / "mae"), baselines=True, **common))
    dataset = load_dataset(data)
    p = _patch_size(dataset, None)
    specs = [("pixel", k) for k in pixel_k] + [(f"feature:{out_dir / 'mae' / 'checkpoint.pt'}", k) for k in feature_k]
    specs.append(("random", pixel_k[-1]))
    rows = []
    for spec, k in specs:
        label = "feature (MAE encoder)" if spec.startswith("feature:") else spec
        tok = build_tokenizer(spec, dataset, n_clusters=k, patch_size=p, seed=seed)
        name = f"clustermim-{label.split()[0]}-{k}"
        tok_path = out_dir / f"{name}.tokenizer.pt"  # beside the run folder: that holds only the run's files
        tok.save(tok_path)  # fitted once: scored here, loaded by the run
        run = pretrain(PretrainConfig(method="clustermim", out=str(out_dir / name),
                                      options={"tokenizer": str(tok_path)}, **common))
        rows.append({"tokenizer": label, "K": k, **score_tokenizer(tok, dataset),
                     "clustermim_linear": run["probes"]["trained"]["linear"],
                     "clustermim_knn": run["probes"]["trained"]["knn"]})
    rows.append({"tokenizer": "MAE (pixel regression)", "K": None, "tcas": None, "nmi": None,
                 "mae_linear": mae["probes"]["trained"]["linear"]})
    result = {"rows": rows, "epochs": epochs, "data": data, "random_init_linear": mae["probes"]["random_init"]["linear"],
              "raw_pixels_linear": mae["probes"]["raw_pixels"]["linear"], "seconds": round(time.perf_counter() - t0, 1)}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _ks(text: str) -> list[int]:
    try:
        ks = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"cluster counts must be >= 1, got {text!r}")
    return ks


def add_tcas_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default="pixel,random",
                   help=f"comma-separated tokenizers, each {TOKENIZER_HELP} (default: %(default)s)")
    p.add_argument("--data", type=data_spec_arg, default="digits", help="image dataset (default: %(default)s)")
    p.add_argument("--n-clusters", type=_ks, default=None, help="comma-separated K values (default: per tokenizer)")
    p.add_argument("--patch-size", type=int, help="patch size (default: 2 for 8x8 images, 4 up to 64x64, else 16)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default: %(default)s)")


def tcas_from_args(args: argparse.Namespace) -> list[dict]:
    rows = tcas_table(args.tokenizer.split(","), args.data, args.n_clusters or [None], patch_size=args.patch_size,
                      seed=args.seed)
    print(f"tokenizers on {args.data} (fitted on the training images, scored on the held-out ones):")
    print(format_table(rows))
    return rows


def add_tokenize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default="pixel", help=f"{TOKENIZER_HELP} (default: %(default)s)")
    p.add_argument("--data", type=data_spec_arg, default="digits", help="image dataset to fit on (default: %(default)s)")
    p.add_argument("--n-clusters", type=int, help="K (default: 50 pixel, 1000 feature)")
    p.add_argument("--patch-size", type=int, help="patch size (default: 2 for 8x8 images, 4 up to 64x64, else 16)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default: %(default)s)")
    p.add_argument("--out", required=True, help="the tokenizer file to write (for --tokenizer FILE / -o tokenizer=FILE)")


def tokenize_from_args(args: argparse.Namespace) -> dict:
    """Fit a tokenizer on the training images, save it, and print its TCAS/NMI on the held-out ones."""
    data = load_dataset(args.data)
    p = _patch_size(data, args.patch_size)
    tok = build_tokenizer(args.tokenizer, data, n_clusters=args.n_clusters, patch_size=p, seed=args.seed)
    tok.save(args.out)
    row = {"tokenizer": args.tokenizer, "K": tok.n_clusters, **score_tokenizer(tok, data)}
    print(format_table([row]))
    print(f"wrote {args.out}")
    return row


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    d = " (default: %(default)s)"
    p.add_argument("--data", type=data_spec_arg, default="digits", help="image dataset" + d)
    p.add_argument("--epochs", type=int, default=100, help="epochs for MAE and for every ClusterMIM run" + d)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 epochs, one K per tokenizer")
    p.add_argument("--seed", type=int, default=0, help=d.strip())
    p.add_argument("--out", default="runs/mim-study", help="output folder" + d)
    p.add_argument("--overwrite", action="store_true", help="replace the runs already in OUT")


def study_from_args(args: argparse.Namespace) -> dict:
    extra = dict(epochs=2, pixel_k=(16,), feature_k=(16,)) if args.quick else dict(epochs=args.epochs)
    result = study(data=args.data, seed=args.seed, out=args.out, overwrite=args.overwrite, **extra)
    print(f"\nClusterMIM vs MAE on {result['data']}, {result['epochs']} epochs each "
          f"(TCAS/NMI on held-out images; probes: held-out accuracy of frozen mean-pooled features):")
    print(format_table(result["rows"]))
    print(f"random-init ViT probe {result['random_init_linear']:.2%}, raw pixels {result['raw_pixels_linear']:.2%}; "
          f"{result['seconds']:.0f}s; wrote {args.out}/results.json")
    return result
