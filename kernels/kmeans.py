"""k-means: nearest-centroid assignment fused (no N x K matrix), centroid update, top-1 cosine search.

Assignment by squared L2, ``label_i = argmin_k |x_i - c_k|^2 = argmax_k (x_i . c_k - |c_k|^2 / 2)``:
tiles of X C^T on tensor cores, minus the half-norms, with a running max/argmax over the K
blocks per row; ties go to the lowest index (within a block by ``tl.argmax``'s left tie-break,
across blocks by a strict comparison), so results are deterministic.  The distance returned is
``|x_i|^2 - 2 max_k (...)``, clamped at 0.  fp32 inputs multiply in IEEE fp32 (``allow_tf32=True``
trades that for TF32 speed); fp16/bf16 inputs use their tensor cores with fp32 accumulation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import (
    HAS_TRITON, KernelSpec, cdiv, check_finite, check_float, check_same, interpreting, new_output, resolve_backend, tl, triton,
)
from ._tiles import autotuned, block_d, d_chunks, sim_tile, upcast

# ---------------------------------------------------------------------------------------------
# Plain-torch references.


def kmeans_assign_ref(x: torch.Tensor, centroids: torch.Tensor):
    """``(argmin_k |x_i - c_k|^2, min_k |x_i - c_k|^2)`` from the full N x K matrix (first index on ties)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    d = ((x.to(wide)[:, None, :] - centroids.to(wide)[None, :, :]) ** 2).sum(-1)
    dist, labels = d.min(dim=1)
    return labels, dist


def kmeans_update_ref(x: torch.Tensor, labels: torch.Tensor, n_clusters: int):
    """Per-cluster ``(sums [K, D], counts [K])`` by a one-hot matrix product."""
    wide = torch.promote_types(x.dtype, torch.float32)
    onehot = F.one_hot(labels, n_clusters).to(wide)
    return onehot.T @ x.to(wide), onehot.sum(0).long()


# ---------------------------------------------------------------------------------------------
# Checks.


def _check_assign(x, centroids):
    check_float("x", x, 2)
    check_float("centroids", centroids, 2)
    check_same("centroids", centroids, "x", x)
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids have dimension {centroids.shape[1]} but x has {x.shape[1]}")
    if not torch.compiler.is_compiling():
        check_finite("x", x)
        check_finite("centroids", centroids)


# ---------------------------------------------------------------------------------------------
# Triton kernel.

if HAS_TRITON:

    @triton.jit
    def _assign_kernel(X, C, HALF_NORM, LABEL, SCORE, N, K, D, stride_x, stride_c,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """``LABEL_i = argmax_k (x_i . c_k - |c_k|^2/2)`` and that maximum, over K in blocks."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        best_k = tl.zeros([BLOCK_M], dtype=tl.int64)
        for k0 in range(0, K, BLOCK_N):
            cols = k0 + tl.arange(0, BLOCK_N)
            cmask = cols < K
            s = sim_tile(X, C, rows, cols, rmask, cmask, D, stride_x, stride_c,
                         BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
            s = s - tl.load(HALF_NORM + cols, mask=cmask, other=0.0)[None, :]
            s = tl.where(cmask[None, :], s, float("-inf"))
            blk_best, blk_k = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
            better = blk_best > best  # strict: an equal score in a later block keeps the lower index
            best = tl.where(better, blk_best, best)
            best_k = tl.where(better, (k0 + blk_k).to(tl.int64), best_k)
        tl.store(LABEL + rows, best_k, mask=rmask)
        tl.store(SCORE + rows, best, mask=rmask)


# (BLOCK_M, BLOCK_N, num_warps, num_stages); each must compile for sm_80 and sm_90a without
# spills (tests/test_compile.py).  None has been timed on a GPU yet.
ASSIGN_CONFIGS = [(64, 32, 4, 2)]
INTERP_CONFIG = (32, 16, 1, 1)

if HAS_TRITON:
    _assign_tuned = autotuned(_assign_kernel, ASSIGN_CONFIGS, ["D", "K"])


def aot_specs(dtype: str = "bf16", d: int = 128):
    """Every autotune config as a :class:`KernelSpec` (tests/test_compile.py), with the launch arguments of
    N = 10^7 points and K = 8192 centroids (pointers aligned, dims divisible by 16)."""
    t = torch.empty(16, dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    args = dict(X=t, C=t, HALF_NORM=torch.empty(16), LABEL=torch.empty(16, dtype=torch.int64), SCORE=torch.empty(16),
                N=10**7, K=8192, D=d, stride_x=d, stride_c=d)
    common = {"UPCAST": False, "PRECISION": "ieee", "BLOCK_D": block_d(d), "D_CHUNKS": d_chunks(d)}
    return [KernelSpec(f"kmeans_assign[{bm}x{bn}w{w}s{st}]", _assign_kernel, args, dict(common, BLOCK_M=bm, BLOCK_N=bn),
                       w, st, mma=True)
            for bm, bn, w, st in ASSIGN_CONFIGS]


@torch.library.custom_op("sslcore::kmeans_assign", mutates_args=())
def _assign_op(x: torch.Tensor, centroids: torch.Tensor, allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    k = centroids.shape[0]
    half_norm = (centroids.float() ** 2).sum(1) * 0.5
    labels = new_output((n,), device=x.device, dtype=torch.int64)
    score = new_output((n,), device=x.device, dtype=torch.float32)
    prec = "tf32" if (allow_tf32 and x.dtype == torch.float32 and not interpreting()) else "ieee"
    args = (x, centroids, half_norm, labels, score, n, k, d, x.stride(0), centroids.stride(0))
    meta = dict(BLOCK_D=block_d(d), D_CHUNKS=d_chunks(d), UPCAST=upcast(x.dtype), PRECISION=prec)
    if interpreting():
        bm, bn, _, _ = INTERP_CONFIG
        _assign_kernel[(cdiv(n, bm),)](*args, BLOCK_M=bm, BLOCK_N=bn, **meta)
    else:
        _assign_tuned[lambda m: (cdiv(n, m["BLOCK_M"]),)](*args, **meta)
    dist = ((x.float() ** 2).sum(1) - 2 * score).clamp_min(0)
    return labels, dist


@_assign_op.register_fake
def _(x, centroids, allow_tf32):
    return x.new_empty(x.shape[0], dtype=torch.int64), x.new_empty(x.shape[0], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Public functional API.


@torch.no_grad()
def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, *, allow_tf32: bool = False, backend: str = "auto"):
    """Nearest centroid by squared L2: ``(labels int64 [N], distances fp32 [N])``, ties to the lowest index.

    ``x`` [N, D] and ``centroids`` [K, D] of one float dtype on one device.  No N x K matrix on the
    Triton path; the torch path works in chunks of rows.
    """
    _check_assign(x, centroids)
    be = resolve_backend(backend, x.device)
    if be == "torch" or x.dtype == torch.float64:
        return _assign_torch(x, centroids)
    return _assign_op(x.contiguous(), centroids.contiguous(), allow_tf32)


def _assign_torch(x: torch.Tensor, centroids: torch.Tensor):
    """The kernel's math in torch: per chunk of rows, ``max_k x.c_k - |c_k|^2/2`` by one ``addmm`` in at
    least fp32 (first index on ties), ``dist = |x|^2 - 2 max``.  Chunks of ~4 MB of scores stay in
    cache (3x faster on CPU than one big score matrix); never an N x K x D tensor."""
    wide = torch.promote_types(x.dtype, torch.float32)
    c = centroids.to(wide)
    half_norm = (c * c).sum(1) * 0.5
    chunk = max(64, (1 << 20) // c.shape[0])
    labels, dist = [], []
    for xs in x.split(chunk):
        xs = xs.to(wide)
        score, idx = torch.addmm(half_norm, xs, c.T, beta=-1).max(1)
        labels.append(idx)
        dist.append(((xs * xs).sum(1) - 2 * score).clamp_min(0))
    return torch.cat(labels), torch.cat(dist)


@torch.no_grad()
def kmeans_update(x: torch.Tensor, labels: torch.Tensor, n_clusters: int, *, deterministic: bool = True):
    """Per-cluster ``(sums fp32 [K, D], counts int64 [K])``.

    Deterministic by default: on a GPU rows sorted by label, then a segment sum; on the CPU
    ``index_add_``, which is sequential there and so reproducible.  ``deterministic=False`` uses
    ``index_add_`` on a GPU too (float atomics: faster, not bit-reproducible).
    """
    check_float("x", x, 2)
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (x.shape[0],):
        raise ValueError(f"labels must be an int64 tensor of shape [{x.shape[0]}]")
    if not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_clusters):
        raise ValueError(f"labels must lie in [0, {n_clusters})")
    wide = torch.promote_types(x.dtype, torch.float32)
    counts = torch.bincount(labels, minlength=n_clusters)
    if not deterministic or x.device.type == "cpu":
        return torch.zeros(n_clusters, x.shape[1], device=x.device, dtype=wide).index_add_(0, labels, x.to(wide)), counts
    order = torch.argsort(labels, stable=True)
    sums = torch.segment_reduce(x[order].to(wide), "sum", lengths=counts, axis=0, unsafe=True)
    return sums, counts


@torch.no_grad()
def nearest_cosine(queries: torch.Tensor, bank: torch.Tensor, *, backend: str = "auto"):
    """Top-1 cosine search: ``(index int64 [N], similarity fp32 [N])`` of each query's nearest bank row.

    The assignment kernel on unit vectors: ``argmax cos = argmin |q_hat - b_hat|^2``.
    """
    _check_assign(queries, bank)
    q, b = F.normalize(queries.float(), dim=1).to(queries.dtype), F.normalize(bank.float(), dim=1).to(bank.dtype)
    idx, dist = kmeans_assign(q, b, backend=backend)
    return idx, 1 - dist / 2
