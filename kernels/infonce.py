"""Fused InfoNCE / NT-Xent: forward and backward without the M x M similarity matrix.

With ``s_ij = q_i . k_j / tau`` (rows L2-normalised by default) the loss of row i is

    l_i = -w_i * mean_{p in P(i)} s_ip  +  LSE_i,      LSE_i = log sum_{j in N(i)} exp(s_ij)

where ``N(i)`` is every key but ``i`` itself in the self-similarity (SimCLR) form, and every key
in the query/key (MoCo, CLIP) form.  The alignment term is a gather, O(M.m.D): in the self form a row
kernel each way that also normalises the rows (forward) and takes the gradient through the normalisation
(backward), elsewhere torch ops.  The uniformity term ``LSE`` is the Triton kernel: tiles of S built in
registers, a running max/sum per row (flash-attention style), only the fp32 vector of LSEs stored.

Its gradient is message passing (docs/methods.md, "The gradient as message passing").  With upstream weights ``g_i`` and
``P_ij = exp(s_ij - LSE_i)``:

    dLSE/dq_i = (1/tau) sum_j g_i P_ij k_j          (messages to the query)
    dLSE/dk_j = (1/tau) sum_i g_i P_ij q_i          (messages to the key)

and in the self form (q = k = z) the two add up to ``(1/tau) sum_j (g_i P_ij + g_j P_ji) z_j``;
since S is symmetric, ``P_ji = exp(s_ij - LSE_j)`` comes from the same tile, so the whole
gradient is one pass: 3 M x M x D matmuls in all (S for the LSEs; S again and W.Z).
"""
from __future__ import annotations

import contextvars

import torch

from ._backend import (
    HAS_TRITON,
    KernelSpec,
    cdiv,
    check_finite,
    check_float,
    check_positive,
    check_reduction,
    check_same,
    interpreting,
    new_output,
    next_pow2,
    resolve_backend,
    tl,
    triton,
    unit_rows,
    validating,
)
from ._tiles import (
    d_tiling,
    load_rows,
    precision as _precision,
    sim_streamed,
    sim_tile,
    size_bucket,
    tuned,
    upcast as _upcast,
)

LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------
# Plain-torch references (readable definitions; they materialise S).


def lse_similarity_ref(a: torch.Tensor, b: torch.Tensor, *, scale: float, exclude_self: bool = False,
                       self_offset: int | None = None) -> torch.Tensor:
    """``LSE_i = log sum_j exp(scale * a_i . b_j)`` over j, fp32 or wider: j != i with ``exclude_self``,
    j != i + ``self_offset`` with that (row i of a is row i + offset of b; the offset may be negative)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    s = (a.to(dtype) @ b.to(dtype).T) * scale
    if exclude_self or self_offset is not None:
        rows = torch.arange(s.shape[0], device=s.device)[:, None] + (self_offset or 0)
        s = s.masked_fill(rows == torch.arange(s.shape[1], device=s.device)[None, :], float("-inf"))
    return torch.logsumexp(s, dim=1)


def infonce_ref(z, keys=None, *, temperature=0.5, pos_index=None, labels=None, weight=None,
                normalize=True, symmetric=False, reduction="mean", self_offset=None):
    """Plain-torch InfoNCE with the same arguments and semantics as :func:`infonce`."""
    _check_args(z, keys, temperature, pos_index, labels, weight, symmetric, reduction, self_offset, True)
    dtype = torch.promote_types(z.dtype, torch.float32)
    q = z.to(dtype)
    q = unit_rows(q) if normalize else q
    if keys is None:
        k = q
    else:
        k = keys.to(dtype)
        k = unit_rows(k) if normalize else k
    s = q @ k.T / temperature
    self_form, off = keys is None or self_offset is not None, self_offset or 0
    if self_form:
        own = torch.arange(len(q), device=q.device)[:, None] + off == torch.arange(len(k), device=q.device)[None, :]
        s = s.masked_fill(own, float("-inf"))
    w = 1.0 if weight is None else weight.to(dtype)
    loss = torch.logsumexp(s, dim=1) - _positive_mean_ref(s, self_form, off, pos_index, labels) * w
    if symmetric:  # column j's positive is query j
        loss = 0.5 * (loss + torch.logsumexp(s.T, dim=1) - s.diagonal() * w)
    return _reduce(loss, reduction)


def _positive_mean_ref(s, self_form, off, pos_index, labels):
    """``mean_{p in P(i)} s_ip`` from the full matrix (duplicates in ``pos_index`` count twice); row i is
    key ``off + i`` in the self form."""
    m, n = s.shape
    if labels is not None:
        rows = torch.arange(m, device=s.device)
        pos = labels[off:off + m, None] == labels[None, :]
        pos[rows, rows + off] = False
        return s.masked_fill(~pos, 0).sum(1) / pos.sum(1)
    idx = _default_pos_index(m, self_form, off, s.device) if pos_index is None else pos_index
    idx = idx.reshape(m, -1).long()
    valid = idx >= 0
    return s.gather(1, idx.clamp_min(0)).masked_fill(~valid, 0).sum(1) / valid.sum(1)


def _default_pos_index(m, self_form, off, device):
    """Two views stacked (the self form): row i's positive is key ``off + (i + m/2) mod m``; else key i."""
    rows = torch.arange(m, device=device)
    return off + (rows + m // 2) % m if self_form else rows


def _reduce(loss, reduction):
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# ---------------------------------------------------------------------------------------------
# Argument checks (before any work; nothing is mutated).


def _check_args(z, keys, temperature, pos_index, labels, weight, symmetric, reduction, self_offset=None,
                validate=None):
    """Shape/type checks always; value checks (indices, labels, finiteness), which read the data,
    where :func:`~sslcore.kernels._backend.validating` says so."""
    values = validating(z.device, validate)
    check_float("z", z, 2)
    check_positive("temperature", temperature)
    check_reduction(reduction)
    m = z.shape[0]
    if keys is None:
        if self_offset is not None:
            raise ValueError("self_offset places z's rows among the keys: it needs keys")
        if m < 2:
            raise ValueError(f"z needs at least 2 rows (a row and its positive), got {m}")
        if symmetric:
            raise ValueError("symmetric=True needs keys (the query/key form)")
    else:
        check_float("keys", keys, 2)
        check_same("keys", keys, "z", z)
        if keys.shape[1] != z.shape[1]:
            raise ValueError(f"keys has dimension {keys.shape[1]} but z has {z.shape[1]}")
        if self_offset is not None:
            if isinstance(self_offset, bool) or not isinstance(self_offset, int) or not (
                    0 <= self_offset <= keys.shape[0] - m):
                raise ValueError(f"self_offset must be an int in [0, {keys.shape[0] - m}] (z's rows within keys), "
                                 f"got {self_offset!r}")
            if symmetric:
                raise ValueError("symmetric=True is the query/key form; self_offset is the self form")
        elif labels is not None:
            raise ValueError("labels is for the self-similarity form (keys=None, or keys with self_offset); "
                             "with keys alone use pos_index")
        if pos_index is None and keys.shape[0] < m:
            raise ValueError("keys must have at least as many rows as z (positives on the diagonal), "
                             f"got {keys.shape[0]} < {m}")
        if symmetric and keys.shape[0] != m:
            raise ValueError(f"symmetric=True needs as many keys as queries, got {keys.shape[0]} and {m}")
        if symmetric and pos_index is not None:
            raise ValueError("symmetric=True pairs query i with key i; pos_index is not supported with it")
    self_form = keys is None or self_offset is not None
    if self_form and pos_index is None and labels is None and m % 2:
        raise ValueError(f"z must have an even number of rows (two views stacked), got {m}")
    n = m if keys is None else keys.shape[0]
    if pos_index is not None and labels is not None:
        raise ValueError("give pos_index or labels, not both")
    if pos_index is not None:
        if not isinstance(pos_index, torch.Tensor) or pos_index.dtype not in (torch.int64, torch.int32):
            raise TypeError("pos_index must be an int64/int32 tensor")
        if pos_index.device != z.device:
            raise ValueError(f"pos_index is on {pos_index.device} but z is on {z.device}")
        if pos_index.dim() not in (1, 2) or pos_index.shape[0] != m:
            raise ValueError(f"pos_index must have shape [{m}] or [{m}, m], got {tuple(pos_index.shape)}")
    if pos_index is not None and values:
        if bool(((pos_index < -1) | (pos_index >= n)).any()):
            raise ValueError(f"pos_index values must lie in [0, {n}) (or -1 for padding)")
        idx = pos_index.reshape(m, -1)
        valid = idx >= 0
        if self_form:
            rows = torch.arange(m, device=z.device)[:, None] + (self_offset or 0)
            if bool((valid & (idx == rows)).any()):
                raise ValueError("pos_index names a row as its own positive "
                                 "(self-pairs are excluded from the denominator)")
        if not bool(valid.any(1).all()):
            raise ValueError("pos_index gives some row no positive (all -1)")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
            raise TypeError("labels must be an int64/int32 tensor")
        if labels.device != z.device:
            raise ValueError(f"labels is on {labels.device} but z is on {z.device}")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape [{n}] (one per {'key' if keys is not None else 'row'}), "
                             f"got {tuple(labels.shape)}")
        if values and bool((torch.unique(labels, return_counts=True)[1] < 2).any()):
            raise ValueError("labels gives some sample no positive (a label that occurs once)")
    if weight is not None:
        check_float("weight", weight, 1)
        if weight.shape != (m,) or weight.device != z.device:
            raise ValueError(f"weight must have shape [{m}] on {z.device}, "
                             f"got {tuple(weight.shape)} on {weight.device}")
    if values:
        check_finite("z", z)
        if keys is not None:
            check_finite("keys", keys)
        if weight is not None:
            check_finite("weight", weight)


# ---------------------------------------------------------------------------------------------
# Triton kernels.  Rows of A (M) against rows of B (N), D-dimensional, unit stride in D.  A row
# block is one program: BLOCK_M = 128 rows over two warpgroups, its A tile loaded once (all of D
# up to 256), B tiles of BLOCK_N rows streamed through the tensor cores.

if HAS_TRITON:

    @triton.jit
    def _valid(rows, cols, cmask, row_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               EXCLUDE_SELF: tl.constexpr, EVEN_N: tl.constexpr):
        """Which pairs count: existing columns, and (self form) not the row's own column ``r + row_offset``."""
        valid = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)
        if not EVEN_N:
            valid = valid & cmask[None, :]
        if EXCLUDE_SELF:
            valid = valid & ((rows[:, None] + row_offset) != cols[None, :])
        return valid

    @triton.jit
    def _tma_tile(desc, row, UPCAST: tl.constexpr):
        """Rows ``row ..`` of a tensor descriptor's block (the tensor-memory-accelerator copy; rows and
        columns past the tensor's end read as zeros), upcast to fp32 under the interpreter's bf16 rule."""
        x = desc.load([row, 0])
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _lse_fwd_kernel(A, B, LSE, M, N, D, stride_a, stride_b, row_offset, scale2, size_bucket,
                        EXCLUDE_SELF: tl.constexpr, STATIC_MAX: tl.constexpr, EVEN_N: tl.constexpr,
                        EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr, TMA: tl.constexpr):
        """Row log-sum-exp of ``scale * A . B^T`` (base 2 inside).

        STATIC_MAX (unit rows, so ``s <= scale``): ``LSE = scale + log sum exp(s - scale)`` with no
        running max or rescaling; otherwise the online max/sum of flash attention.  Row ``r`` of A is
        column ``r + row_offset`` of B in the self form (EXCLUDE_SELF).  TMA (one chunk of D, aligned
        16-bit rows, Hopper): tiles come by tensor descriptors and the loop is warp-specialised -- a
        producer warpgroup issues the copies, two consumer warpgroups (half the rows each) wait only on
        their own tensor-core work, so one's exp/sum overlaps the other's S tile (docs/architecture.md).
        """
        row0 = tl.program_id(0) * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        offs_n = tl.arange(0, BLOCK_N)
        dd = tl.arange(0, BLOCK_D)
        a_ptrs = A + row0.to(tl.int64) * stride_a + tl.arange(0, BLOCK_M)[:, None] * stride_a + dd[None, :]
        b_ptrs = B + offs_n[:, None] * stride_b + dd[None, :]
        if TMA:  # every load a descriptor copy: the warp specialiser accepts no other
            b_desc = tl.make_tensor_descriptor(B, shape=[N, D], strides=[stride_b, 1], block_shape=[BLOCK_N, BLOCK_D])
            a = _tma_tile(tl.make_tensor_descriptor(A, shape=[M, D], strides=[stride_a, 1],
                                                    block_shape=[BLOCK_M, BLOCK_D]), row0, UPCAST)
        else:
            a = load_rows(a_ptrs, rmask, 0, D, EVEN_D, UPCAST, BLOCK_D)  # the A tile when D is one chunk
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in tl.range(0, N, BLOCK_N, warp_specialize=TMA):
            cols = n0 + offs_n
            cmask = cols < N
            if TMA:
                s = tl.dot(a, tl.trans(_tma_tile(b_desc, n0, UPCAST)), input_precision=PRECISION)
            else:
                s = sim_tile(a, a_ptrs, b_ptrs, rmask, cmask, D, EVEN_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N,
                             BLOCK_D, D_CHUNKS)
                b_ptrs += BLOCK_N * stride_b
            s = tl.where(_valid(rows, cols, cmask, row_offset, BLOCK_M, BLOCK_N, EXCLUDE_SELF, EVEN_N),
                         s * scale2, float("-inf"))
            if STATIC_MAX:
                l_i += tl.sum(tl.exp2(s - scale2), 1)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
                m_i = m_new
        if STATIC_MAX:
            m_i = tl.full([BLOCK_M], scale2, dtype=tl.float32)
        tl.store(LSE + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rmask)

    @triton.jit
    def _lse_bwd_kernel(A, B, C, OUT, LSE_R, G_R, LSE_C, G_C, GSCALE, M, N, D,
                        stride_a, stride_b, stride_c, stride_o, row_offset, scale2, out_scale, size_bucket,
                        HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                        C_IS_B: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        D_CHUNKS: tl.constexpr, BLOCK_DO: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr, TMA: tl.constexpr):
        """``OUT[r, do] = out_scale * sum_c W_rc C[c, do]`` with the message weights recomputed per tile:

        ``W_rc = g_r exp(s_rc - LSE_r)`` (HAS_ROW) ``+ g_c exp(s_rc - LSE_c)`` (HAS_COL), where
        ``s = scale * A . B^T``; the g's come divided by GSCALE (their max) so W stays O(1) in
        low precision, and GSCALE multiplies the result.  C_IS_B (C is B and one program holds all
        of D): the B tile that made S is the message operand too, so nothing is loaded twice.  TMA (C_IS_B,
        aligned 16-bit rows, Hopper): the A and B tiles come by tensor descriptors, no per-thread
        addresses, so one warpgroup of 64 rows fits in 240 registers and two programs share an SM: one's
        W work overlaps the other's tensor-core work (docs/architecture.md).
        """
        row0 = tl.program_id(0) * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        offs_n = tl.arange(0, BLOCK_N)
        dd = tl.arange(0, BLOCK_D)
        do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        domask = do < D
        a_ptrs = A + row0.to(tl.int64) * stride_a + tl.arange(0, BLOCK_M)[:, None] * stride_a + dd[None, :]
        b_ptrs = B + offs_n[:, None] * stride_b + dd[None, :]
        c_ptrs = C + offs_n[:, None] * stride_c + do[None, :]
        if TMA:
            b_desc = tl.make_tensor_descriptor(B, shape=[N, D], strides=[stride_b, 1], block_shape=[BLOCK_N, BLOCK_D])
            a = _tma_tile(tl.make_tensor_descriptor(A, shape=[M, D], strides=[stride_a, 1],
                                                    block_shape=[BLOCK_M, BLOCK_D]), row0, UPCAST)
        elif D_CHUNKS == 1:
            a = load_rows(a_ptrs, rmask, 0, D, EVEN_D, UPCAST, BLOCK_D)
        if HAS_ROW:
            lse_r = tl.load(LSE_R + rows, mask=rmask, other=0.0) * 1.4426950408889634
            g_r = tl.load(G_R + rows, mask=rmask, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + offs_n
            cmask = cols < N
            if TMA:
                b = _tma_tile(b_desc, n0, UPCAST)
                s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale2
            elif D_CHUNKS == 1:
                b = load_rows(b_ptrs, cmask, 0, D, EVEN_D, UPCAST, BLOCK_D)
                s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale2
            else:
                s = sim_streamed(a_ptrs, b_ptrs, rmask, cmask, D, EVEN_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N,
                                  BLOCK_D) * scale2
            # P <= 1 wherever it counts: the clamp only stops masked entries (the diagonal) overflowing
            w = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if HAS_ROW:
                w += g_r[:, None] * tl.exp2(tl.minimum(s - lse_r[:, None], 0.0))
            if HAS_COL:
                lse_c = tl.load(LSE_C + cols, mask=cmask, other=0.0) * 1.4426950408889634
                g_c = tl.load(G_C + cols, mask=cmask, other=0.0)
                w += g_c[None, :] * tl.exp2(tl.minimum(s - lse_c[None, :], 0.0))
            w = tl.where(_valid(rows, cols, cmask, row_offset, BLOCK_M, BLOCK_N, EXCLUDE_SELF, EVEN_N), w, 0.0)
            if C_IS_B:  # (implies one chunk of D)
                ct = b  # the S operand's tile: on chip already
            else:
                ct = tl.load(c_ptrs, mask=cmask[:, None] & domask[None, :], other=0.0)
                if UPCAST:
                    ct = ct.to(tl.float32)
            acc = tl.dot(w.to(ct.dtype), ct, acc, input_precision=PRECISION)
            b_ptrs += BLOCK_N * stride_b
            c_ptrs += BLOCK_N * stride_c
        acc = acc * (tl.load(GSCALE) * out_scale)
        out_ptrs = OUT + rows.to(tl.int64)[:, None] * stride_o + do[None, :]
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=rmask[:, None] & domask[None, :])

    @triton.jit
    def _unit_gather(Z, rows, mask, dd, stride, eps):
        """Rows ``rows`` of Z in fp32 and ``1 / max(|z|, eps)`` each, the norm taken after dividing by the row's
        largest magnitude (no overflow for any finite input); masked rows read as zeros."""
        z = tl.load(Z + rows.to(tl.int64)[:, None] * stride + dd[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(z), 1)
        amax = tl.where(amax > 0, amax, 1.0)
        zs = z / amax[:, None]
        return z, 1.0 / tl.maximum(tl.sqrt(tl.sum(zs * zs, 1)) * amax, eps)

    @triton.jit
    def _rows_fwd_kernel(Z, ZN, R, ALIGN, IDX, M, D, stride_z, half, n_pos, eps,
                         DEFAULT_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """``ZN = z R`` with ``R = 1 / max(|z|, eps)`` per row, and ``ALIGN_i = mean_{p in P(i)} zhat_i . zhat_p``
        in fp32 from the unrounded unit rows: ``P(i) = {(i + half) mod M}`` (DEFAULT_POS), else row i of
        IDX [M, n_pos] (-1 pads; a duplicate counts twice).  ZN is [M, D] contiguous."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        dd = tl.arange(0, BLOCK_D)
        dmask = (dd < D)[None, :]
        z, r = _unit_gather(Z, rows, rmask[:, None] & dmask, dd, stride_z, eps)
        zn = z * r[:, None]
        tl.store(ZN + rows.to(tl.int64)[:, None] * D + dd[None, :], zn.to(ZN.dtype.element_ty),
                 mask=rmask[:, None] & dmask)
        tl.store(R + rows, r, mask=rmask)
        if DEFAULT_POS:
            zp, rp = _unit_gather(Z, (rows + half) % M, rmask[:, None] & dmask, dd, stride_z, eps)
            align = tl.sum(zn * zp, 1) * rp
        else:
            acc = tl.zeros([BLOCK_M], dtype=tl.float32)
            cnt = tl.zeros([BLOCK_M], dtype=tl.float32)
            for t in range(0, n_pos):
                p = tl.load(IDX + rows.to(tl.int64) * n_pos + t, mask=rmask, other=-1)
                valid = p >= 0
                zp, rp = _unit_gather(Z, tl.maximum(p, 0), valid[:, None] & dmask, dd, stride_z, eps)
                acc += tl.sum(zn * zp, 1) * rp
                cnt += valid.to(tl.float32)
            align = acc / tl.maximum(cnt, 1.0)
        tl.store(ALIGN + rows, align, mask=rmask)

    @triton.jit
    def _rows_bwd_kernel(ZN, R, DZN, C, IDX, T_OFF, T_SRC, DZ, M, D, stride_g, half, n_pos,
                         DEFAULT_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """``DZ_i = R_i (v_i - zhat_i (zhat_i . v_i))``, the gradient through the normalisation, of
        ``v_i = DZN_i + C_i sum_{p in P(i)} zhat_p + sum_{k: i in P(k)} C_k zhat_k`` (the alignment's messages,
        ``C_k = dL/dALIGN_k / |P(k)|``).  DEFAULT_POS: ``P`` pairs i with (i + half) mod M both ways, so
        ``v_i = DZN_i + (C_i + C_p) zhat_p``; else the rows of IDX and, for the second sum, the sources
        ``T_SRC[T_OFF[i] .. T_OFF[i + 1]]`` naming row i (IDX transposed).  ZN, DZ [M, D] contiguous."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        dd = tl.arange(0, BLOCK_D)
        dmask = (dd < D)[None, :]
        mask = rmask[:, None] & dmask
        offs = rows.to(tl.int64)[:, None] * D + dd[None, :]
        zn = tl.load(ZN + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(DZN + rows.to(tl.int64)[:, None] * stride_g + dd[None, :], mask=mask, other=0.0).to(tl.float32)
        c = tl.load(C + rows, mask=rmask, other=0.0)
        if DEFAULT_POS:
            p = (rows + half) % M
            zp = tl.load(ZN + p.to(tl.int64)[:, None] * D + dd[None, :], mask=mask, other=0.0).to(tl.float32)
            v += (c + tl.load(C + p, mask=rmask, other=0.0))[:, None] * zp
        else:
            for t in range(0, n_pos):
                p = tl.load(IDX + rows.to(tl.int64) * n_pos + t, mask=rmask, other=-1)
                zp = tl.load(ZN + tl.maximum(p, 0).to(tl.int64)[:, None] * D + dd[None, :],
                             mask=(p >= 0)[:, None] & dmask, other=0.0).to(tl.float32)
                v += c[:, None] * zp
            lo = tl.load(T_OFF + rows, mask=rmask, other=0)
            n_in = tl.load(T_OFF + rows + 1, mask=rmask, other=0) - lo
            for t in range(0, tl.max(n_in, 0)):
                valid = t < n_in
                k = tl.load(T_SRC + lo + t, mask=valid, other=0)
                zk = tl.load(ZN + k.to(tl.int64)[:, None] * D + dd[None, :], mask=valid[:, None] & dmask,
                             other=0.0).to(tl.float32)
                v += tl.load(C + k, mask=valid, other=0.0)[:, None] * zk
        r = tl.load(R + rows, mask=rmask, other=0.0)
        dz = r[:, None] * (v - zn * tl.sum(zn * v, 1)[:, None])
        tl.store(DZ + offs, dz.to(DZ.dtype.element_ty), mask=mask)


# Autotune configs: (BLOCK_M, BLOCK_N, num_warps, num_stages).  BLOCK_M = 128 over two warpgroups
# (8 warps), S tiles 64 or 128 wide.  tests/test_compile.py compiles every config, as launched, for
# sm_80 and sm_90a at D in {128, 256, 384, 768} in bf16, fp16 and fp32.  None is timed on a GPU yet.
FWD_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 2)]
BWD_CONFIGS = [(128, 64, 8, 2)]
# Hopper with aligned 16-bit rows and one chunk of D (:func:`_tma_path`): tiles by tensor descriptors.
# Forward warp-specialised: num_warps=4 is the consumer group's size; the specialiser runs two consumer
# warpgroups (BLOCK_M/2 rows each) and a producer, 12 warps.  Backward: one warpgroup of 64 rows, two
# programs per SM.  tests/test_compile.py checks registers, shared memory and the overlap of each.
FWD_TMA_CONFIGS = [(256, 64, 4, 2), (128, 128, 4, 2)]
BWD_TMA_CONFIGS = [(64, 64, 4, 2)]
# Under the interpreter one config, small enough that test shapes span several tiles.
INTERP_CONFIG = (32, 32, 1, 1)
# The static max needs exp2(s - max) to stay a normal fp32 over the whole range s in [-scale, scale].
STATIC_MAX_LIMIT = 100.0  # 2 * scale * log2(e) below this: temperature above about 0.029


def _blocks(d: int, esize: int = 2, cc: int = 90) -> dict:
    """The tiling of D (:func:`~sslcore.kernels._tiles.d_tiling`) and the backward's BLOCK_DO: output
    columns per program, all of D up to 256 bf16 (128 fp32) values on Hopper, whose accumulator then
    holds a whole row block, half that on Ampere, whose registers would spill."""
    tiling = d_tiling(d, esize)
    whole = 512 // esize
    bdo = tiling["BLOCK_D"] if interpreting() else min(max(16, next_pow2(d)), whole if cc >= 90 else whole // 2)
    return dict(tiling, BLOCK_DO=bdo)


def passes(d: int, esize: int = 2, cc: int = 90) -> int:
    """M x M x D matmul passes of a self-form forward + backward: S once forward; backward S once per
    program column of BLOCK_DO outputs, plus the messages W.Z over all of D once."""
    return 1 + cdiv(d, _blocks(d, esize, cc)["BLOCK_DO"]) + 1


def _arch(t: torch.Tensor) -> int:
    """Compute capability of ``t``'s device as one number (90 for sm_90); 90 off a GPU."""
    if t.device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _tma_path(blocks: dict, cc: int, *ts: torch.Tensor) -> bool:
    """Whether a launch takes the tensor-descriptor kernels: sm_90 (the warp specialiser is validated
    there only), fp16/bf16, one chunk of D of at least 64 columns (32 under the interpreter), and rows
    the copy engine can address: 16-byte aligned base and row stride, unit column stride."""
    return (cc == 90 and blocks["D_CHUNKS"] == 1 and (interpreting() or blocks["BLOCK_D"] >= 64)
            and all(t.dtype in (torch.float16, torch.bfloat16) and t.stride(1) == 1 and t.data_ptr() % 16 == 0
                    and t.stride(0) * t.element_size() % 16 == 0 for t in ts))


def _scratch(size: int, alignment: int, stream):
    """Global memory for the descriptors a program builds (Triton's allocator hook)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _with_scratch(fn):
    """Run ``fn`` with :func:`_scratch` as Triton's allocator, set in a copy of the current context so the
    caller's own allocator (if any) is untouched."""
    def run():
        triton.set_allocator(_scratch)
        return fn()
    return contextvars.copy_context().run(run)


def aot_specs(dtype: str = "bf16", d: int = 128, cc: int = 90):
    """Every autotune config of every kernel as a :class:`KernelSpec` (tests/test_compile.py), with the
    launch arguments of the self form at M = 65,536 (all pointers aligned, dims divisible by 16)."""
    t = torch.empty(16, dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    f32 = torch.empty(16)
    m = 65536
    fwd_args = dict(A=t, B=t, LSE=f32, M=m, N=m, D=d, stride_a=d, stride_b=d, row_offset=0, scale2=2.88,
                    size_bucket=size_bucket(m))
    bwd_args = dict(A=t, B=t, C=t, OUT=t, LSE_R=f32, G_R=f32, LSE_C=f32, G_C=f32, GSCALE=f32, M=m, N=m, D=d,
                    stride_a=d, stride_b=d, stride_c=d, stride_o=d, row_offset=0, scale2=2.88, out_scale=2.0,
                    size_bucket=size_bucket(m))
    blocks = _blocks(d, t.element_size(), cc)
    common = dict(EXCLUDE_SELF=True, EVEN_N=True, UPCAST=False, PRECISION="tf32" if dtype == "fp32" else "ieee",
                  TMA=False, **{k: blocks[k] for k in ("BLOCK_D", "D_CHUNKS", "EVEN_D")})
    bwd_common = dict(common, BLOCK_DO=blocks["BLOCK_DO"], HAS_ROW=True, HAS_COL=True,
                      C_IS_B=blocks["D_CHUNKS"] == 1 and blocks["BLOCK_DO"] == blocks["BLOCK_D"])
    specs = []
    if cc == 90 and dtype != "fp32" and 32 < d <= 256:  # :func:`_tma_path`, for the compiled tiling of D
        # The tensor-descriptor kernels launch for aligned rows; the flag combinations a call can add beside
        # the self form's: the cross form with the online max and a ragged last tile, and the backward's
        # single-sided forms.  Unaligned rows (a strided view) take the kernels below.
        for bm, bn, warps, stages in FWD_TMA_CONFIGS:
            for tag, flags in (("", {}), ("-cross", dict(EXCLUDE_SELF=False, STATIC_MAX=False, EVEN_N=False))):
                specs.append(KernelSpec(f"infonce_lse_fwd_tma[{bm}x{bn}w{warps}s{stages}]{tag}", _lse_fwd_kernel,
                                        fwd_args, {**common, "STATIC_MAX": True, "BLOCK_M": bm, "BLOCK_N": bn,
                                                   "TMA": True, **flags}, warps, stages, mma=True))
        for bm, bn, warps, stages in BWD_TMA_CONFIGS:
            for tag, flags in (("", {}), ("-rows", dict(HAS_COL=False, EXCLUDE_SELF=False, EVEN_N=False)),
                               ("-cols", dict(HAS_ROW=False))):
                specs.append(KernelSpec(f"infonce_lse_bwd_tma[{bm}x{bn}w{warps}s{stages}]{tag}", _lse_bwd_kernel,
                                        bwd_args, {**bwd_common, "BLOCK_M": bm, "BLOCK_N": bn, "TMA": True, **flags},
                                        warps, stages, mma=True))
    for bm, bn, warps, stages in FWD_CONFIGS:
        specs.append(KernelSpec(f"infonce_lse_fwd[{bm}x{bn}w{warps}s{stages}]", _lse_fwd_kernel, fwd_args,
                                dict(common, STATIC_MAX=True, BLOCK_M=bm, BLOCK_N=bn), warps, stages, mma=True))
    for bm, bn, warps, stages in BWD_CONFIGS:
        specs.append(KernelSpec(f"infonce_lse_bwd[{bm}x{bn}w{warps}s{stages}]", _lse_bwd_kernel, bwd_args,
                                dict(bwd_common, BLOCK_M=bm, BLOCK_N=bn), warps, stages, mma=True))
    i64 = torch.empty(16, dtype=torch.int64)
    for dim in (d, MAX_ROW_D) if d == 768 else (d,):  # the widest row tile once, beside the bench's widths
        bm, bd, warps = _row_tile(dim)
        for default in (True, False):  # the two-view pairing; positives [M, 2] by index (transposed backward)
            tag, idx, n_pos = (f"[D{dim}]", t, 0) if default else (f"-index[D{dim}]", i64, 2)
            meta = dict(DEFAULT_POS=default, BLOCK_M=bm, BLOCK_D=bd)
            specs.append(KernelSpec(f"infonce_rows_fwd{tag}", _rows_fwd_kernel,
                                    dict(Z=t, ZN=t, R=f32, ALIGN=f32, IDX=idx, M=m, D=dim, stride_z=dim, half=m // 2,
                                         n_pos=n_pos, eps=1e-12), meta, warps, 1, mma=False))
            specs.append(KernelSpec(f"infonce_rows_bwd{tag}", _rows_bwd_kernel,
                                    dict(ZN=t, R=f32, DZN=t, C=f32, IDX=idx, T_OFF=idx, T_SRC=idx, DZ=t, M=m, D=dim,
                                         stride_g=dim, half=m // 2, n_pos=n_pos), meta, warps, 1, mma=False))
    return specs


if HAS_TRITON:
    _FWD_KEY = ["D", "EXCLUDE_SELF", "STATIC_MAX", "size_bucket"]
    _BWD_KEY = ["D", "EXCLUDE_SELF", "HAS_ROW", "HAS_COL", "C_IS_B", "size_bucket"]
    _EVEN = {"EVEN_N": ("N", "BLOCK_N")}
    _lse_fwd_tuned = {False: tuned(_lse_fwd_kernel, FWD_CONFIGS, _FWD_KEY, _EVEN),
                      True: tuned(_lse_fwd_kernel, FWD_TMA_CONFIGS, _FWD_KEY, _EVEN)}
    _lse_bwd_tuned = {False: tuned(_lse_bwd_kernel, BWD_CONFIGS, _BWD_KEY, _EVEN),
                      True: tuned(_lse_bwd_kernel, BWD_TMA_CONFIGS, _BWD_KEY, _EVEN)}


def _launch(kernel, tuned, grid_rows, grid_cols, n, args, meta):
    """One launch: the interpreter's single small config, else the autotuned one of the path (``meta["TMA"]``)."""
    if interpreting():
        bm, bn, _, _ = INTERP_CONFIG
        kernel[(cdiv(grid_rows, bm), grid_cols)](*args, BLOCK_M=bm, BLOCK_N=bn, EVEN_N=n % bn == 0, **meta)
    elif meta["TMA"]:
        _with_scratch(lambda: tuned[True][lambda m: (cdiv(grid_rows, m["BLOCK_M"]), grid_cols)](*args, **meta))
    else:
        tuned[False][lambda m: (cdiv(grid_rows, m["BLOCK_M"]), grid_cols)](*args, **meta)


# The launches are torch.library custom ops, so torch.compile(fullgraph=True) traces through them.
@torch.library.custom_op("sslcore::infonce_lse_fwd", mutates_args=())
def _lse_fwd_launch(a: torch.Tensor, b: torch.Tensor, scale: float, exclude_self: bool, row_offset: int = 0,
                    unit_norm: bool = False) -> torch.Tensor:
    """Row LSEs of ``scale a b^T``; ``unit_norm``: the caller guarantees |a_i| = |b_j| = 1 (static max)."""
    m, d = a.shape
    n = b.shape[0]
    lse = new_output((m,), device=a.device, dtype=torch.float32)
    cc = _arch(a)
    blocks = _blocks(d, a.element_size(), cc)
    meta = dict(EXCLUDE_SELF=exclude_self, STATIC_MAX=unit_norm and 2 * scale * LOG2E < STATIC_MAX_LIMIT,
                UPCAST=_upcast(a.dtype), PRECISION=_precision(a.dtype), TMA=_tma_path(blocks, cc, a, b),
                **{k: blocks[k] for k in ("BLOCK_D", "D_CHUNKS", "EVEN_D")})
    args = (a, b, lse, m, n, d, a.stride(0), b.stride(0), row_offset, scale * LOG2E, size_bucket(m))
    _launch(_lse_fwd_kernel, _lse_fwd_tuned, m, 1, n, args, meta)
    return lse


@_lse_fwd_launch.register_fake
def _(a, b, scale, exclude_self, row_offset=0, unit_norm=False):
    return a.new_empty(a.shape[0], dtype=torch.float32)


@torch.library.custom_op("sslcore::infonce_lse_bwd", mutates_args=())
def _lse_bwd_op(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, lse_r: torch.Tensor | None, g_r: torch.Tensor | None,
                lse_c: torch.Tensor | None, g_c: torch.Tensor | None, scale: float, exclude_self: bool,
                row_offset: int = 0) -> torch.Tensor:
    """``scale * sum_c W_rc c_c`` (see ``_lse_bwd_kernel``); a missing (lse, g) pair drops its term."""
    m, d = a.shape
    n = b.shape[0]
    out = new_output(a.shape, device=a.device, dtype=a.dtype)
    has_row, has_col = g_r is not None, g_c is not None
    gs = [g for g in (g_r, g_c) if g is not None]
    gscale = torch.stack([g.abs().amax() for g in gs]).amax().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    lse_r, g_r = (lse_r, g_r / gscale) if has_row else (gscale, gscale)
    lse_c, g_c = (lse_c, g_c / gscale) if has_col else (gscale, gscale)
    cc = _arch(a)
    blocks = _blocks(d, a.element_size(), cc)
    same = c.data_ptr() == b.data_ptr() and c.shape == b.shape and c.stride() == b.stride()
    c_is_b = same and blocks["D_CHUNKS"] == 1 and blocks["BLOCK_DO"] == blocks["BLOCK_D"]
    meta = dict(HAS_ROW=has_row, HAS_COL=has_col, EXCLUDE_SELF=exclude_self, UPCAST=_upcast(a.dtype),
                PRECISION=_precision(a.dtype), C_IS_B=c_is_b, TMA=c_is_b and _tma_path(blocks, cc, a, b), **blocks)
    args = (a, b, c, out, lse_r, g_r, lse_c, g_c, gscale, m, n, d, a.stride(0), b.stride(0), c.stride(0),
            out.stride(0), row_offset, scale * LOG2E, scale, size_bucket(m))
    _launch(_lse_bwd_kernel, _lse_bwd_tuned, m, cdiv(d, blocks["BLOCK_DO"]), n, args, meta)
    return out


@_lse_bwd_op.register_fake
def _(a, b, c, lse_r, g_r, lse_c, g_c, scale, exclude_self, row_offset=0):
    return torch.empty_like(a)


def _lse_bwd_launch(a, b, c, row, col, scale, exclude_self, row_offset=0):
    """The backward op with row/col given as (lse, g) pairs or None."""
    lse_r, g_r = row if row is not None else (None, None)
    lse_c, g_c = col if col is not None else (None, None)
    return _lse_bwd_op(a, b, c, lse_r, g_r, lse_c, g_c, scale, exclude_self, row_offset)


# Row kernels (the normalisation and the alignment term, each way): all of D in one tile up to MAX_ROW_D (wider
# rows take the torch path), ROW_ELEMS elements per program of 4 warps (16 a thread: two 16-byte bf16 vectors).
# tests/test_compile.py compiles them (8 warps made ptxas spill in one fp32 backward on Triton 3.6; 4,096
# elements, 32 rows at D = 128, fail to compile there).
ROW_ELEMS, MAX_ROW_D = 2048, 4096


def _row_tile(d: int):
    """``(BLOCK_M, BLOCK_D, num_warps)`` of the row kernels for rows of ``d`` values."""
    bd = max(16, next_pow2(d))
    return (4, bd, 1) if interpreting() else (max(1, ROW_ELEMS // bd), bd, 4)


def _run_rows(kernel, grid, args, meta, num_warps):
    """A row kernel's launch, unpipelined (tests replace it to count bytes on meta tensors at the goal shape)."""
    kernel[grid](*args, num_warps=num_warps, num_stages=1, **meta)


@torch.library.custom_op("sslcore::infonce_rows_fwd", mutates_args=())
def _rows_fwd_launch(z: torch.Tensor, idx: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """``(zhat, 1/|z|, align)`` of :func:`_rows_fwd_kernel`; ``idx`` [M, m] or None (the two-view pairing)."""
    m, d = z.shape
    zn = new_output((m, d), device=z.device, dtype=z.dtype)
    r, align = (new_output((m,), device=z.device, dtype=torch.float32) for _ in range(2))
    bm, bd, warps = _row_tile(d)
    args = (z, zn, r, align, z if idx is None else idx, m, d, z.stride(0), m // 2,
            0 if idx is None else idx.shape[1], eps)
    _run_rows(_rows_fwd_kernel, (cdiv(m, bm),), args, dict(DEFAULT_POS=idx is None, BLOCK_M=bm, BLOCK_D=bd), warps)
    return zn, r, align


@_rows_fwd_launch.register_fake
def _(z, idx, eps):
    r = z.new_empty(z.shape[0], dtype=torch.float32)
    return torch.empty_like(z, memory_format=torch.contiguous_format), r, torch.empty_like(r)


@torch.library.custom_op("sslcore::infonce_rows_bwd", mutates_args=())
def _rows_bwd_launch(zn: torch.Tensor, r: torch.Tensor, dzn: torch.Tensor, c: torch.Tensor,
                     idx: torch.Tensor | None, t_off: torch.Tensor | None, t_src: torch.Tensor | None) -> torch.Tensor:
    """``dz`` of :func:`_rows_bwd_kernel`; ``idx``, ``t_off``, ``t_src`` None for the two-view pairing."""
    m, d = zn.shape
    dz = new_output((m, d), device=zn.device, dtype=zn.dtype)
    bm, bd, warps = _row_tile(d)
    pos = (zn, zn, zn) if idx is None else (idx, t_off, t_src)
    args = (zn, r, dzn, c, *pos, dz, m, d, dzn.stride(0), m // 2, 0 if idx is None else idx.shape[1])
    _run_rows(_rows_bwd_kernel, (cdiv(m, bm),), args, dict(DEFAULT_POS=idx is None, BLOCK_M=bm, BLOCK_D=bd), warps)
    return dz


@_rows_bwd_launch.register_fake
def _(zn, r, dzn, c, idx, t_off, t_src):
    return torch.empty_like(zn)


# ---------------------------------------------------------------------------------------------
# Autograd Functions over the launches.


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _SelfLSE(torch.autograd.Function):
    """``LSE_i = log sum_{j != i} exp(scale z_i . z_j)``; backward is the one-pass W = gP + (gP)^T."""

    @staticmethod
    def forward(ctx, z, scale, unit_norm):
        z = _contig(z)
        lse = _lse_fwd_launch(z, z, scale, True, 0, unit_norm)
        ctx.save_for_backward(z, lse)
        ctx.scale = scale
        return lse

    @staticmethod
    def backward(ctx, g):
        z, lse = ctx.saved_tensors
        g = g.float().contiguous()
        dz = _lse_bwd_launch(z, z, z, (lse, g), (lse, g), ctx.scale, True)
        return dz, None, None


class _CrossLSE(torch.autograd.Function):
    """Row LSEs of ``scale q . k^T`` and, with ``cols=True``, column LSEs too (CLIP's two directions).

    ``offset``: None, or the rows of q are rows ``offset ..`` of k (a block of the self form against all
    keys), and each row's own key, ``offset + i``, is left out.  Backward: the query side and the key
    side, each one pass over the M x N tiles.
    """

    @staticmethod
    def forward(ctx, q, k, scale, cols, unit_norm, offset):
        q, k = _contig(q), _contig(k)
        excl, off = offset is not None, offset or 0
        lse_r = _lse_fwd_launch(q, k, scale, excl, off, unit_norm)
        lse_c = _lse_fwd_launch(k, q, scale, excl, -off, unit_norm) if cols else lse_r.new_zeros(0)
        ctx.save_for_backward(q, k, lse_r, lse_c)
        ctx.scale, ctx.cols, ctx.excl, ctx.off = scale, cols, excl, off
        return lse_r, lse_c

    @staticmethod
    def backward(ctx, g_r, g_c):
        q, k, lse_r, lse_c = ctx.saved_tensors
        row = (lse_r, g_r.float().contiguous())
        col = (lse_c, g_c.float().contiguous()) if ctx.cols and g_c is not None else None
        dq = dk = None
        if ctx.needs_input_grad[0]:
            dq = _lse_bwd_launch(q, k, k, row, col, ctx.scale, ctx.excl, ctx.off)
        if ctx.needs_input_grad[1]:
            dk = _lse_bwd_launch(k, q, q, col, row, ctx.scale, ctx.excl, -ctx.off)
        return dq, dk, None, None, None, None


class _SelfRows(torch.autograd.Function):
    """``(zhat, align)`` of the self form in one row kernel each way: the unit rows and ``align_i =
    mean_{p in P(i)} zhat_i . zhat_p`` (``idx`` [M, m], -1 pads, or None for the two-view pairing).
    Backward: the alignment's messages added to ``dL/dzhat`` and the result taken through the normalisation,
    ``dz = (dzhat - zhat (zhat . dzhat)) / |z|``, in one pass; nothing in fp32 of [M, D]."""

    @staticmethod
    def forward(ctx, z, idx):
        zn, r, align = _rows_fwd_launch(_contig(z), idx, 1e-12)
        ctx.save_for_backward(zn, r, idx)
        return zn, align

    @staticmethod
    def backward(ctx, dzn, dalign):
        zn, r, idx = ctx.saved_tensors
        dalign = dalign.float()
        if idx is None:
            return _rows_bwd_launch(zn, r, _contig(dzn), dalign.contiguous(), None, None, None), None
        m, n_pos = idx.shape
        valid = idx >= 0
        c = (dalign / valid.sum(1)).contiguous()
        # IDX transposed without a host read: the (row -> positive) entries sorted by positive, padding last.
        dest = torch.where(valid, idx, m).reshape(-1)
        order = torch.argsort(dest, stable=True)
        t_off = torch.searchsorted(dest[order], torch.arange(m + 1, device=idx.device, dtype=dest.dtype))
        return _rows_bwd_launch(zn, r, _contig(dzn), c, idx, t_off, order // n_pos), None


def lse_similarity(a: torch.Tensor, b: torch.Tensor | None = None, *, scale: float, cols: bool = False,
                   unit_norm: bool = False, self_offset: int | None = None, backend: str = "auto"):
    """Fused ``log sum_j exp(scale * a_i . b_j)`` per row, differentiable, without the matrix.

    ``b=None`` is the self form (``b = a``, j != i).  ``self_offset=o`` with ``b``: the rows of ``a``
    are rows ``o .. o + len(a)`` of ``b`` (one rank's block of a gathered batch), and pair
    ``(i, o + i)`` is left out.  With ``b`` given and ``cols=True`` returns ``(row_lse, col_lse)``;
    otherwise the row LSEs alone (fp32).  ``unit_norm=True`` promises unit rows (so every logit is at
    most ``scale``): the kernel then uses that bound as a fixed max, with no running max or
    rescaling, where ``scale`` allows it (below about 34.7, a temperature above 0.029).
    """
    check_float("a", a, 2)
    if b is not None:
        check_float("b", b, 2)
        check_same("b", b, "a", a)
    check_positive("scale", scale)
    if self_offset is not None:
        if b is None:
            raise ValueError("self_offset places a's rows among b's: it needs b")
        if isinstance(self_offset, bool) or not isinstance(self_offset, int) or not (
                0 <= self_offset <= b.shape[0] - a.shape[0]):
            raise ValueError(f"self_offset must be an int in [0, {b.shape[0] - a.shape[0]}] (a's rows within b), "
                             f"got {self_offset!r}")
    be = resolve_backend(backend, a.device)
    if a.dtype == torch.float64:  # the kernels take fp32/fp16/bf16; fp64 is the reference's domain
        if backend == "triton":
            raise TypeError("backend='triton' takes float32/float16/bfloat16 inputs, got float64")
        be = "torch"
    if be == "torch":
        if b is None:
            return lse_similarity_ref(a, a, scale=scale, exclude_self=True)
        row = lse_similarity_ref(a, b, scale=scale, self_offset=self_offset)
        return (row, lse_similarity_ref(b, a, scale=scale, self_offset=None if self_offset is None
                                        else -self_offset)) if cols else row
    if b is a and self_offset == 0 and not cols:  # the self form: one backward pass serves both sides
        b = None
    if b is None:
        return _SelfLSE.apply(a, scale, unit_norm)
    if b is a:  # one tensor as two inputs of a Function: Dynamo refuses it (torch 2.14) or drops a gradient (2.11)
        b = a.view_as(a)
    row, col = _CrossLSE.apply(a, b, scale, cols, unit_norm, self_offset)
    return (row, col) if cols else row


def lse_grad(a: torch.Tensor, b: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, *, scale: float,
             side: str = "rows", self_offset: int | None = None, backend: str = "auto") -> torch.Tensor:
    """One block's share of the gradient of ``sum_i g_i LSE_i``, ``LSE_i`` the row log-sum-exps of
    ``scale a . b^T`` over *all* key blocks (given), ``P_ij = exp(scale a_i . b_j - LSE_i)``:
    ``side="rows"``: ``d/da_i = scale sum_j g_i P_ij b_j``; ``side="keys"``: ``d/db_j = scale sum_i g_i
    P_ij a_i``.  ``self_offset``: pair ``(i, offset + i)`` left out.  For ring-passed key blocks
    (:func:`sslcore.dist.ring_lse`); one pass over the block's tiles, in ``a``'s dtype."""
    if side not in ("rows", "keys"):
        raise ValueError(f"side must be 'rows' or 'keys', got {side!r}")
    be = "torch" if a.dtype == torch.float64 else resolve_backend(backend, a.device)
    if be == "torch":
        wide = torch.promote_types(a.dtype, torch.float32)
        s = a.to(wide) @ b.to(wide).T * scale
        if self_offset is not None:
            rows = torch.arange(s.shape[0], device=s.device)[:, None] + self_offset
            s = s.masked_fill(rows == torch.arange(s.shape[1], device=s.device)[None, :], float("-inf"))
        w = torch.exp(s - lse.to(wide)[:, None]) * g.to(wide)[:, None] * scale
        return (w @ b.to(wide) if side == "rows" else w.T @ a.to(wide)).to(a.dtype)
    a, b, excl, off, g = _contig(a), _contig(b), self_offset is not None, self_offset or 0, g.float().contiguous()
    lse = lse.float().contiguous()
    if side == "rows":
        return _lse_bwd_launch(a, b, b, (lse, g), None, scale, excl, off)
    return _lse_bwd_launch(b, a, a, None, (lse, g), scale, excl, -off)


# ---------------------------------------------------------------------------------------------
# Public functional API.


def _alignment(q, k, pos_index, labels, self_form, off=0):
    """``mean_{p in P(i)} q_i . k_p`` per row, O(M.m.D) (labels: class sums, O(N.D)); in the self form row
    i is key ``off + i``, left out of its own positives."""
    m = q.shape[0]
    if labels is not None:
        sums, counts = _class_sums(k, labels)
        own = k[off:off + m]
        return (q * (sums[off:off + m] - own)).sum(1) / (counts[off:off + m] - 1).to(q.dtype)
    idx = _default_pos_index(m, self_form, off, q.device) if pos_index is None else pos_index
    idx = idx.reshape(m, -1).long()
    valid = idx >= 0
    kp = k[idx.clamp_min(0)]  # [m, n_pos, D]
    dots = torch.einsum("md,mpd->mp", q, kp).masked_fill(~valid, 0)
    return dots.sum(1) / valid.sum(1).to(q.dtype)


def _class_sums(k, labels):
    """Per row, the sum of ``k`` over the rows of its label and their number (itself included), without
    host synchronisation: rows sorted by label, one segment sum per label (segment ids and offsets
    from a cumulative sum and ``searchsorted``, sized by the number of rows, not of labels)."""
    m = labels.shape[0]
    order = torch.argsort(labels, stable=True)
    ordered = labels[order]
    start = torch.ones(m, dtype=torch.int64, device=labels.device)
    start[1:] = (ordered[1:] != ordered[:-1]).long()
    seg = torch.cumsum(start, 0) - 1  # label number of each sorted row
    offsets = torch.searchsorted(seg, torch.arange(m + 1, device=labels.device))  # unused labels: empty
    sums = torch.segment_reduce(k[order], "sum", offsets=offsets, axis=0, unsafe=True)
    row_seg = torch.empty_like(seg).scatter_(0, order, seg)
    return sums[row_seg], (offsets[1:] - offsets[:-1])[row_seg]


def _fused_rows(z, backend):
    """Whether the self form's normalisation and alignment run as the row kernels (:class:`_SelfRows`): the
    Triton backend, a kernel dtype, all of D in one row tile."""
    return (z.dtype != torch.float64 and z.shape[1] <= MAX_ROW_D
            and resolve_backend(backend, z.device) == "triton")


def infonce_terms(z, keys=None, *, temperature, pos_index=None, labels=None, weight=None, normalize=True,
                  symmetric=False, self_offset=None, backend="auto"):
    """InfoNCE's two terms per row, ``(alignment, uniformity)``, fp32 (fp64 for fp64): the loss of row i
    is ``uniformity_i - alignment_i``.  Same arguments as :func:`infonce` (unchecked: it checks them)."""
    wide = torch.promote_types(z.dtype, torch.float32)
    w = 1.0 if weight is None else weight.to(wide)
    if keys is None and labels is None and normalize and _fused_rows(z, backend):
        idx = None if pos_index is None else pos_index.reshape(len(z), -1).contiguous()
        qn, align = _SelfRows.apply(z, idx)
        unif = lse_similarity(qn, scale=1.0 / temperature, unit_norm=True, backend=backend)
        return align / temperature * w, unif
    qn = unit_rows(z) if normalize else z
    if keys is None:
        kn = qn
    else:
        kn = unit_rows(keys) if normalize else keys
    self_form, off = keys is None or self_offset is not None, self_offset or 0
    align = _alignment(qn.to(wide), kn.to(wide), pos_index, labels, self_form, off) / temperature * w
    scale = 1.0 / temperature
    if keys is None:
        unif = lse_similarity(qn, scale=scale, unit_norm=normalize, backend=backend)
    elif symmetric:
        row, col = lse_similarity(qn, kn, scale=scale, cols=True, unit_norm=normalize, backend=backend)
        col_align = _alignment(kn.to(wide), qn.to(wide), None, None, False) / temperature * w
        return 0.5 * (align + col_align), 0.5 * (row + col).to(wide)
    else:
        unif = lse_similarity(qn, kn, scale=scale, unit_norm=normalize, self_offset=self_offset, backend=backend)
    return align, unif.to(wide)


def infonce(z: torch.Tensor, keys: torch.Tensor | None = None, *, temperature: float = 0.5,
            pos_index: torch.Tensor | None = None, labels: torch.Tensor | None = None,
            weight: torch.Tensor | None = None, normalize: bool = True, symmetric: bool = False,
            reduction: str = "mean", self_offset: int | None = None, backend: str = "auto",
            validate: bool | None = None) -> torch.Tensor:
    """InfoNCE / NT-Xent, fused (no M x M matrix on the Triton path).

    ``l_i = -w_i * mean_{p in P(i)} s_ip + log sum_{j in N(i)} exp(s_ij)``, ``s = z_hat k_hat^T / tau``.

    * ``keys=None`` (SimCLR, SupCon): ``z`` is [M, D], negatives are all rows but i.  Positives:
      by default the two-view pairing ``p(i) = (i + M/2) mod M`` (views stacked [z0; z1]);
      ``pos_index`` [M] or [M, m] (row indices, -1 pads) or ``labels`` [M] (same label, j != i).
    * ``keys`` [N + Q, D] (MoCo): query i's positive is key i (or ``pos_index``), all keys are in
      the denominator.  ``symmetric=True`` (CLIP) averages both directions (needs N keys).
    * ``keys`` [N, D] with ``self_offset=o`` (data parallelism): the self form restricted to the rows
      of ``z``, which are keys ``o .. o + M`` -- each row's own key ``o + i`` left out, positives by
      default key ``o + (i + M/2) mod M`` (``pos_index``: key indices; ``labels``: [N], one per key).
      The work is M x N, not N x N.
    * ``weight`` [M]: per-row weight on the alignment term.

    Rows are normalised with an fp32 norm (no overflow for any finite input).  Statistics and the
    returned loss are fp32 (fp64 for fp64 inputs); gradients come back in the input dtype.  Bad
    values (non-finite inputs, out-of-range indices, a label seen once) raise ``ValueError`` where
    ``validate`` says so (:func:`~sslcore.kernels._backend.validating`: on CPU tensors, and on CUDA
    when asked, since reading values synchronises); no host synchronisation otherwise.
    """
    _check_args(z, keys, temperature, pos_index, labels, weight, symmetric, reduction, self_offset, validate)
    align, unif = infonce_terms(z, keys, temperature=temperature, pos_index=pos_index, labels=labels, weight=weight,
                                normalize=normalize, symmetric=symmetric, self_offset=self_offset, backend=backend)
    return _reduce(unif - align, reduction)


def infonce_messages(z: torch.Tensor, *, temperature: float = 0.5, pos_index: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                     backend: str = "auto", validate: bool | None = None):
    """The message-passing decomposition of the (mean) NT-Xent gradient w.r.t. ``z_hat``.

    Returns ``(loss, alignment, uniformity)`` with ``alignment + uniformity = dL/dz_hat``:
    ``alignment_i = -(1/(M tau)) sum_j (A_ij + A_ji) z_hat_j`` with ``A_ij = w_i [j in P(i)] / |P(i)|``
    (messages from positive neighbours on the augmentation graph) and
    ``uniformity_i = (1/(M tau)) sum_j (P_ij + P_ji) z_hat_j`` (attention-weighted messages from
    all samples).  Computed on the fused kernel; ``z_hat = z / |z|`` is taken as the leaf.
    """
    _check_args(z, None, temperature, pos_index, labels, weight, False, "mean", None, validate)
    zn = unit_rows(z.detach()).requires_grad_(True)
    with torch.enable_grad():
        align, unif = infonce_terms(zn, temperature=temperature, pos_index=pos_index, labels=labels, weight=weight,
                                    normalize=False, backend=backend)
        m = zn.shape[0]
        a_loss, u_loss = -align.sum() / m, unif.sum() / m
        g_align, = torch.autograd.grad(a_loss, zn)
        g_unif, = torch.autograd.grad(u_loss, zn)
    return (a_loss + u_loss).detach(), g_align, g_unif
