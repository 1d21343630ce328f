"""k-means: nearest-centroid assignment fused (no N x K matrix), centroid update, top-1 cosine search.

Assignment by squared L2, ``label_i = argmin_k |x_i - c_k|^2``: tiles of ``|x_i - c_k|^2 / 2 = (|x_i|^2 +
|c_k|^2) / 2 - x_i . c_k`` on the tensor cores (the accumulator starts at the norms), an integer key per
element (the float's bits, the low ``log2(BLOCK_N)`` replaced by the column) whose minimum is the tile's
nearest column, and a running minimum over the tiles.  Ties go to the lowest index, and so do near-ties
within ``2^-16`` of the distance (the bits the column replaces); the expansion's own rounding adds an
absolute error of a few fp32 ulps of ``|x_i|^2 + |c_k|^2``.  The distance returned is measured to the
chosen centroid by direct differences.  fp16/bf16 points multiply in their own dtype, fp32 in TF32, all
with fp32 accumulation (docs/architecture.md, "k-means").
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
    interpreting,
    new_output,
    next_pow2,
    resolve_backend,
    tl,
    triton,
    unit_rows,
    validating,
)
from ._tiles import d_tiling, load_rows, size_bucket, tuned, upcast

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

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_assign(x, centroids, validate=None):
    """Shapes, dtypes, devices always; finiteness (reads the data) where :func:`validating` says so."""
    check_float("x", x, 2)
    check_float("centroids", centroids, 2)
    if centroids.device != x.device:
        raise ValueError(f"centroids are on {centroids.device} but x is on {x.device}")
    if centroids.dtype != x.dtype and not (centroids.dtype == torch.float32 and x.dtype in LOW_PRECISION):
        raise TypeError(f"centroids has dtype {centroids.dtype} but x has {x.dtype} (fp32 centroids go with "
                        "fp16/bf16 points)")
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids have dimension {centroids.shape[1]} but x has {x.shape[1]}")
    if validating(x.device, validate):
        check_finite("x", x)
        check_finite("centroids", centroids)


# ---------------------------------------------------------------------------------------------
# Triton kernel.

# PTX's ``lop3.b32 d, a, b, c, lut`` computes, bit by bit, ``lut``'s bit number ``4a + 2b + c``: the table of a
# function F is F(0xF0, 0xCC, 0xAA) (PTX ISA, "lop3").  The assignment's key is ``(a & b) | c``.
KEY_LUT = (0xF0 & 0xCC) | 0xAA
KEY_ASM = f"lop3.b32 $0, $1, $2, $3, {KEY_LUT:#x};"

if HAS_TRITON:
    _KEY_ASM = tl.constexpr(KEY_ASM)  # a global a kernel reads must be a constexpr

    @triton.jit
    def _centroid_tile(c_ptrs, cols, K, d0, D, EVEN_K: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        """Columns ``d0 .. d0 + BLOCK_D`` of a tile of centroids; no row mask when K is a multiple of the tile."""
        if EVEN_K:
            return load_rows(c_ptrs, None, d0, D, EVEN_D, UPCAST, BLOCK_D)
        return load_rows(c_ptrs, cols < K, d0, D, EVEN_D, UPCAST, BLOCK_D)

    @triton.jit
    def _column_key(bits, offs_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOP3: tl.constexpr):
        """``(bits & -BLOCK_N) | column``: a tile's float bits with the low ``log2(BLOCK_N)`` replaced by the
        column.  ptxas emits the AND and the OR as two LOP3 per element, so compiled kernels (LOP3) write the
        one ``lop3.b32`` of table ``KEY_LUT``; the interpreter, which has no inline PTX, takes the two ops."""
        cols = tl.broadcast_to(offs_n[None, :], (BLOCK_M, BLOCK_N))
        if LOP3:
            mask = tl.full((BLOCK_M, BLOCK_N), -BLOCK_N, tl.int32)
            return tl.inline_asm_elementwise(_KEY_ASM, "=r,r,r,r", [bits, mask, cols], dtype=tl.int32, is_pure=True,
                                             pack=1)
        return (bits & -BLOCK_N) | cols

    @triton.jit
    def _assign_kernel(X, C_NEG, C_EXACT, HALF_NORM, LABEL, DIST, N, K, D, stride_x, stride_c, stride_e, size_bucket,
                       EVEN_K: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                       LOP3: tl.constexpr):
        """``LABEL_i = argmin_k |x_i - c_k|^2`` and ``DIST_i = |x_i - e_{LABEL_i}|^2``, where C_NEG holds ``-c`` in
        X's dtype, C_EXACT the centroids ``e`` in fp32 and HALF_NORM ``|c_k|^2 / 2`` (+inf for BLOCK_N entries
        past K, so neither a load nor a missing centroid needs a mask).

        A row block of X is one program, its tile loaded once when D is one chunk.  Each centroid tile's
        accumulator starts at ``(|x_i|^2 + |c_k|^2) / 2``, so the tensor cores leave ``|x_i - c_k|^2 / 2``;
        its bits with the low ``log2(BLOCK_N)`` replaced by the column are an integer key whose minimum is
        the tile's nearest column (the lowest on ties), and a strict comparison across tiles keeps the
        lower index.  No clamp at 0: a value the expansion rounds below 0 belongs to a centroid within its
        rounding error e of the point, and although negative keys order in reverse among themselves (and
        all below the positive ones), any centroid they pick is then within e of the point, as good as
        the expansion resolves anyway (tests/test_kmeans.py plants such rows).  DIST comes from direct
        differences in fp32, not the expansion (docs/architecture.md, "k-means").  LOP3: each key in one
        instruction (:func:`_column_key`).
        """
        row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < N
        offs_n = tl.arange(0, BLOCK_N)
        dd = tl.arange(0, BLOCK_D)
        x_ptrs = X + row0 * stride_x + tl.arange(0, BLOCK_M)[:, None] * stride_x + dd[None, :]
        c_ptrs = C_NEG + offs_n[:, None] * stride_c + dd[None, :]
        x = load_rows(x_ptrs, rmask, 0, D, EVEN_D, UPCAST, BLOCK_D)  # the X tile when D is one chunk
        if D_CHUNKS == 1:
            xf = x.to(tl.float32)
            x_sq = tl.sum(xf * xf, 1)
        else:
            x_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
            for d0 in tl.range(0, D, BLOCK_D):
                xf = load_rows(x_ptrs, rmask, d0, D, EVEN_D, UPCAST, BLOCK_D).to(tl.float32)
                x_sq += tl.sum(xf * xf, 1)
        half_x = 0.5 * x_sq
        best = tl.full([BLOCK_M], 0x7FFFFFFF, dtype=tl.int32)  # the running minimum key, column bits cleared
        best_key = tl.zeros([BLOCK_M], dtype=tl.int32)
        best_k0 = tl.zeros([BLOCK_M], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_N):
            half_c = tl.load(HALF_NORM + k0 + offs_n)
            acc = half_x[:, None] + half_c[None, :]
            if D_CHUNKS == 1:
                c = _centroid_tile(c_ptrs, k0 + offs_n, K, 0, D, EVEN_K, EVEN_D, UPCAST, BLOCK_D)
                acc = tl.dot(x, tl.trans(c), acc, input_precision=PRECISION)
            else:
                for d0 in tl.range(0, D, BLOCK_D):
                    xs = load_rows(x_ptrs, rmask, d0, D, EVEN_D, UPCAST, BLOCK_D)
                    c = _centroid_tile(c_ptrs, k0 + offs_n, K, d0, D, EVEN_K, EVEN_D, UPCAST, BLOCK_D)
                    acc = tl.dot(xs, tl.trans(c), acc, input_precision=PRECISION)
            key = _column_key(acc.to(tl.int32, bitcast=True), offs_n, BLOCK_M, BLOCK_N, LOP3)
            tile = tl.min(key, 1)
            better = (tile & -BLOCK_N) < best  # strict: a later tile's tie keeps the lower index
            best = tl.where(better, tile & -BLOCK_N, best)
            best_key = tl.where(better, tile, best_key)  # its column is read once, after the loop
            best_k0 = tl.where(better, k0, best_k0)
            c_ptrs += BLOCK_N * stride_c
        best_k = best_k0 + (best_key & (BLOCK_N - 1))
        tl.store(LABEL + rows, best_k.to(tl.int64), mask=rmask)
        # exact distances to the chosen centroids: direct differences, 32 columns at a time
        de = tl.arange(0, 32)
        xe_ptrs = X + rows[:, None] * stride_x + de[None, :]
        e_ptrs = C_EXACT + best_k.to(tl.int64)[:, None] * stride_e + de[None, :]
        dist = tl.zeros([BLOCK_M], dtype=tl.float32)
        for d0 in tl.range(0, D, 32):
            m = rmask[:, None] & ((d0 + de) < D)[None, :]
            diff = tl.load(xe_ptrs + d0, mask=m, other=0.0).to(tl.float32) - tl.load(e_ptrs + d0, mask=m, other=0.0)
            dist += tl.sum(diff * diff, 1)
        tl.store(DIST + rows, dist, mask=rmask)

    @triton.jit
    def _piece_sums_kernel(X, ORDER, PIECE_ROW0, PIECE_ROWS, PART, D, stride_x, stride_p,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """``PART[p] = sum_r X[ORDER[PIECE_ROW0[p] + r]]`` over ``r < PIECE_ROWS[p]``: one piece (at most
        ``SEGMENT_ROWS`` rows of one cluster, rows sorted by label) per program, columns ``BLOCK_D`` per grid
        column, accumulated in PART's dtype (fp32) in a fixed order: deterministic, no atomics."""
        p = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        row0 = tl.load(PIECE_ROW0 + p)
        n = tl.load(PIECE_ROWS + p)
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=PART.dtype.element_ty)
        for r0 in range(0, n, BLOCK_R):
            rmask = (r0 + rr) < n
            idx = tl.load(ORDER + row0 + r0 + rr, mask=rmask, other=0)
            x = tl.load(X + idx[:, None] * stride_x + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            acc += x.to(acc.dtype)
        tl.store(PART + p.to(tl.int64) * stride_p + cols, tl.sum(acc, 0), mask=cmask)


    @triton.jit
    def _trials_kernel(X, C, BEST, M, PART, N, D, T, stride_x, n_prog,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, UPCAST: tl.constexpr):
        """Greedy k-means++'s trials: ``M[t, i] = min(BEST[i], max(0, |x_i|^2 + |c_t|^2 - 2 x_i.c_t))`` for the
        T candidate rows of C, and ``PART[t, p]``, the sum of program ``p``'s rows of ``M[t]``.  One read of X:
        each chunk of a row block gives ``|x_i|^2`` (fp32) and its products with every candidate at once
        (``[BLOCK_M, BLOCK_T]``, tensor cores for fp16/bf16 -- exact products, fp32 sums -- IEEE fp32 otherwise)."""
        p = tl.program_id(0)
        rows = p.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        cols = tl.arange(0, BLOCK_D)
        ts = tl.arange(0, BLOCK_T)
        tmask = ts < T
        x_ptrs = X + rows[:, None] * stride_x + cols[None, :]
        c_ptrs = C + ts[:, None] * D + cols[None, :]
        dot = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
        xx = tl.zeros([BLOCK_M], dtype=tl.float32)
        cc = tl.zeros([BLOCK_T], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cmask = (d0 + cols) < D
            x = tl.load(x_ptrs + d0, mask=rmask[:, None] & cmask[None, :], other=0.0)
            c = tl.load(c_ptrs + d0, mask=tmask[:, None] & cmask[None, :], other=0.0)
            xf, cf = x.to(tl.float32), c.to(tl.float32)
            xx += tl.sum(xf * xf, 1)
            cc += tl.sum(cf * cf, 1)
            if UPCAST:  # the interpreter's bf16 dot multiplies bit patterns
                x, c = xf, cf
            dot = tl.dot(x, tl.trans(c), dot, input_precision="ieee")
        best = tl.load(BEST + rows, mask=rmask, other=0.0)  # rows past N: min(0, d) = 0, nothing to the sums
        m = tl.minimum(best[:, None], tl.maximum(xx[:, None] + cc[None, :] - 2.0 * dot, 0.0))
        tl.store(M + ts[None, :].to(tl.int64) * N + rows[:, None], m, mask=rmask[:, None] & tmask[None, :])
        tl.store(PART + ts * n_prog + p, tl.sum(m, 0), mask=tmask)

# (BLOCK_M, BLOCK_N, num_warps, num_stages): 128 rows over two warpgroups, centroid tiles 64 or 128
# wide; tests/test_compile.py compiles each, as launched, for sm_80 and sm_90a.  None timed on a GPU yet.
ASSIGN_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 2)]
INTERP_CONFIG = (32, 16, 1, 1)
PAD_K = max(bn for _, bn, _, _ in ASSIGN_CONFIGS + [INTERP_CONFIG])  # +inf half-norms past K (one tile ahead)

if HAS_TRITON:
    _assign_tuned = tuned(_assign_kernel, ASSIGN_CONFIGS, ["D", "size_bucket", "K"], {"EVEN_K": ("K", "BLOCK_N")})


STREAM_D = 32  # D beyond one tensor-core chain streams in chunks this wide (fp32 at 64 spills on sm_80)


def _launch_meta(dtype: torch.dtype, d: int) -> dict:
    """The constexprs a launch derives from the points' dtype and D.  fp32 multiplies in TF32 always (IEEE
    fp32 ``tl.dot`` is FFMA on the CUDA cores and spills at these tiles); the interpreter computes in fp32 and
    forms the keys without inline PTX."""
    tiling = d_tiling(d, dtype.itemsize)
    if tiling["D_CHUNKS"] > 1:
        tiling = dict(BLOCK_D=STREAM_D, D_CHUNKS=cdiv(d, STREAM_D), EVEN_D=d % STREAM_D == 0)
    tf32 = dtype == torch.float32 and not interpreting()
    return dict(UPCAST=upcast(dtype), PRECISION="tf32" if tf32 else "ieee", LOP3=not interpreting(), **tiling)


def aot_specs(dtype: str = "bf16", d: int = 128, cc: int = 90):
    """Every autotune config of the assignment as a :class:`KernelSpec` (tests/test_compile.py), with the
    launch arguments of N = 10^7 points and K = 8192 centroids (pointers aligned, dims divisible by 16) and
    the constexprs :func:`_launch_meta` gives a launch; then the update's piece-sum kernel and k-means++'s trials
    kernel as a GPU launches them."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    t, f32 = torch.empty(16, dtype=torch_dtype), torch.empty(16)
    args = dict(X=t, C_NEG=t, C_EXACT=f32, HALF_NORM=f32, LABEL=torch.empty(16, dtype=torch.int64), DIST=f32,
                N=10**7, K=8192, D=d, stride_x=d, stride_c=d, stride_e=d, size_bucket=size_bucket(10**7))
    common = dict(EVEN_K=True, **_launch_meta(torch_dtype, d))
    specs = [KernelSpec(f"kmeans_assign[{bm}x{bn}w{w}s{st}]", _assign_kernel, args,
                        dict(common, BLOCK_M=bm, BLOCK_N=bn), w, st, mma=True)
             for bm, bn, w, st in ASSIGN_CONFIGS]
    i64 = torch.empty(16, dtype=torch.int64)
    br, bd, warps = _piece_tile(d, interpreted=False)
    specs.append(KernelSpec(f"kmeans_piece_sums[{br}x{bd}w{warps}]", _piece_sums_kernel,
                            dict(X=t, ORDER=i64, PIECE_ROW0=i64, PIECE_ROWS=i64, PART=f32, D=d, stride_x=d,
                                 stride_p=d), dict(BLOCK_R=br, BLOCK_D=bd), warps, 1, mma=False))
    for width, tag in ((d, ""), (5, "-D5")):  # 11 candidates (K = 8192) at D, and at a D below one dot chunk
        bm, bd, bt, warps = _trial_tile(width, 11, torch_dtype.itemsize, interpreted=False)
        specs.append(KernelSpec(f"kmeans_trials[{bm}x{bd}x{bt}w{warps}]{tag}", _trials_kernel,
                                dict(X=t, C=t, BEST=f32, M=f32, PART=f32, N=10**7, D=width, T=11, stride_x=width,
                                     n_prog=cdiv(10**7, bm)), dict(BLOCK_M=bm, BLOCK_D=bd, BLOCK_T=bt, UPCAST=False),
                                warps, 2, mma=False))
    return specs


@torch.library.custom_op("sslcore::kmeans_assign", mutates_args=())
def _assign_op(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    k = centroids.shape[0]
    c_neg = (-centroids).to(x.dtype)  # the tensor cores' operand
    exact = centroids.float().contiguous()  # what the distances are measured to
    half_norm = F.pad(torch.linalg.vector_norm(c_neg, dim=1, dtype=torch.float32).square() * 0.5, (0, PAD_K),
                      value=float("inf"))
    labels = new_output((n,), device=x.device, dtype=torch.int64)
    dist = new_output((n,), device=x.device, dtype=torch.float32)
    args = (x, c_neg, exact, half_norm, labels, dist, n, k, d, x.stride(0), c_neg.stride(0), exact.stride(0),
            size_bucket(n))
    meta = _launch_meta(x.dtype, d)
    if interpreting():
        bm, bn, _, _ = INTERP_CONFIG
        _assign_kernel[(cdiv(n, bm),)](*args, BLOCK_M=bm, BLOCK_N=bn, EVEN_K=k % bn == 0, **meta)
    else:
        _assign_tuned[lambda m: (cdiv(n, m["BLOCK_M"]),)](*args, **meta)
    return labels, dist


@_assign_op.register_fake
def _(x, centroids):
    return x.new_empty(x.shape[0], dtype=torch.int64), x.new_empty(x.shape[0], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Public functional API.


def _backend_for(x: torch.Tensor, backend: str) -> str:
    """The backend that runs ``x``: fp64 runs on torch (``backend='triton'`` refuses it)."""
    be = resolve_backend(backend, x.device)
    if x.dtype == torch.float64:
        if backend == "triton":
            raise TypeError("backend='triton' takes float32/float16/bfloat16 inputs, got float64")
        be = "torch"
    return be


@torch.no_grad()
def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, *, backend: str = "auto", validate: bool | None = None):
    """Nearest centroid by squared L2: ``(labels int64 [N], distances [N])``, ties to the lowest index.

    ``x`` [N, D] and ``centroids`` [K, D] on one device, ``centroids`` in ``x``'s dtype, or in fp32 for
    fp16/bf16 points (a master copy: cast to ``x``'s dtype for the tensor cores, once per call).
    Distances are fp32 (fp64 for fp64 input, which runs on torch).  No N x K matrix on either path; the
    Triton path reads X once, makes no copy of it, multiplies fp32 in TF32, breaks near-ties within
    ``2^-16`` of the distance towards the lower index, and measures each distance to the chosen centroid
    by direct differences in fp32 (docs/architecture.md, "k-means").  ``validate``: see
    :func:`~sslcore.kernels._backend.validating`.
    """
    _check_assign(x, centroids, validate)
    be = _backend_for(x, backend)
    if be == "torch":
        return _assign_torch(x, centroids)
    return _assign_op(x.contiguous(), centroids.contiguous())


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


UPDATE_CHUNK_BYTES = 256 * 2**20  # fp32 rows of X per step of the torch backend's deterministic GPU update
SEGMENT_ROWS = 1024  # rows of one cluster a program of the Triton update sums at most (a "piece")


def _piece_tile(d: int, interpreted: bool) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_D, num_warps)`` of the piece-sum kernel: 32 gathered rows of up to 128 columns on a
    GPU (one 256-byte bf16 row segment per row), larger row blocks in the interpreter (fewer Python steps)."""
    if interpreted:
        return 64, min(next_pow2(d), 64), 1
    return 32, min(next_pow2(d), 128), 4


@torch.no_grad()
def kmeans_update(x: torch.Tensor, labels: torch.Tensor, n_clusters: int, *, deterministic: bool = True,
                  backend: str = "auto", validate: bool | None = None):
    """Per-cluster ``(sums [K, D] fp32 (fp64 for fp64), counts int64 [K])``, without host synchronisation.

    Deterministic by default (no float atomics).  Triton backend: the labels sorted once, each cluster's
    rows summed by programs of at most ``SEGMENT_ROWS`` rows (one read of X through the sort order, fp32
    accumulation), the pieces of a cluster added in order (docs/architecture.md, "k-means").  Torch
    backend: ``index_add_`` on the CPU (sequential, so reproducible); on a GPU the rows sorted by label
    and segment sums over fp32 chunks of them.  ``deterministic=False`` uses ``index_add_`` everywhere
    (on a GPU float atomics: not bit-reproducible).  ``validate`` (the label range, which reads the
    labels): see :func:`~sslcore.kernels._backend.validating`.
    """
    check_float("x", x, 2)
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (x.shape[0],):
        raise ValueError(f"labels must be an int64 tensor of shape [{x.shape[0]}]")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
    if labels.device != x.device:
        raise ValueError(f"labels are on {labels.device} but x is on {x.device}")
    be = _backend_for(x, backend)
    if validating(x.device, validate) and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_clusters):
        raise ValueError(f"labels must lie in [0, {n_clusters})")
    wide = torch.promote_types(x.dtype, torch.float32)
    if deterministic and be == "triton" and x.numel():
        return _piece_sums(x.contiguous(), labels, n_clusters)
    counts = torch.zeros(n_clusters, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, labels, torch.ones_like(labels))
    sums = torch.zeros(n_clusters, x.shape[1], device=x.device, dtype=wide)
    if not deterministic or x.device.type == "cpu":
        return sums.index_add_(0, labels, x.to(wide)), counts
    return _sorted_segment_sums(x, labels, sums), counts


def _piece_sums(x: torch.Tensor, labels: torch.Tensor, k: int):
    """The Triton update: ``(sums fp32 [K, D], counts [K])``.  Stable sort of the labels (int32 keys), the
    counts from the sorted labels' cluster bounds; cluster ``c`` is cut into ``ceil(count_c / SEGMENT_ROWS)``
    pieces, ``cdiv(N, SEGMENT_ROWS) + K`` programs (a bound on the pieces: no host read) each sum one piece
    or nothing, and ``segment_reduce`` adds each cluster's consecutive pieces in order."""
    n, d = x.shape
    dev = x.device
    sorted_labels, order = torch.sort(labels.to(torch.int32), stable=True)
    bounds = torch.searchsorted(sorted_labels, torch.arange(k + 1, device=dev, dtype=torch.int32))
    counts = bounds.diff()
    pieces = (counts + SEGMENT_ROWS - 1) // SEGMENT_ROWS
    ends = torch.cumsum(pieces, 0)
    g = cdiv(n, SEGMENT_ROWS) + k
    prog = torch.arange(g, device=dev)
    cluster = torch.searchsorted(ends, prog, right=True).clamp_max(k - 1)  # programs past the pieces: rows 0
    offset = (prog - ends[cluster] + pieces[cluster]) * SEGMENT_ROWS  # this piece's first row in its cluster
    rows = (counts[cluster] - offset).clamp(0, SEGMENT_ROWS)
    row0 = bounds[cluster] + offset
    part = new_output((g, d), device=dev, dtype=torch.float32)
    br, bd, warps = _piece_tile(d, interpreting())
    _piece_sums_kernel[(g, cdiv(d, bd))](x, order, row0, rows, part, d, x.stride(0), part.stride(0),
                                         BLOCK_R=br, BLOCK_D=bd, num_warps=warps)
    lengths = torch.cat([pieces, (g - ends[-1:])])  # the idle programs' zero rows: one last segment
    return torch.segment_reduce(part, "sum", lengths=lengths, axis=0, unsafe=True)[:k], counts


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


def _trial_tile(d: int, t: int, itemsize: int, interpreted: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_D, BLOCK_T, num_warps)`` of the trials kernel: 128 rows in chunks of 16 to 256 bytes of
    columns (128 at fp16/bf16; 64 at fp32, which spilled at 128 on sm_80) against all T candidates (padded
    to 16), two warpgroups -- every dot dimension at least 16, the tensor cores' narrowest; in the
    interpreter 64 rows in chunks of up to 64 columns (so the tests reach one chunk and several at small D)."""
    bt = max(16, next_pow2(t))
    if interpreted:
        return 64, max(16, min(next_pow2(d), 64)), bt, 1
    return 128, max(16, min(next_pow2(d), 256 // itemsize)), bt, 8


@torch.no_grad()
def kmeans_trials(x: torch.Tensor, candidates: torch.Tensor, best: torch.Tensor, *, backend: str = "auto",
                  validate: bool | None = None):
    """Greedy k-means++'s trial step: ``(M [T, N], potentials float64 [T])`` with
    ``M[t, i] = min(best_i, |x_i - c_t|^2)`` and ``potentials[t] = sum_i M[t, i]``.

    ``candidates`` [T, D] in ``x``'s dtype (rows of ``x``: exact in it); ``best`` [N], the squared distance to
    the nearest centre so far (+inf before the first), in fp32 (fp64 for fp64 points), M's dtype.  The
    candidate kept is ``argmin potentials`` and its row of M is the next ``best``.  Distances by
    scikit-learn's expansion ``|x|^2 + |c|^2 - 2 x.c`` clamped at 0: on Triton one read of X in its dtype,
    the products of a row block with all T candidates on the tensor cores (fp16/bf16; fp32 in IEEE fp32),
    fp32 sums per 128 rows added in float64; on torch (and for fp64) in row chunks in M's dtype
    (docs/architecture.md, "k-means").
    """
    check_float("x", x, 2)
    check_float("candidates", candidates, 2)
    wide = torch.promote_types(x.dtype, torch.float32)
    if candidates.dtype != x.dtype or candidates.shape[1] != x.shape[1] or candidates.device != x.device:
        raise ValueError(f"candidates must be [T, {x.shape[1]}] {x.dtype} rows on {x.device}, got "
                         f"{list(candidates.shape)} {candidates.dtype} on {candidates.device}")
    if (not isinstance(best, torch.Tensor) or best.shape != (x.shape[0],) or best.dtype != wide
            or best.device != x.device):
        raise ValueError(f"best must be a {wide} tensor of shape [{x.shape[0]}] on {x.device}")
    if validating(x.device, validate):
        check_finite("candidates", candidates)
    if _backend_for(x, backend) == "torch":
        return _trials_torch(x, candidates, best)
    n, d = x.shape
    x, candidates = x.contiguous(), candidates.contiguous()
    t = len(candidates)
    bm, bd, bt, warps = _trial_tile(d, t, x.element_size(), interpreting())
    g = cdiv(n, bm)
    m = new_output((t, n), device=x.device, dtype=torch.float32)
    part = new_output((t, g), device=x.device, dtype=torch.float32)
    _trials_kernel[(g,)](x, candidates, best.contiguous(), m, part, n, d, t, x.stride(0), g,
                         BLOCK_M=bm, BLOCK_D=bd, BLOCK_T=bt, UPCAST=upcast(x.dtype), num_warps=warps, num_stages=2)
    return m, part.sum(1, dtype=torch.float64)


def _row_chunk(x: torch.Tensor) -> int:
    """Rows per step of a pass over ``x`` in wide (fp32/fp64) chunks: 2^19 elements, ~4 MB of float64, on the
    CPU (they stay in cache: 2.7x faster than one pass), 2^25 elsewhere (few launches)."""
    return max(1, (1 << (19 if x.device.type == "cpu" else 25)) // x.shape[1])


def _trials_torch(x: torch.Tensor, candidates: torch.Tensor, best: torch.Tensor):
    """:func:`kmeans_trials` by scikit-learn's expansion, in row chunks (~4 MB on a CPU: they stay in cache)."""
    wide = best.dtype
    c = candidates.to(wide)
    cc = (c * c).sum(1)
    m = torch.empty(len(c), x.shape[0], device=x.device, dtype=wide)
    step = _row_chunk(x)
    for i in range(0, x.shape[0], step):
        xs = x[i:i + step].to(wide)
        dist = torch.addmm((xs * xs).sum(1, keepdim=True) + cc, xs, c.T, alpha=-2).clamp_min_(0)
        torch.minimum(dist.T, best[i:i + step], out=m[:, i:i + step])
    return m, m.sum(1, dtype=torch.float64)


@torch.no_grad()
def nearest_cosine(queries: torch.Tensor, bank: torch.Tensor, *, backend: str = "auto",
                   validate: bool | None = None):
    """Top-1 cosine search: ``(index int64 [N], similarity fp32 [N])`` of each query's nearest bank row.

    The assignment kernel on unit vectors: ``argmax cos = argmin |q_hat - b_hat|^2``.
    """
    _check_assign(queries, bank, validate)
    idx, dist = kmeans_assign(unit_rows(queries), unit_rows(bank), backend=backend, validate=False)
    return idx, 1 - dist / 2
