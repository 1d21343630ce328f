"""Level 4: the pretraining loop, checkpoints and frozen-feature evaluation (names imported on first use:
:mod:`.config` alone imports no torch, the CLI's parser reads it)."""
from .._imports import lazy_attributes

_EXPORTS = {"CheckpointError": ".checkpoint", "load_checkpoint": ".checkpoint", "save_checkpoint": ".checkpoint",
            "PretrainConfig": ".config", "build_config": ".config", "resolve_device": ".config",
            "TrainingInterrupted": ".loop", "pretrain": ".loop"}
_EXPORTS.update({name: ".evaluate" for name in ("evaluate_checkpoint", "knn_accuracy", "linear_classifier",
                                                "linear_probe", "load_encoder", "probe", "weighted_knn")})
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)

__all__ = ["CheckpointError", "PretrainConfig", "TrainingInterrupted", "build_config", "evaluate_checkpoint",
           "knn_accuracy", "linear_classifier", "linear_probe", "load_checkpoint", "load_encoder", "pretrain", "probe",
           "resolve_device", "save_checkpoint", "weighted_knn"]
