"""``sslcore`` command line: ``pretrain`` (train + probe), ``eval`` (probe a checkpoint), the
studies (``benchmark``, ``transfer``, ``oversmoothing``, ``mim-study``, ``ar-vs-mlm``) and the
tokenizer tools (``tokenize``, ``tcas``)."""
from __future__ import annotations

import argparse
import sys

from .checks import cli_type, parse_literal
from .data import DATASETS, data_spec_arg
from .dist import is_main_process
from .experiments import ar_vs_mlm, benchmark, clustermim, oversmoothing
from .kernels import BACKENDS
from .methods import METHODS
from .train import PretrainConfig, TrainingInterrupted, evaluate_checkpoint, pretrain, resolve_device
from .train.loop import cli_domain

_DEFAULTS = PretrainConfig()


def setting(field: str):
    """argparse ``type=`` for the ``PretrainConfig`` field ``field``: its annotated domain."""
    return cli_type(cli_domain(field))


def device_arg(text: str) -> str:
    """argparse ``type=`` for ``--device``: a device this machine has (or ``auto``)."""
    try:
        resolve_device(text)
    except ValueError as e:  # argparse names the flag itself
        raise argparse.ArgumentTypeError(str(e).removeprefix("--device ")) from None
    return text


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value); the value is a Python literal (number, bool, ...) or else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, parse_literal(value)


def _options(pairs: list[tuple[str, object]]) -> dict:
    """The ``-o`` pairs as a dict; a key given twice is refused (the last would silently win)."""
    options = {}
    for key, value in pairs:
        if key in options:
            raise ValueError(f"-o {key} is given twice ({options[key]!r} and {value!r}): give it once")
        options[key] = value
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="self-supervised pretraining, then linear/k-NN probes")
    d = " (default: %(default)s)"
    p.add_argument("--method", choices=sorted(METHODS), default=_DEFAULTS.method, help="SSL method" + d)
    p.add_argument("--data", type=data_spec_arg, default=_DEFAULTS.data,
                   help=f"dataset: {', '.join(DATASETS)} (NAME:PATH or NAME:SPEC)" + d)
    p.add_argument("--encoder", "--backbone", default=_DEFAULTS.encoder,
                   help="smallcnn or a timm model name[:small][,KEY=VALUE] (small: 3x3 stem for ResNets)" + d)
    p.add_argument("--epochs", type=setting("epochs"), default=_DEFAULTS.epochs, help="training epochs" + d)
    p.add_argument("--batch-size", type=setting("batch_size"), default=_DEFAULTS.batch_size,
                   help="images per step, two views each" + d)
    p.add_argument("--lr", type=setting("lr"), default=_DEFAULTS.lr, help="peak AdamW learning rate, at most 1" + d)
    p.add_argument("--weight-decay", type=setting("weight_decay"), default=_DEFAULTS.weight_decay,
                   help="AdamW weight decay" + d)
    p.add_argument("--warmup-epochs", type=setting("warmup_epochs"), default=_DEFAULTS.warmup_epochs,
                   help="linear warm-up before the cosine decay" + d)
    p.add_argument("--temperature", type=setting("temperature"),
                   help="loss temperature (default: the method's own, e.g. simclr 0.5, moco 0.2)")
    p.add_argument("--seed", type=setting("seed"), default=_DEFAULTS.seed,
                   help="seeds init, shuffling and augmentations" + d)
    p.add_argument("--limit", type=setting("limit"), help="pretrain on the first N training images only")
    p.add_argument("--device", type=device_arg, default="auto",
                   help="auto (cuda if available), cpu, cuda, cuda:1, mps" + d)
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="the loss's kernel backend" + d)
    p.add_argument("--tokenizer", help="clustermim's targets (same as -o tokenizer=...): "
                   + clustermim.TOKENIZER_HELP)
    p.add_argument("--option", "-o", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. -o proj_dim=128 (repeatable; unknown keys list the valid ones)")
    p.add_argument("--out", help="output folder (default: runs/<method>-<data>)")
    p.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (without one: OUT/checkpoint.pt)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in OUT (its files are deleted once this run is ready to train)")

    e = sub.add_parser("eval", help="linear probe and k-NN accuracy of a pretraining checkpoint")
    e.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by pretrain")
    e.add_argument("--device", type=device_arg, default="auto", help="where to compute features (default: %(default)s)")
    e.add_argument("--data", type=data_spec_arg, help="probe on this dataset instead (transfer; default: the checkpoint's)")
    b = sub.add_parser("benchmark", help="every method on one dataset and budget: one table of probe accuracy, time")
    benchmark.add_arguments(b, transfer=False)
    tr = sub.add_parser("transfer", help="train on one shapes domain, probe the frozen encoder on the others")
    benchmark.add_arguments(tr, transfer=True)

    o = sub.add_parser("oversmoothing", help="ContraNorm vs LayerNorm with depth: ViTs on digits, GCNs on an SBM")
    oversmoothing.add_arguments(o)

    k = sub.add_parser("tokenize", help="fit an image tokenizer (k-means) and save it to one file")
    clustermim.add_tokenize_arguments(k)
    t = sub.add_parser("tcas", help="TCAS and NMI(token, class) of image tokenizers (training-free)")
    clustermim.add_tcas_arguments(t)
    m = sub.add_parser("mim-study", help="ClusterMIM per tokenizer vs MAE: TCAS, NMI and probe accuracy")
    clustermim.add_study_arguments(m)
    a = sub.add_parser("ar-vs-mlm", help="ar, mlm, dear and vlm on one budget: probe accuracy and generation loss")
    ar_vs_mlm.add_arguments(a)
    return parser


def _table(rows: list[tuple[str, dict]]) -> str:
    width = max(len("features"), *(len(name) for name, _ in rows)) + 2
    lines = [f"{'features':<{width}}{'linear probe':>12}{'k-NN':>9}"]
    lines += [f"{name:<{width}}{r['linear']:>12.2%}{r['knn']:>9.2%}" for name, r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "pretrain":
            opts = {k: v for k, v in vars(args).items() if k not in ("command", "option", "tokenizer")}
            tokenizer = [] if args.tokenizer is None else [("tokenizer", args.tokenizer)]
            opts["options"] = _options(args.option + tokenizer)
            cfg = PretrainConfig(**opts)
            s = pretrain(cfg)
            if not is_main_process():  # torchrun: rank 0 reports
                return 0
            p = s["probes"]
            loss = "" if s["final_loss"] is None else f", final loss {s['final_loss']:.4f}"
            tau = "" if s["temperature"] is None else f" at temperature {s['temperature']:g}"
            print(f"\n{s['method']} on {s['data']}: {s['epochs']} epochs{tau}{loss}, {s['total_time_s']:.1f}s on "
                  f"{s['device']}; held-out accuracy ({s['n_test']} test images):")
            enc = s["encoder_class"]
            print(_table([(f"{s['method']} ({enc})", p["trained"]), (f"random init ({enc})", p["random_init"]),
                          (s["raw_features"], p["raw_pixels"])]))
            for name, value in s["eval"].items():  # the method's own held-out metrics
                print(f"{name}: {value:.4f}")
            print(f"wrote {cfg.out}/summary.json, metrics.jsonl, checkpoint.pt")
        elif args.command in ("benchmark", "transfer"):
            benchmark.main_from_args(args, transfer=args.command == "transfer")
        elif args.command == "oversmoothing":
            oversmoothing.main_from_args(args)
        elif args.command == "tokenize":
            clustermim.tokenize_from_args(args)
        elif args.command == "tcas":
            clustermim.tcas_from_args(args)
        elif args.command == "mim-study":
            clustermim.study_from_args(args)
        elif args.command == "ar-vs-mlm":
            ar_vs_mlm.main_from_args(args)
        else:
            r = evaluate_checkpoint(args.checkpoint, device=resolve_device(args.device), data=args.data)
            print(f"{r['method']} on {r['data']} (trained on {r['trained_on']}), epoch {r['epoch']}; "
                  f"held-out accuracy ({r['n_test']} test images):")
            print(_table([(f"{r['method']} ({r['encoder']})", r)]))
    except ValueError as e:  # bad options, run folders and checkpoints (CheckpointError is a ValueError)
        parser.exit(2, f"sslcore {args.command}: error: {e}\n")
    except (FloatingPointError, OSError) as e:  # a diverged run; a full disk, a vanished file
        parser.exit(1, f"sslcore {args.command}: error: {e}\n")
    except TrainingInterrupted as e:
        hint = f"; continue with --resume {e.path}" if args.command == "pretrain" else ""
        print(f"\nsslcore {args.command}: {e}{hint}", file=sys.stderr)
        return 130
    return 0
