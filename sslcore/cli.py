"""``sslcore`` command line: ``pretrain`` (train + probe), ``eval`` (probe a checkpoint), ``export`` (the
backbone as safetensors), the studies (``benchmark``, ``transfer``, ``oversmoothing``, ``mim-study``,
``tcas-sweep``, ``ar-vs-mlm``), ``report`` (the README's study tables from the committed results) and the tokenizer
tools (``tokenize``, ``tcas``)."""
from __future__ import annotations

import argparse
import shlex
import sys

from .checks import cli_type, parse_literal
from .data import DATASETS, data_spec_arg
from .data.augment import AUGMENT_CHOICES
from .dist import is_main_process
from .experiments import ar_vs_mlm, benchmark, clustermim, oversmoothing, report, transfer
from .kernels import BACKENDS
from .methods import METHODS
from .train import PretrainConfig, TrainingInterrupted, build_config, evaluate_checkpoint, pretrain, resolve_device
from .train.config import FIELDS, cli_domain
from .train.export import export_backbone
from .train.protocols import DEFAULTS, PROTOCOLS, check_protocol_args, evaluate_protocol, results_path

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


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    """``sslcore pretrain``'s options.  None has a parser default (``SUPPRESS``): what is not given comes from
    ``--config``, the resumed checkpoint or :class:`PretrainConfig`'s defaults (shown in the help)."""
    def opt(*flags, field=None, help="", **kwargs):
        field = field or flags[0].lstrip("-").replace("-", "_")
        default = getattr(_DEFAULTS, field) if field in FIELDS else None
        shown = "" if default is None or kwargs.get("action") == "store_true" else f" (default: {default})"
        p.add_argument(*flags, default=argparse.SUPPRESS, help=help + shown, **kwargs)

    opt("--method", choices=sorted(METHODS), help="SSL method")
    opt("--data", type=data_spec_arg, help=f"dataset: {', '.join(DATASETS)} (NAME:PATH or NAME:SPEC)")
    opt("--encoder", "--backbone", help="smallcnn or a timm model name[:small][,KEY=VALUE] (small: 3x3 stem for "
        "ResNets)")
    opt("--epochs", type=setting("epochs"), help="training epochs")
    opt("--batch-size", type=setting("batch_size"), help="images per step (the global batch), two views each")
    opt("--lr", type=setting("lr"), help="base learning rate per 256 images, at most 1; the peak is lr x batch x "
        "accumulate / 256")
    opt("--weight-decay", type=setting("weight_decay"), help="weight decay (not on norms and biases)")
    opt("--weight-decay-all", action="store_true", help="weight decay on norms and biases too")
    opt("--optimizer", choices=cli_domain("optimizer").__args__, help="through timm's factory; sgd and lars with "
        "momentum 0.9")
    opt("--clip-grad", type=setting("clip_grad"), metavar="NORM", help="clip the gradients' global norm")
    opt("--accumulate", type=setting("accumulate"), metavar="K", help="batches summed per optimizer step")
    opt("--warmup-epochs", type=setting("warmup_epochs"), help="linear warm-up before the cosine decay")
    opt("--temperature", type=setting("temperature"), help="loss temperature (default: the method's own, e.g. "
        "simclr 0.5, moco 0.2)")
    opt("--seed", type=setting("seed"), help="seeds init, data order and augmentations")
    opt("--limit", type=setting("limit"), help="pretrain on the first N training images only")
    opt("--augment", choices=AUGMENT_CHOICES, help="the views' recipe; auto: the method's (mae, clustermim: mae), "
        "else the data's (digits: digits, shapes: light, others: simclr)")
    opt("--workers", type=setting("workers"), help="data-loading processes per rank (default: 0 for data in "
        "memory, up to 8 for imagefolder)")
    opt("--precision", choices=cli_domain("precision").__args__, help="autocast: auto is bf16 on CUDA, fp32 "
        "elsewhere; fp16 (CUDA) scales the loss")
    opt("--compile", action="store_true", help="torch.compile the training step")
    opt("--eval-every", type=setting("eval_every"), metavar="N", help="k-NN and linear probes every N epochs "
        "(0: at the end only)")
    opt("--baselines", action=argparse.BooleanOptionalAction, help="also probe the random initialisation and raw "
        "pixels")
    opt("--sklearn-probes", action="store_true", help="also scikit-learn's linear and k-NN probes (CPU, up to "
        "100,000 training samples; the torch probes are the reported ones)")
    opt("--tensorboard", action=argparse.BooleanOptionalAction, help="event files in OUT/tensorboard when "
        "tensorboard is installed")
    opt("--device", type=device_arg, help="auto (cuda if available), cpu, cuda, cuda:1, mps")
    opt("--backend", choices=BACKENDS, help="the loss's kernel backend")
    opt("--tokenizer", help="clustermim's targets (same as -o tokenizer=...): " + clustermim.TOKENIZER_HELP)
    opt("--option", "-o", type=_option, action="append", metavar="KEY=VALUE",
        help="a method option, e.g. -o proj_dim=128 (repeatable; unknown keys list the valid ones)")
    opt("--out", help="output folder (default: runs/<method>-<data>)")
    opt("--config", metavar="YAML", help="settings from a file (a run's config.yaml); options given here win")
    opt("--resume", nargs="?", const="", metavar="CHECKPOINT",
        help="continue from CHECKPOINT with its run's settings (without one: OUT/checkpoint.pt)")
    opt("--overwrite", action="store_true",
        help="replace the run already in OUT (its files are deleted once this run is ready to train)")


def build_parser() -> argparse.ArgumentParser:
    """The ``sslcore`` argument parser with every command (``sslcore --help``)."""
    parser = argparse.ArgumentParser(prog="sslcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="self-supervised pretraining, then linear/k-NN probes",
                       description="Options not given come from --config, else from the checkpoint of --resume, "
                       "else from the defaults shown.")
    add_pretrain_arguments(p)

    e = sub.add_parser("eval", help="linear probe and k-NN accuracy of a pretraining checkpoint")
    e.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by pretrain")
    e.add_argument("--device", type=device_arg, default="auto", help="where to compute features (default: %(default)s)")
    e.add_argument("--data", type=data_spec_arg,
                   help="probe on this dataset instead (transfer; default: the checkpoint's)")
    e.add_argument("--workers", type=setting("workers"), default=0,
                   help="data-loading processes (default: %(default)s)")
    e.add_argument("--protocol", choices=PROTOCOLS, default="probe",
                   help="probe: the k-NN and L-BFGS linear probes on frozen features (fast); linear: the standard "
                   "linear evaluation (frozen backbone, crops and flips, SGD, cosine); finetune: the whole network "
                   "with a linear head (AdamW, cosine); docs/architecture.md, Evaluation (default: %(default)s)")
    lin, fin = DEFAULTS["linear"], DEFAULTS["finetune"]
    e.add_argument("--epochs", type=setting("epochs"), help=f"linear/finetune epochs (default: {lin[0]})")
    e.add_argument("--lr", type=float, help=f"linear: SGD's lr (default: {lin[1]}); finetune: AdamW's lr per 256 "
                   f"images (default: {fin[1]})")
    e.add_argument("--batch-size", type=setting("batch_size"), help=f"linear/finetune batch (default: {lin[2]})")
    e.add_argument("--weight-decay", type=float, help=f"linear (default: {lin[3]}), finetune (default: {fin[3]})")
    e.add_argument("--seed", type=setting("seed"), default=0, help="linear/finetune: data order, crops, dropout "
                   "(default: %(default)s)")
    e.add_argument("--overwrite", action="store_true", help="replace the run folder's eval-PROTOCOL.json")
    x = sub.add_parser("export", help="a checkpoint's backbone as safetensors with timm's key names")
    x.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by pretrain")
    x.add_argument("--out", required=True, help="the .safetensors file to write")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    b = sub.add_parser("benchmark", help="every method on one dataset and budget: one table of probe accuracy, time")
    benchmark.add_arguments(b)
    tr = sub.add_parser("transfer", help="ArCL vs SimCLR under domain shift: shapes targets inside the augmentation "
                        "family, probe accuracy and worst-pair distance over seeds")
    transfer.add_arguments(tr)

    o = sub.add_parser("oversmoothing", help="ContraNorm vs LayerNorm with depth: ViTs on digits, GCNs on an SBM")
    oversmoothing.add_arguments(o)

    k = sub.add_parser("tokenize", help="fit an image tokenizer (k-means) and save it to one file")
    clustermim.add_tokenize_arguments(k)
    t = sub.add_parser("tcas", help="TCAS and NMI(token, class) of image tokenizers (training-free)")
    clustermim.add_tcas_arguments(t)
    m = sub.add_parser("mim-study", help="ClusterMIM per tokenizer vs MAE: TCAS, NMI and probe accuracy")
    clustermim.add_study_arguments(m)
    w = sub.add_parser("tcas-sweep", help="ClusterMIM on oracle tokenizers of controlled alignment: TCAS vs probe")
    clustermim.add_sweep_arguments(w)
    a = sub.add_parser("ar-vs-mlm", help="ar, mlm, dear and vlm on one budget: probe accuracy and generation loss")
    ar_vs_mlm.add_arguments(a)
    r = sub.add_parser("report", help="rewrite the README's study tables and the plots from docs/results/*.json")
    report.add_arguments(r)
    return parser


COLUMNS = (("linear", "linear@1"), ("linear_top5", "linear@5"), ("knn", "kNN200@1"), ("knn_top5", "kNN200@5"),
           ("sklearn_linear", "skl. linear"), ("sklearn_knn", "skl. kNN20"))


def _table(rows: list[tuple[str, dict]]) -> str:
    """Probe accuracies: the reported torch probes (linear L-BFGS and InstDisc's k-NN, top-1/top-5), then
    scikit-learn's where asked for (``--sklearn-probes``)."""
    width = max(len("features"), *(len(name) for name, _ in rows)) + 2
    columns = [(key, title) for key, title in COLUMNS if any(key in r for _, r in rows)]
    lines = [f"{'features':<{width}}" + "".join(f"{title:>13}" for _, title in columns)]
    lines += [f"{name:<{width}}" + "".join(f"{r[key]:>13.2%}" if key in r else f"{'-':>13}" for key, _ in columns)
              for name, r in rows]
    return "\n".join(lines)


def _pretrain(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items()
             if k not in ("command", "command_line", "option", "tokenizer", "config")}
    pairs = getattr(args, "option", []) + ([("tokenizer", args.tokenizer)] if hasattr(args, "tokenizer") else [])
    if pairs:
        given["options"] = _options(pairs)
    cfg = build_config(given, config_file=getattr(args, "config", None))
    s = pretrain(cfg)
    if not is_main_process():  # torchrun: rank 0 reports
        return 0
    p = s["probes"]
    loss = "" if s["final_loss"] is None else f", final loss {s['final_loss']:.4f}"
    tau = "" if s["temperature"] is None else f" at temperature {s['temperature']:g}"
    print(f"\n{s['method']} on {s['data']}: {s['epochs']} epochs{tau}{loss}, {s['total_time_s']:.1f}s on "
          f"{s['device']}; held-out accuracy ({s['n_test']} test images):")
    enc = s["encoder_class"]
    rows = [(f"{s['method']} ({enc})", p["trained"])]
    if "random_init" in p:
        rows += [(f"random init ({enc})", p["random_init"]), (s["raw_features"], p["raw_pixels"])]
    print(_table(rows))
    for name, value in s["eval"].items():  # the method's own held-out metrics
        print(f"{name}: {value:.4f}")
    print(f"wrote {cfg.out}/summary.json, metrics.jsonl, steps.jsonl, config.yaml, checkpoint.pt")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``sslcore ARGV``; returns the exit code (errors go to stderr with exit code 2)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["sslcore", *argv])  # recorded in the studies' results files
    try:
        if args.command == "pretrain":
            return _pretrain(args)
        if args.command == "benchmark":
            benchmark.main_from_args(args)
        elif args.command == "transfer":
            transfer.main_from_args(args)
        elif args.command == "oversmoothing":
            oversmoothing.main_from_args(args)
        elif args.command == "tokenize":
            clustermim.tokenize_from_args(args)
        elif args.command == "tcas":
            clustermim.tcas_from_args(args)
        elif args.command == "mim-study":
            clustermim.study_from_args(args)
        elif args.command == "tcas-sweep":
            clustermim.sweep_from_args(args)
        elif args.command == "ar-vs-mlm":
            ar_vs_mlm.main_from_args(args)
        elif args.command == "report":
            return report.main_from_args(args)
        elif args.command == "export":
            r = export_backbone(args.checkpoint, args.out, overwrite=args.overwrite)
            print(f"wrote {args.out}: {r['architecture']} ({r['format']}), {r['tensors']} tensors, "
                  f"{r['parameters']:,} parameters; load it with:\n{r['snippet']}")
        elif args.protocol != "probe":
            r = evaluate_protocol(args.checkpoint, args.protocol, epochs=args.epochs, lr=args.lr,
                                  batch_size=args.batch_size, weight_decay=args.weight_decay, data=args.data,
                                  device=resolve_device(args.device), workers=args.workers, seed=args.seed,
                                  overwrite=args.overwrite, progress=True)
            print(f"{r['method']} on {r['data']} (trained on {r['trained_on']}), epoch {r['epoch']}, --protocol "
                  f"{r['protocol']}: {r['epochs']} epochs, {r['optimizer']} at lr {r['peak_lr']:g}; top-1 "
                  f"{r['top1']:.2%}, top-5 {r['top5']:.2%} ({r['n_test']} test images); wrote "
                  f"{results_path(args.checkpoint, r['protocol'], args.data)}")
        else:
            check_protocol_args("probe", epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                weight_decay=args.weight_decay)
            r = evaluate_checkpoint(args.checkpoint, device=resolve_device(args.device), data=args.data,
                                    workers=args.workers)
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
