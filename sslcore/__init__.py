"""sslcore: self-supervised learning methods on fused Triton kernels."""
from . import cluster, functional, kernels, layers, metrics
from .cluster import KMeans
from .layers import ContraNorm, DContraNorm
from .losses import DCLLoss, DCLWLoss, DINOLoss, InfoNCELoss, NegativeCosineSimilarity, NTXentLoss

__version__ = "0.1.0"
__all__ = ["cluster", "functional", "kernels", "layers", "metrics", "KMeans", "ContraNorm", "DContraNorm", "NTXentLoss",
           "InfoNCELoss", "DCLLoss", "DCLWLoss", "DINOLoss", "NegativeCosineSimilarity", "__version__"]
