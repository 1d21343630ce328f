"""Projector and predictor heads shared by the methods (MLPs on the encoder's pooled features)."""
from __future__ import annotations

from torch import nn

SMALL_WIDTH = 256  # encoders narrower than this (sslcore's digits-sized CNNs) keep the small heads below


def sized_head(width: int, given: tuple, small: tuple, paper: tuple) -> tuple:
    """A head's widths: each one ``given`` (not None) as given, else the paper's shapes ``paper`` (computed
    from the encoder's feature ``width``) for encoders at least :data:`SMALL_WIDTH` wide, and the digits-sized
    ``small`` below (docs/methods.md, "Heads")."""
    defaults = small if width < SMALL_WIDTH else paper
    return tuple(d if g is None else g for g, d in zip(given, defaults))


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


def mocov3_mlp(layers: int, dim_in: int, dim_hidden: int, dim_out: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's heads: ``layers`` Linear layers without bias, BN-ReLU after each hidden one, and after the
    last a BatchNorm without affine where ``last_bn``."""
    dims = [dim_in] + [dim_hidden] * (layers - 1) + [dim_out]
    mods = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        mods.append(nn.Linear(a, b, bias=False))
        if i < layers - 1:
            mods += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            mods.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*mods)


def paper_widths(width: int, reference: int, hidden: int = 4096, out: int = 256) -> tuple[int, int]:
    """A head's (hidden, output) widths at the paper's ratios to its encoder: ``hidden`` and ``out`` were
    chosen for a ``reference``-wide encoder (ResNet-50: 2048, ViT-B: 768); scaled to ``width``, at least 1."""
    return max(1, round(hidden * width / reference)), max(1, round(out * width / reference))


def expander_mlp(dim_in: int, dim_hidden: int, dim_out: int, *, bias: bool) -> nn.Sequential:
    """Barlow Twins' projector and VICReg's expander: (Linear-BN-ReLU) x 2, then a Linear without bias;
    ``bias``: whether the first two Linear layers have one (VICReg's do, Barlow Twins' do not)."""
    layers = []
    for width_in in (dim_in, dim_hidden):
        layers += [nn.Linear(width_in, dim_hidden, bias=bias), nn.BatchNorm1d(dim_hidden), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(dim_hidden, dim_out, bias=False))
