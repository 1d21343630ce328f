"""Tiling shared by the kernel families: the similarity tile and the block sizes that follow D."""
import torch

from ._backend import HAS_TRITON, cdiv, interpreting, next_pow2, tl, triton

INTERP_BLOCK_D = 32  # under the interpreter: small, so test shapes span several chunks


def block_d(d: int) -> int:
    """Chunk of D per dot step of a similarity tile on a GPU: all of D up to 128, else 64-wide chunks."""
    return INTERP_BLOCK_D if interpreting() else (max(16, next_pow2(d)) if d <= 128 else 64)


def d_chunks(d: int) -> int:
    return cdiv(d, block_d(d))


def block_do(d: int) -> int:
    """Output columns per program of an aggregating kernel (the fp32 accumulator lives in registers)."""
    return INTERP_BLOCK_D if interpreting() else min(max(16, next_pow2(d)), 128)


def autotuned(kernel, configs, key):
    """``kernel`` autotuned over ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tuples, keyed on ``key``."""
    cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in configs]
    return triton.autotune(configs=cfgs, key=key)(kernel)


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
    def _chunk_dot(a_ptrs, bt_ptrs, d0, dd, rmask, cmask, D, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        dmask = (d0 + dd) < D
        a = tl.load(a_ptrs + d0, mask=rmask[:, None] & dmask[None, :], other=0.0)
        bt = tl.load(bt_ptrs + d0, mask=dmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        return tl.dot(a, bt, acc, input_precision=PRECISION)

    @triton.jit
    def sim_tile(A, B, rows, cols, rmask, cmask, D, stride_a, stride_b,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """fp32 tile ``A[rows] . B[cols]^T``, the dot product summed over D_CHUNKS chunks of D.

        The chunk loop is unrolled (static_range): a runtime loop nested in the tile loop makes
        Triton's software pipeliner spill registers.
        """
        # int64 base pointer of the tile (rows x stride can pass 2^31), int32 offsets inside it
        dd = tl.arange(0, BLOCK_D)
        a_base = A + tl.min(rows, 0).to(tl.int64) * stride_a
        b_base = B + tl.min(cols, 0).to(tl.int64) * stride_b
        a_off = tl.arange(0, BLOCK_M)[:, None] * stride_a + dd[None, :]
        bt_off = tl.arange(0, BLOCK_N)[None, :] * stride_b + dd[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c in tl.static_range(D_CHUNKS):
            acc = _chunk_dot(a_base + a_off, b_base + bt_off, c * BLOCK_D, dd, rmask, cmask, D, acc, UPCAST, PRECISION)
        return acc
