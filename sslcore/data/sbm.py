"""A seeded stochastic-block-model graph for node classification (class = block; generated, no download)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GraphData:
    """Node features ``x`` [N, F], labels ``y`` [N], undirected ``edge_index`` [2, E] (both directions
    listed) and a fixed split as boolean node masks."""

    x: torch.Tensor
    y: torch.Tensor
    edge_index: torch.Tensor
    train_mask: torch.Tensor
    test_mask: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1


def stochastic_block_model(*, num_blocks: int = 5, block_size: int = 100, p_in: float = 0.05, p_out: float = 0.01,
                           num_features: int = 16, signal: float = 0.5, train_fraction: float = 0.2,
                           seed: int = 0) -> GraphData:
    """Blocks of ``block_size`` nodes; an edge joins two nodes with probability ``p_in`` inside a block,
    ``p_out`` across blocks.  Features: ``signal * mu_class + N(0, I)`` with ``mu_class ~ N(0, I)``,
    so a node alone is a weak clue and its neighbourhood a strong one.  ``train_fraction`` of each
    block trains, the rest tests.  Everything is drawn from ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    n = num_blocks * block_size
    y = torch.arange(num_blocks).repeat_interleave(block_size)
    prob = torch.where(y[:, None] == y[None, :], p_in, p_out)
    upper = torch.triu(torch.rand(n, n, generator=g) < prob, diagonal=1)
    src, dst = upper.nonzero().T
    edge_index = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
    means = torch.randn(num_blocks, num_features, generator=g)
    x = signal * means[y] + torch.randn(n, num_features, generator=g)
    rank = torch.rand(num_blocks, block_size, generator=g).argsort(1).flatten()
    train_mask = rank < round(train_fraction * block_size)
    return GraphData(x, y, edge_index, train_mask, ~train_mask)


__all__ = ["GraphData", "stochastic_block_model"]
