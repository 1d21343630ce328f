"""Oversmoothing / dimensional-collapse metrics of token or node representations, and per-layer hooks.

Both take ``x`` [N, D] (one set of rows: a graph's nodes) or [B, L, D] (B sequences: the metric
of each sequence's L rows, averaged over B).  They run in float64 without gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import PositiveInt, check_value

MAX_COUNT_CELLS = 2 ** 28  # C x K token-class counts: 2 GiB of int64, with its float64 copies 6 GiB


def _sets(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"x must be a [N, D] or [B, L, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    x = x.detach().to(torch.float64)
    return x[None] if x.dim() == 2 else x


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity over pairs of distinct rows, ``1/(n(n-1)) sum_{i != j} x_i.x_j / (|x_i||x_j|)``.

    Computed without the n x n matrix: ``sum_{i != j} u_i.u_j = |sum_i u_i|^2 - sum_i |u_i|^2`` for
    the unit rows ``u_i`` (a zero row counts as similarity 0).  1 means all rows point the same way.
    """
    x = _sets(x)
    n = x.shape[1]
    if n < 2:
        raise ValueError(f"mean_pairwise_cosine needs at least 2 rows per set, got {n}")
    u = F.normalize(x, dim=-1)
    pairs = u.sum(1).square().sum(-1) - u.square().sum((1, 2))
    return (pairs / (n * (n - 1))).mean().item()


def effective_rank(x: torch.Tensor) -> float:
    """``exp(H(p))`` with ``p = sigma / sum(sigma)`` over the singular values ``sigma`` of x (no centring).

    Between 1 (all rows parallel) and ``min(n, D)`` (equal singular values, e.g. orthonormal rows).
    """
    sigma = torch.linalg.svdvals(_sets(x))
    p = sigma / sigma.sum(-1, keepdim=True).clamp_min(torch.finfo(sigma.dtype).tiny)
    return torch.special.entr(p).sum(-1).exp().mean().item()


class LayerStats:
    """Records ``mean_pairwise_cosine`` and ``effective_rank`` of chosen modules' outputs via forward hooks.

    ``targets``: module names (as in ``model.named_modules()``, kept in that order) or module
    types.  Use as a context manager around forward passes; ``stats.layers`` is then one dict per
    layer, ``{"name", "mean_cosine", "effective_rank"}``, averaged over the recorded calls::

        with LayerStats(vit, [f"blocks.{i}" for i in range(depth)] + ["norm"]) as stats:
            vit(images)
        stats.layers[-1]["effective_rank"]
    """

    def __init__(self, model: nn.Module, targets):
        if isinstance(targets, type) or (isinstance(targets, tuple) and all(isinstance(t, type) for t in targets)):
            self.modules = [(n, m) for n, m in model.named_modules() if isinstance(m, targets)]
        else:
            named = dict(model.named_modules())
            missing = [t for t in targets if t not in named]
            if missing:
                raise ValueError(f"no module named {missing} in the model")
            self.modules = [(t, named[t]) for t in targets]
        if not self.modules:
            raise ValueError(f"no module of the model matches {targets!r}")
        self._records = {name: [] for name, _ in self.modules}
        self._handles = []

    def __enter__(self) -> LayerStats:
        for name, module in self.modules:
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            self._records[name].append((mean_pairwise_cosine(out), effective_rank(out)))
        return hook

    @property
    def layers(self) -> list[dict]:
        rows = []
        for name, _ in self.modules:
            rec = self._records[name]
            if rec:
                cos, rank = (sum(v) / len(rec) for v in zip(*rec))
                rows.append({"name": name, "mean_cosine": cos, "effective_rank": rank})
        return rows


__all__ = ["LayerStats", "effective_rank", "mean_pairwise_cosine"]


# ---------------------------------------------------------------------------------------------
# Tokenizer-class alignment (ClusterMIM; docs/methods.md).


def _token_class_pairs(tokens, labels):
    """Flatten ``tokens`` ([N] or [B, P] with per-image ``labels`` [B]) to matching int64 [M] pairs."""
    tokens = torch.as_tensor(tokens)
    labels = torch.as_tensor(labels)
    if tokens.is_floating_point() or labels.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError("tokens and labels must be integer tensors")
    if tokens.dim() == 2 and labels.dim() == 1 and labels.shape[0] == tokens.shape[0]:
        labels = labels[:, None].expand_as(tokens)
    if tokens.shape != labels.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)} do not match: "
                         "give tokens [B, P] with labels [B], or both of one shape")
    tokens, labels = tokens.reshape(-1).long().cpu(), labels.reshape(-1).long().cpu()
    if tokens.numel() == 0:
        raise ValueError("tokens is empty")
    return tokens, labels


def token_class_counts(tokens, labels, n_tokens: int, n_classes: int) -> torch.Tensor:
    """The C x K count matrix ``N[c, k]`` of patches of class ``c`` assigned to token ``k`` (int64)."""
    check_value("n_tokens", n_tokens, PositiveInt)
    check_value("n_classes", n_classes, PositiveInt)
    if n_tokens * n_classes > MAX_COUNT_CELLS:
        raise ValueError(f"n_tokens x n_classes = {n_tokens:,} x {n_classes:,} count cells is more than "
                         f"{MAX_COUNT_CELLS:,} (the int64 count matrix alone would take "
                         f"{n_tokens * n_classes * 8 / 2 ** 30:,.0f} GiB)")
    tokens, labels = _token_class_pairs(tokens, labels)
    if int(tokens.min()) < 0 or int(tokens.max()) >= n_tokens:
        raise ValueError(f"tokens must lie in [0, n_tokens={n_tokens})")
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(f"labels must lie in [0, n_classes={n_classes})")
    return torch.bincount(labels * n_tokens + tokens, minlength=n_classes * n_tokens).view(n_classes, n_tokens)


def tcas(tokens, labels, n_tokens: int, n_classes: int) -> float:
    """Token-class alignment score of a discrete tokenizer (training-free; lower is better).

    **Our reading** of the ClusterMIM paper's TCAS (docs/methods.md, "TCAS"; not the
    authors' code).  From the C x K count matrix ``N[c, k]`` (patches of image class c given token k)
    and ``p(c, k) = N / sum N``::

        TCAS = 1 - (1/C) sum_c sum_k p(c, k)^2 / (p(c) p(k))

    zero-probability terms skipped.  ``sum_k p(k|c) p(c|k)`` is the chance that another patch
    sharing a class-c patch's token is also of class c, so TCAS is the chance that it comes from
    a different class, averaged over the C classes that occur in ``labels``: 0 when every token is
    class-pure, ``1 - 1/C`` for a class-blind tokenizer in the limit of many patches per token.  On
    N patches the plug-in value is biased low by about ``(1 - 1/C) K / N`` (fragmentation pays: one
    token per image scores 0), so read it beside :func:`tcas_class_blind` at the same K and N and
    compare tokenizers only at equal K.

    ``tokens``: int [B, P] (patch tokens per image, with ``labels`` [B] per image) or flat [N]
    with ``labels`` [N].
    """
    n = token_class_counts(tokens, labels, n_tokens, n_classes).double()
    p = n / n.sum()
    pc, pk = p.sum(1), p.sum(0)
    nz = p > 0
    ci, ki = torch.nonzero(nz, as_tuple=True)
    same = (p[nz] ** 2 / (pc[ci] * pk[ki])).sum()
    c_present = int((pc > 0).sum())
    return float(1 - same / c_present)


def tcas_class_blind(tokens, labels, n_tokens: int, n_classes: int) -> float:
    """The expected TCAS of a class-blind tokenizer with the same token and class counts: the tokens
    dealt to the patches at random (every count matrix with these margins, hypergeometric).  TCAS is
    linear in ``N[c, k]^2`` once the margins are fixed, so the expectation is exact::

        E[TCAS] = (1 - 1/C) (1 - (K' - 1) / (N - 1))

    with K' the tokens that occur, C the classes, N the patches.  ``tcas_class_blind - tcas`` is the
    alignment a tokenizer has beyond chance at its K and N."""
    n = token_class_counts(tokens, labels, n_tokens, n_classes)
    total, k_used, c_present = int(n.sum()), int((n.sum(0) > 0).sum()), int((n.sum(1) > 0).sum())
    if total < 2:
        raise ValueError("tcas_class_blind needs at least 2 patches")
    return (1 - 1 / c_present) * (1 - (k_used - 1) / (total - 1))


def tcas_label_permuted(tokens, labels, n_tokens: int, n_classes: int, *, permutations: int = 100,
                        seed: int = 0) -> float:
    """TCAS under the null that keeps each image's tokens and permutes the images' labels: the mean TCAS over
    ``permutations`` random permutations (seeded by ``seed``).  Unlike :func:`tcas_class_blind`, which deals
    tokens to *patches* and so breaks the within-image clustering of tokens, this null keeps it: a tokenizer
    giving each image its own token uses no class information and scores about 0 here (about ``1 - 1/C`` by the
    patch deal).  ``tokens``: int [B, P] with ``labels`` [B] (one label per image)."""
    tokens, labels = torch.as_tensor(tokens), torch.as_tensor(labels)
    if tokens.ndim != 2 or labels.shape != tokens.shape[:1]:
        raise ValueError(f"tokens must be [B, P] with labels [B] (one label per image), got {tuple(tokens.shape)} "
                         f"and {tuple(labels.shape)}")
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations must be a positive integer, got {permutations!r}")
    generator = torch.Generator().manual_seed(seed)
    return sum(tcas(tokens, labels[torch.randperm(len(labels), generator=generator)], n_tokens, n_classes)
               for _ in range(permutations)) / permutations


def token_class_nmi(tokens, labels) -> float:
    """Normalized mutual information between patch token and image class (arithmetic mean
    normalisation, ``sklearn.metrics.normalized_mutual_info_score``); higher = more aligned.
    ``tokens`` [B, P] with ``labels`` [B], or both flat."""
    from sklearn.metrics import normalized_mutual_info_score

    tokens, labels = _token_class_pairs(tokens, labels)
    return float(normalized_mutual_info_score(labels.numpy(), tokens.numpy()))


__all__ += ["tcas", "tcas_class_blind", "tcas_label_permuted", "token_class_counts", "token_class_nmi"]
