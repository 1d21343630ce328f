"""sslcore: self-supervised learning methods on fused Triton kernels."""
from . import cluster, functional, kernels, layers, metrics
from .cluster import KMeans
from .layers import ContraNorm, DContraNorm
from .losses import (
    BarlowTwinsLoss,
    DCLLoss,
    DCLWLoss,
    DINOLoss,
    InfoNCELoss,
    NegativeCosineSimilarity,
    NTXentLoss,
    VICRegLoss,
)

__version__ = "0.1.0"
__all__ = ["cluster", "functional", "kernels", "layers", "metrics", "KMeans", "ContraNorm", "DContraNorm", "NTXentLoss",
           "InfoNCELoss", "DCLLoss", "DCLWLoss", "DINOLoss", "NegativeCosineSimilarity",
           "BarlowTwinsLoss", "VICRegLoss", "__version__"]
