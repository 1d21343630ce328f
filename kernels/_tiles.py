"""Tiling shared by the matmul kernel families (InfoNCE, k-means): how D is split, the row-tile loads
and the streamed similarity tile, and the autotuner wrapper."""
import torch

from ._backend import HAS_TRITON, cdiv, interpreting, next_pow2, tl, triton

INTERP_BLOCK_D = 32  # under the interpreter: small, so test shapes span several chunks


def d_tiling(d: int, esize: int) -> dict:
    """How a similarity tile covers D for elements of ``esize`` bytes: ``BLOCK_D`` is all of D up to
    256 bf16 (128 fp32) values -- one tensor-core chain per tile, the row tile loaded once -- and 64
    beyond, streamed; ``D_CHUNKS``; ``EVEN_D`` (no column mask)."""
    if interpreting():
        bd = INTERP_BLOCK_D
    else:
        bd = max(16, next_pow2(d)) if d <= 512 // esize else 64
    return dict(BLOCK_D=bd, D_CHUNKS=cdiv(d, bd), EVEN_D=d % bd == 0)


def size_bucket(n: int) -> int:
    """An autotune key's size: log2 of the rows, so a config is picked per size range, not per size."""
    return max(0, n - 1).bit_length()


def tuned(kernel, configs, key, even: dict):
    """``kernel`` autotuned over ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` configs keyed on ``key``;
    ``even`` maps constexpr flags to ``(size argument, block)`` (e.g. ``EVEN_N: ("N", "BLOCK_N")``), set
    per config: the size is a multiple of the block, so that loop needs no mask."""
    cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in configs]
    rules = {flag: (lambda args, n=n, b=b: args[n] % args[b] == 0) for flag, (n, b) in even.items()}
    return triton.autotune(configs=cfgs, key=key)(triton.heuristics(rules)(kernel))


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs use TF32 only where torch allows it for matmuls."""
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def upcast(dtype: torch.dtype) -> bool:
    """The interpreter's bf16 dot multiplies bit patterns: kernels upcast bf16 to fp32 there."""
    return interpreting() and dtype == torch.bfloat16


if HAS_TRITON:

    @triton.jit
    def load_rows(ptrs, rmask, d0, D, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr):
        """Columns ``d0 .. d0 + BLOCK_D`` of a tile of rows (``ptrs`` at column 0 of each row); ``rmask`` None:
        every row exists (no mask at all when D is even, so the load vectorises unpredicated)."""
        if rmask is None:
            if EVEN_D:
                x = tl.load(ptrs + d0)
            else:
                x = tl.load(ptrs + d0, mask=((d0 + tl.arange(0, BLOCK_D)) < D)[None, :], other=0.0)
        elif EVEN_D:
            x = tl.load(ptrs + d0, mask=rmask[:, None], other=0.0)
        else:
            x = tl.load(ptrs + d0, mask=rmask[:, None] & ((d0 + tl.arange(0, BLOCK_D)) < D)[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def sim_streamed(a_ptrs, b_ptrs, rmask, cmask, D, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """The fp32 tile ``A[rows] . B[cols]^T`` for a D of several chunks: a runtime loop over them, the
        A chunks streamed with the B chunks (a row tile of all of D would not fit on chip beside them)."""
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in tl.range(0, D, BLOCK_D):
            a = load_rows(a_ptrs, rmask, d0, D, EVEN_D, UPCAST, BLOCK_D)
            b = load_rows(b_ptrs, cmask, d0, D, EVEN_D, UPCAST, BLOCK_D)
            s = tl.dot(a, tl.trans(b), s, input_precision=PRECISION)
        return s

    @triton.jit
    def sim_tile(a, a_ptrs, b_ptrs, rmask, cmask, D, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 D_CHUNKS: tl.constexpr):
        """The fp32 tile ``A[rows] . B[cols]^T``: one tensor-core chain over ``a``, the row tile the caller
        loaded once, when D is one chunk; else :func:`sim_streamed` (``a`` unused)."""
        if D_CHUNKS == 1:
            s = tl.dot(a, tl.trans(load_rows(b_ptrs, cmask, 0, D, EVEN_D, UPCAST, BLOCK_D)), input_precision=PRECISION)
        else:
            s = sim_streamed(a_ptrs, b_ptrs, rmask, cmask, D, EVEN_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        return s
