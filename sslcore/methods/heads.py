"""Projector and predictor heads shared by the methods (MLPs on the encoder's pooled features)."""
from __future__ import annotations

from torch import nn


def projection_mlp(dim_in: int, dim_hidden: int, dim_out: int) -> nn.Sequential:
    """SimCLR's projector (also MoCo v2's, NNCLR's): Linear-BN-ReLU-Linear."""
    return nn.Sequential(nn.Linear(dim_in, dim_hidden, bias=False), nn.BatchNorm1d(dim_hidden),
                         nn.ReLU(inplace=True), nn.Linear(dim_hidden, dim_out))


def simsiam_projector(dim_in: int, dim_hidden: int, dim_out: int) -> nn.Sequential:
    """SimSiam's projector: Linear-BN-ReLU-Linear-BN (the output BN without affine, as in SimSiam)."""
    return nn.Sequential(*projection_mlp(dim_in, dim_hidden, dim_out), nn.BatchNorm1d(dim_out, affine=False))


def prediction_mlp(dim: int, dim_hidden: int) -> nn.Sequential:
    """SimSiam's predictor: a bottleneck Linear-BN-ReLU-Linear from ``dim`` back to ``dim``."""
    return projection_mlp(dim, dim_hidden, dim)


def expander_mlp(dim_in: int, dim_hidden: int, dim_out: int, *, bias: bool) -> nn.Sequential:
    """Barlow Twins' projector and VICReg's expander: (Linear-BN-ReLU) x 2, then a Linear without bias;
    ``bias``: whether the first two Linear layers have one (VICReg's do, Barlow Twins' do not)."""
    layers = []
    for width_in in (dim_in, dim_hidden):
        layers += [nn.Linear(width_in, dim_hidden, bias=bias), nn.BatchNorm1d(dim_hidden), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(dim_hidden, dim_out, bias=False))
