"""Level 4: the pretraining loop, checkpoints and frozen-feature evaluation."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import PretrainConfig, build_config, resolve_device
from .evaluate import (
    evaluate_checkpoint,
    knn_accuracy,
    linear_classifier,
    linear_probe,
    load_encoder,
    probe,
    weighted_knn,
)
from .loop import TrainingInterrupted, pretrain

__all__ = ["CheckpointError", "PretrainConfig", "TrainingInterrupted", "build_config", "evaluate_checkpoint",
           "knn_accuracy", "linear_classifier", "linear_probe", "load_checkpoint", "load_encoder", "pretrain", "probe",
           "resolve_device", "save_checkpoint", "weighted_knn"]
