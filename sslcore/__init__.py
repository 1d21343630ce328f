"""sslcore: self-supervised learning methods on fused Triton kernels."""
from . import functional, kernels
from .losses import InfoNCELoss, NTXentLoss

__version__ = "0.1.0"
__all__ = ["functional", "kernels", "NTXentLoss", "InfoNCELoss", "__version__"]
