"""Level 4: the pretraining loop, checkpoints and frozen-feature evaluation."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .evaluate import evaluate_checkpoint, knn_accuracy, linear_probe, probe
from .loop import PretrainConfig, pretrain, resolve_device

__all__ = ["CheckpointError", "PretrainConfig", "evaluate_checkpoint", "knn_accuracy", "linear_probe",
           "load_checkpoint", "pretrain", "probe", "resolve_device", "save_checkpoint"]
