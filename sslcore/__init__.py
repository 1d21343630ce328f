"""sslcore: self-supervised learning methods on fused Triton kernels."""
from . import functional, kernels, layers, metrics
from .layers import ContraNorm, DContraNorm
from .losses import InfoNCELoss, NTXentLoss

__version__ = "0.1.0"
__all__ = ["functional", "kernels", "layers", "metrics", "ContraNorm", "DContraNorm", "NTXentLoss", "InfoNCELoss",
           "__version__"]
