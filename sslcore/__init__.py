"""sslcore: self-supervised learning methods on fused Triton kernels.

Every name here is imported on first use (``sslcore.KMeans`` imports torch then): ``import sslcore`` and the
``sslcore`` command's help and usage errors import no torch (docs/architecture.md, "The command line").
"""
from ._imports import lazy_attributes, register_timm_models_when_imported

_EXPORTS = {"KMeans": ".cluster", "ContraNorm": ".layers", "DContraNorm": ".layers", "NTXentLoss": ".losses",
            "InfoNCELoss": ".losses", "DCLLoss": ".losses", "DCLWLoss": ".losses",
            "NegativeCosineSimilarity": ".losses", "DINOLoss": ".losses", "BarlowTwinsLoss": ".losses",
            "VICRegLoss": ".losses"}
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
register_timm_models_when_imported()

__version__ = "0.1.0"
__all__ = ["cluster", "functional", "kernels", "layers", "metrics", "KMeans", "ContraNorm", "DContraNorm", "NTXentLoss",
           "InfoNCELoss", "DCLLoss", "DCLWLoss", "DINOLoss", "NegativeCosineSimilarity",
           "BarlowTwinsLoss", "VICRegLoss", "__version__"]
