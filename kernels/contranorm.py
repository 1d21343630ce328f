"""ContraNorm's update ``H - s * softmax(H_hat H_hat^T / tau) H`` without the L x L matrix.

The Triton op is *tied attention*: ``Y = softmax(scale * Q Q^T) V`` with Q = H_hat (rows
L2-normalised) and V = H, per sequence of a batch ``[B, L, D]`` (never across the batch), with an
optional key-padding mask and optional self-exclusion, and ``dual=True`` for ``(P + P^T) V``.
Forward: one flash-style pass (online softmax, rescaled accumulator).  Backward, with G = dL/dY:

    dV = P^T G   (dual: (P + P^T) G)
    dQ = scale * sum_j (dS_ij + dS_ji) q_j,   dS_ij = P_ij (dP_ij - delta_i),
    dP_ij = G_i . v_j  (dual: G_i . v_j + G_j . v_i),   delta_i = sum_k P_ik dP_ik

all from tiles recomputed in registers; saved for backward: Q, V, the row LSEs (and PV for dual).
The layer arithmetic around it (normalisation, ``s``, ``identity``, LayerNorm) is plain torch.

Graph mode (``edge_index``): the softmax runs over all N nodes except each node itself and its
neighbours.  The dense kernel excludes only the node itself; the neighbours are removed exactly by
a sparse correction over the E edges (O(E.D), autograd), using Y = (e^(l-c) Y_all - U') / (e^(l-c) - Z')
where ``l`` is the self-excluded LSE, ``c`` its detached value, and U', Z' the neighbours' terms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import (
    HAS_TRITON, cdiv, check_finite, check_float, check_positive, interpreting, new_output, resolve_backend, tl, triton,
)
from ._tiles import autotuned, block_d, block_do as _tiles_block_do, d_chunks, precision, sim_tile_any, sim_tile_loop, upcast

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# Plain-torch references (they materialise the L x L / N x N matrix).


def _neighbour_mask(n, edge_index, device):
    mask = torch.eye(n, dtype=torch.bool, device=device)
    if edge_index is not None:
        mask[edge_index[0], edge_index[1]] = True
    return mask


def tied_attention_ref(q, v, *, scale, key_padding_mask=None, exclude_self=False, dual=False, exclude=None):
    """``softmax(scale * q q^T) v`` over the last two dims (``dual``: ``(P + P^T) v``).

    ``key_padding_mask`` [B, L] (True = padding) removes keys; ``exclude_self`` removes j = i;
    ``exclude`` [L, L] bool (reference only) removes any pairs.  Rows with no key left are 0.
    """
    wide = torch.promote_types(q.dtype, torch.float32)
    q, v = q.to(wide), v.to(wide)
    s = q @ q.transpose(-1, -2) * scale
    drop = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    if key_padding_mask is not None:
        drop = drop | key_padding_mask[..., None, :]
    if exclude_self:
        drop = drop | torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    if exclude is not None:
        drop = drop | exclude
    p = torch.softmax(s.masked_fill(drop, float("-inf")), dim=-1).nan_to_num(0.0)
    if dual:
        p = p + p.transpose(-1, -2)
    return p @ v


def contranorm_ref(h, *, scale, temperature=1.0, dual=False, identity=False, key_padding_mask=None,
                   edge_index=None):
    """ContraNorm's update before its LayerNorm, from the full similarity matrix.

    ``H - s * P H`` with ``P = softmax(H_hat H_hat^T / tau)`` (``dual``: ``P + P^T``;
    ``identity``: ``(1 + s) H - s P H``).  ``h`` is [B, L, D] (softmax within each sequence,
    padding keys removed, padding rows returned unchanged) or [N, D] with ``edge_index`` [2, E]
    (a graph: each node's own row and its neighbours are removed from its softmax).
    ``scale`` is a float or a [D] tensor (per channel).
    """
    _check(h, scale, temperature, key_padding_mask, edge_index)
    wide = torch.promote_types(h.dtype, torch.float32)
    x = h.to(wide)
    xn = F.normalize(x, dim=-1)
    if edge_index is not None:
        y = tied_attention_ref(xn, x, scale=1.0 / temperature, dual=dual,
                               exclude=_neighbour_mask(h.shape[0], edge_index, h.device))
    else:
        y = tied_attention_ref(xn, x, scale=1.0 / temperature, key_padding_mask=key_padding_mask, dual=dual)
    return _combine(x, y, scale, identity, key_padding_mask)


def contranorm_features_ref(h, *, scale, temperature=1.0, identity=False):
    """Feature-wise D-ContraNorm: ``H - s H softmax(H_hat^T H_hat / tau)`` (``identity``: ``(1 + s) H - s H P``).

    ``H_hat`` has each token (row) L2-normalised, as in the paper and the authors' code; the D x D
    softmax is row-wise and runs over the rows of ``h`` [N, D] or of each sequence of ``h`` [B, L, D].
    The authors' reported OGB run is ``scale=1, temperature=1, identity=True``.  See docs/methods.md.
    """
    x = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    xn = F.normalize(x, dim=-1)
    p = torch.softmax(xn.transpose(-1, -2) @ xn / temperature, dim=-1)
    out = (1 + scale) * x - scale * (x @ p) if identity else x - scale * (x @ p)
    return out.to(h.dtype)


def _combine(x, y, scale, identity, key_padding_mask):
    out = (1 + scale) * x - scale * y if identity else x - scale * y
    if key_padding_mask is not None:
        out = torch.where(key_padding_mask[..., None], x, out)
    return out


# ---------------------------------------------------------------------------------------------
# Argument checks.


def _check(h, scale, temperature, key_padding_mask, edge_index):
    check_float("h", h, (2, 3))
    check_positive("temperature", temperature)
    if isinstance(scale, torch.Tensor):
        if scale.shape != (h.shape[-1],):
            raise ValueError(f"scale must be a float or a [{h.shape[-1]}] tensor, got shape {tuple(scale.shape)}")
        if scale.device != h.device:
            raise ValueError(f"scale is on {scale.device} but h is on {h.device}")
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale >= 0:
        raise ValueError(f"scale must be >= 0, got {scale!r}")
    if edge_index is not None:
        if h.dim() != 2:
            raise ValueError(f"edge_index (graph mode) needs h of shape [N, D], got {tuple(h.shape)}")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is for sequences; a graph takes edge_index alone")
        if not isinstance(edge_index, torch.Tensor) or edge_index.dtype not in (torch.int64, torch.int32):
            raise TypeError("edge_index must be an int64/int32 tensor of shape [2, E]")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must have shape [2, E], got {tuple(edge_index.shape)}")
        if edge_index.device != h.device:
            raise ValueError(f"edge_index is on {edge_index.device} but h is on {h.device}")
        if edge_index.numel() and not torch.compiler.is_compiling():
            if int(edge_index.min()) < 0 or int(edge_index.max()) >= h.shape[0]:
                raise ValueError(f"edge_index values must lie in [0, {h.shape[0]}) (the nodes of h)")
    elif h.dim() != 3:
        raise ValueError(f"h must be [B, L, D] (sequences), or [N, D] with edge_index (a graph); got {tuple(h.shape)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = padding)")
        if key_padding_mask.shape != h.shape[:2]:
            raise ValueError(f"key_padding_mask must have shape {tuple(h.shape[:2])}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != h.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but h is on {h.device}")
        if not torch.compiler.is_compiling() and bool(key_padding_mask.all(-1).any()):
            raise ValueError("key_padding_mask masks every token of some sequence")
    if not torch.compiler.is_compiling():
        check_finite("h", h)


# ---------------------------------------------------------------------------------------------
# Triton kernels.  Tensors are [B, L, D] with unit stride in D; one program per (row block,
# output-column chunk, sequence).

if HAS_TRITON:

    @triton.jit
    def _key_valid(KPM, b, idx, imask, L, HAS_KPM: tl.constexpr):
        """True where token ``idx`` of sequence ``b`` exists and is not padding."""
        valid = imask
        if HAS_KPM:
            valid = valid & (tl.load(KPM + b.to(tl.int64) * L + idx, mask=imask, other=1) == 0)
        return valid

    @triton.jit
    def _attn_fwd_kernel(Q, V, Y, LSE, KPM, L, D, stride_qb, stride_ql, stride_vb, stride_vl,
                         stride_yb, stride_yl, scale2,
                         EXCLUDE_SELF: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
                         BLOCK_DO: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """``Y = softmax(scale Q Q^T) V`` with a running max, sum and rescaled accumulator; the row
        LSEs (natural log) are written by the first output chunk."""
        b = tl.program_id(2)
        qb = Q + b.to(tl.int64) * stride_qb
        vb = V + b.to(tl.int64) * stride_vb
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < L
        do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        domask = do < D
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
        for n0 in range(0, L, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < L
            s = sim_tile_any(qb, qb, rows, cols, rmask, cmask, D, stride_ql, stride_ql,
                             BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST, PRECISION) * scale2
            valid = _key_valid(KPM, b, cols, cmask, L, HAS_KPM)[None, :]
            if EXCLUDE_SELF:
                valid = valid & (rows[:, None] != cols[None, :])
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vb + tl.min(cols, 0).to(tl.int64) * stride_vl + tl.arange(0, BLOCK_N)[:, None] * stride_vl
                        + do[None, :], mask=cmask[:, None] & domask[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
        y = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        y_ptrs = Y + b.to(tl.int64) * stride_yb + rows.to(tl.int64)[:, None] * stride_yl + do[None, :]
        tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=rmask[:, None] & domask[None, :])
        if tl.program_id(1) == 0:
            tl.store(LSE + b.to(tl.int64) * L + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rmask)

    @triton.jit
    def _attn_msg_kernel(Q, X1, X2, C, OUT, LSE, DELTA, KPM, L, D, D2, stride_qb, stride_ql, stride_x1b, stride_x1l,
                         stride_x2b, stride_x2l, stride_cb, stride_cl, stride_ob, stride_ol, scale2, out_scale,
                         HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, DS: tl.constexpr,
                         EXCLUDE_SELF: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
                         BLOCK_D2: tl.constexpr, D2_CHUNKS: tl.constexpr,
                         BLOCK_DO: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """``OUT[r] = out_scale * sum_c W_rc C[c]`` with ``P_rc = exp(s_rc - LSE_r)`` recomputed:

        ``W_rc = P_rc x_rc`` (HAS_ROW) ``+ P_cr y_rc`` (HAS_COL), where x = y = 1, or with DS the
        softmax-gradient factors ``x_rc = dp_rc - delta_r``, ``y_rc = dp_rc - delta_c`` from the tile
        ``dp = X1[rows] . X2[cols]^T`` of depth D2 (the caller picks X1, X2 so that dp is dP_rc for
        the row term or dP_cr for the column term).
        """
        b = tl.program_id(2)
        qb = Q + b.to(tl.int64) * stride_qb
        x1b = X1 + b.to(tl.int64) * stride_x1b
        x2b = X2 + b.to(tl.int64) * stride_x2b
        cb = C + b.to(tl.int64) * stride_cb
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < L
        do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        domask = do < D
        lse_r = tl.load(LSE + b.to(tl.int64) * L + rows, mask=rmask, other=0.0) * 1.4426950408889634
        row_key = _key_valid(KPM, b, rows, rmask, L, HAS_KPM)
        if DS:
            delta_r = tl.load(DELTA + b.to(tl.int64) * L + rows, mask=rmask, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
        for n0 in range(0, L, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < L
            s = sim_tile_any(qb, qb, rows, cols, rmask, cmask, D, stride_ql, stride_ql,
                             BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST, PRECISION) * scale2
            pair = rmask[:, None] & cmask[None, :]
            if EXCLUDE_SELF:
                pair = pair & (rows[:, None] != cols[None, :])
            if DS:
                dp = sim_tile_loop(x1b, x2b, rows, cols, rmask, cmask, D2, stride_x1l, stride_x2l,
                                   BLOCK_M, BLOCK_N, BLOCK_D2, UPCAST, PRECISION)
            w = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if HAS_ROW:  # P_rc: query r, key c
                p = tl.exp2(tl.minimum(s - lse_r[:, None], 0.0))
                if DS:
                    p = p * (dp - delta_r[:, None])
                col_key = _key_valid(KPM, b, cols, cmask, L, HAS_KPM)
                w += tl.where(pair & col_key[None, :], p, 0.0)
            if HAS_COL:  # P_cr: query c, key r
                lse_c = tl.load(LSE + b.to(tl.int64) * L + cols, mask=cmask, other=0.0) * 1.4426950408889634
                p = tl.exp2(tl.minimum(s - lse_c[None, :], 0.0))
                if DS:
                    delta_c = tl.load(DELTA + b.to(tl.int64) * L + cols, mask=cmask, other=0.0)
                    p = p * (dp - delta_c[None, :])
                w += tl.where(pair & row_key[:, None], p, 0.0)
            c = tl.load(cb + tl.min(cols, 0).to(tl.int64) * stride_cl + tl.arange(0, BLOCK_N)[:, None] * stride_cl
                        + do[None, :], mask=cmask[:, None] & domask[None, :], other=0.0)
            if UPCAST:
                c = c.to(tl.float32)
            acc = tl.dot(w.to(c.dtype), c, acc, input_precision=PRECISION)  # tensor cores, as flash-attention's dS
        o_ptrs = OUT + b.to(tl.int64) * stride_ob + rows.to(tl.int64)[:, None] * stride_ol + do[None, :]
        tl.store(o_ptrs, (acc * out_scale).to(OUT.dtype.element_ty), mask=rmask[:, None] & domask[None, :])


# Autotune configs (BLOCK_M, BLOCK_N, num_warps, num_stages); each must compile for sm_80 and
# sm_90a without spills at D = 128 and 768, with wgmma on sm_90a (BLOCK_M = 64; tests/test_compile.py):
# an offline sweep found larger tiles and 4-warp message kernels spilling.  None is timed on a GPU yet.
FWD_CONFIGS = [(64, 32, 8, 2), (64, 16, 8, 2)]
MSG_CONFIGS = [(64, 16, 8, 2)]
INTERP_CONFIG = (32, 32, 1, 1)
BLOCK_DO_MAX = 64  # output columns per program: the accumulator's register budget


def block_do(d: int) -> int:
    return min(_tiles_block_do(d), BLOCK_DO_MAX)

def aot_specs(dtype: str = "bf16", d: int = 128):
    """Every autotune config of every kernel as ``(name, fn, signature, constexprs, warps, stages)``
    for ahead-of-time compilation (tests/test_compile.py)."""
    ptr = "*" + dtype
    ints = {k: "i32" for k in ("L", "D")}
    fwd_sig = {"Q": ptr, "V": ptr, "Y": ptr, "LSE": "*fp32", "KPM": "*i8", **ints,
               **{f"stride_{t}{x}": "i32" for t in "qvy" for x in "bl"}, "scale2": "fp32"}
    msg_sig = {"Q": ptr, "X1": ptr, "X2": ptr, "C": ptr, "OUT": ptr, "LSE": "*fp32", "DELTA": "*fp32", "KPM": "*i8",
               **ints, "D2": "i32", **{f"stride_{t}{x}": "i32" for t in ("q", "x1", "x2", "c", "o") for x in "bl"},
               "scale2": "fp32", "out_scale": "fp32"}
    common = {"UPCAST": False, "PRECISION": "ieee", "BLOCK_D": block_d(d), "D_CHUNKS": d_chunks(d), "BLOCK_DO": block_do(d)}
    # the two forms in use: padded sequences, and a graph (self excluded, no padding)
    forms = {"seq": dict(EXCLUDE_SELF=False, HAS_KPM=True), "graph": dict(EXCLUDE_SELF=True, HAS_KPM=False)}
    specs = []
    for form, flags in forms.items():
        for bm, bn, warps, stages in FWD_CONFIGS:
            specs.append((f"tied_attention_fwd_{form}[{bm}x{bn}w{warps}s{stages}]", _attn_fwd_kernel, fwd_sig,
                          dict(common, **flags, BLOCK_M=bm, BLOCK_N=bn), warps, stages))
        # the heaviest message form: dS weights of both terms, from a dp tile of depth 2D (dual)
        for bm, bn, warps, stages in MSG_CONFIGS:
            specs.append((f"tied_attention_msg_{form}[{bm}x{bn}w{warps}s{stages}]", _attn_msg_kernel, msg_sig,
                          dict(common, **flags, BLOCK_M=bm, BLOCK_N=bn, HAS_ROW=True, HAS_COL=True, DS=True,
                               BLOCK_D2=block_d(2 * d), D2_CHUNKS=d_chunks(2 * d)), warps, stages))
    return specs


if HAS_TRITON:
    _attn_fwd_tuned = autotuned(_attn_fwd_kernel, FWD_CONFIGS, ["D", "EXCLUDE_SELF", "HAS_KPM"])
    _attn_msg_tuned = autotuned(_attn_msg_kernel, MSG_CONFIGS, ["D", "D2", "HAS_ROW", "HAS_COL", "DS", "EXCLUDE_SELF", "HAS_KPM"])


def _launch(kernel, tuned, shape, args, meta):
    bsz, length, d = shape
    common = dict(meta, BLOCK_D=block_d(d), D_CHUNKS=d_chunks(d), BLOCK_DO=block_do(d))
    if interpreting():
        bm, bn, _, _ = INTERP_CONFIG
        kernel[(cdiv(length, bm), cdiv(d, block_do(d)), bsz)](*args, BLOCK_M=bm, BLOCK_N=bn, **common)
    else:
        tuned[lambda m: (cdiv(length, m["BLOCK_M"]), cdiv(d, block_do(d)), bsz)](*args, **common)


def _strides(*ts):
    return [x for t in ts for x in (t.stride(0), t.stride(1))]


@torch.library.custom_op("sslcore::tied_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None, scale: float,
            exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, length, d = q.shape
    y = new_output(v.shape, device=v.device, dtype=v.dtype)
    lse = new_output((bsz, length), device=q.device, dtype=torch.float32)
    args = (q, v, y, lse, kpm if kpm is not None else lse, length, d, *_strides(q, v, y), scale * LOG2E)
    meta = dict(EXCLUDE_SELF=exclude_self, HAS_KPM=kpm is not None, UPCAST=upcast(q.dtype), PRECISION=precision(q.dtype))
    _launch(_attn_fwd_kernel, _attn_fwd_tuned, q.shape, args, meta)
    return y, lse


@_fwd_op.register_fake
def _(q, v, kpm, scale, exclude_self):
    return torch.empty_like(v), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("sslcore::tied_attention_msg", mutates_args=())
def _msg_op(q: torch.Tensor, c: torch.Tensor, lse: torch.Tensor, kpm: torch.Tensor | None, scale: float,
            out_scale: float, has_row: bool, has_col: bool, exclude_self: bool, x1: torch.Tensor | None = None,
            x2: torch.Tensor | None = None, delta: torch.Tensor | None = None) -> torch.Tensor:
    """``out_scale * sum_c W_rc c_c`` (see ``_attn_msg_kernel``); ``x1, x2, delta`` given select the dS weights."""
    bsz, length, d = q.shape
    out = new_output(c.shape, device=c.device, dtype=c.dtype)
    x1 = q if x1 is None else x1
    x2 = q if x2 is None else x2
    d2 = x1.shape[-1]
    args = (q, x1, x2, c, out, lse, delta if delta is not None else lse, kpm if kpm is not None else lse, length, d, d2,
            *_strides(q, x1, x2, c, out), scale * LOG2E, out_scale)
    meta = dict(HAS_ROW=has_row, HAS_COL=has_col, DS=delta is not None, EXCLUDE_SELF=exclude_self,
                HAS_KPM=kpm is not None, UPCAST=upcast(q.dtype), PRECISION=precision(q.dtype),
                BLOCK_D2=block_d(d2), D2_CHUNKS=d_chunks(d2))
    _launch(_attn_msg_kernel, _attn_msg_tuned, q.shape, args, meta)
    return out


@_msg_op.register_fake
def _(q, c, lse, kpm, scale, out_scale, has_row, has_col, exclude_self, x1=None, x2=None, delta=None):
    return torch.empty_like(c)


def _rowdot(a, b):
    return (a.float() * b.float()).sum(-1)


class _TiedAttention(torch.autograd.Function):
    """``(Y, LSE)`` of tied attention; LSE is differentiable too (graph mode uses it)."""

    @staticmethod
    def forward(ctx, q, v, kpm, scale, exclude_self, dual):
        y, lse = _fwd_op(q, v, kpm, scale, exclude_self)
        y1 = y
        if dual:  # + P^T V
            y = y + _msg_op(q, v, lse, kpm, scale, 1.0, False, True, exclude_self)
        ctx.save_for_backward(q, v, lse, y1, kpm)
        ctx.scale, ctx.exclude_self, ctx.dual = scale, exclude_self, dual
        return y, lse

    @staticmethod
    def backward(ctx, gy, glse):
        q, v, lse, y1, kpm = ctx.saved_tensors
        scale, excl, dual = ctx.scale, ctx.exclude_self, ctx.dual
        gy = torch.zeros_like(v) if gy is None else gy.contiguous()
        msg = lambda c, row, col, **kw: _msg_op(q, c, lse, kpm, scale, kw.pop("out", 1.0), row, col, excl, **kw)  # noqa: E731
        pt_g = msg(gy, False, True)  # P^T G
        delta = _rowdot(gy, y1)  # delta_i = sum_k P_ik dP_ik
        if dual:  # Y = (P + P^T) V: dV = (P^T + P) G, dP_ij = G_i.v_j + G_j.v_i, delta_i += v_i.(P G)_i
            p_g = msg(gy, True, False)
            dv = pt_g + p_g
            delta = delta + _rowdot(v, p_g)
        else:
            dv = pt_g
        if glse is not None:  # dLSE_i/ds_ij = P_ij: the same dS weights with delta_i - glse_i
            delta = delta - glse
        delta = delta.contiguous()
        if dual:  # one pass: dp = [G, V]_r . [V, G]_c
            x1, x2 = torch.cat([gy, v], -1), torch.cat([v, gy], -1)
            dq = msg(q, True, True, out=scale, x1=x1, x2=x2, delta=delta)
        else:  # row term dP_rc = G_r.v_c, column term dP_cr = G_c.v_r: one pass each
            dq = msg(q, True, False, out=scale, x1=gy, x2=v, delta=delta)
            dq = dq + msg(q, False, True, out=scale, x1=v, x2=gy, delta=delta)
        return dq, dv, None, None, None, None


def tied_attention(q: torch.Tensor, v: torch.Tensor, *, scale: float, key_padding_mask: torch.Tensor | None = None,
                   exclude_self: bool = False, dual: bool = False):
    """Fused ``(softmax(scale q q^T) v, LSE)`` for [B, L, D] (see :func:`tied_attention_ref`), Triton only."""
    kpm = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else None
    return _TiedAttention.apply(q.contiguous(), v.contiguous(), kpm, scale, exclude_self, dual)


def _graph_update(q, h, edge_index, scale):
    """Y over all nodes but each node itself and its neighbours: dense kernel + exact sparse correction."""
    y_all, lse = tied_attention(q[None], h[None], scale=scale, exclude_self=True)
    y_all, lse = y_all[0].float(), lse[0]
    n = h.shape[0]
    src, dst = edge_index.long()
    key = torch.unique(src * n + dst)
    src, dst = key // n, key % n
    keep = src != dst  # the node itself is already out of the dense softmax
    src, dst = src[keep], dst[keep]
    c = lse.detach()
    w = torch.exp(_rowdot(q[src], q[dst]) * scale - c[src])
    z_nb = torch.zeros(n, device=h.device).index_add(0, src, w)
    u_nb = torch.zeros(n, h.shape[1], device=h.device).index_add(0, src, w[:, None] * h[dst].float())
    e = torch.exp(lse - c)
    return (e[:, None] * y_all - u_nb) / (e - z_nb)[:, None]


# ---------------------------------------------------------------------------------------------
# Public functional API.


def contranorm(h: torch.Tensor, *, scale, temperature: float = 1.0, dual: bool = False, identity: bool = False,
               key_padding_mask: torch.Tensor | None = None, edge_index: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """ContraNorm's update before its LayerNorm: ``H - s * softmax(H_hat H_hat^T / tau) H``.

    Same arguments as :func:`contranorm_ref`; fused on the Triton path (no L x L matrix).  The
    torch path runs sequences through ``F.scaled_dot_product_attention`` (dual and graph forms:
    the reference).  Statistics are fp32 on the Triton path; the result has the input dtype.
    """
    _check(h, scale, temperature, key_padding_mask, edge_index)
    be = resolve_backend(backend, h.device)
    if be == "torch" or h.dtype == torch.float64:
        if edge_index is None and not dual:  # torch's fused attention: no L x L matrix kept for backward
            q = F.normalize(h, dim=-1)[:, None]
            keep = ~key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
            y = F.scaled_dot_product_attention(q, q, h[:, None], attn_mask=keep, scale=1.0 / temperature)[:, 0]
            return _combine(h, y, scale, identity, key_padding_mask)
        out = contranorm_ref(h, scale=scale, temperature=temperature, dual=dual, identity=identity,
                             key_padding_mask=key_padding_mask, edge_index=edge_index)
        return out.to(h.dtype)
    if edge_index is not None and dual:
        raise ValueError("dual=True with edge_index is not fused (P^T needs every node's corrected "
                         "normaliser); use backend='torch' for it")
    q = F.normalize(h, dim=-1)
    if edge_index is not None:
        y = _graph_update(q, h, edge_index, 1.0 / temperature)
    else:
        y = tied_attention(q, h, scale=1.0 / temperature, key_padding_mask=key_padding_mask, dual=dual)[0]
    wide = torch.promote_types(h.dtype, torch.float32)
    return _combine(h.to(wide), y.to(wide), scale, identity, key_padding_mask).to(h.dtype)
