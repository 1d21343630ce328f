"""k-means: nearest-centroid assignment of x [N, D] to centroids [K, D], a whole Lloyd fit, and the greedy
k-means++ initialisation, beside their anchors.

Three ops: ``kmeans-assign`` (one assignment: labels and distances), ``kmeans-fit`` (``iters`` Lloyd
iterations from the same K initial centres, tolerance 0; the iteration count is in the shape) and
``kmeans-init`` (greedy k-means++ of K centres, ``T = 2 + int(ln K)`` candidates each: the initialisation
``KMeans`` runs by default, outside the fit rows).  Data: seeded Gaussian points; centroids are K of the
points.  FLOPs counted for every row: 2*N*K*D per assignment (the distance/argmin's matmul; the update's
O(N*D) is not counted), 2*N*D*T per initial centre (the candidates' products: memory-bound, a pass over x).
"""
from __future__ import annotations

import pytest
import torch

from bench.harness import Case, Skip, goal_device, package_version, pytest_case, rehearsing
from sslcore.cluster import KMeans, _local_trials, kmeans_plusplus
from sslcore.kernels.kmeans import kmeans_assign

GPU_SHAPES = [(n, k, d) for n in (10**6, 10**7) for k in (1024, 8192) for d in (128, 768)]
GPU_QUICK = [(10**6, 1024, 128), (10**7, 8192, 128)]
GPU_FIT = [(10**6, 1024, 128, 20), (10**7, 8192, 128, 20)]
GPU_FIT_QUICK = [(10**6, 1024, 128, 20)]
GPU_GOAL = (10**7, 8192, 128)  # the goal shapes: one assignment, and a 20-iteration fit
GPU_FIT_GOAL = (10**7, 8192, 128, 20)
GPU_INIT = [(10**6, 1024, 128), (10**7, 1024, 128)]
GPU_RUN_INIT = (10**7, 1024, 128)  # the GPU run's init row: a centre's pass at the goal N (K = 8192: ~8x)
REHEARSAL_GOAL, REHEARSAL_FIT_GOAL = (300, 16, 16), (300, 16, 16, 2)  # a rehearsal of the GPU run (CPU tensors)
# The GPU run's rows per op, most valuable first: (impl, dtype, goal row?).  flash-kmeans (the strongest peer)
# takes no bf16, so its goal rows are fp16, with sslcore's fp16 row next.  No faiss rows: faiss-gpu is not on
# the lent machine and too large to carry there.
GOAL_ASSIGN = [("sslcore-triton", torch.bfloat16, True), ("flash-kmeans", torch.float16, True),
               ("sslcore-triton", torch.float16, False), ("torch-chunked", torch.bfloat16, False),
               ("torch-chunked", torch.float16, False)]
GOAL_FIT = [("sslcore-triton", torch.bfloat16, True), ("flash-kmeans", torch.float16, True),
            ("sslcore-triton", torch.float16, False)]
CPU_SHAPES = [(10**5, k, d) for k in (256, 1024) for d in (128, 768)]
CPU_QUICK = [(10**5, 256, 128)]
CPU_FIT = [(10**5, 256, 128, 5)]
CPU_FIT_QUICK = [(10**5, 256, 128, 2)]
CPU_INIT = [(10**5, 256, 128)]
CPU_INIT_QUICK = [(2 * 10**4, 64, 128)]
CHUNK_BYTES = 1 << 30  # torch-chunked: rows per chunk so that one chunk's N x K fp32 scores take 1 GiB


def _data(n, k, d, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, device=device, generator=g, dtype=dtype)
    idx = torch.randperm(n, device=device, generator=g)[:k]
    return x, x[idx].clone()


# Assignment implementations: (x, c) -> step.

def _sslcore(backend):
    return lambda x, c: (lambda: kmeans_assign(x, c, backend=backend))


def _torch_chunked(x, c):
    """``x @ c.T`` in x's dtype, minus half-norms, argmax; in row chunks so no full N x K matrix."""
    half = (c.float() ** 2).sum(1) / 2
    rows = max(1, CHUNK_BYTES // (4 * c.shape[0]))

    def step():
        return torch.cat([(xs @ c.T).float().sub_(half).argmax(1) for xs in x.split(rows)])
    return step


def _flash_kmeans(x, c):
    try:
        from flash_kmeans.assign_euclid_triton import euclid_assign_triton
    except ImportError:
        raise Skip("not installed") from None
    if x.dtype == torch.bfloat16:
        raise Skip("skipped: flash-kmeans' assignment takes fp16/fp32, not bf16")
    xb, cb = x[None], c[None]
    x_sq = (x.float() ** 2).sum(1)[None]
    return lambda: euclid_assign_triton(xb, cb, x_sq)


def _faiss(x, c):
    try:
        import faiss
    except ImportError:
        raise Skip("not installed") from None
    if x.is_cuda:
        if not hasattr(faiss, "StandardGpuResources"):
            raise Skip("skipped: this faiss has no GPU support (faiss-gpu not installed)")
        import faiss.contrib.torch_utils  # noqa: F401 - lets faiss take CUDA tensors

        index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), c.shape[1])
        index.add(c.float().cpu().numpy())
        xf = x.float()
        return lambda: index.search(xf, 1)  # faiss' torch interop: CUDA tensors in, CUDA tensors out
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c.float().numpy())
    xn = x.float().numpy()
    return lambda: index.search(xn, 1)


def _assign_impls(device):
    faiss = package_version('faiss-cpu') or package_version('faiss-gpu') or 'not installed'
    faiss_note = f"faiss IndexFlatL2.search(k=1), fp32 (faiss {faiss})"
    if device == "cpu":
        return [("sslcore-torch", _sslcore("torch"), "kmeans_assign(..., backend='torch'): chunked fp32 matmul"),
                ("faiss-cpu", _faiss, faiss_note)]
    return [
        ("sslcore-triton", _sslcore("triton"), "kmeans_assign(..., backend='triton')"),
        ("torch-chunked", _torch_chunked, "x @ c.T in the input dtype, 1 GiB chunks of fp32 scores, argmax"),
        ("flash-kmeans", _flash_kmeans,
         f"euclid_assign_triton (flash-kmeans {package_version('flash-kmeans') or 'not installed'})"),
        ("faiss-gpu", _faiss, faiss_note),
    ]


# Fit implementations: (x, c, iters) -> step.

def _sslcore_fit(backend):
    def make(x, c, iters):
        km = KMeans(c.shape[0], init=c, max_iter=iters, tol=0.0, backend=backend)
        return lambda: km.fit(x)
    return make


def _flash_kmeans_fit(x, c, iters):
    try:
        from flash_kmeans import batch_kmeans_Euclid
    except ImportError:
        raise Skip("not installed") from None
    if x.dtype == torch.bfloat16:
        raise Skip("skipped: flash-kmeans takes fp16/fp32, not bf16")
    return lambda: batch_kmeans_Euclid(x[None], c.shape[0], max_iters=iters, tol=0.0, init_centroids=c[None])


def _faiss_fit(x, c, iters):
    try:
        import faiss
    except ImportError:
        raise Skip("not installed") from None
    if x.is_cuda and not hasattr(faiss, "StandardGpuResources"):
        raise Skip("skipped: this faiss has no GPU support (faiss-gpu not installed)")
    xn, cn = x.float().cpu().numpy(), c.float().cpu().numpy()

    def step():
        km = faiss.Kmeans(x.shape[1], c.shape[0], niter=iters, gpu=x.is_cuda, min_points_per_centroid=1,
                          max_points_per_centroid=x.shape[0])
        km.train(xn, init_centroids=cn)
        return km
    return step


def _fit_impls(device):
    if device == "cpu":
        return [("sslcore-torch", _sslcore_fit("torch"), "KMeans(init=c, tol=0, backend='torch').fit"),
                ("faiss-cpu", _faiss_fit, "faiss.Kmeans(niter).train(init_centroids=c), fp32")]
    return [("sslcore-triton", _sslcore_fit("triton"), "KMeans(init=c, tol=0, backend='triton').fit"),
            ("flash-kmeans", _flash_kmeans_fit, "batch_kmeans_Euclid(x[None], K, max_iters, tol=0, init_centroids)"),
            ("faiss-gpu", _faiss_fit, "faiss.Kmeans(niter, gpu=True).train(init_centroids=c), fp32; host copies")]


# Initialisation implementations: (x, k) -> step.

def _sslcore_init(backend):
    return lambda x, k: (lambda: kmeans_plusplus(x, k, random_state=0, backend=backend))


def _sklearn_init(x, k):
    try:
        from sklearn.cluster import kmeans_plusplus as sk_kmeans_plusplus
    except ImportError:
        raise Skip("not installed") from None
    xn = x.float().cpu().numpy()
    return lambda: sk_kmeans_plusplus(xn, k, random_state=0)


def _init_impls(device):
    if device == "cpu":
        return [("sslcore-torch", _sslcore_init("torch"), "kmeans_plusplus(x, K, backend='torch')"),
                ("scikit-learn", _sklearn_init,
                 f"sklearn.cluster.kmeans_plusplus, fp32 (scikit-learn {package_version('scikit-learn')})")]
    return [("sslcore-triton", _sslcore_init("triton"), "kmeans_plusplus(x, K, backend='triton')")]


def _case(op, impl, make, note, size, dtype, device):
    n, k, d = size[:3]
    iters = size[3] if len(size) == 4 else 1
    shape = {"N": n, "K": k, "D": d} | ({"iters": iters} if op == "kmeans-fit" else {})
    flops = 2.0 * n * d * _local_trials(k) * k if op == "kmeans-init" else 2.0 * n * k * d * iters

    def setup():
        x, c = _data(n, k, d, dtype, device)
        if op == "kmeans-init":
            return make(x, k)
        return make(x, c, iters) if op == "kmeans-fit" else make(x, c)
    return Case(op, impl, dtype, shape, flops, setup, device, 0.0, note)


def _goal_cases() -> list[Case]:
    """The GPU run's rows (``python -m bench gpu``): GOAL_ASSIGN and GOAL_FIT at the goal shapes, and sslcore's
    k-means++ at GPU_RUN_INIT (no goal; no peer runs greedy k-means++ on a GPU)."""
    assign, fit, init = ((REHEARSAL_GOAL, REHEARSAL_FIT_GOAL, REHEARSAL_GOAL) if rehearsing()
                         else (GPU_GOAL, GPU_FIT_GOAL, GPU_RUN_INIT))
    out = []
    for op, size, table, impls in (("kmeans-assign", assign, GOAL_ASSIGN, _assign_impls("cuda")),
                                   ("kmeans-fit", fit, GOAL_FIT, _fit_impls("cuda")),
                                   ("kmeans-init", init, [("sslcore-triton", torch.bfloat16, False)],
                                    _init_impls("cuda"))):
        by_name = {impl[0]: impl for impl in impls}
        for name, dtype, goal in table:
            out.append(_case(op, *by_name[name], size, dtype, goal_device()))
            out[-1].goal = goal
    return out


def cases(quick: bool = False, goal: bool = False) -> list[Case]:
    """GPU rows (bf16 and fp16: flash-kmeans takes no bf16) and CPU rows (fp32), side by side per shape;
    ``goal``: the GPU run's rows, sslcore and flash-kmeans at the goal shapes marked ``goal``."""
    if goal:
        return _goal_cases()
    out = []
    grids = [("cuda", (torch.bfloat16, torch.float16), GPU_QUICK if quick else GPU_SHAPES,
              GPU_FIT_QUICK if quick else GPU_FIT, GPU_INIT[:1] if quick else GPU_INIT),
             ("cpu", (torch.float32,), CPU_QUICK if quick else CPU_SHAPES, CPU_FIT_QUICK if quick else CPU_FIT,
              CPU_INIT_QUICK if quick else CPU_INIT)]
    for device, dtypes, shapes, fits, inits in grids:  # every assignment before the (slower) fits and inits
        out += [_case("kmeans-assign", *impl, s, dtype, device)
                for dtype in dtypes for s in shapes for impl in _assign_impls(device)]
        out += [_case("kmeans-fit", *impl, s, dtype, device)
                for dtype in dtypes for s in fits for impl in _fit_impls(device)]
        out += [_case("kmeans-init", *impl, s, dtype, device)
                for dtype in dtypes for s in inits for impl in _init_impls(device)]
    return out


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_kmeans(benchmark, case):
    pytest_case(benchmark, case)
