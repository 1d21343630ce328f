"""Level 4: the pretraining loop, checkpoints and frozen-feature evaluation."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .evaluate import evaluate_checkpoint, knn_accuracy, linear_probe, load_encoder, probe
from .loop import PretrainConfig, TrainingInterrupted, pretrain, resolve_device

__all__ = ["CheckpointError", "PretrainConfig", "TrainingInterrupted", "evaluate_checkpoint", "knn_accuracy",
           "linear_probe", "load_checkpoint", "load_encoder", "pretrain", "probe", "resolve_device", "save_checkpoint"]
