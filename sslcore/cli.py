"""``sslcore`` command line: ``pretrain`` (train + probe), ``eval`` (probe a checkpoint), ``export`` (the
backbone as safetensors), the studies (``benchmark``, ``transfer``, ``oversmoothing``, ``mim-study``,
``tcas-sweep``, ``ar-vs-mlm``), ``report`` (the README's study tables from the committed results) and the tokenizer
tools (``tokenize``, ``tcas``).

Nothing here imports torch before the arguments are parsed: a subcommand's arguments are added when it is
parsed, from light modules (``experiments/arguments.py`` for the studies whose modules import torch), and the
work's modules are imported after parsing, so every command's help and usage errors are quick.  Unknown
commands, options, methods and data names get a "did you mean".
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from .checks import BACKENDS, parse_literal, suggest
from .data import AUGMENT_CHOICES, DATA_NAMES, data_spec_arg
from .methods import COMMON_OPTIONS, METHODS, TOKENIZER_HELP, check_options
from .methods.options import OPTIONS
from .train.config import DEFAULTS, FIELDS, PROTOCOL_DEFAULTS, PROTOCOLS, cli_domain, device_arg, setting


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for an unknown choice or option (Python 3.11 has no ``suggest_on_error``),
    whose arguments may be added on first use: ``populate(parser)`` runs before it first parses."""

    def __init__(self, *args, populate=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.populate = populate

    def _check_value(self, action, value):
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as e:
            raise argparse.ArgumentError(action, e.message + suggest(str(value), action.choices)) from None

    def _populated(self) -> Parser:
        if self.populate is not None:
            populate, self.populate = self.populate, None
            populate(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        return self._populated()._parse_with_hints(args, namespace)

    def _parse_with_hints(self, args, namespace):
        args, extras = super().parse_known_args(args, namespace)
        unknown = [a.partition("=")[0] for a in extras if a.startswith("--")]
        if unknown and self._subparsers is None:  # the top level hands its subcommand's leftovers back up
            self.error(f"unrecognized arguments: {' '.join(extras)}{suggest(unknown[0], self._option_string_actions)}")
        return args, extras

    def format_help(self) -> str:
        return super(Parser, self._populated()).format_help()

    def format_usage(self) -> str:
        return super(Parser, self._populated()).format_usage()


def _study(module: str, function: str = "add_arguments"):
    """``populate`` for a study's subcommand: its module's ``function(parser)`` (imported when it is parsed)."""
    return lambda p: getattr(importlib.import_module(f".experiments.{module}", __package__), function)(p)


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
        default = DEFAULTS.get(field) if field in FIELDS else None
        shown = "" if default is None or kwargs.get("action") == "store_true" else f" (default: {default})"
        p.add_argument(*flags, default=argparse.SUPPRESS, help=help + shown, **kwargs)

    opt("--method", choices=sorted(METHODS), help="SSL method")
    opt("--data", type=data_spec_arg, help=f"dataset: {', '.join(DATA_NAMES)} (NAME:PATH or NAME:SPEC)")
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
    opt("--online-linear", action=argparse.BooleanOptionalAction, help="the online linear head on detached "
        "features, its accuracy each epoch (default: on for labelled image data)")
    opt("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project (pip install wandb)")
    opt("--sklearn-probes", action="store_true", help="also scikit-learn's linear and k-NN probes (CPU, up to "
        "100,000 training samples; the torch probes are the reported ones)")
    opt("--tensorboard", action=argparse.BooleanOptionalAction, help="event files in OUT/tensorboard when "
        "tensorboard is installed")
    opt("--device", type=device_arg, help="auto (cuda if available), cpu, cuda, cuda:1, mps")
    opt("--backend", choices=BACKENDS, help="the loss's kernel backend")
    opt("--tokenizer", help="clustermim's targets (same as -o tokenizer=...): " + TOKENIZER_HELP)
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
    parser = Parser(prog="sslcore", description=__doc__.partition("\n\n")[0])
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
    lin, fin = PROTOCOL_DEFAULTS["linear"], PROTOCOL_DEFAULTS["finetune"]
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
    studies = (("benchmark", "every method on one dataset and budget: one table of probe accuracy, time", "benchmark",
                "add_arguments"),
               ("transfer", "ArCL vs SimCLR under domain shift: shapes targets inside the augmentation family, probe "
                "accuracy and worst-pair distance over seeds", "arguments", "transfer_arguments"),
               ("oversmoothing", "ContraNorm vs LayerNorm with depth: ViTs on digits, GCNs on an SBM", "arguments",
                "oversmoothing_arguments"),
               ("tokenize", "fit an image tokenizer (k-means) and save it to one file", "arguments",
                "tokenize_arguments"),
               ("tcas", "TCAS and NMI(token, class) of image tokenizers (training-free)", "arguments",
                "tcas_arguments"),
               ("mim-study", "ClusterMIM per tokenizer vs MAE: TCAS, NMI and probe accuracy", "arguments",
                "mim_study_arguments"),
               ("tcas-sweep", "ClusterMIM on oracle tokenizers of controlled alignment: TCAS vs probe", "arguments",
                "tcas_sweep_arguments"),
               ("ar-vs-mlm", "ar, mlm, dear and vlm on one budget: probe accuracy and generation loss", "arguments",
                "ar_vs_mlm_arguments"),
               ("report", "rewrite the study tables (docs/results.md) and plots from docs/results/*.json", "report",
                "add_arguments"))
    for name, help, module, function in studies:
        sub.add_parser(name, help=help, populate=_study(module, function))
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
        method = given.get("method", None if "config" in args or "resume" in args else DEFAULTS["method"])
        if method in OPTIONS:  # the method's options checked before anything heavy is imported
            check_options(method, {k: v for k, v in given["options"].items() if k not in COMMON_OPTIONS},
                          OPTIONS[method])
    from .dist import is_main_process
    from .train.config import build_config
    from .train.loop import pretrain

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
        return _run(args)
    except ValueError as e:  # bad options, run folders and checkpoints (CheckpointError is a ValueError)
        parser.exit(2, f"sslcore {args.command}: error: {e}\n")
    except (FloatingPointError, OSError) as e:  # a diverged run; a full disk, a vanished file
        parser.exit(1, f"sslcore {args.command}: error: {e}\n")
    except KeyboardInterrupt as e:
        from .train.loop import TrainingInterrupted

        if not isinstance(e, TrainingInterrupted):
            raise
        hint = f"; continue with --resume {e.path}" if args.command == "pretrain" else ""
        print(f"\nsslcore {args.command}: {e}{hint}", file=sys.stderr)
        return 130


_STUDIES = {"benchmark": ("benchmark", "main_from_args"), "transfer": ("transfer", "main_from_args"),
            "oversmoothing": ("oversmoothing", "main_from_args"), "tokenize": ("clustermim", "tokenize_from_args"),
            "tcas": ("clustermim", "tcas_from_args"), "mim-study": ("clustermim", "study_from_args"),
            "tcas-sweep": ("clustermim", "sweep_from_args"), "ar-vs-mlm": ("ar_vs_mlm", "main_from_args"),
            "report": ("report", "main_from_args")}


def _run(args: argparse.Namespace) -> int:
    """The parsed command's work (its modules imported here, after parsing)."""
    if args.command == "pretrain":
        return _pretrain(args)
    if args.command in _STUDIES:
        module, function = _STUDIES[args.command]
        code = getattr(importlib.import_module(f".experiments.{module}", __package__), function)(args)
        return code if args.command == "report" else 0
    if args.command == "export":
        from .train.export import export_backbone

        r = export_backbone(args.checkpoint, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}: {r['architecture']} ({r['format']}), {r['tensors']} tensors, "
              f"{r['parameters']:,} parameters; load it with:\n{r['snippet']}")
        return 0
    from .train.config import resolve_device
    from .train.evaluate import evaluate_checkpoint
    from .train.protocols import check_protocol_args, evaluate_protocol, results_path

    if args.protocol != "probe":
        r = evaluate_protocol(args.checkpoint, args.protocol, epochs=args.epochs, lr=args.lr,
                              batch_size=args.batch_size, weight_decay=args.weight_decay, data=args.data,
                              device=resolve_device(args.device), workers=args.workers, seed=args.seed,
                              overwrite=args.overwrite, progress=True)
        print(f"{r['method']} on {r['data']} (trained on {r['trained_on']}), epoch {r['epoch']}, --protocol "
              f"{r['protocol']}: {r['epochs']} epochs, {r['optimizer']} at lr {r['peak_lr']:g}; top-1 "
              f"{r['top1']:.2%}, top-5 {r['top5']:.2%} ({r['n_test']} test images); wrote "
              f"{results_path(args.checkpoint, r['protocol'], args.data)}")
        return 0
    check_protocol_args("probe", epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                        weight_decay=args.weight_decay)
    r = evaluate_checkpoint(args.checkpoint, device=resolve_device(args.device), data=args.data, workers=args.workers)
    print(f"{r['method']} on {r['data']} (trained on {r['trained_on']}), epoch {r['epoch']}; "
          f"held-out accuracy ({r['n_test']} test images):")
    print(_table([(f"{r['method']} ({r['encoder']})", r)]))
    return 0
