"""KMeans (sslcore.cluster) and the tokenizer-class metrics (TCAS, NMI).

Without a GPU the kernels run through the Triton interpreter (tests/conftest.py), so sizes stay
small: a few hundred points, K <= 8, D <= 16.
"""
import contextlib
import importlib
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from traffic import Traffic

from sslcore.cluster import KMeans, kmeans_plusplus
from sslcore.metrics import tcas, tcas_class_blind, tcas_label_permuted, token_class_counts, token_class_nmi


def blobs(n_per=60, k=4, d=8, spread=0.3, sep=6.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * sep
    x = torch.cat([c + spread * torch.randn(n_per, d, generator=g) for c in centers])
    y = torch.arange(k).repeat_interleave(n_per)
    return x, y, centers


def noisy(n=300, d=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def test_lloyd_monotone():
    x = noisy()
    km = KMeans(6, max_iter=15, tol=0.0, random_state=3).fit(x)
    h = km.inertia_history_
    assert len(h) == km.n_iter_ + 1 >= 3
    assert all(b <= a for a, b in zip(h, h[1:])), h
    assert h[-1] < h[0]
    # inertia_ is the exact sum of squared distances to the assigned centres, labels are nearest
    diff = x.double() - km.cluster_centers_.double()[km.labels_]
    assert km.inertia_ == pytest.approx(float((diff ** 2).sum()), rel=1e-9)
    full = torch.cdist(x.double(), km.cluster_centers_.double()).argmin(1)
    assert (full == km.labels_).float().mean() > 0.99


def test_empty_cluster_reseeded():
    x, _, _ = blobs(n_per=40, k=3, d=4)
    far = torch.full((1, 4), 1e3)
    init = torch.cat([x[:1], x[40:41], far])  # the third centre attracts no point at the start
    km = KMeans(3, init=init, max_iter=10, tol=0.0).fit(x)
    assert km.n_reseeded_ >= 1
    assert bool((km.cluster_centers_.abs() < 100).all())
    assert bool((torch.bincount(km.labels_, minlength=3) > 0).all())
    h = km.inertia_history_
    assert all(b <= a for a, b in zip(h, h[1:]))
    # a re-seeded run recovers the three blobs: each blob gets its own centre
    assert len({tuple(km.labels_[i * 40:(i + 1) * 40].unique().tolist()) for i in range(3)}) == 3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fewer_distinct_points_than_clusters_stop_and_warn(backend):
    """5 distinct points, 4 copies each, 8 clusters: every point ends on a centre (inertia 0); the empty clusters
    cannot stay filled (a re-seeded copy ties with its twin's centre and goes back to the lower index), so the
    run stops at inertia 0 instead of running to max_iter, and warns as scikit-learn does."""
    x = noisy(n=5, d=3).repeat(4, 1)
    with pytest.warns(RuntimeWarning, match=r"distinct clusters \(5\) found smaller than n_clusters \(8\)") as rec:
        km = KMeans(8, random_state=0, backend=backend).fit(x)
    assert rec[0].filename == __file__  # the caller's line
    assert km.inertia_ == 0 and km.n_iter_ < 10, (km.n_iter_, km.inertia_)


@pytest.mark.parametrize("iters", [2, 5, 40])
def test_reseeding_a_singleton_donor_moves_the_point(iters):
    """The farthest point is alone in its cluster when a cluster is empty: re-seeding moves it (its old
    cluster is re-seeded in turn), so no centre duplicates another and no cluster ends empty; run to
    convergence, the result is scikit-learn's Lloyd from the same centres.  (Before: counts [200, 1, 0]
    after one iteration, the seed left counted in its donor, two centres equal.)"""
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    g = torch.Generator().manual_seed(0)
    x = torch.cat([0.1 * torch.randn(200, 2, generator=g, dtype=torch.float64), torch.tensor([[10.0, 0.0]],
                                                                                             dtype=torch.float64)])
    init = torch.tensor([[0.0, 0.0], [5.0, 0.0], [1e3, 1e3]], dtype=torch.float64)
    km = KMeans(3, init=init, max_iter=iters, tol=0.0, backend="torch").fit(x)
    assert (km.counts_ > 0).all() and km.n_reseeded_ >= 2
    assert torch.pdist(km.cluster_centers_).min() > 0.01  # no two centres alike
    assert km.n_iter_ == iters or iters == 40
    if iters == 40:
        sk = sklearn_cluster.KMeans(3, init=init.numpy(), n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd").fit(x)
        assert km.inertia_ == pytest.approx(sk.inertia_, rel=1e-9)


class _CountHostReads(TorchDispatchMode):
    """Records the ATen ops that read tensor values on the host (a synchronisation each on CUDA)."""
    READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim", "aten::equal",
             "aten::is_nonzero", "aten::masked_select", "aten::unique_consecutive", "aten::bincount"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.READS:
            self.reads.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("data,max_iter", [("noisy", 12), ("blobs", 30)])  # runs to max_iter / stops early
def test_fit_reads_the_host_once_every_few_iterations(monkeypatch, backend, data, max_iter):
    """A full-batch fit reads device values only through ``_to_host``: once for the input check, once every
    ``check_every`` Lloyd iterations and once for the results, never an op that reads a tensor on the host
    (the old loop synchronised several times per iteration: ``float`` per inertia chunk, ``nonzero``,
    ``equal``, ``bincount``).  Its results equal a check after every iteration, the iterations computed
    past the stop discarded."""
    import sslcore.cluster as cluster

    x = noisy(n=200, d=5, seed=2) if data == "noisy" else blobs(n_per=40, k=4, d=5, seed=3)[0]
    real, calls = cluster._to_host, []
    monkeypatch.setattr(cluster, "_to_host", lambda t: calls.append(t.numel()) or real(t))
    with _CountHostReads() as mode:
        km = KMeans(6, max_iter=max_iter, tol=0.0, random_state=0, backend=backend).fit(x)
    assert mode.reads == []
    every = KMeans.check_every
    # the input check; a check at each multiple of check_every below max_iter until the one after the stop
    # (at iteration n_iter_, or n_iter_ + 1 when an iteration is refused); the results
    assert len(calls) <= 1 + min(math.ceil((km.n_iter_ + 1) / every), (max_iter - 1) // every) + 1, calls
    assert len(calls) < km.n_iter_ if data == "noisy" else km.n_iter_ < max_iter, (calls, km.n_iter_)
    monkeypatch.setattr(KMeans, "check_every", 1)
    each = KMeans(6, max_iter=max_iter, tol=0.0, random_state=0, backend=backend).fit(x)
    assert torch.equal(each.cluster_centers_, km.cluster_centers_) and torch.equal(each.labels_, km.labels_)
    assert (each.n_iter_, each.inertia_history_, each.n_reseeded_) == (km.n_iter_, km.inertia_history_,
                                                                       km.n_reseeded_)


def test_same_seed_same_result():
    x = noisy(n=200, d=5)
    a = KMeans(5, random_state=7, max_iter=5).fit(x)
    b = KMeans(5, random_state=7, max_iter=5).fit(x)
    assert torch.equal(a.cluster_centers_, b.cluster_centers_)
    assert torch.equal(a.labels_, b.labels_)
    assert a.inertia_ == b.inertia_
    c = KMeans(5, random_state=8, max_iter=5).fit(x)
    assert not torch.equal(a.cluster_centers_, c.cluster_centers_)


def test_n_init_keeps_best():
    x = noisy(n=150, d=4)
    runs = [KMeans(4, random_state=11, max_iter=5, n_init=1).fit(x).inertia_]
    best = KMeans(4, random_state=11, max_iter=5, n_init=2).fit(x)
    assert best.inertia_ <= runs[0] + 1e-9


def test_agrees_with_faiss():
    faiss = pytest.importorskip("faiss")  # noqa: F841
    x = noisy(n=400, d=8, seed=5)
    init = x[torch.randperm(400, generator=torch.Generator().manual_seed(0))[:6]].clone()
    ours = KMeans(6, init=init, max_iter=20, tol=0.0).fit(x)
    ref = KMeans(6, init=init, max_iter=20, tol=0.0, backend="faiss").fit(x)
    assert ref.cluster_centers_.shape == (6, 8)
    assert abs(ours.inertia_ - ref.inertia_) <= 0.01 * ref.inertia_, (ours.inertia_, ref.inertia_)


def test_faiss_missing_is_clear(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_faiss(name, *a, **k):
        if name == "faiss":
            raise ImportError("no faiss")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match="faiss"):
        KMeans(2, backend="faiss").fit(noisy(n=20, d=3))


def test_partial_fit_converges_on_blobs():
    x, y, centers = blobs(n_per=80, k=4, d=6, seed=2)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    km = KMeans(4, random_state=0)
    for _ in range(2):
        for i in range(0, x.shape[0], 64):
            km.partial_fit(x[i:i + 64])
    assert int(km.counts_.sum()) == 2 * x.shape[0]
    # every true centre has a learned centre close to it, and labels match the blobs up to renaming
    d = torch.cdist(centers, km.cluster_centers_)
    assert float(d.min(1).values.max()) < 0.5
    pred = km.predict(x)
    from sklearn.metrics import adjusted_rand_score
    assert adjusted_rand_score(y.numpy(), pred.numpy()) > 0.99


def test_partial_fit_count_update_rule():
    # sklearn MiniBatchKMeans semantics: c_k <- (n_k c_k + sum of the batch's points in k) / (n_k + b_k)
    x = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    km = KMeans(2, init=x.clone()).partial_fit(x)
    assert torch.equal(km.counts_, torch.tensor([1, 1]))
    km.partial_fit(torch.tensor([[1.0, 0.0], [3.0, 0.0], [10.0, 12.0]]))
    assert torch.equal(km.counts_, torch.tensor([3, 2]))
    torch.testing.assert_close(km.cluster_centers_, torch.tensor([[4 / 3, 0.0], [10.0, 11.0]]))


def test_minibatch_fit():
    x, y, _ = blobs(n_per=50, k=3, d=4, seed=4)
    km = KMeans(3, batch_size=50, max_iter=2, random_state=1).fit(x)
    from sklearn.metrics import adjusted_rand_score
    assert adjusted_rand_score(y.numpy(), km.labels_.numpy()) > 0.99


def test_save_load_roundtrip(tmp_path):
    x, _, _ = blobs(n_per=30, k=3, d=5)
    km = KMeans(3, max_iter=5, random_state=2).fit(x)
    path = tmp_path / "km.pt"
    km.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["km.pt"]  # no temp file left behind
    back = KMeans.load(path)
    assert torch.equal(back.cluster_centers_, km.cluster_centers_.cpu())
    assert back.inertia_ == km.inertia_ and back.n_iter_ == km.n_iter_
    assert back.inertia_history_ == km.inertia_history_
    assert torch.equal(back.predict(x), km.predict(x))
    assert back.n_clusters == 3 and back.random_state == 2 and back.max_iter == 5
    # a streamed model keeps its counts and can continue
    s = KMeans(3).partial_fit(x)
    s.save(path)
    s2 = KMeans.load(path).partial_fit(x)
    assert torch.equal(s2.counts_, s.counts_ * 2)


def test_bad_input():
    x = noisy(n=10, d=3)
    with pytest.raises(ValueError, match="n_clusters"):
        KMeans(0)
    with pytest.raises(ValueError, match="n_clusters"):
        KMeans(11).fit(x)
    with pytest.raises(ValueError, match="n_clusters"):
        KMeans(11).partial_fit(x)
    with pytest.raises(ValueError, match="empty"):
        KMeans(2).fit(torch.empty(0, 3))
    with pytest.raises(ValueError, match="x"):
        KMeans(2).fit(torch.randn(5))
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        KMeans(2).fit(bad)
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        KMeans(2).fit(bad)
    with pytest.raises(ValueError, match="not fitted"):
        KMeans(2).predict(x)
    km = KMeans(2, max_iter=2).fit(x)
    with pytest.raises(ValueError, match="dimension"):
        km.predict(torch.randn(4, 4))
    with pytest.raises(ValueError, match="dimension"):
        km.partial_fit(torch.randn(4, 2))
    with pytest.raises(ValueError, match="non-finite"):
        km.predict(bad)
    with pytest.raises(ValueError, match="init"):
        KMeans(2, init="kmeans")
    with pytest.raises(ValueError, match="init"):
        KMeans(3, init=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="backend"):
        KMeans(2, backend="cuda")
    with pytest.raises(ValueError, match="batch_size"):
        KMeans(2, batch_size=0)


# ---------------------------------------------------------------------------------------------
# Greedy k-means++ and scikit-learn's behaviour.


def kmeans_plusplus_ref(x: np.ndarray, k: int, seed: int, trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ in float64 numpy, transcribed from scikit-learn's ``_kmeans_plusplus`` (1.9:
    ``2 + int(log k)`` candidates by ``searchsorted`` of the cumulative squared distances, the one with
    the lowest potential kept), drawing its random numbers from a CPU ``torch.Generator`` in KMeans's order
    (one ``randint`` for the first centre, then ``rand(trials)`` per centre) so the centres must agree.
    ``trials=1``: plain k-means++."""
    g = torch.Generator().manual_seed(seed)
    n, trials = x.shape[0], trials or 2 + int(np.log(k))
    first = int(torch.randint(n, (1,), generator=g)[0])
    centers, closest = [x[first]], ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        u = torch.rand(trials, generator=g, dtype=torch.float64).numpy() * closest.sum()
        ids = np.minimum(np.searchsorted(np.cumsum(closest), u), n - 1)
        dist = np.minimum(closest, ((x[None, :, :] - x[ids][:, None, :]) ** 2).sum(-1))  # [trials, n]
        best = int(np.argmin(dist.sum(1)))
        centers.append(x[ids[best]])
        closest = dist[best]
    return np.stack(centers)


@pytest.mark.parametrize("dtype,backend", [(torch.float64, "torch"), (torch.float32, "torch"),
                                           (torch.bfloat16, "torch"), (torch.float32, "triton"),
                                           (torch.bfloat16, "triton")])
def test_greedy_kmeans_plusplus_matches_a_transcription_of_scikit_learn(dtype, backend):
    x = noisy(n=203, d=5, seed=4).to(dtype)
    for k, seed in ((7, 0), (11, 5))[: 2 if backend == "torch" else 1]:  # 3 and 4 candidates per centre
        km = KMeans(k, random_state=seed, backend=backend)
        got = km._init_centers(x, km._new_generator(x.device, seed))
        want = kmeans_plusplus_ref(x.double().numpy(), k, seed)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        np.testing.assert_array_equal(got.double().numpy(), want)
    # the reference is greedy: its potential is below plain k-means++'s (one candidate) on average
    pots = {t: [] for t in (1, 3)}
    for seed in range(20):
        for t in pots:
            c = kmeans_plusplus_ref(x.double().numpy(), 7, seed, t)
            pots[t].append(((x.double().numpy()[:, None] - c[None]) ** 2).sum(-1).min(1).sum())
    assert np.mean(pots[3]) < 0.95 * np.mean(pots[1]), {t: np.mean(v) for t, v in pots.items()}


@pytest.mark.parametrize("dtype,backend", [(torch.float64, "torch"), (torch.bfloat16, "triton")])
def test_kmeans_plusplus_is_scikit_learns_routine(dtype, backend):
    """The public ``kmeans_plusplus`` (scikit-learn's name and return): the transcription's centres, for the
    default candidates and for ``n_local_trials``, rows of x at the indices it returns, KMeans's initial
    centres for the same ``random_state``; numpy in, numpy out."""
    x = noisy(n=203, d=5, seed=4).to(dtype)
    for trials in (None, 1):
        centers, idx = kmeans_plusplus(x, 7, random_state=3, n_local_trials=trials, backend=backend)
        want = kmeans_plusplus_ref(x.double().numpy(), 7, 3, trials)
        np.testing.assert_array_equal(centers.double().numpy(), want)
        assert idx.dtype == torch.int64 and torch.equal(x[idx].to(centers.dtype), centers)
    km = KMeans(7, random_state=3, backend=backend)
    assert torch.equal(km._init_centers(x, km._new_generator(x.device, 3)),
                       kmeans_plusplus(x, 7, random_state=3, backend=backend)[0])
    c_np, i_np = kmeans_plusplus(x.double().numpy(), 7, random_state=3)
    assert isinstance(c_np, np.ndarray) and c_np.dtype == np.float64 and i_np.dtype == np.int64
    np.testing.assert_array_equal(c_np, kmeans_plusplus_ref(x.double().numpy(), 7, 3))


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_clusters=0), "n_clusters must be an integer >= 1"),
    (dict(n_clusters=300), r"n_clusters=300 exceeds the number of points in x \(203\)"),
    (dict(n_clusters=3, n_local_trials=0), "n_local_trials must be None or an integer >= 1"),
    (dict(n_clusters=3, random_state="a"), "random_state must be None or an integer"),
    (dict(n_clusters=3, backend="faiss"), "backend must be one of"),
])
def test_kmeans_plusplus_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kmeans_plusplus(noisy(n=203, d=5), **kwargs)


@contextlib.contextmanager
def one_thread():
    """torch and scikit-learn on one thread: their thread pools fight on a shared, loaded CPU (a 400-point
    fit took 0.5 s instead of 0.02 s)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpoolctl.threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


def test_inertia_within_one_percent_of_scikit_learn_on_blobs():
    """The issue's bar (#23 §2): 8-blob mixtures (``make_blobs``, 16-d as the review's), ``n_init=1`` on both
    sides, the same seed number: sslcore's inertia within 1 % of scikit-learn's in >= 95 of 100 seeds
    (measured: 98; scikit-learn itself, seeded differently, also 98).  The bar can fail: random
    initialisation, same Lloyd, meets it in about 13 of 100 seeds."""
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    make_blobs = pytest.importorskip("sklearn.datasets").make_blobs
    within, worse, random_within = 0, [], 0
    with one_thread():
        for seed in range(100):
            x, _ = make_blobs(n_samples=400, centers=8, n_features=16, random_state=seed)
            ref = sklearn_cluster.KMeans(8, n_init=1, random_state=seed).fit(x).inertia_
            ours = KMeans(8, n_init=1, random_state=seed, backend="torch").fit(x).inertia_
            within += ours <= 1.01 * ref
            if ours > 1.01 * ref:
                worse.append((seed, round(ours / ref, 3)))
            if seed < 20:
                random_init = KMeans(8, init="random", n_init=1, random_state=seed, backend="torch").fit(x)
                random_within += random_init.inertia_ <= 1.01 * ref
    assert within >= 95, worse
    assert random_within < 19, random_within  # below the bar's 95 %: the comparison discriminates


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_fit_within_one_percent_of_scikit_learn(dtype):
    """The bar on CUDA through the Triton kernel (bf16 points keep fp32 centres; fp32 multiplies in TF32):
    20 blob mixtures, >= 19 within 1 % of scikit-learn's inertia, measured on the points as given to it."""
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    make_blobs = pytest.importorskip("sklearn.datasets").make_blobs
    within = 0
    for seed in range(20):
        x, _ = make_blobs(n_samples=4000, centers=8, n_features=16, random_state=seed)
        xd = torch.from_numpy(x).to("cuda", dtype)
        ref = sklearn_cluster.KMeans(8, n_init=1, random_state=seed).fit(xd.double().cpu().numpy()).inertia_
        km = KMeans(8, n_init=1, random_state=seed, backend="triton").fit(xd)
        assert km.cluster_centers_.device.type == "cuda" and km.cluster_centers_.dtype == torch.float32
        within += km.inertia_ <= 1.01 * ref
    assert within >= 19, within


def test_scikit_learn_api_numpy_in_numpy_out():
    sklearn_base = pytest.importorskip("sklearn.base")
    x, _, _ = blobs(n_per=30, k=3, d=4, seed=5)
    xn = x.double().numpy()
    km = KMeans(3, random_state=0, backend="torch")
    assert km.fit(xn) is km
    assert isinstance(km.cluster_centers_, np.ndarray) and km.cluster_centers_.dtype == np.float64
    assert isinstance(km.labels_, np.ndarray) and km.labels_.shape == (90,) and km.n_features_in_ == 4
    assert isinstance(km.counts_, np.ndarray) and isinstance(km.inertia_, float)
    labels = km.predict(xn)
    np.testing.assert_array_equal(labels, km.labels_)
    dist = km.transform(xn)  # Euclidean, not squared, as scikit-learn's
    want = np.sqrt(((xn[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1))
    assert isinstance(dist, np.ndarray) and dist.shape == (90, 3)
    np.testing.assert_allclose(dist, want, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(dist.argmin(1), labels)
    assert km.score(xn) == pytest.approx(-km.inertia_, rel=1e-12)
    assert km.score(xn[:10]) == pytest.approx(-(dist[:10].min(1) ** 2).sum(), rel=1e-9)
    np.testing.assert_allclose(km.fit_transform(xn), dist, rtol=1e-12)
    np.testing.assert_array_equal(km.fit_predict(xn), labels)
    # torch in, torch out (also from a model fitted on numpy)
    assert isinstance(km.predict(x), torch.Tensor) and isinstance(km.transform(x), torch.Tensor)
    kt = KMeans(3, random_state=0, backend="torch").fit(x)
    assert all(isinstance(v, torch.Tensor) for v in (kt.cluster_centers_, kt.labels_, kt.counts_))
    assert kt.cluster_centers_.dtype == torch.float32 and isinstance(kt.predict(xn), np.ndarray)
    # partial_fit follows its input too, and continues from numpy state
    s = KMeans(3, random_state=1, backend="torch").partial_fit(xn).partial_fit(xn)
    assert isinstance(s.cluster_centers_, np.ndarray) and int(s.counts_.sum()) == 180
    # clone: same parameters, not fitted; get_params / set_params
    c = sklearn_base.clone(km)
    assert c.get_params() == km.get_params() and c.cluster_centers_ is None
    assert km.get_params()["random_state"] == 0 and km.get_params()["n_init"] == "auto"
    assert km.set_params(n_clusters=2, max_iter=10) is km and (km.n_clusters, km.max_iter) == (2, 10)
    with pytest.raises(ValueError, match="invalid parameter 'seed'.*random_state"):
        km.set_params(seed=1)
    with pytest.raises(ValueError, match="max_iter"):
        km.set_params(n_clusters=4, max_iter=0)
    assert (km.n_clusters, km.max_iter) == (2, 10)  # a refused set_params changes nothing
    with pytest.raises(TypeError, match="random_state"):
        KMeans(3, seed=0)
    with pytest.raises(ValueError, match="random_state"):
        KMeans(3, random_state=2 ** 64)
    with pytest.raises(ValueError, match="random_state"):
        KMeans(3, random_state=1.5)
    with pytest.raises(ValueError, match="n_init"):
        KMeans(3, n_init="many")
    with pytest.raises(ValueError, match="sample_weight"):
        KMeans(3).fit(xn, sample_weight=np.ones(90))


def test_scikit_learn_pipeline_and_grid_search():
    pipeline = pytest.importorskip("sklearn.pipeline")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    model_selection = pytest.importorskip("sklearn.model_selection")
    x = blobs(n_per=30, k=3, d=4, seed=6)[0].double().numpy()
    p = pipeline.make_pipeline(preprocessing.StandardScaler(), KMeans(3, random_state=0, backend="torch"))
    assert p.fit_predict(x).shape == (90,) and p.transform(x).shape == (90, 3) and p.score(x) < 0
    grid = {"n_clusters": np.array([1, 3])}  # numpy integers, as a grid search often passes them
    search = model_selection.GridSearchCV(KMeans(random_state=0, backend="torch"), grid, cv=3)
    assert search.fit(x).best_params_ == {"n_clusters": 3}  # score: minus the inertia on held-out rows


def test_numpy_integer_parameters_fit_and_save(tmp_path):
    x = noisy(n=50, d=3).numpy()
    km = KMeans(np.int64(3), n_init=np.int64(2), max_iter=np.int64(4), tol=np.float32(0.0),
                random_state=np.int64(1), batch_size=None, backend="torch").fit(x)
    assert km.cluster_centers_.shape == (3, 3) and km.n_iter_ <= 4
    km.save(tmp_path / "km.pt")
    back = KMeans.load(tmp_path / "km.pt")
    assert (back.n_clusters, back.n_init, back.max_iter, back.random_state) == (3, 2, 4, 1)
    np.testing.assert_array_equal(back.predict(x), km.labels_)


def test_n_init_follows_scikit_learns_auto_rule(monkeypatch):
    x = noisy(n=60, d=3)
    runs = []
    real = KMeans._init_centers
    monkeypatch.setattr(KMeans, "_init_centers", lambda self, *a: runs.append(1) or real(self, *a))
    for init, n_init, expected in (("k-means++", "auto", 1), ("random", "auto", 10), ("k-means++", 3, 3)):
        runs.clear()
        KMeans(3, init=init, n_init=n_init, max_iter=2, random_state=0, backend="torch").fit(x)
        assert len(runs) == expected, (init, n_init)
    runs.clear()
    with pytest.warns(RuntimeWarning, match="one initialisation"):
        KMeans(3, init=x[:3].clone(), n_init=3, max_iter=2, backend="torch").fit(x)
    assert len(runs) == 1


def test_random_state_none_follows_torch_manual_seed():
    x = noisy(n=80, d=3)
    torch.manual_seed(123)
    a = KMeans(4, max_iter=3, backend="torch").fit(x).cluster_centers_
    torch.manual_seed(123)
    b = KMeans(4, max_iter=3, backend="torch").fit(x).cluster_centers_
    assert torch.equal(a, b)


def test_loads_a_format_1_file_with_seed(tmp_path):
    x = noisy(n=40, d=3)
    state = KMeans(3, random_state=4, max_iter=3, backend="torch").fit(x).state_dict()
    config = dict(state["config"])
    config["seed"], config["n_init"] = config.pop("random_state"), 1  # format 1: seed, an integer n_init
    torch.save({**state, "format": 1, "config": config}, tmp_path / "old.pt")
    back = KMeans.load(tmp_path / "old.pt")
    assert back.random_state == 4 and torch.equal(back.cluster_centers_, state["cluster_centers"])


# ---------------------------------------------------------------------------------------------
# TCAS / NMI.


def test_tcas_class_pure_is_zero():
    g = torch.Generator().manual_seed(0)
    n_classes, per_class_tokens = 5, 4
    labels = torch.randint(n_classes, (200,), generator=g)
    # every token belongs to one class: token = class * 4 + something
    tokens = labels[:, None] * per_class_tokens + torch.randint(per_class_tokens, (200, 16), generator=g)
    assert tcas(tokens, labels, n_classes * per_class_tokens, n_classes) == pytest.approx(0.0, abs=1e-12)
    assert token_class_nmi(tokens, labels) > 0.5


def test_tcas_class_blind_is_one_minus_one_over_c():
    g = torch.Generator().manual_seed(1)
    n_classes, k = 4, 10
    labels = torch.randint(n_classes, (2000,), generator=g)
    tokens = torch.randint(k, (2000, 16), generator=g)  # random tokenizer, ignores class
    t = tcas(tokens, labels, k, n_classes)
    assert t == pytest.approx(1 - 1 / n_classes, abs=0.01)
    assert token_class_nmi(tokens, labels) < 0.01
    # exactly 1 - 1/C for an exactly independent count matrix, even with unbalanced classes
    pc, pk = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 1, 2, 5, 7])
    lab = torch.arange(4).repeat_interleave(pc * 16)                       # class c: 16 * pc patches
    tok = torch.cat([torch.arange(5).repeat_interleave(pk).repeat(int(pc[c])) for c in range(4)])
    assert tcas(tok, lab, 5, 4) == pytest.approx(0.75, abs=1e-12)


@pytest.mark.parametrize("k", [16, 50, 200, 1000])
def test_tcas_class_blind_is_the_mean_over_random_deals(k):
    """The closed form against its definition: the mean TCAS of the tokens dealt at random to the patches
    (a permutation keeps both margins), at the reviewers' digits shape (360 images x 16 patches, C = 10),
    where random tokens scored 0.898 (K = 16) down to 0.745 (K = 1000)."""
    g = torch.Generator().manual_seed(k)
    labels = torch.randint(10, (360,), generator=g)
    tokens = torch.randint(k, (360, 16), generator=g)
    flat = labels[:, None].expand(360, 16).reshape(-1)
    draws = torch.tensor([tcas(tokens.reshape(-1)[torch.randperm(flat.numel(), generator=g)], flat, k, 10)
                          for _ in range(200)], dtype=torch.float64)
    expected = tcas_class_blind(tokens, labels, k, 10)
    assert abs(expected - draws.mean().item()) < 4 * draws.std().item() / 200 ** 0.5
    assert expected == pytest.approx({16: 0.898, 50: 0.892, 200: 0.869, 1000: 0.745}[k], abs=0.002)
    assert tcas(tokens, labels, k, 10) == pytest.approx(expected, abs=4 * draws.std().item())  # random tokens: chance


def test_tcas_rewards_fragmentation_the_class_blind_baseline_does_not_hide_it():
    """One token per image carries no class information but every token is class-pure: TCAS 0, and its
    class-blind baseline is far above (so the reading needs K and N beside it)."""
    labels = torch.arange(360) % 10
    tokens = torch.arange(360)[:, None].expand(360, 16)
    assert tcas(tokens, labels, 360, 10) == pytest.approx(0.0, abs=1e-12)
    assert tcas_class_blind(tokens, labels, 360, 10) == pytest.approx(0.9 * (1 - 359 / 5759))
    assert tcas_label_permuted(tokens, labels, 360, 10, permutations=5) == pytest.approx(0.0, abs=1e-12)  # its null: 0


def test_tcas_label_permuted_is_chance_for_class_free_tokens_and_keeps_class_tokens_apart():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(10, (400,), generator=g)
    free = torch.randint(50, (400, 16), generator=g)  # tokens that ignore the class: TCAS is at its null
    null = tcas_label_permuted(free, labels, 50, 10, permutations=40)
    assert abs(tcas(free, labels, 50, 10) - null) < 0.01 and null == pytest.approx(tcas_class_blind(
        free, labels, 50, 10), abs=0.01)  # independent tokens: both nulls agree (the review's 0.8923 vs 0.8924)
    aligned = labels[:, None] * 5 + torch.randint(5, (400, 16), generator=g)  # token = (class, cluster)
    assert tcas(aligned, labels, 50, 10) == pytest.approx(0.0, abs=1e-12)
    assert tcas_label_permuted(aligned, labels, 50, 10, permutations=40) > 0.85  # permuting labels loses it
    one = tcas_label_permuted(free, labels, 50, 10, permutations=1, seed=7)
    assert one == tcas(free, labels[torch.randperm(400, generator=torch.Generator().manual_seed(7))], 50, 10)
    with pytest.raises(ValueError, match="one label per image"):
        tcas_label_permuted(free.flatten(), labels.repeat_interleave(16), 50, 10)
    with pytest.raises(ValueError, match="permutations"):
        tcas_label_permuted(free, labels, 50, 10, permutations=0)


def test_tcas_between_and_flat_matches_batched():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(3, (100,), generator=g)
    pure = labels[:, None].expand(100, 8) * 2 + torch.randint(2, (100, 8), generator=g)
    noise = torch.randint(6, (100, 8), generator=g)
    mix = torch.where(torch.rand(100, 8, generator=g) < 0.5, pure, noise)
    t = tcas(mix, labels, 6, 3)
    assert 0.05 < t < 1 - 1 / 3
    flat = tcas(mix.reshape(-1), labels[:, None].expand(100, 8).reshape(-1), 6, 3)
    assert t == pytest.approx(flat, abs=1e-12)
    n = token_class_counts(mix, labels, 6, 3)
    assert n.shape == (3, 6) and int(n.sum()) == 800
    # brute force from the definition
    p = n.double() / n.sum()
    ref = 1 - sum(p[c, k] ** 2 / (p[c].sum() * p[:, k].sum()) for c in range(3) for k in range(6) if p[c, k] > 0) / 3
    assert t == pytest.approx(float(ref), abs=1e-12)


def test_nmi_sanity():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert token_class_nmi(labels + 10, labels) == pytest.approx(1.0)   # a relabelling
    assert token_class_nmi(torch.zeros(6, dtype=torch.long), labels) == pytest.approx(0.0)
    assert math.isfinite(token_class_nmi(torch.randint(5, (6, 3)), labels))


def test_tcas_bad_input():
    with pytest.raises(ValueError, match="n_tokens"):
        tcas(torch.tensor([0, 5]), torch.tensor([0, 1]), 5, 2)
    with pytest.raises(ValueError, match="n_classes"):
        tcas(torch.tensor([0, 1]), torch.tensor([0, 2]), 5, 2)
    with pytest.raises(ValueError, match="match"):
        tcas(torch.zeros(3, 4, dtype=torch.long), torch.zeros(5, dtype=torch.long), 5, 2)
    with pytest.raises(ValueError, match="empty"):
        tcas(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 5, 2)


# docs/architecture.md, k-means, "KMeans.fit": one Lloyd iteration at N = 10^7, D = 128, K = 8192, bf16 points
# moves at most FIT_ITERATION_GB: the assignment's read of X and the update's gather of X (2.56 GB each, the
# kernels 5.24 GB in all) plus 2.55 GB of O(N) torch passes over labels, distances and the sort (7.79 now).
# Before the piece-sum update its torch ops alone moved 20.6 GB (fp32 copies of chunks of the sorted rows).
FIT_ITERATION_GB = 8.0


def test_bytes_per_lloyd_iteration_at_the_goal_shape(monkeypatch):
    """Everything one Lloyd iteration moves on a GPU (the two Triton launches by the tensors they declare, every
    torch op by a dispatch mode on meta tensors, so the host code is the one that runs on a GPU): two reads of
    X and O(N) more, within the documented bound; no torch op touches all of X."""
    km_mod, cluster = importlib.import_module("sslcore.kernels.kmeans"), importlib.import_module("sslcore.cluster")
    for module in (km_mod, cluster):
        monkeypatch.setattr(module, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(km_mod, "interpreting", lambda: False)
    monkeypatch.setattr(cluster, "_to_host", lambda t: [0.0] * t.numel())
    monkeypatch.setenv("SSLCORE_POISON", "0")
    launched = []

    def nbytes(t):
        return t.numel() * t.element_size()

    class Launch:  # a Triton launch: the bytes of the tensors it reads and writes, each once
        def __init__(self, tensors):
            self.tensors = tensors

        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append(sum(nbytes(args[i]) for i in self.tensors))

    monkeypatch.setattr(km_mod, "_assign_tuned", Launch([0, 1, 3, 4, 5]))  # X, -C, half-norms, labels, dist
    monkeypatch.setattr(km_mod, "_piece_sums_kernel", Launch([0, 1, 2, 3, 4]))  # X (gathered once), order, pieces
    n, d, k = 10**7, 128, 8192
    x = torch.empty(n, d, device="meta", dtype=torch.bfloat16)
    centers = torch.empty(k, d, device="meta")
    tol = torch.empty((), device="meta", dtype=torch.float64)
    totals = []
    for iterations in (1, 2):
        launched.clear()
        with Traffic("meta") as ops:
            KMeans(k, max_iter=iterations, tol=1e-4)._lloyd(x, centers, tol)
        totals.append((sum(launched), ops.bytes))
    kernels = totals[1][0] - totals[0][0]
    glue = totals[1][1] - totals[0][1]
    assert kernels == pytest.approx(2 * nbytes(x), abs=0.3e9), kernels
    largest = glue.most_common(1)[0]
    assert largest[1] < nbytes(x), f"a torch op moves as much as X: {largest}"
    total = kernels + sum(glue.values())
    assert total <= FIT_ITERATION_GB * 1e9, f"{total / 1e9:.2f} GB: {glue.most_common(8)}"


# docs/architecture.md, k-means, "Initialisation": one centre of greedy k-means++ at N = 10^7, D = 128, bf16, the
# 11 candidates K = 8192 draws, moves at most GREEDY_CENTRE_GB: the trials kernel 3.04 GB (its read of X, 2.56,
# and its fp32 [11, N] output, 0.44), torch 0.28 (the float64 cumulative sum of D, the kept row of M, and
# searchsorted charged a read of the whole CDF, 0.08, though it reads T log N elements): 3.33 counted.
# Before kmeans_trials: a potentials pass over X with fp32 copies of its bf16 chunks, then an assignment, ~15 GB.
GREEDY_CENTRE_GB = 3.4


def test_bytes_per_greedy_centre_at_the_goal_shape(monkeypatch):
    """Everything one greedy k-means++ centre moves on a GPU (the trials launch by the tensors it declares,
    every torch op by a dispatch mode on meta tensors): one read of X and O(T N) more."""
    km_mod = importlib.import_module("sslcore.kernels.kmeans")
    monkeypatch.setattr(km_mod, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(km_mod, "interpreting", lambda: False)
    monkeypatch.setenv("SSLCORE_POISON", "0")
    launched = []

    class Launch:  # the trials kernel: X, the candidates, D, M and the partial sums, each once
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append(sum(t.numel() * t.element_size() for t in args[:5]))

    monkeypatch.setattr(km_mod, "_trials_kernel", Launch())
    n, d, k = 10**7, 128, 8192
    x = torch.empty(n, d, device="meta", dtype=torch.bfloat16)
    best = torch.empty(n, device="meta")
    trials = 2 + int(math.log(k))
    with Traffic("meta") as ops:
        pick, new_best = KMeans(k)._greedy_centre(x, best, None, trials)
    assert pick.shape == (1,) and new_best.shape == (n,) and len(launched) == 1
    assert launched[0] == pytest.approx(x.numel() * 2 + trials * n * 4, rel=0.05), launched
    glue = ops.bytes
    largest = glue.most_common(1)[0]
    assert largest[1] < 0.2 * x.numel() * 2, f"a torch op moves {largest}"
    total = launched[0] + sum(glue.values())
    assert total <= GREEDY_CENTRE_GB * 1e9, f"{total / 1e9:.2f} GB: {glue.most_common(8)}"
