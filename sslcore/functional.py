"""``torch.nn.functional``-style entry points (tensors positional, options keyword-only) over the
fused InfoNCE op.

``gather_distributed`` follows lightly's convention (:mod:`sslcore.dist`): ``True`` -- this rank's
rows against the keys of every rank, gathered; ``"ring"`` -- the same loss with the key blocks passed
round the ring of ranks instead of gathered (memory O(M/W . D) per rank); either way the result is
the mean over this rank's rows, and DDP's gradient average makes it the single-process gradient.
Not distributed (or one process): the plain loss.
"""
from __future__ import annotations

from typing import Literal, Union

import torch

from . import dist
from .kernels import infonce, infonce_messages as _infonce_messages, infonce_terms, lse_similarity
from .kernels._backend import check_finite, unit_rows, validating
from .kernels.infonce import _check_args, _reduce

GatherMode = Union[bool, Literal["ring"]]
GATHER_MODES = (False, True, "ring")


def _mode(gather_distributed) -> str | None:
    """``"gather"``, ``"ring"``, or None where nothing is distributed."""
    if gather_distributed not in GATHER_MODES or isinstance(gather_distributed, int) and not isinstance(
            gather_distributed, bool):
        raise ValueError(f"gather_distributed must be False, True or 'ring', got {gather_distributed!r}")
    if not gather_distributed or dist.world_size() == 1:
        return None
    return "ring" if gather_distributed == "ring" else "gather"


def _two_views(out0, out1):
    for name, t in (("out0", out0), ("out1", out1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if out0.shape != out1.shape:
        raise ValueError(f"out0 and out1 must have the same shape, got {tuple(out0.shape)} and {tuple(out1.shape)}")
    if out0.dim() != 2:
        raise ValueError(f"out0 and out1 must be [N, D], got shape {tuple(out0.shape)}")


def nt_xent(out0: torch.Tensor, out1: torch.Tensor, *, temperature: float = 0.5, weight: torch.Tensor | None = None,
            gather_distributed: GatherMode = False, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """SimCLR's NT-Xent of two views ``[N, D]`` each (row i of out0 pairs with row i of out1): the rows
    ``z = [out0; out1]``, positive of row i row ``(i + N) mod 2N``, negatives every other row (of every
    rank).  ``weight`` [N]: a per-pair weight on the alignment term."""
    _two_views(out0, out1)
    z = torch.cat([out0, out1])
    w = torch.cat([weight, weight]) if weight is not None else None
    mode = _mode(gather_distributed)
    if mode is None:
        return infonce(z, temperature=temperature, weight=w, reduction=reduction, backend=backend)
    if mode == "gather":
        return infonce(z, dist.gather(z), self_offset=dist.rank() * len(z), temperature=temperature, weight=w,
                       reduction=reduction, backend=backend)
    _check_args(z, None, temperature, None, None, w, False, reduction)
    zn = unit_rows(z)
    m = len(z)
    pos = (torch.arange(m, device=z.device) + m // 2) % m
    align = (zn * zn[pos]).sum(1).to(torch.promote_types(z.dtype, torch.float32)) / temperature
    unif = dist.ring_lse(zn, zn, scale=1.0 / temperature, unit_norm=True, exclude_own=True, backend=backend)
    return _reduce(unif.to(align.dtype) - align * (1.0 if w is None else w.to(align.dtype)), reduction)


def supcon(z: torch.Tensor, labels: torch.Tensor, *, temperature: float = 0.1, gather_distributed: bool = False,
           reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Supervised contrastive loss: positives of row i are all other rows with its label (of every rank)."""
    mode = _mode(gather_distributed)
    if mode is None:
        return infonce(z, temperature=temperature, labels=labels, reduction=reduction, backend=backend)
    if mode == "ring":
        raise ValueError("supcon needs every key's label to sum a class: use gather_distributed=True, not 'ring'")
    return infonce(z, dist.gather(z), self_offset=dist.rank() * len(z), labels=dist.gather(labels),
                   temperature=temperature, reduction=reduction, backend=backend)


def infonce_pairs(query: torch.Tensor, key: torch.Tensor, *, temperature: float = 0.2,
                  queue: torch.Tensor | None = None, symmetric: bool = False, gather_distributed: GatherMode = False,
                  reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Query/key InfoNCE (MoCo; CLIP with ``symmetric=True``): query i's positive is key i, its negatives
    every other key of every rank and the rows of ``queue`` (the same on every rank).  ``symmetric``:
    the mean of both directions, keys as queries against the queries."""
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if query.shape != key.shape:
        raise ValueError(f"query and key must have the same shape, got {tuple(query.shape)} and {tuple(key.shape)}")
    if symmetric and queue is not None:
        raise ValueError("symmetric=True (CLIP) takes no queue")
    mode = _mode(gather_distributed)
    if mode is None:
        keys = key if queue is None else torch.cat([key, queue.to(key.dtype)])
        return infonce(query, keys, temperature=temperature, symmetric=symmetric, reduction=reduction,
                       backend=backend)
    if mode == "gather":
        pos = dist.rank() * len(key) + torch.arange(len(key), device=key.device)

        def direction(q, k):
            keys = dist.gather(k)
            keys = keys if queue is None or k is not key else torch.cat([keys, queue.to(keys.dtype)])
            return infonce(q, keys, pos_index=pos, temperature=temperature, reduction="none", backend=backend)
        loss = direction(query, key)
        return _reduce(0.5 * (loss + direction(key, query)) if symmetric else loss, reduction)
    _check_args(query, key, temperature, None, None, None, False, reduction)
    qn, kn = unit_rows(query), unit_rows(key)
    scale = 1.0 / temperature
    align = (qn * kn).sum(1).to(torch.promote_types(query.dtype, torch.float32)) * scale

    def uniformity(q, k, with_queue):
        lse = dist.ring_lse(q, k, scale=scale, unit_norm=True, backend=backend)
        if with_queue:
            lse = torch.logaddexp(lse, lse_similarity(q, unit_rows(queue.to(q.dtype)), scale=scale, unit_norm=True,
                                                      backend=backend))
        return lse.to(align.dtype)
    loss = uniformity(qn, kn, queue is not None) - align
    if symmetric:
        loss = 0.5 * (loss + uniformity(kn, qn, False) - align)
    return _reduce(loss, reduction)


def dcl(out0: torch.Tensor, out1: torch.Tensor, *, temperature: float = 0.1, weight_fn=None,
        gather_distributed: GatherMode = False, backend: str = "auto") -> torch.Tensor:
    """Decoupled contrastive loss (Yeh et al., 2021), as lightly computes it: for row i of out0,
    ``-w_i s(z0_i, z1_i) + log sum_{j != i} [exp s(z0_i, z0_j) + exp s(z0_i, z1_j)]`` -- the positive out of
    the denominator -- and the same for out1; the mean of the two views' means.  ``weight_fn(a, b) -> [N]``
    gives ``w`` from the unit rows, ``(z0, z1)`` for out0's side and ``(z1, z0)`` for out1's (lightly's
    order); DCLW's is :func:`mises_fisher_weights`."""
    _two_views(out0, out1)
    _check_args(out0, out1, temperature, None, None, None, False, "mean")
    mode, scale = _mode(gather_distributed), 1.0 / temperature
    if len(out0) * (dist.world_size() if mode else 1) == 1:
        raise ValueError("out0 and out1 hold 1 sample each: DCL's negatives are the batch's other samples (the "
                         "positive is left out of the denominator), so the loss would be -inf; give at least 2")
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"weight_fn must be callable (a, b) -> [N] weights, got {type(weight_fn).__name__}")
    n0, n1 = unit_rows(out0), unit_rows(out1)
    wide = torch.promote_types(out0.dtype, torch.float32)

    def lse(a, b):  # a's rows against b's rows of every rank, row i's own index left out
        if mode == "ring":
            return dist.ring_lse(a, b, scale=scale, unit_norm=True, exclude_own=True, backend=backend)
        keys = dist.gather(b) if mode == "gather" else b
        return lse_similarity(a, keys, scale=scale, unit_norm=True, self_offset=dist.rank() * len(a) if mode else 0,
                              backend=backend)

    def side(a, b):
        positive = (a * b).sum(1).to(wide) * scale
        if weight_fn is not None:
            w = torch.as_tensor(weight_fn(a, b), device=a.device)
            if w.shape != (len(a),):
                raise ValueError(f"weight_fn must return one weight per row, shape ({len(a)},), got {tuple(w.shape)}")
            if validating(w.device):
                check_finite("the weights weight_fn returned", w)
            positive = positive * w.to(wide)
        return (torch.logaddexp(lse(a, a).to(wide), lse(a, b).to(wide)) - positive).mean()
    return 0.5 * (side(n0, n1) + side(n1, n0))


@torch.no_grad()
def mises_fisher_weights(out0: torch.Tensor, out1: torch.Tensor, sigma: float = 0.5,
                         gather_distributed: GatherMode = False) -> torch.Tensor:
    """DCLW's negative von Mises-Fisher weights ``2 - N softmax_i(cos(out0_i, out1_i) / sigma)`` over the batch
    of N pairs (pairs already aligned weigh less), as lightly computes them in one process.  With
    ``gather_distributed`` the softmax and N run over every rank's pairs (lightly's take each rank's
    alone), so that the ranks' losses average to the single-process loss."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    c = (unit_rows(out0) * unit_rows(out1)).sum(1).to(torch.promote_types(out0.dtype, torch.float32)) / sigma
    lse, n = torch.logsumexp(c, 0), c.shape[0]
    if _mode(gather_distributed):
        lse, n = torch.logsumexp(dist.gather(lse[None], check=False), 0), n * dist.world_size()
    return 2 - n * torch.exp(c - lse)


def infonce_messages(z: torch.Tensor, *, temperature: float = 0.5, pos_index: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                     gather_distributed: bool = False, backend: str = "auto", validate: bool | None = None):
    """The message-passing decomposition of the mean NT-Xent's gradient w.r.t. ``z_hat``
    (:func:`sslcore.kernels.infonce_messages`).  ``gather_distributed=True``: the loss and messages of
    the *global* batch's mean loss, for this rank's rows (``pos_index`` in global row indices, ``labels``
    this rank's); each rank computes its rows against every rank's, the gather's backward brings
    back the messages this rank's rows send to the others."""
    mode = _mode(gather_distributed)
    if mode is None:
        return _infonce_messages(z, temperature=temperature, pos_index=pos_index, labels=labels, weight=weight,
                                 backend=backend, validate=validate)
    if mode == "ring":
        raise ValueError("infonce_messages takes gather_distributed=True, not 'ring'")
    zn = unit_rows(z.detach()).requires_grad_(True)
    keys = dist.gather(zn)
    n, off = keys.shape[0], dist.rank() * len(z)
    with torch.enable_grad():
        align, unif = infonce_terms(zn, keys, temperature=temperature, pos_index=pos_index,
                                    labels=dist.gather(labels) if labels is not None else None, weight=weight,
                                    normalize=False, self_offset=off, backend=backend)
        # this rank's share of the global mean; through the keys the gather's backward adds the others'
        a_loss, u_loss = -align.sum() / n, unif.sum() / n
        g_align, = torch.autograd.grad(a_loss, zn, retain_graph=True)
        g_unif, = torch.autograd.grad(u_loss, zn)
    loss = dist.all_reduce_sum((a_loss + u_loss).detach())
    return loss, g_align, g_unif


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Stored images as float in [0, 1]: uint8 is divided by 255; float and token (integer) data pass unchanged."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


__all__ = ["GATHER_MODES", "GatherMode", "dcl", "infonce", "infonce_messages", "infonce_pairs", "lse_similarity",
           "mises_fisher_weights", "nt_xent", "supcon", "to_float"]
