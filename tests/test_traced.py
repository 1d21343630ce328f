"""Every loss module, functional op and layer under ``torch.compile(fullgraph=True)`` gives eager's output
and gradients, with Dynamo's ``eager`` and ``aot_eager`` backends, for the Triton backend (the interpreter
here) and the torch backend.

Dynamo rewrites the autograd graph of what it traces; on torch 2.11 a Function whose output was a no-op
``.to()`` got a gradient of exactly 0 under any backend (``unit_rows``: every normalised loss trained on
nothing under ``--compile``), where eager was right.  Comparing with eager itself, on the same inputs and
the same kernels, leaves no room: the tolerance is float32 round-off of a reordered sum, not of a
different algorithm.  Inductor's code generation runs on the GPU machine (``-m gpu`` tests).
"""
import copy

import pytest
import torch

import sslcore.functional as F
from sslcore import (
    BarlowTwinsLoss,
    ContraNorm,
    DCLLoss,
    DCLWLoss,
    DContraNorm,
    InfoNCELoss,
    NegativeCosineSimilarity,
    NTXentLoss,
    VICRegLoss,
)
from sslcore.kernels import contranorm, infonce, kmeans_assign, lse_similarity, nearest_cosine, prepare_graph
from sslcore.losses import ring_write

N, D = 7, 12  # rows per view, width: odd, not multiples of any block


def _rows(*shape):
    return torch.randn(*shape, dtype=torch.float32)


def _graph(n):
    """A ring with chords: every node has neighbours, none all of them."""
    i = torch.arange(n)
    return torch.stack([torch.cat([i, i]), torch.cat([(i + 1) % n, (i + 3) % n])])


# name -> builder(backend) -> (callable, inputs needing grad, extra inputs)
CASES = {
    "NTXentLoss": lambda be: (NTXentLoss(backend=be), [_rows(N, D), _rows(N, D)]),
    "NTXentLoss-bank": lambda be: (NTXentLoss(memory_bank_size=(16, D), backend=be), [_rows(N, D), _rows(N, D)]),
    "InfoNCELoss": lambda be: (InfoNCELoss(backend=be), [_rows(N, D), _rows(N, D)]),
    "InfoNCELoss-bank": lambda be: (InfoNCELoss(memory_bank_size=(16, D), backend=be), [_rows(N, D), _rows(N, D)]),
    "InfoNCELoss-symmetric": lambda be: (InfoNCELoss(symmetric=True, backend=be), [_rows(N, D), _rows(N, D)]),
    "DCLLoss": lambda be: (DCLLoss(backend=be), [_rows(N, D), _rows(N, D)]),
    "DCLWLoss": lambda be: (DCLWLoss(backend=be), [_rows(N, D), _rows(N, D)]),
    "NegativeCosineSimilarity": lambda be: (NegativeCosineSimilarity(), [_rows(N, D), _rows(N, D)]),
    "BarlowTwinsLoss": lambda be: (BarlowTwinsLoss(), [_rows(N, D), _rows(N, D)]),
    "VICRegLoss": lambda be: (VICRegLoss(), [0.3 * _rows(N, D), _rows(N, D)]),
    "nt_xent": lambda be: (lambda a, b: F.nt_xent(a, b, temperature=0.3, backend=be), [_rows(N, D), _rows(N, D)]),
    "nt_xent-weight": lambda be: (lambda a, b, w: F.nt_xent(a, b, weight=w, backend=be),
                                  [_rows(N, D), _rows(N, D), torch.rand(N) + 0.5]),
    "supcon": lambda be: (lambda z: F.supcon(z, torch.arange(2 * N) % 3, backend=be), [_rows(2 * N, D)]),
    "infonce_pairs-queue": lambda be: (lambda q, k, u: F.infonce_pairs(q, k, queue=u, backend=be),
                                       [_rows(N, D), _rows(N, D), _rows(5, D)]),
    "dcl": lambda be: (lambda a, b: F.dcl(a, b, temperature=0.2, backend=be), [_rows(N, D), _rows(N, D)]),
    "infonce-pos_index": lambda be: (lambda z: infonce(z, pos_index=(torch.arange(2 * N) + 3) % (2 * N), backend=be),
                                     [_rows(2 * N, D)]),
    "infonce-unnormalised": lambda be: (lambda z: infonce(0.3 * z, normalize=False, reduction="sum", backend=be),
                                        [_rows(2 * N, D)]),
    "infonce-self_offset": lambda be: (lambda z, k: infonce(z, k, self_offset=4, backend=be),
                                       [_rows(6, D), _rows(2 * N, D)]),
    "lse_similarity-cols": lambda be: (lambda a, b: torch.stack(lse_similarity(a, b, scale=2.0, cols=True,
                                                                               backend=be)[0:1]),
                                       [_rows(N, D), _rows(N + 2, D)]),
    "contranorm": lambda be: (lambda h: contranorm(h, scale=0.3, temperature=0.5, backend=be), [_rows(2, 9, D)]),
    "contranorm-dual-mask": lambda be: (
        lambda h: contranorm(h, scale=0.3, dual=True, key_padding_mask=(torch.arange(9) >= 7).expand(2, 9), backend=be),
        [_rows(2, 9, D)]),
    "contranorm-graph": lambda be: (lambda h: contranorm(h, scale=0.3, edge_index=prepare_graph(_graph(11), 11),
                                                         backend=be), [_rows(11, D)]),
    "ContraNorm": lambda be: (ContraNorm(D, scale=0.2, learnable=True, backend=be), [_rows(2, 9, D)]),
    "ContraNorm-graph": lambda be: (ContraNorm(D, scale=0.2, graph=True, backend=be), [_rows(11, D)], [_graph(11)]),
    "DContraNorm": lambda be: (DContraNorm(D, scale=0.5), [_rows(2, 9, D)]),
}
NO_GRAD = {  # the ops without a gradient: outputs compared
    "kmeans_assign": lambda be: (lambda x, c: kmeans_assign(x, c, backend=be), [_rows(13, D), _rows(5, D)]),
    "nearest_cosine": lambda be: (lambda x, c: nearest_cosine(x, c, backend=be), [_rows(13, D), _rows(5, D)]),
}


def _flat(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


def _run(module, call, inputs, extra, grad):
    """Outputs, and the gradients of a weighted sum of them w.r.t. the inputs and the module's parameters."""
    leaves = [t.clone().requires_grad_(grad) for t in inputs]
    outs = _flat(call(*leaves, *extra))
    if not grad:
        return outs, []
    wrt = leaves + (list(module.parameters()) if isinstance(module, torch.nn.Module) else [])
    floats = [o for o in outs if o.is_floating_point()]
    total = sum((o * torch.linspace(0.5, 1.5, o.numel()).view(o.shape)).sum() for o in floats)
    return outs, list(torch.autograd.grad(total, wrt, allow_unused=True))


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", [*CASES, *NO_GRAD])
def test_compiled_equals_eager(name, backend, compiler, seed):
    grad = name in CASES
    built = (CASES if grad else NO_GRAD)[name](backend)
    fn, inputs, extra = (*built, [])[:3]
    torch._dynamo.reset()
    eager_fn, compiled_fn = fn, copy.deepcopy(fn)
    if isinstance(fn, torch.nn.Module):
        fn(*inputs, *extra)  # a first call makes lazy state (a memory bank); both copies then have it
        eager_fn, compiled_fn = fn, copy.deepcopy(fn)
    want, want_g = _run(eager_fn, eager_fn, inputs, extra, grad)
    got, got_g = _run(compiled_fn, torch.compile(compiled_fn, backend=compiler, fullgraph=True), inputs, extra, grad)
    for what, a, b in [("output", want, got), ("gradient", want_g, got_g)]:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert (x is None) == (y is None), what
            if x is not None:
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {what}: {m}")
    if grad:
        assert any(g is not None and g.abs().sum() > 0 for g in want_g), "a test whose gradient is 0 proves nothing"
    if isinstance(fn, torch.nn.Module):  # state a call changes (a memory bank) changes alike
        for (k, a), (_, b) in zip(eager_fn.state_dict().items(), compiled_fn.state_dict().items()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} state {k}: {m}")


def _ring_ref(buf, ptr, batch, wrap):
    """The ring buffer written row by row (a transcription of the loops it replaced)."""
    buf, size, n = buf.clone(), buf.shape[0], batch.shape[0]
    if wrap:
        for j in range(n):
            buf[(ptr + j) % size] = batch[j]
        return buf, (ptr + n) % size
    if ptr + n >= size:  # lightly's bank: fill to the end, drop the rest, start over
        buf[ptr:] = batch[:size - ptr]
        return buf, 0
    buf[ptr:ptr + n] = batch
    return buf, ptr + n


@pytest.mark.parametrize("wrap", [False, True])
def test_ring_write_is_the_row_by_row_ring_without_host_reads(wrap, no_host_reads):
    """The memory banks' and queues' write (NTXentLoss/InfoNCELoss banks, MoCo, NNCLR): every size, batch
    and pointer, batches longer than the ring included, with no host read of the pointer."""
    for size in range(1, 7):
        for n in range(1, 10):
            for p in range(size):
                buf, batch = torch.randn(size, 3), torch.randn(n, 3)
                want, want_ptr = _ring_ref(buf, p, batch, wrap)
                ptr = torch.tensor(p)
                with no_host_reads():
                    ring_write(buf, ptr, batch, wrap=wrap)
                assert torch.equal(buf, want) and int(ptr) == want_ptr, (size, n, p)
