"""InfoNCE / NT-Xent on two stacked views z [M, D], forward + backward w.r.t. z, beside its anchors.

FLOPs counted for every row: 3 * 2*M*M*D (S for the LSEs; S again and W.Z in the backward).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.harness import Case, Skip, compile_backend, goal_device, package_version, pytest_case, rehearsing
from sslcore.kernels.infonce import infonce, infonce_ref

TAU = 0.5
GPU_SHAPES = [(m, d) for m in (4096, 16384, 65536) for d in (128, 256, 768)]
GPU_QUICK = [(4096, 128), (16384, 256)]
GPU_GOAL = [(65536, 256), (16384, 256)]  # the GPU run's shapes: the goal, M = 65,536, D = 256; the eager rows' fit
REHEARSAL_GOAL = [(48, 16), (32, 16)]  # the same rows in a rehearsal of the GPU run (CPU tensors)
PEER = "inf-cl"  # the strongest peer: its row at the goal shape is a goal row of the GPU run
CPU_SHAPES = [(m, d) for m in (1024, 4096) for d in (128, 256)]
CPU_QUICK = [(1024, 128), (1024, 256)]
REF_NOTE = "sslcore.kernels.infonce_ref: builds the M x M matrix, fp32 math"


# Each implementation: z -> loss function of z (anything that depends only on the shape is built once).

def _sslcore(backend):
    return lambda z: (lambda x: infonce(x, temperature=TAU, backend=backend))


def _eager(z):
    return lambda x: infonce_ref(x, temperature=TAU)


def _compiled(z):
    torch._dynamo.reset()  # a fresh cache per shape: the shapes never reach the recompile limit
    fn = torch.compile(infonce_ref, dynamic=False, backend=compile_backend())
    return lambda x: fn(x, temperature=TAU)


def _inf_cl(z):
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        raise Skip("not installed") from None
    m, d = z.shape
    labels = (torch.arange(m, device=z.device) + m // 2) % m  # the two-view pairing
    head_dim = math.gcd(d, 256)  # inf-cl splits D into heads of at most 256

    def loss(x):
        xn = F.normalize(x, dim=1)
        return cal_inf_loss(xn / TAU, xn, labels, head_dim=head_dim)
    return loss


def _impls(device):
    """(impl, z -> loss, k: the step needs over k*4*M*M bytes, note) for the rows of ``device``."""
    if device == "cpu":
        return [("sslcore-torch", _sslcore("torch"), 0, "infonce(..., backend='torch')"),
                ("torch-eager", _eager, 0, REF_NOTE)]
    inf_cl = package_version("inf-cl")
    return [
        ("sslcore-triton", _sslcore("triton"), 0, ""),
        ("torch-eager", _eager, 4, REF_NOTE),
        ("torch-compile", _compiled, 2, "torch.compile(infonce_ref, dynamic=False); compile time in compile s"),
        ("inf-cl", _inf_cl, 0, "inf_cl.cal_inf_loss(z/tau, z, two-view labels): the same M x M x D work, but the "
                               f"self-pair stays in the denominator; fp32 math (inf-cl {inf_cl or 'not installed'})"),
    ]


def _case(impl, make_loss, k, note, m, d, dtype, device):
    def setup():
        torch.manual_seed(0)
        z = torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)
        loss = make_loss(z)
        return lambda: torch.autograd.grad(loss(z), z)
    return Case("infonce", impl, dtype, {"M": m, "D": d}, 6.0 * m * m * d, setup, device, k * 4.0 * m * m, note)


def cases(quick: bool = False, goal: bool = False) -> list[Case]:
    """GPU rows (bf16) and CPU rows (fp32), the implementations side by side per shape; ``goal``: the
    GPU run's rows (``python -m bench gpu``), sslcore and its peer at the goal shape marked ``goal``."""
    if goal:
        shapes = REHEARSAL_GOAL if rehearsing() else GPU_GOAL
        out = [_case(*impl, m, d, torch.bfloat16, goal_device()) for m, d in shapes for impl in _impls("cuda")]
        for c in out:
            c.goal = (c.shape["M"], c.shape["D"]) == shapes[0] and c.impl in ("sslcore-triton", PEER)
        return out
    grids = [("cuda", torch.bfloat16, GPU_QUICK if quick else GPU_SHAPES),
             ("cpu", torch.float32, CPU_QUICK if quick else CPU_SHAPES)]
    return [_case(*impl, m, d, dtype, device)
            for device, dtype, shapes in grids for m, d in shapes for impl in _impls(device)]


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_infonce(benchmark, case):
    pytest_case(benchmark, case)
