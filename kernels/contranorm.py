"""ContraNorm's update ``H - s * softmax(H_hat H_hat^T / tau) H`` without keeping an L x L matrix.

The attention part, ``Y = softmax(scale * Q Q^T) V`` with ``Q = H_hat`` (rows L2-normalised) and
``V = H``, runs over *chunks*: a few whole sequences of a batch [B, L, D], or a block of R rows of a
graph [N, D] against all N nodes.  Each matrix product is one cuBLAS call over the chunk; every
elementwise step (masks, the softmax, its gradient) is one fused Triton kernel that works in place,
so a chunk needs at most three L x L (R x N) buffers and nothing of them is kept for backward.  With
``P = softmax(scale S)`` (masked pairs 0) and ``G = dL/dY``, per chunk c:

    forward    S = Q_c Q^T;   P  (dual: W = P + P^T);   Y_c = P V
    backward   S = Q_c Q^T;   dPr = G_c V^T;   dPc = V_c G^T;
               A_ij = P_ji (dual: W_ij),   T_ij = scale [P_ij (dP_ij - delta_i) + P_ji (dP_ji - delta_j)];
               dV_c = A G;   dQ_c = T Q

where ``dP_ij = dPr_ij`` and ``dP_ji = dPc_ij`` (dual: both ``dPr_ij + dPc_ij``), and
``delta_i = sum_j P_ij dP_ij`` (``= G_i . Y_i`` without dual).  S is symmetric, so
``P_ji = exp(scale S_ij - LSE_j)`` comes from the same element as ``P_ij``: no kernel reads a
transposed tile.  Forward + backward: **7 L x L x D matmul passes** (2 + 5), the count of an
attention forward + backward, with no S recomputed per output chunk.  docs/architecture.md has the
design and its memory traffic.

Masks: a ``key_padding_mask`` removes padding tokens from every softmax, as keys *and* as queries
(their rows of P are 0, so with dual nothing of them comes back through P^T).  A graph removes from
each node's softmax the node itself and its neighbours, edges taken as undirected; the excluded pairs
are written as -inf into S before the softmax, so the result is exact (no subtraction of neighbour
sums).  The layer arithmetic around the op (normalisation, ``s``, ``identity``) is plain torch.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

from ._backend import (
    HAS_TRITON,
    KernelSpec,
    cdiv,
    check_float,
    check_positive,
    interpreting,
    new_output,
    resolve_backend,
    tl,
    triton,
    unit_rows,
    validating,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Bytes of chunk buffers (3 per chunk) the op may hold at once: the chunk is as many whole sequences,
# or graph rows, as fit (at least one).  bf16 at L = 4096: 4 sequences; a graph of N = 131,072: 512 rows.
CHUNK_BYTES = 384 * 2**20
N_BUFFERS = 3

# ---------------------------------------------------------------------------------------------
# Plain-torch references (they materialise the L x L / N x N matrix).


def _neighbour_mask(n, edge_index, device):
    """[N, N] bool: a node itself and its neighbours (edges undirected)."""
    mask = torch.eye(n, dtype=torch.bool, device=device)
    if edge_index is not None:
        mask[edge_index[0], edge_index[1]] = True
        mask[edge_index[1], edge_index[0]] = True
    return mask


def tied_attention_ref(q, v, *, scale, key_padding_mask=None, exclude_self=False, dual=False, exclude=None):
    """``softmax(scale * q q^T) v`` over the last two dims (``dual``: ``(P + P^T) v``).

    ``key_padding_mask`` [..., L] (True = padding) takes padding tokens out of every softmax, as keys
    and as queries (their rows of P are 0); ``exclude_self`` removes j = i; ``exclude`` [L, L] bool
    removes any pairs.  Rows with no key left are 0.
    """
    wide = torch.promote_types(q.dtype, torch.float32)
    q, v = q.to(wide), v.to(wide)
    s = q @ q.transpose(-1, -2) * scale
    drop = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    if key_padding_mask is not None:
        drop = drop | key_padding_mask[..., None, :] | key_padding_mask[..., :, None]
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
    ``identity``: ``(1 + s) H - s P H``).  ``h`` is [B, L, D] (softmax within each sequence; padding
    tokens take part in no softmax and their rows are returned unchanged) or [N, D] with
    ``edge_index`` [2, E] or a :class:`NeighbourGraph` (a graph: each node's own row and its
    neighbours, edges undirected, are removed from its softmax).  ``scale`` is a float or a [D]
    tensor (per channel).
    """
    _check(h, scale, temperature, key_padding_mask, edge_index, None)
    wide = torch.promote_types(h.dtype, torch.float32)
    x = h.to(wide)
    xn = unit_rows(x)
    if edge_index is not None:
        edges = edge_index.edge_index if isinstance(edge_index, NeighbourGraph) else edge_index
        y = tied_attention_ref(xn, x, scale=1.0 / temperature, dual=dual,
                               exclude=_neighbour_mask(h.shape[0], edges, h.device))
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
    xn = unit_rows(x)
    p = torch.softmax(xn.transpose(-1, -2) @ xn / temperature, dim=-1)
    out = (1 + scale) * x - scale * (x @ p) if identity else x - scale * (x @ p)
    return out.to(h.dtype)


def _combine(x, y, scale, identity, key_padding_mask):
    out = (1 + scale) * x - scale * y if identity else x - scale * y
    if key_padding_mask is not None:
        out = torch.where(key_padding_mask[..., None], x, out)
    return out


# ---------------------------------------------------------------------------------------------
# Graphs: the excluded pairs, prepared once.


class NeighbourGraph:
    """The pairs a graph's ContraNorm leaves out of each node's softmax: the node itself and its
    neighbours, edges undirected.  Built by :func:`prepare_graph` (which synchronises with the device
    once); then every call with it runs without host synchronisation.

    ``keys`` (int64, on the nodes' device): the sorted, distinct ``i * N + j`` of the excluded pairs
    (both directions, and the self pairs); ``rowptr`` (int64, CPU) [N + 1]: node i's keys are
    ``keys[rowptr[i]:rowptr[i + 1]]``.
    """

    def __init__(self, keys: torch.Tensor, rowptr: torch.Tensor, num_nodes: int):
        self.keys, self.rowptr, self.num_nodes = keys, rowptr, num_nodes

    def bounds(self, rows: int) -> list[int]:
        """Offsets into ``keys`` of rows ``0, rows, 2 rows, ..., N``: the keys of each chunk of ``rows`` rows."""
        return _key_bounds(self.rowptr, rows)

    @property
    def edge_index(self) -> torch.Tensor:
        """The excluded pairs as [2, E'] (self pairs included)."""
        return torch.stack([self.keys // self.num_nodes, self.keys % self.num_nodes])

    def __repr__(self) -> str:
        return f"NeighbourGraph(num_nodes={self.num_nodes}, excluded_pairs={self.keys.numel()})"


def _check_edge_index(edge_index, num_nodes, device):
    if not isinstance(edge_index, torch.Tensor) or edge_index.dtype not in (torch.int64, torch.int32):
        raise TypeError("edge_index must be an int64/int32 tensor of shape [2, E] (or a NeighbourGraph)")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {tuple(edge_index.shape)}")
    if edge_index.device != device:
        raise ValueError(f"edge_index is on {edge_index.device} but h is on {device}")


def _key_bounds(rowptr: torch.Tensor, rows: int) -> list[int]:
    """Offsets into a graph's keys of rows ``0, rows, 2 rows, ..., N`` (``rowptr`` is on the CPU: no sync)."""
    n = rowptr.shape[0] - 1
    return rowptr[list(range(0, n, rows)) + [n]].tolist()


@torch.library.custom_op("sslcore::contranorm_graph_keys", mutates_args=())
def _graph_keys(edge_index: torch.Tensor, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, rowptr)`` of :class:`NeighbourGraph`: an op of its own, so that ``torch.compile`` traces a
    call that prepares its graph (the number of keys is data-dependent)."""
    n = num_nodes
    src, dst = edge_index.long()
    if src.numel() and (int(torch.minimum(src.min(), dst.min())) < 0 or int(torch.maximum(src.max(), dst.max())) >= n):
        raise ValueError(f"edge_index values must lie in [0, {n}) (the nodes of h)")
    loops = torch.arange(n, device=src.device)
    keys = torch.unique(torch.cat([src * n + dst, dst * n + src, loops * (n + 1)]))  # sorted
    counts = torch.bincount(keys // n, minlength=n).cpu()
    rowptr = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=rowptr[1:])
    return keys, rowptr


@_graph_keys.register_fake
def _(edge_index, num_nodes):
    keys = edge_index.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)
    return keys, torch.empty(num_nodes + 1, dtype=torch.int64)


def prepare_graph(edge_index: torch.Tensor, num_nodes: int) -> NeighbourGraph:
    """The :class:`NeighbourGraph` of ``edge_index`` [2, E] over ``num_nodes`` nodes (sorting,
    deduplicating; synchronises with the device once).  :func:`contranorm` caches the last few."""
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes must be an integer >= 1, got {num_nodes!r}")
    _check_edge_index(edge_index, num_nodes, edge_index.device if isinstance(edge_index, torch.Tensor) else None)
    return NeighbourGraph(*_graph_keys(edge_index, num_nodes), num_nodes)


_GRAPHS: dict[int, tuple] = {}  # id(edge_index) -> (weakref, version, num_nodes, graph): the last few
_GRAPHS_MAX = 8


def _cached_graph(edge_index: torch.Tensor, num_nodes: int) -> NeighbourGraph:
    """:func:`prepare_graph`, reused while the same tensor, unmodified (``_version``), comes back."""
    if torch.compiler.is_compiling():  # a traced call prepares its graph (pass a NeighbourGraph to save that)
        return prepare_graph(edge_index, num_nodes)
    hit = _GRAPHS.get(id(edge_index))
    if hit is not None and hit[0]() is edge_index and hit[1] == edge_index._version and hit[2] == num_nodes:
        return hit[3]
    graph = prepare_graph(edge_index, num_nodes)
    if len(_GRAPHS) >= _GRAPHS_MAX:
        _GRAPHS.pop(next(iter(_GRAPHS)))
    key = id(edge_index)
    _GRAPHS[key] = (weakref.ref(edge_index, lambda _: _GRAPHS.pop(key, None)), edge_index._version, num_nodes, graph)
    return graph


# ---------------------------------------------------------------------------------------------
# Argument checks.


def _check(h, scale, temperature, key_padding_mask, edge_index, validate):
    """Shapes, types and devices always; values (finiteness, index ranges, fully padded sequences)
    where :func:`validating` says so."""
    check_float("h", h, (2, 3))
    check_positive("temperature", temperature)
    values = validating(h.device, validate)
    if isinstance(scale, torch.Tensor):
        if scale.shape != (h.shape[-1],) or not scale.is_floating_point():
            raise ValueError(f"scale must be a float or a float [{h.shape[-1]}] tensor, got "
                             f"{scale.dtype} of shape {tuple(scale.shape)}")
        if scale.device != h.device:
            raise ValueError(f"scale is on {scale.device} but h is on {h.device}")
        if values and not bool((torch.isfinite(scale) & (scale >= 0)).all()):
            raise ValueError("scale must be finite and >= 0 in every channel")
    elif (not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale >= 0
          or scale == float("inf")):
        raise ValueError(f"scale must be a finite number >= 0 (or a [D] tensor), got {scale!r}")
    if edge_index is not None:
        if h.dim() != 2:
            raise ValueError(f"edge_index (graph mode) needs h of shape [N, D], got {tuple(h.shape)}")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is for sequences; a graph takes edge_index alone")
        if isinstance(edge_index, NeighbourGraph):
            if edge_index.num_nodes != h.shape[0]:
                raise ValueError(f"the NeighbourGraph has {edge_index.num_nodes} nodes but h has {h.shape[0]} rows")
            if edge_index.keys.device != h.device:
                raise ValueError(f"the NeighbourGraph is on {edge_index.keys.device} but h is on {h.device}")
        else:
            _check_edge_index(edge_index, h.shape[0], h.device)
            if values and edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= h.shape[0]):
                raise ValueError(f"edge_index values must lie in [0, {h.shape[0]}) (the nodes of h)")
    elif h.dim() != 3:
        raise ValueError(f"h must be [B, L, D] (sequences), or [N, D] with edge_index (a graph); got {tuple(h.shape)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = padding)")
        if key_padding_mask.shape != h.shape[:2]:
            raise ValueError(f"key_padding_mask must have shape {tuple(h.shape[:2])}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != h.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but h is on {h.device}")
        if values and bool(key_padding_mask.all(-1).any()):
            raise ValueError("key_padding_mask masks every token of some sequence")
    if values and not bool(torch.isfinite(h).all()):
        raise ValueError("h contains NaN or Inf")


# ---------------------------------------------------------------------------------------------
# Elementwise stages over a chunk.  A chunk buffer is [b, R, C]: rows ``row0 .. row0 + R`` of b
# sequences (or of one graph) against all C tokens (nodes).  ``lse``/``delta`` are the [b, C]
# statistics of every token of those sequences (row i's is ``[:, row0 + i]``); ``valid`` [b, C]
# int8 (1 = a real token) or None.  Pairs are masked where either token is padding or S is -inf.
# Each stage exists twice with the same arithmetic: Triton kernels, and torch ops (backend="torch").

if HAS_TRITON:

    @triton.jit
    def _tile(b, pid_r, pid_c, R, C, CP, row0, VALID, HAS_VALID: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_C: tl.constexpr):
        """Offsets into the chunk buffer (rows CP apart, CP >= C padded to 16), the statistics' indices,
        ``inb`` (inside the buffer, padding columns included: loads and stores stay 16-byte vectors)
        and ``keep`` (a real pair: in bounds, both tokens valid)."""
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        inb = (r < R)[:, None] & (c < CP)[None, :]
        offs = (b * R + r).to(tl.int64)[:, None] * CP + c[None, :]
        rows = row0 + r  # token index of each row in its sequence
        stat_r = b.to(tl.int64) * C + rows
        stat_c = b.to(tl.int64) * C + c
        keep = (r < R)[:, None] & (c < C)[None, :]
        if HAS_VALID:
            vr = tl.load(VALID + stat_r, mask=r < R, other=0)
            vc = tl.load(VALID + stat_c, mask=c < C, other=0)
            keep = keep & (vr != 0)[:, None] & (vc != 0)[None, :]
        return offs, inb, keep, stat_r, stat_c, r < R, c < C

    @triton.jit
    def _logits(S, offs, inb, keep, scale2):
        """The chunk tile's ``scale * S`` in base-2 units (fp32) and where it counts (unmasked, not -inf)."""
        s = tl.load(S + offs, mask=inb, other=float("-inf")).to(tl.float32) * scale2
        return s, keep & (s > float("-inf"))

    @triton.jit
    def _lse2(LSE, idx, mask):
        """LSEs (natural log in memory) in base-2 units."""
        return tl.load(LSE + idx, mask=mask, other=0.0) * 1.4426950408889634

    @triton.jit
    def _lse_partial_kernel(S, PART, VALID, R, C, CP, row0, n_cblocks, scale2,
                            HAS_VALID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """``PART[b, r, k] = log sum_{c in block k} exp(scale S_rc)`` over unmasked pairs (-inf if none)."""
        pid_c, pid_r, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs, inb, keep, _, _, rmask, _ = _tile(b, pid_r, pid_c, R, C, CP, row0, VALID, HAS_VALID, BLOCK_R, BLOCK_C)
        s, keep = _logits(S, offs, inb, keep, scale2)
        s = tl.where(keep, s, float("-inf"))
        m = tl.max(s, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        part = (m + tl.log2(tl.sum(tl.exp2(s - m_safe[:, None]), 1))) * 0.6931471805599453
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        tl.store(PART + (b * R + r).to(tl.int64) * n_cblocks + pid_c, part, mask=rmask)

    @triton.jit
    def _probs_kernel(S, LSE, VALID, R, C, CP, row0, scale2,
                      DUAL: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """In place: ``S <- P`` (``P_rc = exp(scale S_rc - LSE_r)``), or with DUAL ``S <- P_rc + P_cr``."""
        pid_c, pid_r, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs, inb, keep, stat_r, stat_c, rmask, cmask = _tile(b, pid_r, pid_c, R, C, CP, row0, VALID, HAS_VALID,
                                                               BLOCK_R, BLOCK_C)
        s, keep = _logits(S, offs, inb, keep, scale2)
        p = tl.where(keep, tl.exp2(s - _lse2(LSE, stat_r, rmask)[:, None]), 0.0)
        if DUAL:
            p += tl.where(keep, tl.exp2(s - _lse2(LSE, stat_c, cmask)[None, :]), 0.0)
        tl.store(S + offs, p.to(S.dtype.element_ty), mask=inb)

    @triton.jit
    def _dual_delta_kernel(S, DPR, DPC, LSE, VALID, PART, R, C, CP, row0, n_cblocks, scale2,
                           HAS_VALID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """``PART[b, r, k] = sum_{c in block k} P_rc (dPr_rc + dPc_rc)``: dual's delta, by column block."""
        pid_c, pid_r, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs, inb, keep, stat_r, _, rmask, _ = _tile(b, pid_r, pid_c, R, C, CP, row0, VALID, HAS_VALID,
                                                      BLOCK_R, BLOCK_C)
        s, keep = _logits(S, offs, inb, keep, scale2)
        dp = (tl.load(DPR + offs, mask=inb, other=0.0).to(tl.float32)
              + tl.load(DPC + offs, mask=inb, other=0.0).to(tl.float32))
        part = tl.sum(tl.where(keep, tl.exp2(s - _lse2(LSE, stat_r, rmask)[:, None]) * dp, 0.0), 1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        tl.store(PART + (b * R + r).to(tl.int64) * n_cblocks + pid_c, part, mask=rmask)

    @triton.jit
    def _grads_kernel(S, DPR, DPC, LSE, DELTA, VALID, R, C, CP, row0, scale2, scale,
                      DUAL: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """In place: ``S <- A`` (``P_cr``; dual ``P_rc + P_cr``) and ``DPR <- T`` (see the module docstring)."""
        pid_c, pid_r, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs, inb, keep, stat_r, stat_c, rmask, cmask = _tile(b, pid_r, pid_c, R, C, CP, row0, VALID, HAS_VALID,
                                                               BLOCK_R, BLOCK_C)
        s, keep = _logits(S, offs, inb, keep, scale2)
        d_r = tl.load(DELTA + stat_r, mask=rmask, other=0.0)
        d_c = tl.load(DELTA + stat_c, mask=cmask, other=0.0)
        p_rc = tl.where(keep, tl.exp2(s - _lse2(LSE, stat_r, rmask)[:, None]), 0.0)
        p_cr = tl.where(keep, tl.exp2(s - _lse2(LSE, stat_c, cmask)[None, :]), 0.0)
        dpr = tl.load(DPR + offs, mask=inb, other=0.0).to(tl.float32)
        dpc = tl.load(DPC + offs, mask=inb, other=0.0).to(tl.float32)
        if DUAL:
            dp = dpr + dpc
            a = p_rc + p_cr
            t = p_rc * (dp - d_r[:, None]) + p_cr * (dp - d_c[None, :])
        else:
            a = p_cr
            t = p_rc * (dpr - d_r[:, None]) + p_cr * (dpc - d_c[None, :])
        t = tl.where(keep, t, 0.0)  # padding columns hold garbage: no NaN written there
        tl.store(S + offs, a.to(S.dtype.element_ty), mask=inb)
        tl.store(DPR + offs, (t * scale).to(DPR.dtype.element_ty), mask=inb)


# (BLOCK_R, BLOCK_C, num_warps) per kernel: memory-bound tiles of 16-byte loads (8 bf16 per thread and
# row segment) with few live values per thread; tests/test_compile.py compiles them for sm_80/sm_90a.
TILES = {"lse": (32, 256, 4), "probs": (32, 256, 4), "delta": (32, 128, 4), "grads": (32, 128, 4)}
INTERP_TILE = (16, 16)  # under the interpreter: small, so test shapes span several tiles


def _tile_of(kind):
    return (*INTERP_TILE, 1) if interpreting() else TILES[kind]


def _launch(kernel, kind, s, args, meta):
    b, rows, cols = s.shape
    br, bc, warps = _tile_of(kind)
    kernel[(cdiv(s.stride(1), bc), cdiv(rows, br), b)](*args, BLOCK_R=br, BLOCK_C=bc, num_warps=warps, **meta)


def _valid_arg(valid, s):
    return (valid, True) if valid is not None else (s, False)


class _TritonStages:
    """The elementwise stages as Triton kernels (in place on the chunk buffers)."""

    @staticmethod
    def lse(s, valid, row0, scale):
        b, rows, cols = s.shape
        n_cblocks = cdiv(s.stride(1), _tile_of("lse")[1])
        part = new_output((b, rows, n_cblocks), device=s.device, dtype=torch.float32)
        v, has_valid = _valid_arg(valid, s)
        _launch(_lse_partial_kernel, "lse", s, (s, part, v, rows, cols, s.stride(1), row0, n_cblocks, scale * LOG2E),
                dict(HAS_VALID=has_valid))
        return torch.logsumexp(part, -1)

    @staticmethod
    def probs(s, lse, valid, row0, scale, dual):
        b, rows, cols = s.shape
        v, has_valid = _valid_arg(valid, s)
        _launch(_probs_kernel, "probs", s, (s, lse, v, rows, cols, s.stride(1), row0, scale * LOG2E),
                dict(DUAL=dual, HAS_VALID=has_valid))

    @staticmethod
    def dual_delta(s, dpr, dpc, lse, valid, row0, scale):
        b, rows, cols = s.shape
        n_cblocks = cdiv(s.stride(1), _tile_of("delta")[1])
        part = new_output((b, rows, n_cblocks), device=s.device, dtype=torch.float32)
        v, has_valid = _valid_arg(valid, s)
        _launch(_dual_delta_kernel, "delta", s, (s, dpr, dpc, lse, v, part, rows, cols, s.stride(1), row0,
                                                 n_cblocks, scale * LOG2E), dict(HAS_VALID=has_valid))
        return part.sum(-1)

    @staticmethod
    def grads(s, dpr, dpc, lse, delta, valid, row0, scale, dual):
        b, rows, cols = s.shape
        v, has_valid = _valid_arg(valid, s)
        _launch(_grads_kernel, "grads", s, (s, dpr, dpc, lse, delta, v, rows, cols, s.stride(1), row0,
                                            scale * LOG2E, scale),
                dict(DUAL=dual, HAS_VALID=has_valid))


class _TorchStages:
    """The same stages in torch ops (any device, any float dtype; fp32 or wider arithmetic)."""

    @staticmethod
    def _logits(s, valid, row0, scale):
        x = s.to(torch.promote_types(s.dtype, torch.float32)) * scale
        if valid is not None:
            v = valid != 0
            x = x.masked_fill(~(v[:, row0:row0 + s.shape[1], None] & v[:, None, :]), float("-inf"))
        return x

    @staticmethod
    def _p(x, lse):
        """``exp(x - lse)``: 0 where x is masked (-inf), also in rows with nothing left (lse = -inf)."""
        return torch.exp(x - lse.clamp_min(-1e30))

    @classmethod
    def lse(cls, s, valid, row0, scale):
        return torch.logsumexp(cls._logits(s, valid, row0, scale), -1)

    @classmethod
    def probs(cls, s, lse, valid, row0, scale, dual):
        x = cls._logits(s, valid, row0, scale)
        p = cls._p(x, lse[:, row0:row0 + s.shape[1], None])
        if dual:
            p = p + cls._p(x, lse[:, None, :])
        s.copy_(p)

    @classmethod
    def dual_delta(cls, s, dpr, dpc, lse, valid, row0, scale):
        x = cls._logits(s, valid, row0, scale)
        return (cls._p(x, lse[:, row0:row0 + s.shape[1], None]) * (dpr + dpc)).sum(-1)

    @classmethod
    def grads(cls, s, dpr, dpc, lse, delta, valid, row0, scale, dual):
        x = cls._logits(s, valid, row0, scale)
        rows = slice(row0, row0 + s.shape[1])
        p_rc, p_cr = cls._p(x, lse[:, rows, None]), cls._p(x, lse[:, None, :])
        d_r, d_c = delta[:, rows, None], delta[:, None, :]
        if dual:
            dp = dpr + dpc
            a, t = p_rc + p_cr, p_rc * (dp - d_r) + p_cr * (dp - d_c)
        else:
            a, t = p_cr, p_rc * (dpr - d_r) + p_cr * (dpc - d_c)
        s.copy_(a)
        dpr.copy_(t * scale)


# ---------------------------------------------------------------------------------------------
# The chunked forward and backward (one driver for both backends).


class LaunchLog:
    """What the op launched inside :func:`record_launches`: ``matmuls`` (FLOPs of each cuBLAS call)
    and ``kernels`` (names of the elementwise launches)."""

    def __init__(self):
        self.matmuls: list[int] = []
        self.kernels: list[str] = []

    def passes(self, bsz: int, length: int, d: int) -> float:
        """Matmul FLOPs in units of one ``L x L x D`` pass over the batch (``2 B L^2 D``)."""
        return sum(self.matmuls) / (2.0 * bsz * length * length * d)


_LOGS: list[LaunchLog] = []


@contextlib.contextmanager
def record_launches():
    """``with record_launches() as log: ...`` records every matmul and kernel ContraNorm launches."""
    log = LaunchLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _bmm(a, b, out=None):
    for log in _LOGS:
        log.matmuls.append(2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])
    return torch.bmm(a, b, out=out)


def _logged(name):
    for log in _LOGS:
        log.kernels.append(name)


def _graph_rows(num_nodes, esize):
    """Rows of a graph per chunk: as many as CHUNK_BYTES holds (at least one)."""
    return max(1, CHUNK_BYTES // (N_BUFFERS * num_nodes * esize))


def _chunks(bsz, length, graph_rows, esize):
    """``(b0, b1, r0, r1)``: ``graph_rows`` rows of a graph per chunk, or as many whole sequences as
    CHUNK_BYTES holds (at least one)."""
    if graph_rows:
        return [(0, 1, r0, min(r0 + graph_rows, length)) for r0 in range(0, length, graph_rows)]
    step = max(1, CHUNK_BYTES // (N_BUFFERS * length * length * esize))
    return [(b0, min(b0 + step, bsz), 0, length) for b0 in range(0, bsz, step)]


def _buffer(b, rows, cols, like):
    """A [b, rows, cols] chunk buffer whose rows start 16 elements apart (a view of a padded
    allocation): every kernel load and store is then a 16-byte vector, whatever L is."""
    pad = -cols % 16
    return torch.empty(b, rows, cols + pad, device=like.device, dtype=like.dtype)[..., :cols]


def _similarity(q, i, chunk, keys, key_bounds):
    """``S = Q_c Q^T`` for chunk number ``i``, with a graph's excluded pairs set to -inf."""
    b0, b1, r0, r1 = chunk
    n = q.shape[1]
    s = _bmm(q[b0:b1, r0:r1], q[b0:b1].transpose(1, 2), out=_buffer(b1 - b0, r1 - r0, n, q))
    if keys is not None:
        k = keys[key_bounds[i]:key_bounds[i + 1]]  # keys are i * N + j, sorted: the chunk's rows
        flat = k - r0 * n if s.stride(1) == n else (k // n - r0) * s.stride(1) + k % n
        torch.as_strided(s, (s.stride(0) * s.shape[0],), (1,)).index_fill_(0, flat, float("-inf"))
    return s


def _stages(use_triton):
    return _TritonStages if use_triton else _TorchStages


@torch.library.custom_op("sslcore::contranorm_attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, keys: torch.Tensor | None,
                   rowptr: torch.Tensor | None, graph_rows: int, scale: float, dual: bool,
                   use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, LSE)`` of ``softmax(scale Q Q^T) V`` ([B, L, D]; a graph: B = 1, with its keys, split
    into chunks of ``graph_rows`` rows, node i's keys at ``rowptr[i]``)."""
    st = _stages(use_triton)
    key_bounds = _key_bounds(rowptr, graph_rows) if graph_rows else []
    bsz, length, _ = q.shape
    y = new_output(v.shape, device=v.device, dtype=v.dtype)
    lse = new_output((bsz, length), device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))
    for i, chunk in enumerate(_chunks(bsz, length, graph_rows, q.element_size())):
        b0, b1, r0, r1 = chunk
        s = _similarity(q, i, chunk, keys, key_bounds)
        vb = valid[b0:b1] if valid is not None else None
        lse[b0:b1, r0:r1] = st.lse(s, vb, r0, scale)
        st.probs(s, lse[b0:b1], vb, r0, scale, dual)  # dual: whole sequences, so every LSE_j is known
        _logged("lse")
        _logged("probs")
        _bmm(s, v[b0:b1], out=y[b0:b1, r0:r1])
    return y, lse


@_attention_fwd.register_fake
def _(q, v, valid, keys, rowptr, graph_rows, scale, dual, use_triton):
    return torch.empty_like(v), q.new_empty(q.shape[:2], dtype=torch.promote_types(q.dtype, torch.float32))


@torch.library.custom_op("sslcore::contranorm_attention_bwd", mutates_args=())
def _attention_bwd(q: torch.Tensor, v: torch.Tensor, g: torch.Tensor, y: torch.Tensor, lse: torch.Tensor,
                   valid: torch.Tensor | None, keys: torch.Tensor | None, rowptr: torch.Tensor | None, graph_rows: int,
                   scale: float, dual: bool, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dQ, dV)`` for the upstream gradient ``g`` of Y (see the module docstring)."""
    st = _stages(use_triton)
    key_bounds = _key_bounds(rowptr, graph_rows) if graph_rows else []
    bsz, length, _ = q.shape
    dq = new_output(q.shape, device=q.device, dtype=q.dtype)
    dv = new_output(v.shape, device=v.device, dtype=v.dtype)
    delta = None if dual else (g.to(lse.dtype) * y.to(lse.dtype)).sum(-1)  # delta_i = G_i . Y_i
    for i, chunk in enumerate(_chunks(bsz, length, graph_rows, q.element_size())):
        b0, b1, r0, r1 = chunk
        s = _similarity(q, i, chunk, keys, key_bounds)
        dpr = _bmm(g[b0:b1, r0:r1], v[b0:b1].transpose(1, 2), out=_buffer(b1 - b0, r1 - r0, length, g))
        dpc = _bmm(v[b0:b1, r0:r1], g[b0:b1].transpose(1, 2), out=_buffer(b1 - b0, r1 - r0, length, g))
        vb = valid[b0:b1] if valid is not None else None
        if dual:  # whole sequences: the chunk's rows are every row
            d = st.dual_delta(s, dpr, dpc, lse[b0:b1], vb, r0, scale)
            _logged("dual_delta")
        else:
            d = delta[b0:b1]
        st.grads(s, dpr, dpc, lse[b0:b1], d, vb, r0, scale, dual)
        _logged("grads")
        _bmm(s, g[b0:b1], out=dv[b0:b1, r0:r1])
        _bmm(dpr, q[b0:b1], out=dq[b0:b1, r0:r1])
    return dq, dv


@_attention_bwd.register_fake
def _(q, v, g, y, lse, valid, keys, rowptr, graph_rows, scale, dual, use_triton):
    return torch.empty_like(q), torch.empty_like(v)


class _Attention(torch.autograd.Function):
    """``softmax(scale Q Q^T) V``: saves Q, V, Y and the LSEs (O(B L D)); no L x L buffer outlives a call."""

    @staticmethod
    def forward(ctx, q, v, valid, keys, rowptr, graph_rows, scale, dual, use_triton):
        y, lse = _attention_fwd(q, v, valid, keys, rowptr, graph_rows, scale, dual, use_triton)
        ctx.save_for_backward(q, v, y, lse, valid, keys, rowptr)
        ctx.graph_rows, ctx.scale, ctx.dual, ctx.use_triton = graph_rows, scale, dual, use_triton
        return y

    @staticmethod
    def backward(ctx, gy):
        q, v, y, lse, valid, keys, rowptr = ctx.saved_tensors
        dq, dv = _attention_bwd(q, v, gy.contiguous(), y, lse, valid, keys, rowptr, ctx.graph_rows,
                                ctx.scale, ctx.dual, ctx.use_triton)
        return dq, dv, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Public functional API.


def contranorm(h: torch.Tensor, *, scale, temperature: float = 1.0, dual: bool = False, identity: bool = False,
               key_padding_mask: torch.Tensor | None = None, edge_index=None, backend: str = "auto",
               validate: bool | None = None) -> torch.Tensor:
    """ContraNorm's update before its LayerNorm: ``H - s * softmax(H_hat H_hat^T / tau) H``.

    Same arguments as :func:`contranorm_ref`.  ``edge_index`` may be a :class:`NeighbourGraph`
    (:func:`prepare_graph`); a raw [2, E] tensor is prepared once and cached while it is unchanged.
    The Triton backend runs the chunked design of this module; the torch backend runs
    ``F.scaled_dot_product_attention`` for plain sequences, the same chunked driver with torch ops for
    dual sequences and graphs, and the reference for dual graphs (Triton does not take those).  Statistics are fp32
    (fp64 for fp64 input, which runs on torch); the result has the input dtype.  ``validate``: see
    :func:`~sslcore.kernels._backend.validating`.
    """
    _check(h, scale, temperature, key_padding_mask, edge_index, validate)
    be = resolve_backend(backend, h.device)
    if h.dtype == torch.float64:
        if backend == "triton":
            raise TypeError("backend='triton' takes float32/float16/bfloat16 inputs, got float64")
        be = "torch"
    if edge_index is not None and dual:
        if be == "triton":
            raise ValueError("dual=True with edge_index is not fused (P^T needs every node's normaliser before "
                             "any row); use backend='torch' for it")
        return contranorm_ref(h, scale=scale, temperature=temperature, dual=True, identity=identity,
                              edge_index=edge_index).to(h.dtype)
    wide = torch.promote_types(h.dtype, torch.float32)
    q = unit_rows(h)  # the norm in fp32: no fp16 overflow
    if be == "torch" and edge_index is None and not dual:  # torch's fused attention: exact, fastest on a CPU
        keep = ~key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
        y = F.scaled_dot_product_attention(q[:, None], q[:, None], h[:, None], attn_mask=keep,
                                           scale=1.0 / temperature)[:, 0]
        return _combine(h.to(wide), y.to(wide), scale, identity, key_padding_mask).to(h.dtype)
    valid = (~key_padding_mask).to(torch.int8).contiguous() if key_padding_mask is not None else None
    keys, rowptr, graph_rows = None, None, 0
    if edge_index is not None:
        graph = edge_index if isinstance(edge_index, NeighbourGraph) else _cached_graph(edge_index, h.shape[0])
        graph_rows = _graph_rows(h.shape[0], h.element_size())
        keys, rowptr = graph.keys, graph.rowptr
        q, v = q[None], h[None]
    else:
        v = h
    y = _Attention.apply(q.contiguous(), v.contiguous(), valid, keys, rowptr, graph_rows, 1.0 / temperature,
                         dual, be == "triton")
    if edge_index is not None:
        y = y[0]
    return _combine(h.to(wide), y.to(wide), scale, identity, key_padding_mask).to(h.dtype)


def aot_specs(dtype: str = "bf16", d: int = 0, cc: int = 90):
    """Every kernel variant as a :class:`KernelSpec` (tests/test_compile.py), with the launch arguments
    of a padded batch of sequences (L = 197, rows padded to 208; L = 4096) and of a graph chunk
    (N = 131,072).  ``d`` does not enter these kernels: the matmuls are cuBLAS calls."""
    buf = torch.empty(16, dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    f32, i8 = torch.empty(16), torch.empty(16, dtype=torch.int8)
    shapes = {"seq-L197": (197, 197, 208, 0, i8), "seq-L4096": (4096, 4096, 4096, 0, i8),
              "graph": (640, 131072, 131072, 1280, None)}
    specs = []
    for where, (rows, cols, cp, row0, valid) in shapes.items():
        has_valid = valid is not None
        dims = dict(VALID=valid if has_valid else buf, R=rows, C=cols, CP=cp, row0=row0)
        variants = [("lse", _lse_partial_kernel, dict(S=buf, PART=f32, **dims, n_cblocks=cdiv(cp, TILES["lse"][1]),
                                                      scale2=1.44), {})]
        for dual in (False, True) if has_valid else (False,):  # dual runs on sequences only
            variants += [
                ("probs", _probs_kernel, dict(S=buf, LSE=f32, **dims, scale2=1.44), dict(DUAL=dual)),
                ("grads", _grads_kernel, dict(S=buf, DPR=buf, DPC=buf, LSE=f32, DELTA=f32, **dims, scale2=1.44,
                                              scale=1.0), dict(DUAL=dual)),
            ]
        if has_valid:
            variants.append(("delta", _dual_delta_kernel, dict(S=buf, DPR=buf, DPC=buf, LSE=f32, PART=f32, **dims,
                                                               n_cblocks=cdiv(cp, TILES["delta"][1]), scale2=1.44),
                             {}))
        for kind, fn, args, flags in variants:
            br, bc, warps = TILES[kind]
            label = f"{kind}{'-dual' if flags.get('DUAL') else ''}[{where}]"
            specs.append(KernelSpec(f"contranorm_{label}", fn, args, dict(flags, HAS_VALID=has_valid, BLOCK_R=br,
                                                                          BLOCK_C=bc), warps, 1, mma=False))
    return specs
