"""ContraNorm's update ``H - s * softmax(H_hat H_hat^T / tau) H``, forward + backward w.r.t. H, beside its anchors.

Two ops: ``contranorm`` on sequences h [B, L, D] (softmax within each sequence) and ``contranorm-graph``
on one graph h [N, D] with edge_index [2, E] (each node's softmax leaves out the node and its
neighbours; a seeded random undirected graph, 5N random pairs in both directions: E = 10N, about 10
neighbours per node).  s = 0.1, tau = 1.  The step is ``torch.autograd.grad(out, h, g)`` for a fixed
random g.

FLOPs counted for every row, attention-style (as FlashAttention counts, 2 FLOPs per multiply-add):
7 * 2*B*L*L*D = 14*B*L^2*D (graph: 14*N^2*D) -- the forward's two L x L x D matmuls (S = H_hat H_hat^T,
P H) and the backward's five.  The count is the same for every impl, so TFLOP/s compares times.

The ``passes`` column is what each row's step really performs, in units of one L x L x D matmul over
the batch: sslcore's from the matmuls the op launches (``record_launches``), the torch rows' from
``torch.utils.flop_counter`` (eager keeps P, so it needs fewer passes and L x L memory); none for
``torch.compile``.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.harness import Case, Skip, compile_backend, goal_device, pytest_case, rehearsing
from sslcore.kernels import contranorm, contranorm_ref
from sslcore.kernels.contranorm import record_launches

SCALE, TAU = 0.1, 1.0
DEGREE = 10  # edges per node in the random graph (E = DEGREE * N, symmetric)
MASK_MAX_BYTES = 4 * 2**30  # the SDPA graph row builds its dense N x N mask only up to this size
GPU_SEQ = [(b, n, d) for b in (32,) for n in (197, 1024, 4096) for d in (384, 768)]
GPU_SEQ_QUICK = [(32, 197, 384), (32, 1024, 768)]
GPU_GRAPH = [(n, 256) for n in (16384, 131072)]
GPU_GRAPH_QUICK = [(16384, 256)]
# The GPU run's shapes: the goals (B = 32, L = 4096, D = 768; the graph N = 131,072, D = 256), then L = 1024
GPU_GOAL = [(32, 4096, 768), (131072, 256), (32, 1024, 768)]
REHEARSAL_GOAL = [(2, 24, 16), (48, 16), (2, 16, 16)]  # the same rows in a rehearsal of the GPU run (CPU tensors)
PEER = "torch-sdpa"  # the strongest peer: its rows at the goal shapes are goal rows of the GPU run
CPU_SEQ = [(4, n, d) for n in (64, 197) for d in (64, 128)]
CPU_SEQ_QUICK = [(4, 64, 64), (4, 197, 128)]
CPU_GRAPH = [(2048, 64)]
CPU_GRAPH_QUICK = [(1024, 64)]
REF_NOTE = "sslcore.kernels.contranorm_ref: builds the L x L (N x N) matrix, fp32 math, fp32 output"
SDPA_NOTE = "F.scaled_dot_product_attention(q = k = H_hat, v = H, scale = 1/tau), then H - s*Y"


# Each implementation: (h, edge_index, case) -> (x -> out) (anything that depends only on the shape is
# built once).

def _sslcore(backend):
    def make(h, edge_index, case):
        return lambda x: contranorm(x, scale=SCALE, temperature=TAU, edge_index=edge_index, backend=backend)
    return make


def _eager(h, edge_index, case):
    return lambda x: contranorm_ref(x, scale=SCALE, temperature=TAU, edge_index=edge_index)


def _compiled(h, edge_index, case):
    torch._dynamo.reset()  # a fresh cache per shape: the shapes never reach the recompile limit
    fn = torch.compile(contranorm_ref, dynamic=False, backend=compile_backend())
    return lambda x: fn(x, scale=SCALE, temperature=TAU, edge_index=edge_index)


def _sdpa_backend(y: torch.Tensor) -> str:
    """Which SDPA kernel torch picked, read off the output's autograd node (the math path has none of its own)."""
    name = type(y.grad_fn).__name__
    found = re.match(r"ScaledDotProduct(\w+?)Attention(ForCpu)?Backward", name)
    return f"{found[1].lower()}{' (CPU)' if found[2] else ''}" if found else f"math ({name})"


def _sdpa(h, edge_index, case):
    """SDPA on [B, 1, L, D] (graph: [1, 1, N, D]); torch chooses the kernel, the row's note names it."""
    mask, note = None, SDPA_NOTE
    if edge_index is not None:
        n = h.shape[0]
        nbytes = n * n * h.element_size()
        if nbytes > MASK_MAX_BYTES:
            raise Skip(f"skipped: SDPA takes no sparse mask, and the dense N x N additive mask would be "
                       f"{nbytes / 2**30:.0f} GiB ({str(h.dtype).removeprefix('torch.')}), over the "
                       f"{MASK_MAX_BYTES / 2**30:.0f} GiB this bench allows a mask")
        mask = torch.zeros(n, n, dtype=h.dtype, device=h.device)
        mask.fill_diagonal_(float("-inf"))  # each node itself and its neighbours leave its softmax
        mask[edge_index[0], edge_index[1]] = float("-inf")
        note += "; a dense N x N additive mask (0 / -inf) in h's dtype, built once (not in peak extra MiB)"
    named = False

    def fn(x):
        nonlocal named
        x4 = x[None, None] if x.dim() == 2 else x[:, None]
        q = F.normalize(x4, dim=-1)
        y = F.scaled_dot_product_attention(q, q, x4, attn_mask=mask, scale=1.0 / TAU)
        if not named:  # the first (warm-up) call
            case.note, named = f"{note}; torch chose the {_sdpa_backend(y)} kernel", True
        return (x4 - SCALE * y).reshape(x.shape)
    return fn


def _passes(impl, step, rows, length, d):
    """Matmul passes of one step (see the module docstring); None where they cannot be counted."""
    one = 2.0 * rows * length * length * d
    if impl.startswith("sslcore"):  # None where the op runs torch's SDPA (the torch backend's plain sequences)
        with record_launches() as log:
            step()
        return log.passes(rows, length, d) or None
    if impl == "torch-compile":
        return None
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / one or None  # 0: a kernel torch's counter has no formula for


def _impls(device):
    """(impl, make, k: the step needs over k*4*B*L*L (k*4*N*N) bytes, note) for the rows of ``device``."""
    sdpa = ("torch-sdpa", _sdpa, 0, SDPA_NOTE)
    if device == "cpu":
        return [("sslcore-torch", _sslcore("torch"), 0, "contranorm(..., backend='torch')"),
                ("torch-eager", _eager, 0, REF_NOTE), sdpa]
    return [
        ("sslcore-triton", _sslcore("triton"), 0, "contranorm(..., backend='triton')"),
        ("torch-eager", _eager, 3, REF_NOTE),
        sdpa,
        ("torch-compile", _compiled, 2, "torch.compile(contranorm_ref, dynamic=False); compile time in compile s"),
    ]


def _random_graph(n: int, device: str) -> torch.Tensor:
    """A seeded random undirected graph: DEGREE/2 * n random pairs, each in both directions."""
    gen = torch.Generator().manual_seed(0)
    src, dst = torch.randint(0, n, (2, DEGREE // 2 * n), generator=gen)
    return torch.stack([torch.cat([src, dst]), torch.cat([dst, src])]).to(device)


def _case(impl, make, k, note, size, dtype, device):
    graph = len(size) == 2
    # L first: the plot puts the first size on its x axis (a panel per D, B)
    shape = {"N": size[0], "D": size[1]} if graph else {"L": size[1], "D": size[2], "B": size[0]}
    rows, length, d = (1, *size) if graph else size

    def setup():
        torch.manual_seed(0)
        h = torch.randn((length, d) if graph else size, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(h.shape, device=device, dtype=dtype)
        edge_index = _random_graph(length, device) if graph else None
        fn = make(h, edge_index, case)
        grads = {}  # g in the output's dtype (the references return fp32 for bf16 input)

        def step():
            out = fn(h)
            gd = grads.get(out.dtype)
            if gd is None:
                gd = grads[out.dtype] = g.to(out.dtype)
            return torch.autograd.grad(out, h, gd)
        case.passes = _passes(impl, step, rows, length, d)  # also the warm-up call
        return step

    op = "contranorm-graph" if graph else "contranorm"
    case = Case(op, impl, dtype, shape, 14.0 * rows * length * length * d, setup, device,
                k * 4.0 * rows * length * length, note)
    return case


def cases(quick: bool = False, goal: bool = False) -> list[Case]:
    """GPU rows (bf16) and CPU rows (fp32), the implementations side by side per shape; ``goal``: the
    GPU run's rows (``python -m bench gpu``), sslcore and SDPA at the goal shapes marked ``goal``."""
    if goal:
        out = []
        for i, size in enumerate(REHEARSAL_GOAL if rehearsing() else GPU_GOAL):
            for impl in _impls("cuda"):
                out.append(_case(*impl, size, torch.bfloat16, goal_device()))
                out[-1].goal = i < 2 and impl[0] in ("sslcore-triton", PEER)  # the first two sizes are the goals
        return out
    grids = [("cuda", torch.bfloat16, (GPU_SEQ_QUICK + GPU_GRAPH_QUICK) if quick else (GPU_SEQ + GPU_GRAPH)),
             ("cpu", torch.float32, (CPU_SEQ_QUICK + CPU_GRAPH_QUICK) if quick else (CPU_SEQ + CPU_GRAPH))]
    return [_case(*impl, size, dtype, device)
            for device, dtype, sizes in grids for size in sizes for impl in _impls(device)]


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_contranorm(benchmark, case):
    pytest_case(benchmark, case)
