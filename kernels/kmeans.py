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
    HAS_TRITON,
    KernelSpec,
    cdiv,
    check_finite,
    check_float,
    check_same,
    interpreting,
    new_output,
    resolve_backend,
    tl,
    triton,
    unit_rows,
    validating,
)
from ._tiles import d_tiling, load_rows, sim_tile, size_bucket, tuned, upcast

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


def _check_assign(x, centroids, validate=None):
    """Shapes, dtypes, devices always; finiteness (reads the data) where :func:`validating` says so."""
    check_float("x", x, 2)
    check_float("centroids", centroids, 2)
    check_same("centroids", centroids, "x", x)
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids have dimension {centroids.shape[1]} but x has {x.shape[1]}")
    if validating(x.device, validate):
        check_finite("x", x)
        check_finite("centroids", centroids)


# ---------------------------------------------------------------------------------------------
# Triton kernel.

if HAS_TRITON:

    @triton.jit
    def _assign_kernel(X, C, HALF_NORM, LABEL, DIST, N, K, D, stride_x, stride_c, size_bucket,
                       EVEN_K: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr):
        """``LABEL_i = argmax_k (x_i . c_k - |c_k|^2/2)``, ``DIST_i = max(|x_i|^2 - 2 max_k (...), 0)``.

        A row block of X is one program (its tile loaded once when D is one chunk, and |x|^2 taken
        from that tile: no fp32 copy of X anywhere); centroid tiles stream through the tensor cores
        with a running max/argmax.  Ties: the lowest index (left tie-break within a block, a strict
        comparison across blocks).
        """
        row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < N
        offs_n = tl.arange(0, BLOCK_N)
        dd = tl.arange(0, BLOCK_D)
        x_ptrs = X + row0 * stride_x + tl.arange(0, BLOCK_M)[:, None] * stride_x + dd[None, :]
        c_ptrs = C + offs_n[:, None] * stride_c + dd[None, :]
        x = load_rows(x_ptrs, rmask, 0, D, EVEN_D, UPCAST, BLOCK_D)  # the X tile when D is one chunk
        if D_CHUNKS == 1:
            xf = x.to(tl.float32)
            x_sq = tl.sum(xf * xf, 1)
        else:
            x_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
            for d0 in tl.range(0, D, BLOCK_D):
                xf = load_rows(x_ptrs, rmask, d0, D, EVEN_D, UPCAST, BLOCK_D).to(tl.float32)
                x_sq += tl.sum(xf * xf, 1)
        best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        best_k = tl.zeros([BLOCK_M], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_N):
            cols = k0 + offs_n
            cmask = cols < K
            s = sim_tile(x, x_ptrs, c_ptrs, rmask, cmask, D, EVEN_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
                         D_CHUNKS)
            if EVEN_K:
                s = s - tl.load(HALF_NORM + cols)[None, :]
            else:  # a missing centroid's half-norm is +inf: its score -inf
                s = s - tl.load(HALF_NORM + cols, mask=cmask, other=float("inf"))[None, :]
            blk_best, blk_k = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
            better = blk_best > best  # strict: an equal score in a later block keeps the lower index
            best = tl.where(better, blk_best, best)
            best_k = tl.where(better, k0 + blk_k, best_k)
            c_ptrs += BLOCK_N * stride_c
        tl.store(LABEL + rows, best_k.to(tl.int64), mask=rmask)
        tl.store(DIST + rows, tl.maximum(x_sq - 2 * best, 0.0), mask=rmask)


# (BLOCK_M, BLOCK_N, num_warps, num_stages): 128 rows over two warpgroups, centroid tiles 64 or 128
# wide; tests/test_compile.py compiles each, as launched, for sm_80 and sm_90a.  None timed on a GPU yet.
ASSIGN_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 2)]
INTERP_CONFIG = (32, 16, 1, 1)

if HAS_TRITON:
    _assign_tuned = tuned(_assign_kernel, ASSIGN_CONFIGS, ["D", "size_bucket", "K"], {"EVEN_K": ("K", "BLOCK_N")})


def aot_specs(dtype: str = "bf16", d: int = 128, cc: int = 90):
    """Every autotune config as a :class:`KernelSpec` (tests/test_compile.py), with the launch arguments of
    N = 10^7 points and K = 8192 centroids (pointers aligned, dims divisible by 16)."""
    t = torch.empty(16, dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    args = dict(X=t, C=t, HALF_NORM=torch.empty(16), LABEL=torch.empty(16, dtype=torch.int64), DIST=torch.empty(16),
                N=10**7, K=8192, D=d, stride_x=d, stride_c=d, size_bucket=size_bucket(10**7))
    common = dict(UPCAST=False, PRECISION="tf32" if dtype == "fp32" else "ieee", EVEN_K=True,
                  **d_tiling(d, t.element_size()))
    return [KernelSpec(f"kmeans_assign[{bm}x{bn}w{w}s{st}]", _assign_kernel, args, dict(common, BLOCK_M=bm, BLOCK_N=bn),
                       w, st, mma=True)
            for bm, bn, w, st in ASSIGN_CONFIGS]


@torch.library.custom_op("sslcore::kmeans_assign", mutates_args=())
def _assign_op(x: torch.Tensor, centroids: torch.Tensor, allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    k = centroids.shape[0]
    half_norm = torch.linalg.vector_norm(centroids, dim=1, dtype=torch.float32).square() * 0.5
    labels = new_output((n,), device=x.device, dtype=torch.int64)
    dist = new_output((n,), device=x.device, dtype=torch.float32)
    prec = "tf32" if (allow_tf32 and x.dtype == torch.float32 and not interpreting()) else "ieee"
    args = (x, centroids, half_norm, labels, dist, n, k, d, x.stride(0), centroids.stride(0), size_bucket(n))
    meta = dict(UPCAST=upcast(x.dtype), PRECISION=prec, **d_tiling(d, x.element_size()))
    if interpreting():
        bm, bn, _, _ = INTERP_CONFIG
        _assign_kernel[(cdiv(n, bm),)](*args, BLOCK_M=bm, BLOCK_N=bn, EVEN_K=k % bn == 0, **meta)
    else:
        _assign_tuned[lambda m: (cdiv(n, m["BLOCK_M"]),)](*args, **meta)
    return labels, dist


@_assign_op.register_fake
def _(x, centroids, allow_tf32):
    return x.new_empty(x.shape[0], dtype=torch.int64), x.new_empty(x.shape[0], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Public functional API.


@torch.no_grad()
def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, *, allow_tf32: bool = False, backend: str = "auto",
                  validate: bool | None = None):
    """Nearest centroid by squared L2: ``(labels int64 [N], distances [N])``, ties to the lowest index.

    ``x`` [N, D] and ``centroids`` [K, D] of one float dtype on one device; distances are fp32 (fp64 for
    fp64 input, which runs on torch).  No N x K matrix on either path; the Triton path reads X once
    and makes no copy of it.  ``validate``: see :func:`~sslcore.kernels._backend.validating`.
    """
    _check_assign(x, centroids, validate)
    be = resolve_backend(backend, x.device)
    if x.dtype == torch.float64:
        if backend == "triton":
            raise TypeError("backend='triton' takes float32/float16/bfloat16 inputs, got float64")
        be = "torch"
    if be == "torch":
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


UPDATE_CHUNK_BYTES = 256 * 2**20  # fp32 rows of X per step of the deterministic GPU update


@torch.no_grad()
def kmeans_update(x: torch.Tensor, labels: torch.Tensor, n_clusters: int, *, deterministic: bool = True,
                  validate: bool | None = None):
    """Per-cluster ``(sums [K, D] fp32 (fp64 for fp64), counts int64 [K])``, without host synchronisation.

    Deterministic by default: on a GPU the rows sorted by label, then segment sums over chunks of
    them, added in a fixed order (no float atomics, no fp32 copy of all of X); on the CPU
    ``index_add_``, which is sequential there and so reproducible.  ``deterministic=False`` uses
    ``index_add_`` on a GPU too (float atomics: faster, not bit-reproducible).  ``validate`` (the
    label range, which reads the labels): see :func:`~sslcore.kernels._backend.validating`.
    """
    check_float("x", x, 2)
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (x.shape[0],):
        raise ValueError(f"labels must be an int64 tensor of shape [{x.shape[0]}]")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
    if labels.device != x.device:
        raise ValueError(f"labels are on {labels.device} but x is on {x.device}")
    if validating(x.device, validate) and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_clusters):
        raise ValueError(f"labels must lie in [0, {n_clusters})")
    wide = torch.promote_types(x.dtype, torch.float32)
    counts = torch.zeros(n_clusters, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, labels, torch.ones_like(labels))
    sums = torch.zeros(n_clusters, x.shape[1], device=x.device, dtype=wide)
    if not deterministic or x.device.type == "cpu":
        return sums.index_add_(0, labels, x.to(wide)), counts
    return _sorted_segment_sums(x, labels, sums), counts


def _sorted_segment_sums(x, labels, sums):
    """``sums += per-cluster sums of x``: rows sorted by label, segment sums over chunks of them added
    in order (deterministic on any device; an fp32 copy of one chunk at a time)."""
    order = torch.argsort(labels, stable=True)
    step = max(1, UPDATE_CHUNK_BYTES // (4 * x.shape[1]))
    for i in range(0, x.shape[0], step):
        idx = order[i:i + step]
        part = labels[idx]  # sorted: each cluster's rows of this chunk are one segment
        lengths = torch.zeros(len(sums), dtype=torch.int64, device=x.device).scatter_add_(0, part,
                                                                                          torch.ones_like(part))
        sums += torch.segment_reduce(x[idx].to(sums.dtype), "sum", lengths=lengths, axis=0, unsafe=True)
    return sums


@torch.no_grad()
def nearest_cosine(queries: torch.Tensor, bank: torch.Tensor, *, backend: str = "auto",
                   validate: bool | None = None):
    """Top-1 cosine search: ``(index int64 [N], similarity fp32 [N])`` of each query's nearest bank row.

    The assignment kernel on unit vectors: ``argmax cos = argmin |q_hat - b_hat|^2``.
    """
    _check_assign(queries, bank, validate)
    idx, dist = kmeans_assign(unit_rows(queries), unit_rows(bank), backend=backend, validate=False)
    return idx, 1 - dist / 2
