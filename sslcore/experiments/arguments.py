"""The command lines of the studies whose modules import torch (transfer, oversmoothing, the tokenizer studies,
ar-vs-mlm), and the defaults they show: kept here, light, so that ``sslcore STUDY --help`` and a study's usage
errors answer before torch is imported (the study's module is imported after parsing; docs/architecture.md,
Command line)."""
from __future__ import annotations

import argparse

from ..checks import BACKENDS, NonNegative, PositiveInt, Views, cli_type, suggest
from ..data import data_spec_arg, image_data_spec_arg
from ..methods import TOKENIZER_HELP
from ..train.config import DEFAULTS, device_arg, setting
from .report import ints_arg, seeds_arg

TRANSFER_DATA, TRANSFER_EPOCHS, TRANSFER_VIEWS, TRANSFER_SEEDS = "shapes:plain,size=16", 20, (2, 4, 8), (0, 1, 2)
AR_DATA = "imagetokens:digits"  # 16-token k-means grids of the digits
AR_EPOCHS, QUICK_EPOCHS, QUICK_LIMIT = 20, 1, 256
EQUALISE = ("targets", "epochs")
OBJECTIVES = ("ar", "mlm", "dear", "vlm", "vlm-nosuffix")  # ar-vs-mlm's; vlm-nosuffix: vlm with suffix_prob = 0
DEFAULT_RATES = (0.0, 1 / 3, 2 / 3, 1.0)  # tcas-sweep's rates rho
scale = cli_type(NonNegative)  # ContraNorm's s: a finite number >= 0


def transfer_arguments(p: argparse.ArgumentParser) -> None:
    d = " (default: %(default)s)"
    p.add_argument("--data", default=TRANSFER_DATA, help="the source: a shapes domain and its settings, "
                   "shapes:DOMAIN[,size=N,n=N,test=N,seed=S]" + d)
    p.add_argument("--views", type=ints_arg("--views", 2), default=TRANSFER_VIEWS,
                   help="ArCL's views per sample m, one model each (SimCLR is always trained)" + d)
    p.add_argument("--seeds", type=ints_arg("--seeds"), default=TRANSFER_SEEDS,
                   help="model seeds (init, order, views)" + d)
    p.add_argument("--epochs", type=setting("epochs"), default=TRANSFER_EPOCHS, help="training epochs per model" + d)
    p.add_argument("--batch-size", type=setting("batch_size"), default=256, help="images per step" + d)
    p.add_argument("--lr", type=setting("lr"), default=DEFAULTS["lr"], help="base learning rate per 256 "
                   "images" + d)
    p.add_argument("--temperature", type=setting("temperature"), help="loss temperature of both methods "
                   "(default: each method's own)")
    p.add_argument("--encoder", "--backbone", default="smallcnn", help="smallcnn or a timm spec" + d)
    p.add_argument("--metric-views", type=cli_type(Views), help="views per image of the worst-pair distance "
                   "(default: the largest of --views)")
    p.add_argument("--threads", type=cli_type(PositiveInt), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda, ..." + d)
    p.add_argument("--backend", default="auto", help="the losses' kernel backend" + d)
    p.add_argument("--out", default="runs/transfer", help="folder of the runs" + d)
    p.add_argument("--results-out", help="the results JSON (default: OUT/results.json), e.g. "
                   "docs/results/transfer.json")
    p.add_argument("--overwrite", action="store_true", help="replace the runs in OUT and the results file")


def oversmoothing_arguments(p: argparse.ArgumentParser) -> None:
    d = " (default: %(default)s)"
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer depths and epochs, 1 ViT epoch (seconds)")
    p.add_argument("--out", default="runs/oversmoothing", help="folder for results.json and oversmoothing.png" + d)
    p.add_argument("--results-out", help="the results JSON (default: OUT/results.json), e.g. "
                   "docs/results/oversmoothing.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    p.add_argument("--seed", type=int, default=0, help="seeds the graph, the inits and the batches" + d)
    p.add_argument("--vit-seeds", type=cli_type(PositiveInt), help="model seeds of each ViT (default: 3; --quick 1)")
    p.add_argument("--gcn-seeds", type=cli_type(PositiveInt), help="model seeds of each GCN (default: 3; --quick 1)")
    p.add_argument("--vit-scale", type=scale, default=0.1, help="ContraNorm's s in the ViTs, LN(H - sPH)" + d)
    p.add_argument("--gcn-scale", type=scale, default=1.0,
                   help="ContraNorm's s in the GCNs, LN((1+s)H - sPH) as the authors' GNN; = LN(H - s'PH) with "
                        "s' = s/(1+s), so 1.0 here is 0.5 in the plain form" + d)
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="ContraNorm op backend" + d)
    p.add_argument("--threads", type=cli_type(PositiveInt),
                   help="torch CPU threads (default: torch's choice; 1 is often fastest for these small models)")
    p.add_argument("--tables", metavar="RESULTS_JSON",
                   help="train nothing: print the tables and write the plot (beside the file) of a results.json")


def tcas_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default="pixel,random",
                   help=f"comma-separated tokenizers, each {TOKENIZER_HELP} (default: %(default)s)")
    p.add_argument("--data", type=image_data_spec_arg, default="digits", help="image dataset (default: %(default)s)")
    p.add_argument("--n-clusters", type=ints_arg("--n-clusters", 1), default=None,
                   help="comma-separated K values (default: per tokenizer)")
    p.add_argument("--patch-size", type=int, help="patch size (default: 2 for 8x8 images, 4 up to 64x64, else 16)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default: %(default)s)")


def tokenize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default="pixel", help=f"{TOKENIZER_HELP} (default: %(default)s)")
    p.add_argument("--data", type=image_data_spec_arg, default="digits",
                   help="image dataset to fit on (default: %(default)s)")
    p.add_argument("--n-clusters", type=int, help="K (default: 50 pixel, 1000 feature)")
    p.add_argument("--patch-size", type=int, help="patch size (default: 2 for 8x8 images, 4 up to 64x64, else 16)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default: %(default)s)")
    p.add_argument("--out", required=True,
                   help="the tokenizer file to write (for --tokenizer FILE / -o tokenizer=FILE)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a tokenizer sslcore wrote")


def _add_run_arguments(p: argparse.ArgumentParser, name: str) -> None:
    d = " (default: %(default)s)"
    p.add_argument("--data", type=image_data_spec_arg, default="digits", help="image dataset" + d)
    p.add_argument("--seeds", type=ints_arg("--seeds"), default=[0, 1, 2], help="comma-separated seeds" + d)
    p.add_argument("--epochs", type=cli_type(PositiveInt), default=150, help="epochs of every run" + d)
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 epoch, 128 images, one seed")
    p.add_argument("--threads", type=cli_type(PositiveInt), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=f"runs/{name}", help="folder of the runs" + d)
    p.add_argument("--results-out", help=f"the results JSON to write, e.g. docs/results/{name}.json "
                                         "(default: OUT/results.json)")
    p.add_argument("--overwrite", action="store_true", help="replace the runs in OUT and the results file")


def mim_study_arguments(p: argparse.ArgumentParser) -> None:
    _add_run_arguments(p, "mim-study")
    p.add_argument("--n-clusters", type=ints_arg("--n-clusters", 1), default=[50],
                   help="comma-separated K of the pixel and feature tokenizers; the random control uses the first "
                        "(default: 50)")


def tcas_sweep_arguments(p: argparse.ArgumentParser) -> None:
    _add_run_arguments(p, "tcas-sweep")
    p.add_argument("--n-clusters", type=cli_type(PositiveInt), default=50,
                   help="K of every oracle tokenizer, a multiple of the classes (default: %(default)s)")
    p.add_argument("--rates", type=_rates, default=list(DEFAULT_RATES),
                   help="comma-separated rates rho of replacing the class part (default: 0,1/3,2/3,1)")


def _rates(text: str) -> list[float]:
    try:
        rates = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not 0 <= r <= 1 for r in rates) or len(set(rates)) < 2:
        raise argparse.ArgumentTypeError(f"expected at least two distinct rates in [0, 1], got {text!r}")
    return rates


def objectives_arg(text: str) -> tuple[str, ...]:
    """argparse ``type=`` of ar-vs-mlm's ``--objectives``: distinct names of :data:`OBJECTIVES`, in that order."""
    names = text.split(",")
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or len(set(names)) != len(names):
        hint = suggest(unknown[0], OBJECTIVES) if unknown else ""
        raise argparse.ArgumentTypeError(f"expected distinct objectives of {','.join(OBJECTIVES)}, got {text!r}{hint}")
    return tuple(n for n in OBJECTIVES if n in names)


def ar_vs_mlm_arguments(p: argparse.ArgumentParser) -> None:
    d, positive = " (default: %(default)s)", cli_type(PositiveInt)
    p.add_argument("--objectives", type=objectives_arg, default=OBJECTIVES,
                   help="comma-separated objectives to train, e.g. ar,mlm for the classification claim alone "
                   f"(default: {','.join(OBJECTIVES)})")
    p.add_argument("--seeds", type=seeds_arg, default=(0, 1, 2), help="seeds: the inits, batches, masks and offsets "
                   "(default: 0,1,2)")
    p.add_argument("--epochs", type=positive, help=f"AR's epochs, E (default: {AR_EPOCHS}, --quick: {QUICK_EPOCHS})")
    p.add_argument("--equalise", choices=EQUALISE, default="targets",
                   help="targets: each objective trains round(E (L-1) / t) epochs, t its supervised targets per "
                        "sequence, so all see AR's number of targets; epochs: all train E epochs" + d)
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK_EPOCHS} epoch on {QUICK_LIMIT} "
                   "training sequences")
    p.add_argument("--data", type=data_spec_arg, default=AR_DATA,
                   help="token data: imagetokens:DATA, pystdlib[:LEN[:PER_CLASS]] or text:PATH[:LEN]" + d)
    p.add_argument("--encoder", default="transformer-tiny", help="transformer-tiny | -small | -base" + d)
    p.add_argument("--batch-size", type=positive, default=64, help="sequences per step" + d)
    p.add_argument("--lr", type=float, default=8e-3, help="base learning rate per 256 sequences (peak: lr x batch "
                   "/ 256)" + d)
    p.add_argument("--eval-samples", type=positive, default=256, help="held-out sequences for generation" + d)
    p.add_argument("--no-left-to-right", action="store_true",
                   help="skip the masked models' left-to-right generation loss (one pass per position)")
    p.add_argument("--threads", type=positive, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ..." + d)
    p.add_argument("--out", default="runs/ar-vs-mlm", help="folder of the run folders, OUT/seed<S>/<objective>" + d)
    p.add_argument("--results-out", help="the results JSON (default: OUT/results.json); an existing one is kept "
                   "unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the results file and the runs already in OUT")
