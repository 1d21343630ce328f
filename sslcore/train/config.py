"""A run's settings (:class:`PretrainConfig`), checked whole before any work, and where they come from.

A run's config is built from, in increasing priority: the defaults, the checkpoint of ``--resume``
(its run's config: ``--resume CHECKPOINT`` alone continues the run as it was), a ``--config`` YAML
file (every run writes its own as ``OUT/config.yaml``), and the options given on the command line.
Resuming with a given option that changes the run (:data:`RUN_KEYS`) is refused, naming it; the
epochs may be extended, and where the run happens (device, workers, out, logging) may change.
This module imports no torch until a config is checked: the CLI's parser reads the fields, their domains and
defaults from here (:func:`setting`, :func:`device_arg`).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml

from ..checks import Backend, NonNegative, NonNegativeInt, PositiveInt, Range, Seed, Temperature, check_value, cli_type
from ..data import AUGMENT_CHOICES, check_data_spec, data_kind
from ..methods import check_options, get_method, option_parameters

if typing.TYPE_CHECKING:
    import torch

# Options that define a run: resuming with different values is refused (epochs may be extended).
RUN_KEYS = ("method", "data", "encoder", "batch_size", "lr", "weight_decay", "warmup_epochs", "temperature",
            "seed", "limit", "options", "augment", "optimizer", "accumulate", "clip_grad", "weight_decay_all")
# Run control, not settings: not written to config.yaml and not taken from a resumed checkpoint.
CONTROL_KEYS = ("out", "resume", "overwrite")
DEFAULTED = "defaulted"  # config.yaml: the settings resolved from the method's defaults rather than given
MAX_CONFIG_BYTES = 1 << 20
# The base learning rate is per 256 samples; above 1 that is noise for every optimizer here, LARS included.
LearningRate = Annotated[float, Range(0, 1, low_open=True)]
ClipNorm = Annotated[float, Range(0, low_open=True)]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Optimizer = Literal["adamw", "sgd", "lars", "lamb"]
# Method options the trainer sets itself (from --backend, and under torchrun).
TRAINER_OPTIONS = {"backend": "--backend", "gather_distributed": "torchrun"}
# sslcore eval --protocol (train/protocols.py); here so that the CLI reads them without torch.
PROTOCOLS = ("probe", "linear", "finetune")
# protocol -> (epochs, lr, batch_size, weight_decay): solo-learn's linear (SGD lr 0.1, batch 256, 100 epochs);
# fine-tuning with AdamW at 1e-3 x batch / 256 and weight decay 0.05 (MAE's), 100 epochs
PROTOCOL_DEFAULTS = {"linear": (100, 0.1, 256, 0.0), "finetune": (100, 1e-3, 256, 0.05)}
LR_BATCH = 256  # the learning rate scales with the batch: peak lr = lr x batch x accumulate / 256


@dataclass
class PretrainConfig:
    """One run's settings: the ``sslcore pretrain`` options (``--batch-size`` is ``batch_size``).

    Each is checked on creation against its annotated domain (the CLI parses with the same
    annotations), and so are the cross-checks that need no data: the data kind against the
    method, the method's options, the batch size against the method's minimum, the device,
    backend and precision.  ``temperature=None`` means the method's own default (then stored
    here); a method without a temperature takes none.  ``-o temperature=`` is the same as
    ``--temperature``, not both.  ``lr`` is the base learning rate per 256 samples: the peak is
    :attr:`peak_lr`.
    """

    method: str = "simclr"
    data: str = "digits"
    encoder: str = "smallcnn"
    epochs: PositiveInt = 100
    batch_size: PositiveInt = 256  # the global batch of one forward pass (what a contrastive loss sees)
    lr: LearningRate = 2e-3
    weight_decay: NonNegative = 1e-4
    warmup_epochs: NonNegativeInt = 3
    temperature: Temperature | None = None
    seed: Seed = 0
    limit: PositiveInt | None = None  # pretrain on the first `limit` training images only (smoke tests)
    augment: Literal[AUGMENT_CHOICES] = "auto"  # the views' recipe; auto: the method's, else the data's
    optimizer: Optimizer = "adamw"
    weight_decay_all: bool = False  # decay norms and biases too (default: only weights of dimension >= 2)
    clip_grad: ClipNorm | None = None  # clip the gradients' global norm to this
    accumulate: PositiveInt = 1  # batches whose gradients are summed per optimizer step
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = False  # torch.compile the training step
    workers: NonNegativeInt | None = None  # data-loading processes per rank; None: 0 in memory, up to 8 on disk
    eval_every: NonNegativeInt = 0  # k-NN and linear probes every N epochs (0: only at the end)
    baselines: bool = False  # also probe the random initialisation and raw pixels
    sklearn_probes: bool = False  # also scikit-learn's linear and k-NN probes (CPU, up to 100,000 samples)
    online_linear: bool | None = None  # the online linear head (train/online.py); None: on for image data
    tensorboard: bool = True  # event files in OUT/tensorboard when the tensorboard package is installed
    wandb: str | None = None  # a Weights & Biases project to log to (wandb's own files, in wandb's folder)
    device: str = "auto"
    backend: Backend = "auto"  # the loss's backend: auto | triton | torch
    out: str | None = None  # default runs/<method>-<data>
    resume: str | None = None  # checkpoint to continue from; "" = OUT/checkpoint.pt
    overwrite: bool = False  # replace the run in OUT (deleted only when this run is ready to train)
    options: dict = dataclasses.field(default_factory=dict)  # the method's own options (``--option KEY=VALUE``)

    def __post_init__(self):
        cls = get_method(self.method)
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a dict, got {self.options!r}")
        options = dict(self.options)
        for key, source in TRAINER_OPTIONS.items():
            if key in options:
                raise ValueError(f"-o {key} is set by the trainer ({source}), not as a method option")
        if "temperature" in options:
            if self.temperature is not None:
                raise ValueError(f"the temperature is given twice, --temperature {self.temperature} and "
                                 f"-o temperature={options['temperature']!r}: give one")
            self.temperature = check_value("-o temperature", options.pop("temperature"), Temperature)
        hints = typing.get_type_hints(type(self), include_extras=True)
        for f in dataclasses.fields(self):
            if f.name != "options":
                setattr(self, f.name, check_value(flag(f.name), getattr(self, f.name), hints[f.name]))
        self.options = check_options(self.method, options)
        check_data_spec(self.data)
        kind = data_kind(self.data)
        if kind not in cls.data_kinds:
            raise ValueError(f"method {self.method!r} trains on {' or '.join(cls.data_kinds)} data; --data {self.data} "
                             f"is {kind} data")
        if kind != "image" and self.augment not in ("auto", "none"):
            raise ValueError(f"--augment {self.augment}: --data {self.data} is token data, which takes no image "
                             "augmentation (auto or none)")
        params = option_parameters(self.method)
        self.defaulted = ()  # settings resolved from the method's defaults, not given: config.yaml says which
        if "temperature" in params:
            if self.temperature is None:
                self.temperature = cls.default_temperature(self.options)
                self.defaulted = ("temperature",)
        elif self.temperature is not None:
            raise ValueError(f"method {self.method!r} has no temperature (its loss has no softmax over negatives); "
                             "leave out --temperature")
        if self.peak_lr * self.weight_decay >= 1:
            raise ValueError(f"the peak learning rate {self.peak_lr:g} (--lr {self.lr:g} x {self.effective_batch} / "
                             f"{LR_BATCH}) x --weight-decay {self.weight_decay:g} must be < 1: each step multiplies "
                             "every decayed weight by 1 - lr x weight_decay")
        if self.batch_size < cls.min_batch_size:
            raise ValueError(f"--batch-size {self.batch_size} is too small for {self.method}: it needs at least "
                             f"{cls.min_batch_size} samples per batch ({cls.min_batch_reason})")
        if self.wandb is not None:
            if not self.wandb.strip() or any(c in self.wandb for c in "/\\#?%:"):
                raise ValueError(f"--wandb {self.wandb!r}: a Weights & Biases project name (no / \\ # ? % :)")
            if importlib.util.find_spec("wandb") is None:
                raise ValueError(f"--wandb {self.wandb}: the wandb package is not installed (pip install wandb, "
                                 "or sslcore[wandb])")
        if self.resume is not None and self.overwrite:
            raise ValueError("--resume continues a run and --overwrite starts a new one: give one")
        from ..kernels import resolve_backend

        device = resolve_device(self.device)
        try:
            resolve_backend(self.backend, device)
        except RuntimeError as e:
            raise ValueError(f"--backend {self.backend} on --device {self.device}: {e}") from None
        resolve_precision(self.precision, device)
        if self.out is None:
            self.out = default_out(self.method, self.data)
        if self.resume == "":
            self.resume = str(Path(self.out) / "checkpoint.pt")

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step: the global batch times the batches accumulated."""
        return self.batch_size * self.accumulate

    @property
    def peak_lr(self) -> float:
        """The learning rate after warm-up: ``lr x batch x accumulate / 256`` (the linear scaling rule)."""
        return self.lr * self.effective_batch / LR_BATCH

    def settings(self) -> dict:
        """The settings as plain data (``config.yaml``): everything but run control (out, resume, overwrite),
        and under ``defaulted`` those the method resolved (a replay with another method resolves them anew)."""
        settings = {k: _plain(v) for k, v in dataclasses.asdict(self).items() if k not in CONTROL_KEYS}
        return {**settings, DEFAULTED: list(self.defaulted)}


def _plain(value):
    """Tuples as lists, recursively (YAML's safe dumper writes no tuples)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def default_out(method: str, data: str) -> str:
    """``runs/<method>-<data name>``: where a run goes without ``--out``."""
    return str(Path("runs") / f"{method}-{data.partition(':')[0]}")


def flag(field: str) -> str:
    """The command-line flag of a ``PretrainConfig`` field."""
    return "--" + field.replace("_", "-")


def cli_domain(field: str):
    """The annotated domain of a ``PretrainConfig`` field, for the CLI's parser."""
    return typing.get_type_hints(PretrainConfig, include_extras=True)[field]


FIELDS = tuple(f.name for f in dataclasses.fields(PretrainConfig))
DEFAULTS = {f.name: f.default for f in dataclasses.fields(PretrainConfig) if f.default is not dataclasses.MISSING}


def setting(field: str):
    """argparse ``type=`` for the ``PretrainConfig`` field ``field``: its annotated domain."""
    return cli_type(cli_domain(field))


def device_arg(text: str) -> str:
    """argparse ``type=`` for ``--device``: a device this machine has (or ``auto``; anything but auto and cpu
    imports torch to ask it)."""
    if text in ("auto", "cpu"):
        return text
    try:
        resolve_device(text)
    except ValueError as e:  # argparse names the flag itself
        raise argparse.ArgumentTypeError(str(e).removeprefix("--device ")) from None
    return text


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else must name a device this machine has
    (cpu, cuda[:N], mps) or a ``ValueError`` says why not."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device!r}: this torch build or machine has no MPS device")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r}: training and probes run on cpu, cuda or mps, not {dev.type} "
                         "(meta tensors, for one, hold no values)")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` on ``device`` (None: fp32, no autocast); ``auto`` is bf16 on CUDA.
    fp16 needs CUDA (its gradients are scaled by a ``GradScaler``); bf16 also runs on the CPU."""
    import torch

    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"--precision fp16 needs a CUDA device (fp16 autocast with gradient scaling), not "
                         f"{device.type}: use bf16 or fp32 there")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this GPU has no bf16 support; use fp16 or fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


class _ConfigLoader(yaml.SafeLoader):
    """YAML for settings: no aliases (a few hundred bytes of nested aliases expand to gigabytes) and no
    duplicate keys (which YAML resolves silently to the last)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"line {mark.line + 1}: aliases (*name) are not allowed in a config file")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: the setting {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str) -> dict:
    """The settings in a ``config.yaml`` (as every run writes it), checked to be known fields; those it lists
    as ``defaulted`` are left out (resolved again for this run's method)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"--config {path} is over {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--config {path} is not a text file (a config is YAML, as OUT/config.yaml)") from None
    try:
        settings = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 -- a SafeLoader, stricter still
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path} is not valid YAML: {e}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"--config {path} must hold a mapping of settings, got {type(settings).__name__}")
    defaulted = settings.pop(DEFAULTED, [])
    if not isinstance(defaulted, list) or not set(map(str, defaulted)) <= set(FIELDS):
        raise ValueError(f"--config {path}: {DEFAULTED} must list settings, got {defaulted!r}")
    unknown = sorted(set(settings) - set(FIELDS))
    if unknown:
        raise ValueError(f"--config {path} has unknown setting(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(f for f in FIELDS if f not in CONTROL_KEYS)}")
    control = sorted(set(settings) & set(CONTROL_KEYS))
    if control:
        raise ValueError(f"--config {path} sets {', '.join(control)}: give those on the command line")
    return {k: v for k, v in settings.items() if k not in defaulted}


def build_config(given: dict, *, config_file: str | None = None) -> PretrainConfig:
    """The run's config from the options ``given`` on the command line, over a ``--config`` file, over the
    config of the checkpoint being resumed, over the defaults (see the module docstring)."""
    settings = read_config_file(config_file) if config_file is not None else {}
    if "temperature" in given.get("options", {}):  # -o temperature= beside --config wins over its temperature
        settings.pop("temperature", None)
    if "temperature" in given and isinstance(settings.get("options"), dict):
        settings["options"] = {k: v for k, v in settings["options"].items() if k != "temperature"}
    if given.get("method", settings.get("method")) != settings.get("method", given.get("method")) and \
            "temperature" not in option_parameters(given["method"]):  # the file's method had one; this has none
        settings.pop("temperature", None)
    merged = {**settings, **given}
    if merged.get("resume") is not None and merged.get("overwrite"):
        raise ValueError("--resume continues a run and --overwrite starts a new one: give one")
    if merged.get("resume") is not None:
        path = merged["resume"] or str(Path(merged.get("out") or default_out(
            merged.get("method", PretrainConfig.method), merged.get("data", PretrainConfig.data))) / "checkpoint.pt")
        from .checkpoint import CheckpointError, load_checkpoint

        saved = load_checkpoint(path)["config"]
        taken = {k: v for k, v in saved.items() if k in FIELDS and k not in CONTROL_KEYS}
        merged.setdefault("out", str(Path(path).parent))  # continue in the checkpoint's own folder
        diff = [f"{flag(k)} {merged[k]!r} (the checkpoint's run has {taken.get(k)!r})" for k in RUN_KEYS
                if k in merged and k != "options" and merged[k] != taken.get(k)]
        if "options" in merged and merged["options"] and merged["options"] != taken.get("options"):
            diff.append(f"-o {merged['options']!r} (the checkpoint's run has {taken.get('options')!r})")
        if diff:
            raise CheckpointError(f"--resume {path}: {'; '.join(diff)}; a resumed run keeps its settings "
                                  "(leave these out, or start a new run)")
        merged = {**taken, **{k: v for k, v in merged.items() if not (k == "options" and not v)}}
        _check_where(merged, given, path)
    try:
        return PretrainConfig(**merged)
    except TypeError as e:  # an unknown keyword from a hand-written caller
        raise ValueError(str(e)) from None


def _check_where(merged: dict, given: dict, path: str) -> None:
    """A resumed run takes its device and precision from the checkpoint unless given: say so when this machine
    cannot run them, and how to run here instead."""
    try:
        device = resolve_device(merged.get("device", "auto"))
        resolve_precision(merged.get("precision", "auto"), device)
    except ValueError as e:
        taken = [f"{flag(k)} {merged[k]}" for k in ("device", "precision") if k in merged and k not in given]
        if not taken:
            raise
        raise ValueError(f"{e}; --resume {path} takes {' and '.join(taken)} from the checkpoint's run: give "
                         "--device cpu (and --precision fp32 or bf16) to resume it on this machine") from None


__all__ = ["CONTROL_KEYS", "DEFAULTED", "DEFAULTS", "FIELDS", "LR_BATCH", "PretrainConfig", "RUN_KEYS",
           "TRAINER_OPTIONS", "build_config", "cli_domain", "default_out", "device_arg", "flag", "read_config_file",
           "resolve_device", "resolve_precision", "setting"]
