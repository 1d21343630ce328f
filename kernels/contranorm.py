"""ContraNorm's update ``H - s * softmax(H_hat H_hat^T / tau) H`` (and the LayerNorm after it) without an L x L matrix.

The attention part, ``Y = softmax(scale * Q Q^T) V`` with ``Q = H_hat`` (rows L2-normalised) and
``V = H``, runs over *chunks*: a few whole sequences of a batch [B, L, D]; for a graph [N, D], a *tile
pair*, row blocks I <= J of its nodes.
Each matrix product is cuBLAS over the chunk (on the Triton stages S in row panels); every elementwise
step (masks, the softmax, its gradient) is one fused Triton kernel that works in place, so a chunk needs at
most three buffers and nothing of them is kept for backward.  With ``P = softmax(scale S)`` (masked pairs 0)
and ``G = dL/dY``, per chunk c:

    forward    S = Q_c Q^T;   P  (dual: W = P + P^T);   Y_c = P V
    backward   S = Q_c Q^T;   dPr = G_c V^T;
               A_ij = P_ji (dual: W_ij),   T_ij = scale [P_ij (dP_ij - delta_i) + P_ji (dP_ji - delta_j)];
               dV_c += A G;   dQ_c = T Q

where ``dP_ij = dPr_ij`` and ``dP_ji = dPr_ji`` is read from the transposed tile (one program per tile
pair (I, J), (J, I) of the chunk's sequences: T is symmetric; dual: both ``dPr_ij + dPr_ji``), and
``delta_i = sum_j P_ij dP_ij`` (``= G_i . Y_i`` without dual).  S is symmetric, so
``P_ji = exp(scale S_ij - LSE_j)`` comes from the same element as ``P_ij``: the forward's pair kernels too
take each row's partial LSEs (rows I over J, rows J over I) and then ``P_IJ``, ``P_JI`` from the tiles I <= J
of S alone.  A graph's tile pair computes
``S_IJ = Q_I Q_J^T`` once for both tiles, ``dP_IJ = G_I V_J^T`` and ``dP_JI^T = V_I G_J^T`` (so ``dP_ji`` is
an element at [i, j] too), one kernel turns them into ``A``, ``T`` and ``P_IJ``, and the products add
``dV_I += A G_J``, ``dQ_I += T Q_J`` and, off the diagonal, ``dV_J += P_IJ^T G_I``, ``dQ_J += T^T Q_I``
into fp32 accumulators.  A graph's forward sweeps the pairs twice: first the partial LSEs of rows I over
J and of rows J over I from one ``S_IJ``, then ``P_IJ`` and ``P_JI^T`` from another, ``Y_I += P_IJ V_J``,
``Y_J += P_JI V_I`` (fp32): one L x L read fewer than rows against all nodes, for half a pass of S more.
Forward + backward: **6 L x L x D matmul passes** on sequences (2 + 4) at most: the pair kernels read S
only at tiles I <= J, so S is computed in panels of ``PANEL_ROWS`` rows against the columns from the panel's
first row on (5.125 passes at L = 4096); ``5.5 + 2.5 sum_I R_I^2 / N^2`` on a graph (5.58 at N = 131,072 in
tiles of 4096).

Around the chunks, four row kernels (each a whole row of D per program, fp32 arithmetic, input-dtype
memory) do the rest: ``Q = H_hat`` and the reciprocal norms; ``H - s Y`` (``identity``:
``(1 + s) H - s Y``) and the optional LayerNorm; backward, the LayerNorm and combine gradients with
``G`` and ``delta`` (and the per-channel sums for ``s``, the LayerNorm's weight and bias); then
``dH = dH_direct + dV + (dQ through the normalisation)``, with dV added by the A G product itself.
docs/architecture.md has the design and the bytes it moves.

Masks: a ``key_padding_mask`` removes padding tokens from every softmax, as keys *and* as queries
(their rows of P are 0, so with dual nothing of them comes back through P^T).  A graph removes from
each node's softmax the node itself and its neighbours, edges taken as undirected; the excluded pairs
are written as -inf into S before the softmax, so the result is exact (no subtraction of neighbour
sums).
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
    next_pow2,
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
# S on sequences is symmetric and the Triton pair kernels (forward and backward) read only its tiles I <= J:
# cuBLAS computes it in panels of PANEL_ROWS rows against the columns from the panel's first row on (0.5625 of
# a pass at L = 4096).
PANEL_ROWS = 512

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
                   edge_index=None, layer_norm=None):
    """ContraNorm's update from the full similarity matrix (and its LayerNorm, given ``layer_norm``).

    ``H - s * P H`` with ``P = softmax(H_hat H_hat^T / tau)`` (``dual``: ``P + P^T``;
    ``identity``: ``(1 + s) H - s P H``).  ``h`` is [B, L, D] (softmax within each sequence; padding
    tokens take part in no softmax and their rows are returned unchanged) or [N, D] with
    ``edge_index`` [2, E] or a :class:`NeighbourGraph` (a graph: each node's own row and its
    neighbours, edges undirected, are removed from its softmax).  ``scale`` is a float or a [D]
    tensor (per channel).  ``layer_norm=(weight, bias, eps)``: the result is
    ``F.layer_norm(update, (D,), weight, bias, eps)`` (weight, bias: [D] tensors or None).
    """
    _check(h, scale, temperature, key_padding_mask, edge_index, None, layer_norm)
    wide = torch.promote_types(h.dtype, torch.float32)
    x = h.to(wide)
    xn = unit_rows(x)
    if edge_index is not None:
        edges = edge_index.edge_index if isinstance(edge_index, NeighbourGraph) else edge_index
        y = tied_attention_ref(xn, x, scale=1.0 / temperature, dual=dual,
                               exclude=_neighbour_mask(h.shape[0], edges, h.device))
    else:
        y = tied_attention_ref(xn, x, scale=1.0 / temperature, key_padding_mask=key_padding_mask, dual=dual)
    return _layer_norm(_combine(x, y, scale, identity, key_padding_mask), layer_norm, wide)


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


def _layer_norm(x, layer_norm, dtype=None):
    """``F.layer_norm`` over the last dim with ``layer_norm = (weight, bias, eps)`` (None: ``x``); ``dtype``:
    the weight and bias cast to it first."""
    if layer_norm is None:
        return x
    w, b, eps = layer_norm
    if dtype is not None:
        w, b = (None if t is None else t.to(dtype) for t in (w, b))
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


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


def _check_layer_norm(layer_norm, h):
    if not isinstance(layer_norm, tuple) or len(layer_norm) != 3:
        raise TypeError("layer_norm must be a tuple (weight, bias, eps)")
    for name, t in zip(("weight", "bias"), layer_norm[:2]):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != (h.shape[-1],):
            raise ValueError(f"layer_norm's {name} must be None or a float [{h.shape[-1]}] tensor")
        if t.device != h.device:
            raise ValueError(f"layer_norm's {name} is on {t.device} but h is on {h.device}")
    check_positive("layer_norm's eps", layer_norm[2])


def _check(h, scale, temperature, key_padding_mask, edge_index, validate, layer_norm=None):
    """Shapes, types and devices always; values (finiteness, index ranges, fully padded sequences)
    where :func:`validating` says so."""
    check_float("h", h, (2, 3))
    check_positive("temperature", temperature)
    if layer_norm is not None:
        _check_layer_norm(layer_norm, h)
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
# Triton kernels.  Row kernels: one program per BLOCK_M rows of an [M, D] tensor with all of D in one
# tile, fp32 arithmetic, memory in the input dtype.  Chunk kernels: a chunk buffer is [b, R, C]: rows
# ``row0 .. row0 + R`` of b sequences (or of one graph) against all C tokens (nodes), rows CP >= C
# apart (padded to 16); ``lse``/``delta`` are the [b, C] statistics of every token of those sequences
# (row i's is ``[:, row0 + i]``); ``valid`` [b, C] int8 (1 = a real token) or None.  Pairs are masked
# where either token is padding or S is -inf.  Each stage also exists as torch ops (backend="torch").

if HAS_TRITON:
    # the natural-log <-> base-2 factors as the kernels read them (a global a kernel reads must be a constexpr)
    _LOG2E, _LN2 = tl.constexpr(LOG2E), tl.constexpr(LN2)

    @triton.jit
    def _rows_tile(pid, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """Offsets (int64) of rows ``pid * BLOCK_M ...`` of an [M, D] tensor, the row and column indices, the mask."""
        m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        return m.to(tl.int64)[:, None] * D + d[None, :], m, d, (m < M)[:, None] & (d < D)[None, :]

    @triton.jit
    def _scale_and_keep(SCALE, VALID, m, d, M, D, s, HAS_VALID: tl.constexpr, SCALE_VEC: tl.constexpr):
        """``s`` (the float, or the [D] tensor as a [1, BLOCK_D] row) and ``keep`` [BLOCK_M, 1]: a real token's row."""
        if SCALE_VEC:
            sv = tl.load(SCALE + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
        else:
            sv = s
        keep = m < M
        if HAS_VALID:
            keep = keep & (tl.load(VALID + m, mask=m < M, other=0) != 0)
        return sv, keep[:, None]

    @triton.jit
    def _update(h, y, sv, keep, IDENTITY: tl.constexpr):
        """``u = h - s y`` (identity: ``(1 + s) h - s y``); a padding row stays ``h``."""
        if IDENTITY:
            u = (1.0 + sv) * h - sv * y
        else:
            u = h - sv * y
        return tl.where(keep, u, h)

    @triton.jit
    def _unit_rows_kernel(X, Q, R, M, D, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """``R = 1 / max(|x|, eps)`` per row, the norm taken after dividing by the row's largest magnitude (no
        overflow for any finite input), and ``Q = x R`` in Q's dtype."""
        offs, m, _, mask = _rows_tile(tl.program_id(0), M, D, BLOCK_M, BLOCK_D)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), 1)
        amax = tl.where(amax > 0, amax, 1.0)
        xs = x / amax[:, None]
        r = 1.0 / tl.maximum(tl.sqrt(tl.sum(xs * xs, 1)) * amax, eps)
        tl.store(Q + offs, (x * r[:, None]).to(Q.dtype.element_ty), mask=mask)
        tl.store(R + m, r, mask=m < M)

    @triton.jit
    def _combine_kernel(H, Y, OUT, VALID, SCALE, W, B, MEAN, RSTD, M, D, s, eps,
                        HAS_VALID: tl.constexpr, SCALE_VEC: tl.constexpr, IDENTITY: tl.constexpr, LN: tl.constexpr,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """``OUT = u`` (:func:`_update`), or with LN ``(u - mean) rstd w + b`` and each row's ``MEAN``, ``RSTD``."""
        offs, m, d, mask = _rows_tile(tl.program_id(0), M, D, BLOCK_M, BLOCK_D)
        sv, keep = _scale_and_keep(SCALE, VALID, m, d, M, D, s, HAS_VALID, SCALE_VEC)
        h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        u = _update(h, tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32), sv, keep, IDENTITY)
        if LN:
            mean = tl.sum(u, 1) / D  # u is 0 outside the mask
            diff = tl.where(mask, u - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / D + eps)
            u = diff * rstd[:, None]
            if HAS_W:
                u = u * tl.load(W + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                u = u + tl.load(B + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
            tl.store(MEAN + m, mean, mask=m < M)
            tl.store(RSTD + m, rstd, mask=m < M)
        tl.store(OUT + offs, u.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_bwd_kernel(GO, H, Y, VALID, SCALE, W, MEAN, RSTD, G, DACC, DELTA, PART, M, D, s, blocks,
                            HAS_VALID: tl.constexpr, SCALE_VEC: tl.constexpr, IDENTITY: tl.constexpr,
                            LN: tl.constexpr, HAS_W: tl.constexpr, LOAD_H: tl.constexpr, WANT_DELTA: tl.constexpr,
                            WANT_DS: tl.constexpr, WANT_DLN: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        """Backward of :func:`_combine_kernel` for ``GO = dL/dOUT``, over ``blocks`` row blocks per program:
        ``du = dL/du`` (through the LayerNorm), ``G = -s du`` (0 on padding rows), ``DACC = du`` (identity:
        ``(1 + s) du`` on real rows), ``DELTA = G . y`` (G rounded to its dtype, as the matmuls see it), and
        the program's sums of ``dL/ds``, ``dL/dw``, ``dL/db`` over its rows in ``PART[pid]`` [3, D]."""
        pid = tl.program_id(0)
        d = tl.arange(0, BLOCK_D)
        acc_ds = tl.zeros([BLOCK_D], tl.float32)
        acc_dw = tl.zeros([BLOCK_D], tl.float32)
        acc_db = tl.zeros([BLOCK_D], tl.float32)
        if HAS_W:
            w = tl.load(W + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
        for i in range(0, blocks):
            offs, m, _, mask = _rows_tile(pid * blocks + i, M, D, BLOCK_M, BLOCK_D)
            sv, keep = _scale_and_keep(SCALE, VALID, m, d, M, D, s, HAS_VALID, SCALE_VEC)
            go = tl.load(GO + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
            if LOAD_H:
                h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
            if LN:
                mean = tl.load(MEAN + m, mask=m < M, other=0.0)
                rstd = tl.load(RSTD + m, mask=m < M, other=0.0)
                xhat = tl.where(mask, (_update(h, y, sv, keep, IDENTITY) - mean[:, None]) * rstd[:, None], 0.0)
                wg = go * w if HAS_W else go
                a = tl.sum(wg, 1) / D
                c = tl.sum(wg * xhat, 1) / D
                du = tl.where(mask, rstd[:, None] * (wg - a[:, None] - xhat * c[:, None]), 0.0)
                if WANT_DLN:
                    acc_dw += tl.sum(go * xhat, 0)
                    acc_db += tl.sum(go, 0)
            else:
                du = go
            gq = tl.where(keep, -sv * du, 0.0).to(G.dtype.element_ty)
            if IDENTITY:
                dacc = tl.where(keep, (1.0 + sv) * du, du)
            else:
                dacc = du
            tl.store(G + offs, gq, mask=mask)
            tl.store(DACC + offs, dacc.to(DACC.dtype.element_ty), mask=mask)
            if WANT_DELTA:
                tl.store(DELTA + m, tl.sum(gq.to(tl.float32) * y, 1), mask=m < M)
            if WANT_DS:
                if IDENTITY:
                    part = du * (h - y)
                else:
                    part = -du * y
                acc_ds += tl.sum(tl.where(keep, part, 0.0), 0)
        if WANT_DS:
            tl.store(PART + pid * 3 * D + d, acc_ds, mask=d < D)
        if WANT_DLN:
            tl.store(PART + (pid * 3 + 1) * D + d, acc_dw, mask=d < D)
            tl.store(PART + (pid * 3 + 2) * D + d, acc_db, mask=d < D)

    @triton.jit
    def _finish_kernel(DACC, DQ, H, R, DH, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """``DH = DACC + r (dq - q (q . dq))`` with ``q = h r``: the gradient through the row normalisation added."""
        offs, m, _, mask = _rows_tile(tl.program_id(0), M, D, BLOCK_M, BLOCK_D)
        r = tl.load(R + m, mask=m < M, other=0.0)[:, None]
        q = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32) * r
        dq = tl.load(DQ + offs, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(DACC + offs, mask=mask, other=0.0).to(tl.float32) + r * (dq - q * tl.sum(q * dq, 1)[:, None])
        tl.store(DH + offs, dh.to(DH.dtype.element_ty), mask=mask)

    @triton.jit
    def _logits(S, offs, inb, keep, scale2):
        """The tile's ``scale * S`` in base-2 units (fp32) and where it counts (unmasked, not -inf)."""
        s = tl.load(S + offs, mask=inb, other=float("-inf")).to(tl.float32) * scale2
        return s, keep & (s > float("-inf"))

    @triton.jit
    def _lse2(LSE, idx, mask):
        """LSEs (natural log in memory) in base-2 units."""
        return tl.load(LSE + idx, mask=mask, other=0.0) * _LOG2E

    @triton.jit
    def _row_lse2(s):
        """Each row's ``log2 sum exp2(s)`` of a tile of base-2 logits (masked entries -inf; -inf if none)."""
        m = tl.max(s, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        return m + tl.log2(tl.sum(tl.exp2(s - m_safe[:, None]), 1))

    @triton.jit
    def _graph_block(S, r, c, rows, cols, CP, scale2):
        """Rows ``r`` and columns ``c`` of a graph's tile: the offsets, ``inb`` (padding columns included) and the
        logits in base-2 units with ``keep``."""
        inb = (r < rows)[:, None] & (c < CP)[None, :]
        offs = r.to(tl.int64)[:, None] * CP + c[None, :]
        s, keep = _logits(S, offs, inb, (r < rows)[:, None] & (c < cols)[None, :], scale2)
        return offs, inb, s, keep

    @triton.jit
    def _program_block(BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """The rows and columns of the block that program (column block, row block) takes."""
        return (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R),
                tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C))

    @triton.jit
    def _tile_lse_kernel(S, PART_R, PART_C, rows, cols, CP, n_cb, group_rows, n_groups, scale2,
                         MIRROR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """A graph's tile ``S_IJ``, one read: ``PART_R[i, k] = log sum_{j in column block k} exp(scale S_ij)`` and,
        with MIRROR, ``PART_C[j, g] = log sum_{i in row group g} exp(scale S_ij)`` (rows J's partials over
        columns I: S is symmetric), the column sums carried online over the group's row blocks; -inf where
        nothing counts."""
        pid_c, pid_g = tl.program_id(0), tl.program_id(1)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m_c = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
        l_c = tl.zeros([BLOCK_C], dtype=tl.float32)
        for r0 in range(pid_g * group_rows, tl.minimum(rows, (pid_g + 1) * group_rows), BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            offs, inb, s, keep = _graph_block(S, r, c, rows, cols, CP, scale2)
            s = tl.where(keep, s, float("-inf"))
            part = _row_lse2(s) * _LN2
            tl.store(PART_R + r.to(tl.int64) * n_cb + pid_c, part, mask=r < rows)
            if MIRROR:
                m_new = tl.maximum(m_c, tl.max(s, 0))
                m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_c = l_c * tl.exp2(m_c - m_new_safe) + tl.sum(tl.exp2(s - m_new_safe[None, :]), 0)
                m_c = m_new
        if MIRROR:
            tl.store(PART_C + c.to(tl.int64) * n_groups + pid_g, (m_c + tl.log2(l_c)) * _LN2,
                     mask=c < cols)

    @triton.jit
    def _tile_probs_kernel(S, PT, LSE, rows, cols, CP, row0, col0, scale2,
                           MIRROR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """A graph's tile ``S_IJ`` (rows ``row0 + i``, columns ``col0 + j``), in place: ``S <- P_IJ`` and, with
        MIRROR, ``PT <- (P_JI)^T`` (``P_ji`` at [i, j]) from the same element."""
        r, c = _program_block(BLOCK_R, BLOCK_C)
        offs, inb, s, keep = _graph_block(S, r, c, rows, cols, CP, scale2)
        p_rc = tl.where(keep, tl.exp2(s - _lse2(LSE, row0 + r, r < rows)[:, None]), 0.0)
        tl.store(S + offs, p_rc.to(S.dtype.element_ty), mask=inb)
        if MIRROR:
            p_cr = tl.where(keep, tl.exp2(s - _lse2(LSE, col0 + c, c < cols)[None, :]), 0.0)
            tl.store(PT + offs, p_cr.to(PT.dtype.element_ty), mask=inb)

    @triton.jit
    def _tile_grads_kernel(S, DPA, DPB, LSE, DELTA, rows, cols, CP, row0, col0, scale2, scale,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """A graph's tile (I, J): rows ``row0 + r``, columns ``col0 + c``, ``DPA = dP_IJ`` and ``DPB = (dP_JI)^T``
        (both indexed [i, j]).  In place: ``S <- P_ji`` (A of rows I), ``DPA <- T_ij`` (T of both, T is symmetric),
        ``DPB <- P_ij`` (A of rows J, transposed)."""
        r, c = _program_block(BLOCK_R, BLOCK_C)
        offs, inb, s, keep = _graph_block(S, r, c, rows, cols, CP, scale2)
        p_rc, p_cr = _pair_probs(LSE, row0 + r, col0 + c, r < rows, c < cols, s, keep)
        d_r = tl.load(DELTA + row0 + r, mask=r < rows, other=0.0)[:, None]
        d_c = tl.load(DELTA + col0 + c, mask=c < cols, other=0.0)[None, :]
        dpa = tl.load(DPA + offs, mask=inb, other=0.0).to(tl.float32)
        dpb = tl.load(DPB + offs, mask=inb, other=0.0).to(tl.float32)
        t = tl.where(keep, p_rc * (dpa - d_r) + p_cr * (dpb - d_c), 0.0) * scale
        tl.store(S + offs, p_cr.to(S.dtype.element_ty), mask=inb)
        tl.store(DPA + offs, t.to(DPA.dtype.element_ty), mask=inb)
        tl.store(DPB + offs, p_rc.to(DPB.dtype.element_ty), mask=inb)

    @triton.jit
    def _mask_tile_kernel(S, KEYS, n_keys, n, row0, col0, cols, CP, BLOCK: tl.constexpr):
        """``S_ij = -inf`` for the excluded pairs ``KEYS = i * n + j`` (the keys of rows I) whose j lies in the
        tile's columns ``col0 .. col0 + cols``."""
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        key = tl.load(KEYS + k, mask=k < n_keys, other=0)
        i = key // n - row0
        j = key % n - col0
        minus_inf = tl.full([BLOCK], float("-inf"), tl.float32).to(S.dtype.element_ty)
        tl.store(S + i * CP + j, minus_inf, mask=(k < n_keys) & (j >= 0) & (j < cols))

    @triton.jit
    def _pair_logits(S, VALID, b, pid_r, pid_c, C, CP, scale2, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
        """Tile (I, J) = (pid_r, pid_c), I <= J, of a chunk of whole sequences [b, C, CP] and its mirror (J, I):
        the tile's and the mirror's offsets (the mirror's indexed [j, i]), the store masks (``inb`` with the
        padding columns; the mirror's off on the diagonal), the statistics' indices and row masks of I and J,
        and the tile's base-2 logits with ``keep`` -- the only read of S: S is symmetric, so the mirror's
        ``S_ji`` is this tile's ``S_ij`` and the region below the tiles I <= J is never read."""
        i = pid_r * BLOCK + tl.arange(0, BLOCK)
        j = pid_c * BLOCK + tl.arange(0, BLOCK)
        seq = b.to(tl.int64) * C
        offs = (seq + pid_r * BLOCK) * CP + (tl.arange(0, BLOCK)[:, None] * CP + j[None, :])
        offs_t = (seq + pid_c * BLOCK) * CP + (tl.arange(0, BLOCK)[:, None] * CP + i[None, :])
        inb = (i < C)[:, None] & (j < CP)[None, :]
        inb_t = (j < C)[:, None] & (i < CP)[None, :] & (pid_r != pid_c)
        keep = (i < C)[:, None] & (j < C)[None, :]
        if HAS_VALID:
            keep = keep & (tl.load(VALID + seq + i, mask=i < C, other=0) != 0)[:, None]
            keep = keep & (tl.load(VALID + seq + j, mask=j < C, other=0) != 0)[None, :]
        s, keep = _logits(S, offs, inb, keep, scale2)
        return offs, offs_t, inb, inb_t, seq + i, seq + j, i < C, j < C, s, keep

    @triton.jit
    def _pair_probs(LSE, stat_r, stat_c, rmask, cmask, s, keep):
        """``P_ij`` and ``P_ji`` of a tile pair, both as [i, j] tiles, from the tile's logits."""
        p_rc = tl.where(keep, tl.exp2(s - _lse2(LSE, stat_r, rmask)[:, None]), 0.0)
        p_cr = tl.where(keep, tl.exp2(s - _lse2(LSE, stat_c, cmask)[None, :]), 0.0)
        return p_rc, p_cr

    @triton.jit
    def _pair_lse_kernel(S, PART, VALID, C, CP, n_t, scale2, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
        """Row LSE partials of whole sequences from each tile I <= J, one read: ``PART[b, i, J] = log sum_{j in J}
        exp(scale S_ij)`` and, from the same tile, ``PART[b, j, I]`` (S is symmetric); -inf where nothing counts."""
        pid_c, pid_r, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if pid_r > pid_c:
            return
        _, _, _, _, stat_r, stat_c, rmask, cmask, s, keep = _pair_logits(S, VALID, b, pid_r, pid_c, C, CP, scale2,
                                                                         HAS_VALID, BLOCK)
        s = tl.where(keep, s, float("-inf"))
        tl.store(PART + stat_r * n_t + pid_c, _row_lse2(s) * _LN2, mask=rmask)
        tl.store(PART + stat_c * n_t + pid_r, _row_lse2(tl.trans(s)) * _LN2,
                 mask=cmask & (pid_r != pid_c))

    @triton.jit
    def _pair_softmax_kernel(S, LSE, VALID, C, CP, scale2, DUAL: tl.constexpr, HAS_VALID: tl.constexpr,
                             BLOCK: tl.constexpr):
        """In place, from each tile I <= J of S alone: ``S_IJ <- P_IJ`` and the mirror ``S_JI <- P_JI``, written
        transposed (dual: ``P + P^T``, symmetric, on both).  No program reads what another writes."""
        pid_c, pid_r, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if pid_r > pid_c:
            return
        offs, offs_t, inb, inb_t, stat_r, stat_c, rmask, cmask, s, keep = _pair_logits(
            S, VALID, b, pid_r, pid_c, C, CP, scale2, HAS_VALID, BLOCK)
        p_rc, p_cr = _pair_probs(LSE, stat_r, stat_c, rmask, cmask, s, keep)
        if DUAL:
            p_rc = p_rc + p_cr
            p_cr = p_rc
        tl.store(S + offs, p_rc.to(S.dtype.element_ty), mask=inb)
        tl.store(S + offs_t, tl.trans(p_cr).to(S.dtype.element_ty), mask=inb_t)

    @triton.jit
    def _pair(S, DPR, LSE, VALID, b, pid_r, pid_c, C, CP, scale2, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
        """:func:`_pair_logits` of tile (I, J) and its mirror, then ``P_ij``, ``P_ji`` and ``dPr_ij``, ``dPr_ji``,
        all as [i, j] tiles (the mirror's ``dPr`` read transposed)."""
        offs, offs_t, inb, inb_t, stat_r, stat_c, rmask, cmask, s, keep = _pair_logits(
            S, VALID, b, pid_r, pid_c, C, CP, scale2, HAS_VALID, BLOCK)
        p_rc, p_cr = _pair_probs(LSE, stat_r, stat_c, rmask, cmask, s, keep)
        dpr = tl.load(DPR + offs, mask=inb, other=0.0).to(tl.float32)
        dpt = tl.trans(tl.load(DPR + offs_t, mask=cmask[:, None] & rmask[None, :], other=0.0).to(tl.float32))
        return offs, offs_t, inb, inb_t, stat_r, stat_c, p_rc, p_cr, dpr, dpt, keep

    @triton.jit
    def _pair_delta_kernel(S, DPR, LSE, VALID, PART, C, CP, n_t, scale2, HAS_VALID: tl.constexpr,
                           BLOCK: tl.constexpr):
        """Dual's delta by column tile, for a tile pair of whole sequences: ``PART[b, i, J] = sum_{j in J} P_ij
        dP_ij`` and the mirror's ``PART[b, j, I] = sum_{i in I} P_ji dP_ji``, ``dP_ij = dPr_ij + dPr_ji = dP_ji``."""
        pid_c, pid_r, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if pid_r > pid_c:
            return
        _, _, _, _, stat_r, stat_c, p_rc, p_cr, dpr, dpt, keep = _pair(S, DPR, LSE, VALID, b, pid_r, pid_c, C, CP,
                                                                       scale2, HAS_VALID, BLOCK)
        dp = tl.where(keep, dpr + dpt, 0.0)
        i = pid_r * BLOCK + tl.arange(0, BLOCK)
        j = pid_c * BLOCK + tl.arange(0, BLOCK)
        tl.store(PART + stat_r * n_t + pid_c, tl.sum(p_rc * dp, 1), mask=i < C)
        tl.store(PART + stat_c * n_t + pid_r, tl.sum(p_cr * dp, 0), mask=(j < C) & (pid_r != pid_c))

    @triton.jit
    def _pair_grads_kernel(S, DPR, LSE, DELTA, VALID, C, CP, scale2, scale,
                           DUAL: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
        """In place, for a tile pair of whole sequences: ``S <- A`` and ``DPR <- T`` on both tiles, with the mirror's
        ``dPr`` read transposed (no ``dPc`` product).  T is symmetric; A's mirror is ``P_ij`` (dual: A is symmetric)."""
        pid_c, pid_r, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if pid_r > pid_c:
            return
        offs, offs_t, inb, inb_t, stat_r, stat_c, p_rc, p_cr, dpr, dpt, keep = _pair(
            S, DPR, LSE, VALID, b, pid_r, pid_c, C, CP, scale2, HAS_VALID, BLOCK)
        i = pid_r * BLOCK + tl.arange(0, BLOCK)
        j = pid_c * BLOCK + tl.arange(0, BLOCK)
        d_r = tl.load(DELTA + stat_r, mask=i < C, other=0.0)[:, None]
        d_c = tl.load(DELTA + stat_c, mask=j < C, other=0.0)[None, :]
        if DUAL:
            dp = dpr + dpt
            a = p_rc + p_cr
            a_t = a
            t = p_rc * (dp - d_r) + p_cr * (dp - d_c)
        else:
            a = p_cr
            a_t = p_rc
            t = p_rc * (dpr - d_r) + p_cr * (dpt - d_c)
        t = tl.where(keep, t, 0.0) * scale  # padding columns hold garbage: no NaN written there
        tl.store(S + offs, a.to(S.dtype.element_ty), mask=inb)
        tl.store(DPR + offs, t.to(DPR.dtype.element_ty), mask=inb)
        tl.store(S + offs_t, tl.trans(a_t).to(S.dtype.element_ty), mask=inb_t)
        tl.store(DPR + offs_t, tl.trans(t).to(DPR.dtype.element_ty), mask=inb_t)


# (BLOCK_R, BLOCK_C, num_warps) per chunk kernel: memory-bound tiles of 16-byte loads with few live values per
# thread ("pair": square tiles and their mirrors, ~70 registers: 7 programs an SM); tests/test_compile.py
# compiles them for sm_80/sm_90a.
TILES = {"grads": (32, 128, 4), "pair": (32, 32, 4),
         "tile_lse": (32, 128, 4), "tile_probs": (32, 128, 4)}  # a graph's tiles: 32 x 128, as "grads"
MASK_TILE = (1024, 4)  # (keys, num_warps) per program of the graph's -inf scatter
LSE_GROUPS = 16  # a graph tile's LSE kernel: row groups (its programs: column blocks x groups; the mirror's partials)
INTERP_TILE = (16, 16)  # under the interpreter: small, so test shapes span several tiles
# Row kernels: all of D in one tile (up to MAX_ROW_D; wider rows run the torch row stages, whose registers
# would spill), ROW_ELEMS elements per program of 8 warps (8 a thread: 16-byte bf16 vectors); the backward's
# PROGRAMS programs each sum the parameter gradients of their rows (deterministic, no atomics).
ROW_ELEMS, MAX_ROW_D, PROGRAMS = 2048, 4096, 1024


def _tile_of(kind):
    return (*INTERP_TILE, 1) if interpreting() else TILES[kind]


def _row_tile(d):
    """``(BLOCK_M, BLOCK_D, num_warps)`` of the row kernels for rows of ``d`` values."""
    bd = max(16, next_pow2(d))
    if interpreting():
        return 4, bd, 1
    return max(1, ROW_ELEMS // bd), bd, 8


# ---------------------------------------------------------------------------------------------
# Launches, and what they are recorded as.


class LaunchLog:
    """What the op launched inside :func:`record_launches`: ``matmuls`` (FLOPs of each cuBLAS call),
    ``kernels`` (names of the Triton launches) and ``kernel_bytes`` (the bytes each launch declares it
    reads and writes: every tensor it touches, once per direction)."""

    def __init__(self):
        self.matmuls: list[int] = []
        self.kernels: list[str] = []
        self.kernel_bytes: list[int] = []

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


def _bmm(a, b, out, add=False):
    """``out = a @ b`` (``add``: ``out += a @ b``, cuBLAS reading ``out`` as its C), batched, logged.  An fp32
    ``out`` with half-precision ``a``, ``b`` (add only) is cuBLAS's fp32 C and output (``out_dtype``); the CPU,
    which has no such kernel, multiplies fp32 copies."""
    for log in _LOGS:
        log.matmuls.append(2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])
    if out.dtype != a.dtype:
        assert add, "a product of mixed dtypes only accumulates"
        if out.device.type == "cpu":
            return out.baddbmm_(a.to(out.dtype), b.to(out.dtype))
        return torch.baddbmm(out, a, b, out_dtype=out.dtype, out=out)
    return out.baddbmm_(a, b) if add else torch.bmm(a, b, out=out)


def _span(t):
    """Bytes a kernel touches in ``t``: its rows as laid out (a chunk buffer's padding columns included)."""
    return t.shape[0] * t.stride(0) * t.element_size() if t.dim() else t.element_size()


def _pair_tiles(s):
    """Pair tiles across a chunk buffer's (padded) row: its tile pairs' grid side."""
    return cdiv(s.stride(1), _tile_of("pair")[0])


def _upper_span(s):
    """Bytes of the tiles I <= J of a chunk buffer (the pair kernels' reads of S), diagonal tiles included."""
    n_t = _pair_tiles(s)
    return _span(s) * (n_t + 1) // (2 * n_t)


def _launch(kernel, name, grid, args, meta, num_warps, moved):
    """Launch ``kernel`` and log ``name`` with the bytes of ``moved`` (the tensors it reads, then writes; an int:
    bytes of scattered accesses)."""
    for log in _LOGS:
        log.kernels.append(name)
        log.kernel_bytes.append(sum(t if isinstance(t, int) else _span(t) for t in moved if t is not None))
    _run(kernel, grid, args, meta, num_warps)


def _run(kernel, grid, args, meta, num_warps):
    """The launch itself (tests replace it to count bytes on meta tensors at the goal shape)."""
    kernel[grid](*args, num_warps=num_warps, **meta)


def _chunk_launch(kernel, kind, s, args, meta, moved):
    b, rows, _ = s.shape
    br, bc, warps = _tile_of(kind)
    _launch(kernel, kind, (cdiv(s.stride(1), bc), cdiv(rows, br), b), args, dict(meta, BLOCK_R=br, BLOCK_C=bc),
            warps, moved)


def _pair_launch(kernel, kind, s, args, meta, moved):
    bt, _, warps = _tile_of("pair")
    n_t = _pair_tiles(s)
    _launch(kernel, kind, (n_t, n_t, s.shape[0]), args, dict(meta, BLOCK=bt), warps, moved)


def _valid_arg(valid, s):
    return (valid, True) if valid is not None else (s, False)


# ---------------------------------------------------------------------------------------------
# The stages, twice: Triton kernels and torch ops (any device, any float dtype; fp32 or wider arithmetic).


def _wide(t):
    return torch.promote_types(t.dtype, torch.float32)


def _empty(like):
    return like.new_empty(0, dtype=_wide(like))


class _TritonRows:
    """The row steps as Triton kernels over h [B, L, D] (contiguous) and its companions."""

    @staticmethod
    def unit_rows(h):
        m, d = h.numel() // h.shape[-1], h.shape[-1]
        q = new_output(h.shape, device=h.device, dtype=h.dtype)
        r = new_output(h.shape[:-1], device=h.device, dtype=torch.float32)
        bm, bd, warps = _row_tile(d)
        _launch(_unit_rows_kernel, "unit_rows", (cdiv(m, bm),), (h, q, r, m, d, 1e-12), dict(BLOCK_M=bm, BLOCK_D=bd),
                warps, (h, q, r))
        return q, r

    @staticmethod
    def combine(h, y, valid, s, s_vec, identity, ln):
        m, d = h.numel() // h.shape[-1], h.shape[-1]
        out = new_output(h.shape, device=h.device, dtype=h.dtype)
        w, b, eps = ln if ln is not None else (None, None, 0.0)
        mean, rstd = ((new_output(h.shape[:-1], device=h.device, dtype=torch.float32) for _ in range(2))
                      if ln is not None else (_empty(h), _empty(h)))
        bm, bd, warps = _row_tile(d)
        args = (h, y, out, *(h if t is None else t for t in (valid, s_vec, w, b)), mean, rstd, m, d, s, eps)
        meta = dict(HAS_VALID=valid is not None, SCALE_VEC=s_vec is not None, IDENTITY=identity, LN=ln is not None,
                    HAS_W=w is not None, HAS_B=b is not None, BLOCK_M=bm, BLOCK_D=bd)
        _launch(_combine_kernel, "combine", (cdiv(m, bm),), args, meta, warps,
                (h, y, valid, s_vec, w, b, out, *((mean, rstd) if ln is not None else ())))
        return out, mean, rstd

    @staticmethod
    def combine_bwd(go, h, y, valid, s, s_vec, identity, w, ln, mean, rstd, want_delta, want_ds, want_dln, acc):
        m, d = h.numel() // h.shape[-1], h.shape[-1]
        g = new_output(h.shape, device=h.device, dtype=h.dtype)
        dacc = new_output(h.shape, device=h.device, dtype=acc)
        delta = new_output(h.shape[:-1], device=h.device, dtype=torch.float32) if want_delta else None
        bm, bd, warps = _row_tile(d)
        n_blocks = cdiv(m, bm)
        programs = min(n_blocks, 3 if interpreting() else PROGRAMS)
        blocks = cdiv(n_blocks, programs)
        part = new_output((programs, 3, d), device=h.device, dtype=torch.float32) if want_ds or want_dln else None
        load_h = ln or (want_ds and identity)
        w = w if ln else None
        args = (go, h, y, *(h if t is None else t for t in (valid, s_vec, w)), mean if ln else h, rstd if ln else h,
                g, dacc, h if delta is None else delta, h if part is None else part, m, d, s, blocks)
        meta = dict(HAS_VALID=valid is not None, SCALE_VEC=s_vec is not None, IDENTITY=identity, LN=ln,
                    HAS_W=w is not None, LOAD_H=load_h, WANT_DELTA=want_delta, WANT_DS=want_ds, WANT_DLN=want_dln,
                    BLOCK_M=bm, BLOCK_D=bd)
        _launch(_combine_bwd_kernel, "combine_bwd", (programs,), args, meta, warps,
                (go, h if load_h else None, y, valid, s_vec, w, *((mean, rstd) if ln else ()), g, dacc, delta, part))
        sums = [part[:, k].sum(0) if part is not None and want else _empty(h)
                for k, want in enumerate((want_ds, want_dln, want_dln))]
        return g, dacc, delta, *sums

    @staticmethod
    def finish(dacc, dq, h, r, out):
        m, d = h.numel() // h.shape[-1], h.shape[-1]
        bm, bd, warps = _row_tile(d)
        _launch(_finish_kernel, "finish", (cdiv(m, bm),), (dacc, dq, h, r, out, m, d), dict(BLOCK_M=bm, BLOCK_D=bd),
                warps, (dacc, dq, h, r, out))
        return out


class _TorchRows:
    """The same row steps in torch ops."""

    @staticmethod
    def unit_rows(h):
        x = h.to(_wide(h))
        amax = x.abs().amax(-1, keepdim=True)
        amax = torch.where(amax > 0, amax, 1.0)
        r = 1.0 / (torch.linalg.vector_norm(x / amax, dim=-1, keepdim=True) * amax).clamp_min(1e-12)
        return (x * r).to(h.dtype), r[..., 0]

    @staticmethod
    def _update(x, y, s, identity, valid):
        u = (1 + s) * x - s * y if identity else x - s * y
        return u if valid is None else torch.where(valid[..., None] != 0, u, x)

    @classmethod
    def combine(cls, h, y, valid, s, s_vec, identity, ln):
        wide = _wide(h)
        u = cls._update(h.to(wide), y.to(wide), s if s_vec is None else s_vec.to(wide), identity, valid)
        if ln is None:
            return u.to(h.dtype), _empty(h), _empty(h)
        w, b, eps = ln
        mean = u.mean(-1)
        diff = u - mean[..., None]
        rstd = torch.rsqrt((diff * diff).mean(-1) + eps)
        out = diff * rstd[..., None]
        out = out if w is None else out * w.to(wide)
        out = out if b is None else out + b.to(wide)
        return out.to(h.dtype), mean, rstd

    @classmethod
    def combine_bwd(cls, go, h, y, valid, s, s_vec, identity, w, ln, mean, rstd, want_delta, want_ds, want_dln,
                    acc):
        wide = _wide(h)
        go, x, yw = go.to(wide), h.to(wide), y.to(wide)
        sv = s if s_vec is None else s_vec.to(wide)
        rows = tuple(range(h.dim() - 1))
        sums = [_empty(h) for _ in range(3)]  # distinct tensors: a custom op's outputs may not alias
        if ln:
            xhat = (cls._update(x, yw, sv, identity, valid) - mean[..., None]) * rstd[..., None]
            wg = go if w is None else go * w.to(wide)
            du = rstd[..., None] * (wg - wg.mean(-1, keepdim=True) - xhat * (wg * xhat).mean(-1, keepdim=True))
            if want_dln:
                sums[1:] = (go * xhat).sum(rows), go.sum(rows)
        else:
            du = go
        keep = torch.ones_like(du, dtype=torch.bool) if valid is None else (valid[..., None] != 0).expand_as(du)
        g = torch.where(keep, -sv * du, 0.0).to(h.dtype)
        dacc = torch.where(keep, (1 + sv) * du, du) if identity else du.clone() if du is go else du
        if want_ds:
            sums[0] = torch.where(keep, du * (x - yw) if identity else -du * yw, 0.0).sum(rows)
        delta = (g.to(wide) * yw).sum(-1) if want_delta else None
        return g, dacc.to(acc), delta, *sums

    @staticmethod
    def finish(dacc, dq, h, r, out):
        wide = _wide(h)
        q, dq = h.to(wide) * r[..., None], dq.to(wide)
        return out.copy_(dacc.to(wide) + r[..., None] * (dq - q * (q * dq).sum(-1, keepdim=True)))


class _TritonStages:
    """The chunk stages as Triton kernels (in place on the chunk buffers)."""

    UPPER_S = True  # the pair kernels read S at tiles I <= J only (P_ji from S_ij)

    @staticmethod
    def softmax(s, lse, valid, scale, dual):
        """``lse <- LSE`` and ``s <- P`` (dual: ``P + P^T``) from S's tiles I <= J, the rest of ``s`` written, not
        read: each row's partial LSEs per tile pair combined by ``logsumexp``, then the probabilities."""
        b, cols = s.shape[0], s.shape[2]
        n_t = _pair_tiles(s)
        part = new_output((b, cols, n_t), device=s.device, dtype=torch.float32)
        v, has_valid = _valid_arg(valid, s)
        _pair_launch(_pair_lse_kernel, "pair_lse", s, (s, part, v, cols, s.stride(1), n_t, scale * LOG2E),
                     dict(HAS_VALID=has_valid), (_upper_span(s), valid, part))
        torch.logsumexp(part, -1, out=lse)
        _pair_launch(_pair_softmax_kernel, "pair_softmax", s, (s, lse, v, cols, s.stride(1), scale * LOG2E),
                     dict(DUAL=dual, HAS_VALID=has_valid), (_upper_span(s), lse, valid, s))

    @staticmethod
    def dual_delta(s, dpr, lse, valid, scale):
        b, cols = s.shape[0], s.shape[2]
        n_t = _pair_tiles(s)
        part = new_output((b, cols, n_t), device=s.device, dtype=torch.float32)
        v, has_valid = _valid_arg(valid, s)
        _pair_launch(_pair_delta_kernel, "dual_delta", s, (s, dpr, lse, v, part, cols, s.stride(1), n_t,
                                                           scale * LOG2E), dict(HAS_VALID=has_valid),
                     (_upper_span(s), dpr, lse, valid, part))
        return part.sum(-1)

    @staticmethod
    def grads(s, dpr, lse, delta, valid, scale, dual):
        cols = s.shape[2]
        v, has_valid = _valid_arg(valid, s)
        _pair_launch(_pair_grads_kernel, "grads", s, (s, dpr, lse, delta, v, cols, s.stride(1), scale * LOG2E, scale),
                     dict(DUAL=dual, HAS_VALID=has_valid), (_upper_span(s), dpr, lse, delta, valid, s, dpr))

    @staticmethod
    def mask_tile(s, keys, n, row0, col0):
        block, warps = (64, 1) if interpreting() else MASK_TILE
        _launch(_mask_tile_kernel, "mask", (max(1, cdiv(keys.numel(), block)),),
                (s, keys, keys.numel(), n, row0, col0, s.shape[2], s.stride(1)), dict(BLOCK=block), warps,
                (keys, keys.numel() * s.element_size()))  # each key writes at most one element

    @staticmethod
    def tile_lse(s, mirror, scale):
        _, rows, cols = s.shape
        br, bc, warps = _tile_of("tile_lse")
        groups = 2 if interpreting() else LSE_GROUPS
        group_rows = cdiv(cdiv(rows, groups), br) * br
        n_cb, n_groups = cdiv(s.stride(1), bc), cdiv(rows, group_rows)
        part_r = new_output((rows, n_cb), device=s.device, dtype=torch.float32)
        part_c = new_output((cols, n_groups), device=s.device, dtype=torch.float32) if mirror else None
        _launch(_tile_lse_kernel, "tile_lse", (n_cb, n_groups),
                (s, part_r, part_c if mirror else part_r, rows, cols, s.stride(1), n_cb, group_rows, n_groups,
                 scale * LOG2E), dict(MIRROR=mirror, BLOCK_R=br, BLOCK_C=bc), warps, (s, part_r, part_c))
        return torch.logsumexp(part_r, -1), torch.logsumexp(part_c, -1) if mirror else None

    @staticmethod
    def tile_probs(s, pt, lse, row0, col0, scale):
        _, rows, cols = s.shape
        mirror = pt is not None
        _chunk_launch(_tile_probs_kernel, "tile_probs", s, (s, pt if mirror else s, lse, rows, cols, s.stride(1), row0,
                                                           col0, scale * LOG2E), dict(MIRROR=mirror),
                      (s, lse[row0:row0 + rows], lse[col0:col0 + cols] if mirror else None, s, pt))

    @staticmethod
    def tile_grads(s, dpa, dpb, lse, delta, row0, col0, scale):
        _, rows, cols = s.shape
        stats = (lse[row0:row0 + rows], lse[col0:col0 + cols], delta[row0:row0 + rows], delta[col0:col0 + cols])
        _chunk_launch(_tile_grads_kernel, "grads", s, (s, dpa, dpb, lse, delta, rows, cols, s.stride(1), row0,
                                                           col0, scale * LOG2E, scale), {},
                      (s, dpa, dpb, *stats, s, dpa, dpb))


class _TorchStages:
    """The chunk stages in torch ops."""

    UPPER_S = False  # they read all of S

    @staticmethod
    def _logits(s, valid, scale):
        x = s.to(_wide(s)) * scale
        if valid is not None:
            v = valid != 0
            x = x.masked_fill(~(v[:, :, None] & v[:, None, :]), float("-inf"))
        return x

    @staticmethod
    def _p(x, lse):
        """``exp(x - lse)``: 0 where x is masked (-inf), also in rows with nothing left (lse = -inf)."""
        return torch.exp(x - lse.clamp_min(-1e30))

    @classmethod
    def lse(cls, s, valid, scale):
        return torch.logsumexp(cls._logits(s, valid, scale), -1)

    @classmethod
    def probs(cls, s, lse, valid, scale, dual):
        x = cls._logits(s, valid, scale)
        p = cls._p(x, lse[:, :, None])
        if dual:
            p = p + cls._p(x, lse[:, None, :])
        s.copy_(p)

    @classmethod
    def softmax(cls, s, lse, valid, scale, dual):
        lse.copy_(cls.lse(s, valid, scale))
        cls.probs(s, lse, valid, scale, dual)

    @classmethod
    def dual_delta(cls, s, dpr, lse, valid, scale):
        x = cls._logits(s, valid, scale)
        return (cls._p(x, lse[:, :, None]) * (dpr + dpr.transpose(1, 2))).sum(-1)

    @classmethod
    def grads(cls, s, dpr, lse, delta, valid, scale, dual):
        x = cls._logits(s, valid, scale)
        p_rc, p_cr = cls._p(x, lse[:, :, None]), cls._p(x, lse[:, None, :])
        d_r, d_c = delta[:, :, None], delta[:, None, :]
        dpc = dpr.transpose(1, 2)
        if dual:
            dp = dpr + dpc
            a, t = p_rc + p_cr, p_rc * (dp - d_r) + p_cr * (dp - d_c)
        else:
            a, t = p_cr, p_rc * (dpr - d_r) + p_cr * (dpc - d_c)
        s.copy_(a)
        dpr.copy_(t * scale)

    @staticmethod
    def mask_tile(s, keys, n, row0, col0):
        i, j = keys // n - row0, keys % n - col0
        flat = torch.where((j >= 0) & (j < s.shape[2]), i * s.stride(1) + j, s.shape[1] * s.stride(1))  # else: scratch
        torch.as_strided(s, (s.shape[1] * s.stride(1) + 1,), (1,)).index_fill_(0, flat, float("-inf"))

    @classmethod
    def tile_lse(cls, s, mirror, scale):
        x = cls._logits(s, None, scale)
        return torch.logsumexp(x[0], -1), torch.logsumexp(x[0], 0) if mirror else None

    @classmethod
    def tile_probs(cls, s, pt, lse, row0, col0, scale):
        x = cls._logits(s, None, scale)
        if pt is not None:
            pt.copy_(cls._p(x, lse[None, col0:col0 + s.shape[2]]))
        s.copy_(cls._p(x, lse[row0:row0 + s.shape[1], None]))

    @classmethod
    def tile_grads(cls, s, dpa, dpb, lse, delta, row0, col0, scale):
        rows, cols = slice(row0, row0 + s.shape[1]), slice(col0, col0 + s.shape[2])
        x = cls._logits(s, None, scale)
        p_rc, p_cr = cls._p(x, lse[rows, None]), cls._p(x, lse[None, cols])
        t = p_rc * (dpa - delta[rows, None]) + p_cr * (dpb - delta[None, cols])
        s.copy_(p_cr)
        dpa.copy_(t * scale)
        dpb.copy_(p_rc)


# ---------------------------------------------------------------------------------------------
# The driver (one for both backends): row stages around the chunked attention.


def _graph_tile(num_nodes, d, esize):
    """Rows of a graph's tiles: the largest power of two (at least 16) whose N_BUFFERS square tiles and the
    two fp32 [N, D] accumulators (the backward's dV and dQ; the forward holds Y and two tiles) fit in
    CHUNK_BYTES, the tiles at least a quarter of it (a large graph's accumulators, O(N D) like its input, do not
    shrink them further); at most N."""
    room = max(CHUNK_BYTES - 2 * 4 * num_nodes * d, CHUNK_BYTES // 4) // (N_BUFFERS * esize)
    tile = 16
    while (2 * tile) ** 2 <= room:
        tile *= 2
    return min(tile, num_nodes)


def _chunks(bsz, length, esize):
    """``(b0, b1)``: as many whole sequences per chunk as CHUNK_BYTES holds (at least one)."""
    step = max(1, CHUNK_BYTES // (N_BUFFERS * length * length * esize))
    return [(b0, min(b0 + step, bsz)) for b0 in range(0, bsz, step)]


def _buffer(b, rows, cols, like, spare=0):
    """A [b, rows, cols] chunk buffer whose rows start 16 elements apart (a view of a padded
    allocation): every kernel load and store is then a 16-byte vector, whatever L is.  ``spare``
    elements more follow it (a scratch target for scattered writes).  NaN-poisoned under the tests
    (``new_output``), so a kernel that reads what no stage wrote fails them."""
    cp = cols + -cols % 16
    flat = new_output((b * rows * cp + spare,), device=like.device, dtype=like.dtype)
    return flat.as_strided((b, rows, cols), (rows * cp, cp, 1))


def _similarity(q, b0, b1, upper=False):
    """``S = Q_c Q_c^T`` for the sequences ``b0 .. b1``; ``upper``: only what tiles I <= J of the pair kernels
    read, by panels of :data:`PANEL_ROWS` rows (a multiple of the pair tile) against the columns from their
    first row on; the rest of the buffer is left unwritten."""
    length = q.shape[1]
    s = _buffer(b1 - b0, length, length, q)
    tile = _tile_of("pair")[0]
    step = cdiv(PANEL_ROWS, tile) * tile if upper else length
    for r0 in range(0, length, step):
        _bmm(q[b0:b1, r0:r0 + step], q[b0:b1, r0:].transpose(1, 2), out=s[:, r0:r0 + step, r0:])
    return s


def _stages(use_triton):
    return _TritonStages if use_triton else _TorchStages


def _rows(use_triton, d):
    return _TritonRows if use_triton and d <= MAX_ROW_D else _TorchRows


def _attend(q, v, valid, scale, dual, st):
    """``(Y, LSE)`` of ``softmax(scale Q Q^T) V`` over chunks of whole sequences."""
    bsz, length, _ = q.shape
    y = new_output(v.shape, device=v.device, dtype=v.dtype)
    lse = new_output((bsz, length), device=q.device, dtype=_wide(q))
    for b0, b1 in _chunks(bsz, length, q.element_size()):
        s = _similarity(q, b0, b1, upper=st.UPPER_S)
        vb = valid[b0:b1] if valid is not None else None
        st.softmax(s, lse[b0:b1], vb, scale, dual)  # dual: whole sequences, so every LSE_j is known
        _bmm(s, v[b0:b1], out=y[b0:b1])
        del s  # freed before the next chunk's buffer is allocated: one buffer at a time
    return y, lse


def _tile_pairs(q, keys, rowptr, tile, st):
    """A graph's tile pairs (I, J), I <= J, of ``tile`` rows: ``(i0, j0, S)`` with ``S = Q_I Q_J^T`` and its
    excluded pairs (keys of rows I in columns J; edges are undirected, so they are J's in I too) at -inf.  The
    caller drops S before the next pair's is made."""
    n = q.shape[1]
    bounds = _key_bounds(rowptr, tile)
    starts = range(0, n, tile)
    for a, i0 in enumerate(starts):
        k = keys[bounds[a]:bounds[a + 1]]  # the keys of rows I (sorted by row)
        for j0 in starts[a:]:
            s = _bmm(q[:, i0:i0 + tile], q[:, j0:j0 + tile].transpose(1, 2),
                     out=_buffer(1, min(tile, n - i0), min(tile, n - j0), q, spare=1))
            st.mask_tile(s, k, n, i0, j0)
            yield i0, j0, s
            del s


def _attend_graph(q, v, keys, rowptr, tile, scale, st):
    """A graph's ``(Y, LSE)`` over tile pairs, S computed twice per pair: first each row's partial LSEs (rows
    I over columns J and, off the diagonal, rows J over columns I from the same tile), combined by
    ``logsumexp``; then ``P_IJ`` and ``P_JI`` from one tile, ``Y_I += P_IJ V_J`` and ``Y_J += P_JI V_I``.  No
    row of Y is complete before the last pair, so Y accumulates in fp32 (fp64 for fp64)."""
    n = q.shape[1]
    part = new_output((n, cdiv(n, tile)), device=q.device, dtype=_wide(q))  # row i's LSE over block b
    for i0, j0, s in _tile_pairs(q, keys, rowptr, tile, st):
        lse_r, lse_c = st.tile_lse(s, j0 != i0, scale)
        part[i0:i0 + tile, j0 // tile] = lse_r
        if j0 != i0:
            part[j0:j0 + tile, i0 // tile] = lse_c
        del s
    lse = torch.logsumexp(part, -1)[None]
    y = torch.zeros(v.shape, device=v.device, dtype=_wide(v))
    for i0, j0, s in _tile_pairs(q, keys, rowptr, tile, st):
        pt = _buffer(*s.shape, q) if j0 != i0 else None
        st.tile_probs(s, pt, lse[0], i0, j0, scale)
        _bmm(s, v[:, j0:j0 + tile], out=y[:, i0:i0 + tile], add=True)
        if pt is not None:
            _bmm(pt.transpose(1, 2), v[:, i0:i0 + tile], out=y[:, j0:j0 + tile], add=True)
        del s, pt
    return y.to(v.dtype), lse


def _attend_bwd(q, v, g, lse, delta, dacc, valid, scale, dual, st):
    """``dQ`` for the upstream gradient ``g`` of Y over chunks of whole sequences; ``dV`` is added to ``dacc``
    (see the module docstring)."""
    bsz, length, _ = q.shape
    dq = new_output(q.shape, device=q.device, dtype=q.dtype)
    for b0, b1 in _chunks(bsz, length, q.element_size()):
        s = _similarity(q, b0, b1, upper=st.UPPER_S)
        dpr = _bmm(g[b0:b1], v[b0:b1].transpose(1, 2), out=_buffer(b1 - b0, length, length, g))
        vb = valid[b0:b1] if valid is not None else None
        d = st.dual_delta(s, dpr, lse[b0:b1], vb, scale) if dual else delta[b0:b1]
        st.grads(s, dpr, lse[b0:b1], d, vb, scale, dual)
        _bmm(s, g[b0:b1], out=dacc[b0:b1], add=True)
        _bmm(dpr, q[b0:b1], out=dq[b0:b1])
        del s, dpr
    return dq


def _attend_bwd_graph(q, v, g, lse, delta, dacc, keys, rowptr, tile, scale, st):
    """A graph's ``dQ`` (fp32, as ``dacc``) over tile pairs (I, J), I <= J, of ``tile`` rows; ``dV`` is added to
    ``dacc``.  Per pair: ``S = Q_I Q_J^T`` (its excluded pairs -inf), ``dP_IJ = G_I V_J^T``,
    ``dP_JI^T = V_I G_J^T``, the tile kernel, then ``dV_I += A G_J``, ``dQ_I += T Q_J`` and, off the diagonal,
    the mirrors ``dV_J += (P_IJ)^T G_I``, ``dQ_J += T^T Q_I``: no output row is complete before the last pair,
    so dV and dQ accumulate in fp32."""
    dq = torch.zeros(q.shape, device=q.device, dtype=dacc.dtype)
    for i0, j0, s in _tile_pairs(q, keys, rowptr, tile, st):
        rows, cols = slice(i0, i0 + tile), slice(j0, j0 + tile)
        dpa = _bmm(g[:, rows], v[:, cols].transpose(1, 2), out=_buffer(*s.shape, g))
        dpb = _bmm(v[:, rows], g[:, cols].transpose(1, 2), out=_buffer(*s.shape, g))
        st.tile_grads(s, dpa, dpb, lse[0], delta[0], i0, j0, scale)
        _bmm(s, g[:, cols], out=dacc[:, rows], add=True)
        _bmm(dpa, q[:, cols], out=dq[:, rows], add=True)
        if j0 != i0:
            _bmm(dpb.transpose(1, 2), g[:, rows], out=dacc[:, cols], add=True)
            _bmm(dpa.transpose(1, 2), q[:, rows], out=dq[:, cols], add=True)
        del s, dpa, dpb
    return dq


@torch.library.custom_op("sslcore::contranorm_fwd", mutates_args=())
def _forward(h: torch.Tensor, s_vec: torch.Tensor | None, ln_w: torch.Tensor | None, ln_b: torch.Tensor | None,
             valid: torch.Tensor | None, keys: torch.Tensor | None, rowptr: torch.Tensor | None, graph_tile: int,
             s: float, scale: float, identity: bool, dual: bool, ln: bool, eps: float,
             use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor]:
    """``(out, Q, R, Y, LSE, mean, rstd)`` for h [B, L, D] (a graph: B = 1, with its keys, over tile pairs of
    ``graph_tile`` rows, node i's keys at ``rowptr[i]``); ``mean``, ``rstd`` (the LayerNorm's) are empty
    without ``ln``."""
    rows = _rows(use_triton, h.shape[-1])
    q, r = rows.unit_rows(h)
    st = _stages(use_triton)
    if graph_tile:
        y, lse = _attend_graph(q, h, keys, rowptr, graph_tile, scale, st)
    else:
        y, lse = _attend(q, h, valid, scale, dual, st)
    out, mean, rstd = rows.combine(h, y, valid, s, s_vec, identity, (ln_w, ln_b, eps) if ln else None)
    return out, q, r, y, lse, mean, rstd


@_forward.register_fake
def _(h, s_vec, ln_w, ln_b, valid, keys, rowptr, graph_tile, s, scale, identity, dual, ln, eps, use_triton):
    stats = [h.new_empty(h.shape[:-1], dtype=_wide(h)) for _ in range(4)]
    if not ln:
        stats[2:] = _empty(h), _empty(h)
    return torch.empty_like(h), torch.empty_like(h), stats[0], torch.empty_like(h), *stats[1:]


@torch.library.custom_op("sslcore::contranorm_bwd", mutates_args=())
def _backward(go: torch.Tensor, h: torch.Tensor, q: torch.Tensor, r: torch.Tensor, y: torch.Tensor,
              lse: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, s_vec: torch.Tensor | None,
              ln_w: torch.Tensor | None, valid: torch.Tensor | None, keys: torch.Tensor | None,
              rowptr: torch.Tensor | None, graph_tile: int, s: float, scale: float, identity: bool, dual: bool,
              ln: bool, use_triton: bool, want_ds: bool,
              want_dln: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dH, ds, dw, db)`` for the upstream gradient ``go`` of the output (ds, dw, db empty unless wanted)."""
    rows, st = _rows(use_triton, h.shape[-1]), _stages(use_triton)
    g, dacc, delta, ds, dw, db = rows.combine_bwd(go, h, y, valid, s, s_vec, identity, ln_w, ln, mean, rstd,
                                                  not dual, want_ds, want_dln, _wide(h) if graph_tile else h.dtype)
    if graph_tile:
        dq = _attend_bwd_graph(q, h, g, lse, delta, dacc, keys, rowptr, graph_tile, scale, st)
    else:
        dq = _attend_bwd(q, h, g, lse, delta, dacc, valid, scale, dual, st)
    return rows.finish(dacc, dq, h, r, g), ds, dw, db  # g is spent: it takes dH


@_backward.register_fake
def _(go, h, q, r, y, lse, mean, rstd, s_vec, ln_w, valid, keys, rowptr, graph_tile, s, scale, identity, dual, ln,
      use_triton, want_ds, want_dln):
    d = h.shape[-1]
    return (torch.empty_like(h), h.new_empty(d if want_ds else 0, dtype=_wide(h)),
            *(h.new_empty(d if want_dln else 0, dtype=_wide(h)) for _ in range(2)))


def _as(t, dtype):
    """``t`` in ``dtype``, without a no-op ``.to()``."""
    return t if t.dtype == dtype else t.to(dtype)


class _ContraNorm(torch.autograd.Function):
    """ContraNorm (and its LayerNorm) on h [B, L, D]: saves H, Q, Y and per-row statistics (O(B L D)); no
    L x L buffer outlives a call."""

    @staticmethod
    def forward(ctx, h, s_vec, ln_w, ln_b, valid, keys, rowptr, graph_tile, s, scale, identity, dual, ln, eps,
                use_triton):
        out, q, r, y, lse, mean, rstd = _forward(h, s_vec, ln_w, ln_b, valid, keys, rowptr, graph_tile, s, scale,
                                                 identity, dual, ln, eps, use_triton)
        ctx.save_for_backward(h, q, r, y, lse, mean, rstd, s_vec, ln_w, valid, keys, rowptr)
        ctx.cfg = (graph_tile, s, scale, identity, dual, ln, use_triton)
        ctx.b_dtype = None if ln_b is None else ln_b.dtype
        return out

    @staticmethod
    def backward(ctx, go):
        h, q, r, y, lse, mean, rstd, s_vec, ln_w, valid, keys, rowptr = ctx.saved_tensors
        need = ctx.needs_input_grad
        dh, ds, dw, db = _backward(go.contiguous(), h, q, r, y, lse, mean, rstd, s_vec, ln_w, valid, keys, rowptr,
                                   *ctx.cfg, need[1], need[2] or need[3])
        return (dh, _as(ds, s_vec.dtype) if need[1] else None, _as(dw, ln_w.dtype) if need[2] else None,
                _as(db, ctx.b_dtype) if need[3] else None, *([None] * 11))


# ---------------------------------------------------------------------------------------------
# Public functional API.


def contranorm(h: torch.Tensor, *, scale, temperature: float = 1.0, dual: bool = False, identity: bool = False,
               key_padding_mask: torch.Tensor | None = None, edge_index=None, layer_norm: tuple | None = None,
               backend: str = "auto", validate: bool | None = None) -> torch.Tensor:
    """ContraNorm's update ``H - s * softmax(H_hat H_hat^T / tau) H``, and with ``layer_norm=(weight, bias,
    eps)`` the LayerNorm after it (ContraNorm the layer), fused.

    Same arguments as :func:`contranorm_ref`.  ``edge_index`` may be a :class:`NeighbourGraph`
    (:func:`prepare_graph`); a raw [2, E] tensor is prepared once and cached while it is unchanged.
    The Triton backend runs the chunked design of this module; the torch backend runs
    ``F.scaled_dot_product_attention`` for plain sequences, the same chunked driver with torch ops for
    dual sequences and graphs, and the reference for dual graphs (Triton does not take those).  Statistics
    are fp32 (fp64 for fp64 input, which runs on torch); the result has the input dtype.  ``validate``:
    see :func:`~sslcore.kernels._backend.validating`.
    """
    _check(h, scale, temperature, key_padding_mask, edge_index, validate, layer_norm)
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
                              edge_index=edge_index, layer_norm=layer_norm).to(h.dtype)
    if be == "torch" and edge_index is None and not dual:  # torch's fused attention: exact, fastest on a CPU
        wide = _wide(h)
        q = unit_rows(h)  # the norm in fp32: no fp16 overflow
        keep = ~key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
        y = F.scaled_dot_product_attention(q[:, None], q[:, None], h[:, None], attn_mask=keep,
                                           scale=1.0 / temperature)[:, 0]
        return _layer_norm(_combine(h.to(wide), y.to(wide), scale, identity, key_padding_mask).to(h.dtype), layer_norm)
    valid = (~key_padding_mask).to(torch.int8).contiguous() if key_padding_mask is not None else None
    keys, rowptr, graph_tile, x = None, None, 0, h
    if edge_index is not None:
        graph = edge_index if isinstance(edge_index, NeighbourGraph) else _cached_graph(edge_index, h.shape[0])
        graph_tile = _graph_tile(h.shape[0], h.shape[1], h.element_size())
        keys, rowptr, x = graph.keys, graph.rowptr, h[None]
    s_vec, s = (scale, 0.0) if isinstance(scale, torch.Tensor) else (None, float(scale))
    w, b, eps = layer_norm if layer_norm is not None else (None, None, 0.0)
    out = _ContraNorm.apply(x.contiguous(), s_vec, w, b, valid, keys, rowptr, graph_tile, s, 1.0 / temperature,
                            identity, dual, layer_norm is not None, eps, be == "triton")
    return out.squeeze(0) if edge_index is not None else out  # a view: no copy in backward


def aot_specs(dtype: str = "bf16", d: int = 0, cc: int = 90):
    """Every kernel variant as a :class:`KernelSpec` (tests/test_compile.py): the chunk kernels with the launch
    arguments of a graph's tiles (N = 131,072: a full one and a ragged one, with and without the mirror's
    statistics), of a padded, masked batch of sequences (L = 197, rows padded to 208) and of L = 4096
    unmasked; the row kernels at D = 197, 768 and MAX_ROW_D,
    without options and with all of them.  ``d`` is not used (the matmuls are cuBLAS calls; the row kernels
    list their own D)."""
    buf = torch.empty(16, dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    f32, i8, i64 = torch.empty(16), torch.empty(16, dtype=torch.int8), torch.empty(16, dtype=torch.int64)
    specs = []

    def add(label, fn, args, flags, warps):
        specs.append(KernelSpec(f"contranorm_{label}", fn, args, flags, warps, 1, mma=False))

    graph = dict(S=buf, LSE=f32, CP=4096, row0=8192, col0=126976, scale2=1.44)  # a graph's tile pair (I, J)
    for tag, (tr, tc, tcp) in {"": (4096, 4096, 4096), "-ragged": (4096, 1001, 1008)}.items():
        tile = dict(graph, rows=tr, cols=tc, CP=tcp)
        for mirror in (False, True):
            mtag = "-mirror" if mirror else ""
            br, bc, warps = TILES["tile_lse"]
            add(f"tile_lse{tag}{mtag}[graph]", _tile_lse_kernel,
                dict(S=buf, PART_R=f32, PART_C=f32, rows=tr, cols=tc, CP=tcp, n_cb=cdiv(tcp, bc), group_rows=256,
                     n_groups=LSE_GROUPS, scale2=1.44), dict(MIRROR=mirror, BLOCK_R=br, BLOCK_C=bc), warps)
            br, bc, warps = TILES["tile_probs"]
            add(f"tile_probs{tag}{mtag}[graph]", _tile_probs_kernel, dict(tile, PT=buf),
                dict(MIRROR=mirror, BLOCK_R=br, BLOCK_C=bc), warps)
        br, bc, warps = TILES["grads"]
        add(f"grads{tag}[graph]", _tile_grads_kernel, dict(tile, DPA=buf, DPB=buf, DELTA=f32, scale=1.0),
            dict(BLOCK_R=br, BLOCK_C=bc), warps)
    block, warps = MASK_TILE
    add("mask_tile[graph]", _mask_tile_kernel, dict(S=buf, KEYS=i64, n_keys=86016, n=131072, row0=8192, col0=126976,
                                                   cols=4096, CP=4096), dict(BLOCK=block), warps)
    shapes = {"seq-L197": (197, 208, i8), "seq-L4096": (4096, 4096, None)}
    for where, (cols, cp, valid) in shapes.items():
        has_valid = valid is not None
        valid = valid if has_valid else buf
        bt, _, pair_warps = TILES["pair"]
        pair = dict(S=buf, DPR=buf, LSE=f32, VALID=valid, C=cols, CP=cp)
        add(f"pair_lse[{where}]", _pair_lse_kernel, dict(S=buf, PART=f32, VALID=valid, C=cols, CP=cp,
                                                         n_t=cdiv(cp, bt), scale2=1.44),
            dict(HAS_VALID=has_valid, BLOCK=bt), pair_warps)
        for dual in (False, True):
            tag = "-dual" if dual else ""
            add(f"pair_softmax{tag}[{where}]", _pair_softmax_kernel,
                dict(S=buf, LSE=f32, VALID=valid, C=cols, CP=cp, scale2=1.44),
                dict(DUAL=dual, HAS_VALID=has_valid, BLOCK=bt), pair_warps)
            add(f"pair_grads{tag}[{where}]", _pair_grads_kernel, dict(pair, DELTA=f32, scale2=1.44, scale=1.0),
                dict(DUAL=dual, HAS_VALID=has_valid, BLOCK=bt), pair_warps)
        add(f"pair_delta[{where}]", _pair_delta_kernel, dict(pair, PART=f32, n_t=cdiv(cp, bt), scale2=1.44),
            dict(HAS_VALID=has_valid, BLOCK=bt), pair_warps)
    for dim in (197, 768, MAX_ROW_D):
        bm, bd, warps = _row_tile(dim)
        rows = dict(M=131072, D=dim)
        tile = dict(BLOCK_M=bm, BLOCK_D=bd)
        add(f"unit_rows[D{dim}]", _unit_rows_kernel, dict(X=buf, Q=buf, R=f32, **rows, eps=1e-12), tile, warps)
        for full in (False, True):
            opts = dict(HAS_VALID=full, SCALE_VEC=full, IDENTITY=full, LN=full)
            tag = "-all" if full else ""
            add(f"combine{tag}[D{dim}]", _combine_kernel,
                dict(H=buf, Y=buf, OUT=buf, VALID=i8, SCALE=f32, W=f32, B=f32, MEAN=f32, RSTD=f32, **rows, s=0.1,
                     eps=1e-6), dict(opts, HAS_W=full, HAS_B=full, **tile), warps)
            add(f"combine_bwd{tag}[D{dim}]", _combine_bwd_kernel,
                dict(GO=buf, H=buf, Y=buf, VALID=i8, SCALE=f32, W=f32, MEAN=f32, RSTD=f32, G=buf, DACC=buf,
                     DELTA=f32, PART=f32, **rows, s=0.1, blocks=32),
                dict(opts, HAS_W=full, LOAD_H=full, WANT_DELTA=True, WANT_DS=full, WANT_DLN=full, **tile), warps)
        add(f"finish[D{dim}]", _finish_kernel, dict(DACC=buf, DQ=buf, H=buf, R=f32, DH=buf, **rows), tile, warps)
    return specs
