"""A deep GCN in plain PyTorch (sparse matmul, no graph library), with ContraNorm as an option.

``GraphConv``: ``H' = A_hat H W + b`` with ``A_hat = D^-1/2 (A + I) D^-1/2`` (Kipf & Welling).
Each hidden layer is ``conv -> norm -> ReLU``; the last conv gives the class logits.  ``norm``:

* ``"none"``: the plain GCN (conv -> ReLU);
* ``"layernorm"``: conv -> LayerNorm -> ReLU;
* ``"pairnorm"``: conv -> PairNorm -> ReLU (Zhao & Akoglu, ICLR 2020, the ContraNorm paper's GNN
  baseline): centre the nodes, then rescale so the mean squared row norm is ``s^2`` (:class:`PairNorm`);
* ``"contranorm"``: conv -> ContraNorm -> ReLU with ContraNorm as in the authors' GNN layer:
  ``LayerNorm((1 + s) H - s * softmax(H_hat H_hat^T) H)`` (identity form, LayerNorm eps 1e-5), the
  softmax over all nodes but each node itself and its neighbours.

The s convention is the authors' (default s = 1).  Under the LayerNorm the identity form equals the
plain ``H - s' P H`` with ``s' = s / (1 + s)`` (up to eps).  Earlier sslcore GCNs used the plain form
(eps 1e-6): their s' is ``s = s' / (1 - s')`` here, so their default s' = 0.5 is s = 1.  See docs/methods.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ContraNorm

NORMS = ("none", "layernorm", "pairnorm", "contranorm")


def normalized_adjacency(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Sparse ``D^-1/2 (A + I) D^-1/2`` [N, N] from ``edge_index`` [2, E] (both directions of each
    undirected edge listed; duplicates and given self-loops count once)."""
    loops = torch.arange(num_nodes, device=edge_index.device).expand(2, -1)
    a = torch.sparse_coo_tensor(torch.cat([edge_index.long(), loops], 1),
                                torch.ones(edge_index.shape[1] + num_nodes, device=edge_index.device),
                                (num_nodes, num_nodes), check_invariants=False).coalesce()
    idx = a.indices()
    deg = torch.zeros(num_nodes, device=idx.device).index_add_(0, idx[0], torch.ones(idx.shape[1], device=idx.device))
    w = deg[idx[0]].rsqrt() * deg[idx[1]].rsqrt()
    return torch.sparse_coo_tensor(idx, w, (num_nodes, num_nodes), check_invariants=False).coalesce()


class PairNorm(nn.Module):
    """PairNorm's "PN" form over the nodes of one graph, ``x [N, D]``:
    ``x_c = x - mean_n x_n``, then ``s * x_c / sqrt(eps + mean_n |x_c,n|^2)`` -- every node centred, the total
    pairwise squared distance held at ``2 N^2 s^2`` whatever the depth (Zhao & Akoglu 2020, eq. 4; their default
    s = 1; ``eps`` 1e-6 inside the root as their code).  No parameters.  docs/methods.md, ContraNorm."""

    def __init__(self, scale: float = 1.0, eps: float = 1e-6):
        super().__init__()
        if not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"scale must be a number > 0, got {scale!r}")
        self.scale, self.eps = float(scale), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(0)
        return self.scale * x / (self.eps + x.pow(2).sum(1).mean()).sqrt()


class GraphConv(nn.Linear):
    """``A_hat (H W^T) + b``: a linear map, then propagation over the normalised adjacency."""

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(adj, F.linear(x, self.weight)) + self.bias


class GCNBlock(nn.Module):
    """``ReLU(norm(GraphConv(x)))``, one hidden layer.  ``"contranorm"``: ``LayerNorm((1 + s) H - s P H)``
    (eps 1e-5, as the authors' GNN); ``"layernorm"``: ``LayerNorm(H)`` with the same eps, so s = 0 is it exactly;
    ``"pairnorm"``: :class:`PairNorm` (s = 1)."""

    def __init__(self, in_dim: int, out_dim: int, norm: str, contranorm_scale: float, backend: str):
        super().__init__()
        self.conv = GraphConv(in_dim, out_dim)
        if norm == "contranorm":
            self.norm = ContraNorm(out_dim, scale=contranorm_scale, identity=True, eps=1e-5, graph=True,
                                   backend=backend)
        else:
            self.norm = {"layernorm": lambda: nn.LayerNorm(out_dim, eps=1e-5), "pairnorm": PairNorm,
                         "none": nn.Identity}[norm]()

    def forward(self, x: torch.Tensor, adj: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h = self.conv(x, adj)
        h = self.norm(h, edge_index) if isinstance(self.norm, ContraNorm) else self.norm(h)
        return F.relu(h)


class GCN(nn.Module):
    """``depth`` graph convolutions: ``depth - 1`` hidden blocks (``blocks.i``), then a conv to logits.

    ``forward(x [N, in_dim], edge_index [2, E]) -> [N, num_classes]``.  ``contranorm_scale``: s in the
    authors' convention, ``(1 + s) H - s P H``.
    """

    def __init__(self, in_dim: int, num_classes: int, *, hidden: int = 64, depth: int = 2, norm: str = "layernorm",
                 contranorm_scale: float = 1.0, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        dims = [in_dim] + [hidden] * (depth - 1)
        self.blocks = nn.ModuleList(GCNBlock(a, b, norm, contranorm_scale, backend) for a, b in zip(dims, dims[1:]))
        self.head = GraphConv(dims[-1], num_classes)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        adj = normalized_adjacency(edge_index, x.shape[0])
        for block in self.blocks:
            x = block(F.dropout(x, self.dropout, self.training), adj, edge_index)
        return self.head(F.dropout(x, self.dropout, self.training), adj)


__all__ = ["GCN", "GCNBlock", "GraphConv", "NORMS", "PairNorm", "normalized_adjacency"]
