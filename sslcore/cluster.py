"""k-means on the fused assignment / update kernels (``sslcore.kernels.kmeans``), with scikit-learn's API.

:class:`KMeans` runs greedy k-means++ initialisation (scikit-learn's: ``2 + int(ln K)`` candidates per
centre, the one that lowers the potential most kept; one pass over X per centre through
:func:`~sslcore.kernels.kmeans.kmeans_trials`) and Lloyd iterations on the data's device, in the
data's dtype (fp16/bf16 points keep fp32 centres, cast once per assignment): every nearest-centroid query
goes through :func:`~sslcore.kernels.kmeans.kmeans_assign` (no N x K matrix on the Triton path) and every
centroid update through :func:`~sslcore.kernels.kmeans.kmeans_update` (deterministic segment sums); the
initialisation, the inertia, empty-cluster re-seeding and the convergence test stay on the device, read
by the host once every ``check_every`` iterations (docs/architecture.md, "k-means").  Names and methods
are scikit-learn's (``fit``, ``predict``, ``fit_predict``, ``transform``, ``score``, ``get_params`` /
``set_params``, so ``sklearn.base.clone`` works); numpy in, numpy out; :func:`kmeans_plusplus` is the
initialisation on its own, as scikit-learn's function.  ``partial_fit`` streams
mini-batches with scikit-learn ``MiniBatchKMeans`` semantics (per-centre counts, learning rate
1 / count), for data that does not fit in memory.  ``backend="faiss"`` runs ``faiss.Kmeans`` (CPU) from
the same initial centres, for comparison.
"""
from __future__ import annotations

import copy
import math
import numbers
import os
import warnings

import torch

from .files import atomic_torch_save
from .kernels._backend import resolve_backend
from .kernels.kmeans import _row_chunk, kmeans_assign, kmeans_trials, kmeans_update

__all__ = ["KMeans", "kmeans_plusplus"]

_INITS = ("k-means++", "random")
_BACKENDS = ("auto", "triton", "torch", "faiss")
_PARAMS = ("n_clusters", "init", "n_init", "max_iter", "tol", "random_state", "batch_size", "backend")
_FORMAT = 2  # 1: config["seed"], now config["random_state"] (load reads both)
_STATE_KEYS = ("format", "config", "init", "cluster_centers", "counts", "inertia", "n_iter", "n_steps",
               "inertia_history")


def _to_host(t: torch.Tensor):
    """``t``'s values as Python numbers: the fit's only way to read the device (a synchronisation on CUDA)."""
    return t.tolist()


def _as_points(x, name: str = "x") -> torch.Tensor:
    """``x`` as a floating [N, D] tensor (numpy accepted) with N, D >= 1 and finite entries (one pass over
    ``x``, one host read); fp16/bf16 stay as they are."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{name} must be a tensor or array of shape [N, D], got {type(x).__name__}") from e
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [N, D], got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        x = x.float()
    lo, hi = torch.aminmax(x)
    if not _to_host(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return x.contiguous()


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The centres' dtype for points of ``dtype``: fp32 for fp16/bf16/fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _exact_inertia(x: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``sum_i |x_i - c_{label_i}|^2`` in float64 by direct differences (no cancellation from the kernel's
    expansion), in row chunks: a 0-dim tensor on ``x``'s device, no host read."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    c = centers.double()
    step = _row_chunk(x)
    for i in range(0, x.shape[0], step):
        diff = x[i:i + step].double() - c[labels[i:i + step]]
        total += (diff * diff).sum()
    return total


def _counts(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Points per cluster, without the host read ``bincount`` makes on CUDA."""
    return torch.zeros(k, dtype=torch.int64, device=labels.device).scatter_add_(0, labels, torch.ones_like(labels))


def _farthest(dist: torch.Tensor, r: int) -> torch.Tensor:
    """Indices of the ``r`` largest of ``dist`` (>= 0), largest first, ties to the lower index: a stable sort's
    first ``r``; for fp32, one ``topk`` of int64 keys (distance bits, then the reversed index) instead."""
    if dist.dtype == torch.float64:
        return torch.sort(dist, descending=True, stable=True).indices[:r]
    bits = dist.float().view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    rank = torch.arange(dist.numel() - 1, -1, -1, device=dist.device)
    return dist.numel() - 1 - torch.topk((bits << 32) | rank, r).values.bitwise_and(0xFFFFFFFF)


def _reseed(x, labels, dist, sums, counts):
    """Every empty cluster gets a point, sequentially in effect: the points farthest from their centres go
    first (ties to the lower row), each *moved* out of its cluster into the next empty one, and a cluster
    that this empties joins the queue of empty ones.  Vectorised over the ``r = min(K, N)`` farthest
    points, which bound the moves (each fills a cluster that then stays filled); no host read.  Returns
    ``(sums, counts, moves)``."""
    k, r = counts.numel(), min(counts.numel(), x.shape[0])
    dev = x.device
    pts = _farthest(dist, r)
    home = labels[pts]
    # seen_j: candidates 0..j in cluster home_j; moving candidate j empties its cluster iff seen_j = its count
    pos = torch.arange(r, device=dev)
    by_home = torch.argsort(home, stable=True)
    sorted_home = home[by_home]
    first = torch.ones(r, dtype=torch.bool, device=dev)
    first[1:] = sorted_home[1:] != sorted_home[:-1]
    rank = pos - torch.cummax(torch.where(first, pos, 0), 0).values
    seen = torch.empty_like(pos).scatter_(0, by_home, rank + 1)
    emptied = (seen == counts[home]).long()
    empty = counts == 0
    m = empty.sum()
    # the queue before move j holds m + (clusters emptied by moves 0..j-1) - j clusters; moves go on while > 0
    move = m + torch.cumsum(emptied, 0) - emptied - pos > 0
    # move j fills queue[j]: the empty clusters in ascending order, then the emptied ones as they empty
    queue = torch.full((r + 1,), k, dtype=torch.int64, device=dev)
    queue.scatter_(0, torch.where(empty, torch.cumsum(empty, 0) - 1, r).clamp_max(r), torch.arange(k, device=dev))
    late = move & (emptied > 0)
    queue.scatter_(0, torch.where(late, m + torch.cumsum(late, 0) - 1, r).clamp_max(r), home)
    moved = x[pts].to(sums.dtype) * move[:, None]
    if dev.type == "cpu":  # in order, one point at a time: the sequential loop's arithmetic, bit for bit
        sums = sums.index_add(0, home, -moved)
    else:  # deterministic (no float atomics)
        sums = sums - kmeans_update(moved, home, k, validate=False)[0]
    dest = torch.where(move, queue[:r], k)  # k: a scratch row for the points that stay
    sums = torch.cat([sums, sums.new_zeros(1, sums.shape[1])]).index_copy_(0, dest, moved)[:k]
    counts = torch.cat([counts.index_add(0, home, -move.long()), counts.new_zeros(1)]).index_fill_(0, dest, 1)[:k]
    return sums, counts, move.sum()


def _local_trials(k: int) -> int:
    """Greedy k-means++'s candidates per centre for ``k`` centres, scikit-learn's ``2 + int(ln k)``."""
    return 2 + int(math.log(k))


def _is_int(v) -> bool:
    """An integer (Python or numpy: ``numbers.Integral``), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_tensor_out(x) -> bool:
    """Whether results for input ``x`` are torch tensors (torch in) or numpy arrays (anything else)."""
    return isinstance(x, torch.Tensor)


def _tensor(v):
    """A fitted attribute as a tensor (numpy arrays are wrapped without a copy); ``None`` stays ``None``."""
    return None if v is None else torch.as_tensor(v)


def _out(t: torch.Tensor, as_tensor: bool):
    """``t`` as given to a torch caller, as a numpy array (on the CPU) to anyone else."""
    return t if as_tensor else t.detach().cpu().numpy()


class KMeans:
    """k-means clustering on the fused kernels, with scikit-learn's names and behaviour.

    Parameters (scikit-learn's, in its order; the last two are sslcore's)
    ----------
    n_clusters: number of centres K (>= 1, at most the number of points fitted).
    init: ``"k-means++"`` (default: greedy k-means++ as scikit-learn's, ``2 + int(ln K)`` candidates per
        centre), ``"random"`` (K distinct points), or a [K, D] tensor/array of initial centres.
    n_init: runs from different initialisations; the lowest inertia wins.  ``"auto"`` (default): 1 for
        ``"k-means++"`` and an array, 10 for ``"random"`` (scikit-learn's rule); an array always runs once.
    max_iter: Lloyd iterations per run (with ``batch_size``: passes over the data).
    tol: stop when the squared centre shift, summed over centres, is at most ``tol`` times the
        mean per-feature variance of the data (scikit-learn's convention), or when no label changes.
    random_state: ``None`` (a seed drawn from torch's default generator at each fit, so
        ``torch.manual_seed`` makes it repeatable) or an integer seeding a ``torch.Generator`` on the
        data's device: same seed, data and device -> same result.  (Was ``seed=``: that name now raises.)
    batch_size: ``None`` -> full-batch Lloyd; an integer -> ``fit`` runs mini-batch k-means
        (``max_iter`` shuffled passes of ``partial_fit`` steps).
    backend: ``"auto"``/``"triton"``/``"torch"`` go to the kernels; ``"faiss"`` runs ``faiss.Kmeans``
        on CPU from this class's initial centres (for comparison).

    Attributes after fitting: ``cluster_centers_`` [K, D] (fp32 for fp16/bf16/fp32 points, fp64 for fp64),
    ``labels_`` [N], ``inertia_`` (sum of squared distances, a float), ``n_iter_``, ``n_features_in_``,
    ``inertia_history_`` (inertia after the initial assignment and after each Lloyd iteration;
    non-increasing), ``counts_`` (points per centre; for ``partial_fit`` the running per-centre counts),
    ``n_reseeded_`` (empty clusters re-seeded).  Arrays are torch tensors on the data's device when the
    data came as a tensor, numpy arrays otherwise; ``predict``, ``transform`` and ``fit_predict`` follow
    their input the same way.

    A full-batch fit keeps its initialisation and Lloyd iterations on the device: the host reads whether
    the run has stopped once every ``check_every`` iterations (a class attribute, 5) and the inertia
    history once at the end, so a run that stops at iteration ``t`` computes up to ``check_every - 1``
    more iterations whose results are discarded; what it returns is what a check per iteration returns.
    """

    check_every = 5

    def __init__(self, n_clusters: int = 8, *, init="k-means++", n_init="auto", max_iter: int = 300,
                 tol: float = 1e-4, random_state: int | None = None, batch_size: int | None = None,
                 backend: str = "auto", **renamed):
        if renamed:
            name = next(iter(renamed))
            if name == "seed":
                raise TypeError("KMeans takes random_state= (scikit-learn's name), not seed=")
            raise TypeError(f"KMeans got an unexpected keyword argument {name!r}")
        # stored as given (sklearn.base.clone checks the identity of each parameter), checked at once
        self.n_clusters, self.init, self.n_init, self.max_iter = n_clusters, init, n_init, max_iter
        self.tol, self.random_state, self.batch_size, self.backend = tol, random_state, batch_size, backend
        self._check_params()
        self._reset()

    def _check_params(self):
        """A ``ValueError`` naming the first bad parameter."""
        n_clusters, init = self.n_clusters, self.init
        if not _is_int(n_clusters) or n_clusters < 1:
            raise ValueError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
        if isinstance(init, str):
            if init not in _INITS:
                raise ValueError(f"init must be one of {_INITS} or a [n_clusters, D] array, got {init!r}")
        else:
            init = _as_points(init, "init")
            if init.shape[0] != n_clusters:
                raise ValueError(f"init has {init.shape[0]} centres but n_clusters={n_clusters}")
        if not (isinstance(self.n_init, str) and self.n_init == "auto") and (not _is_int(self.n_init)
                                                                             or self.n_init < 1):
            raise ValueError(f"n_init must be 'auto' or an integer >= 1, got {self.n_init!r}")
        if not _is_int(self.max_iter) or self.max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real) or not math.isfinite(self.tol) \
                or self.tol < 0:
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol!r}")
        rs = self.random_state
        if rs is not None and (not _is_int(rs) or not -2 ** 63 <= rs < 2 ** 64):  # torch.Generator's seeds
            raise ValueError(f"random_state must be None or an integer in [-2**63, 2**64), got {rs!r}")
        bs = self.batch_size
        if bs is not None and (not _is_int(bs) or bs < 1):
            raise ValueError(f"batch_size must be None or an integer >= 1, got {bs!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's parameters by name (scikit-learn's estimator protocol; ``deep`` is ignored:
        no parameter is an estimator)."""
        return {name: getattr(self, name) for name in _PARAMS}

    def set_params(self, **params) -> "KMeans":
        """Set constructor parameters by name; returns ``self``.  An unknown name or a bad value raises
        ``ValueError`` and leaves every parameter as it was.  The fitted state is kept (as scikit-learn)."""
        for name in params:
            if name not in _PARAMS:
                hint = " (use random_state)" if name == "seed" else ""
                raise ValueError(f"invalid parameter {name!r} for KMeans{hint}; valid parameters: {', '.join(_PARAMS)}")
        old = self.get_params()
        self.__dict__.update(params)
        try:
            self._check_params()
        except ValueError:
            self.__dict__.update(old)
            raise
        return self

    def __sklearn_tags__(self):
        """scikit-learn's estimator tags (a clusterer and transformer on dense float arrays), which its
        pipelines and ``check_is_fitted`` ask for; only scikit-learn calls this, so it imports it here."""
        from sklearn.utils import Tags, TargetTags, TransformerTags

        tags = Tags(estimator_type="clusterer", target_tags=TargetTags(required=False),
                    transformer_tags=TransformerTags(preserves_dtype=["float64", "float32"]))
        tags.input_tags.sparse = False
        return tags

    def __sklearn_is_fitted__(self) -> bool:
        return self.cluster_centers_ is not None

    def _reset(self):
        self.cluster_centers_ = None
        self.labels_ = None
        self.inertia_ = None
        self.n_iter_ = 0
        self.inertia_history_ = []
        self.counts_ = None
        self.n_steps_ = 0
        self.n_reseeded_ = 0
        self.n_features_in_ = None
        self._generator = None

    # -----------------------------------------------------------------------------------------
    # Helpers.

    @property
    def _k(self) -> int:
        """``n_clusters`` as a Python int (a numpy integer, e.g. from a grid search, is accepted as given)."""
        return int(self.n_clusters)

    @property
    def _kernel_backend(self) -> str:
        return "auto" if self.backend == "faiss" else self.backend

    def _assign(self, x, centers):
        """Labels and distances of ``x`` against ``centers`` (fp32 centres go to the kernel as they are with
        fp16/bf16 points: it casts them once and measures the distances to them)."""
        return kmeans_assign(x, centers.to(_master_dtype(x.dtype)), backend=self._kernel_backend, validate=False)

    def _inertia(self, x, centers, labels, dist) -> torch.Tensor:
        """The float64 inertia as a device tensor: on a GPU's Triton path the kernel's distances (direct
        differences in fp32, summed in fp64), elsewhere :func:`_exact_inertia` (float64 differences)."""
        direct = (x.device.type != "cpu" and x.dtype != torch.float64
                  and resolve_backend(self._kernel_backend, x.device) == "triton")
        return dist.sum(dtype=torch.float64) if direct else _exact_inertia(x, centers, labels)

    def _seed(self) -> int:
        """``random_state``, or for ``None`` a fresh seed from torch's default (CPU) generator."""
        if self.random_state is None:
            return int(torch.randint(2 ** 31 - 1, (1,)).tolist()[0])
        return int(self.random_state)

    @staticmethod
    def _new_generator(device, seed: int) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g

    def _n_runs(self) -> int:
        """Initialisations per fit: ``n_init``, with scikit-learn's ``"auto"`` rule; one for given centres."""
        if not isinstance(self.init, str):
            if not (isinstance(self.n_init, str) or self.n_init == 1):
                warnings.warn(f"explicit initial centres passed: performing one initialisation in KMeans instead "
                              f"of n_init={self.n_init}", RuntimeWarning, stacklevel=3)
            return 1
        if isinstance(self.n_init, str):  # "auto"
            return 10 if self.init == "random" else 1
        return int(self.n_init)

    def _check_k(self, n: int, name: str = "x"):
        if self.n_clusters > n:
            raise ValueError(f"n_clusters={self.n_clusters} exceeds the number of points in {name} ({n})")

    def _check_fitted(self):
        if self.cluster_centers_ is None:
            raise ValueError("this KMeans is not fitted yet: call fit(x) or partial_fit(x) first")

    def _check_dim(self, x, name="x"):
        d = self.cluster_centers_.shape[1]
        if x.shape[1] != d:
            raise ValueError(f"{name} has dimension {x.shape[1]} but the centres have dimension {d}")

    def _points_for_centres(self, x) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(points, centres, tensor out?)`` for a query on the fitted centres: checked, on their device."""
        self._check_fitted()
        as_tensor = _is_tensor_out(x)
        x = _as_points(x)
        self._check_dim(x)
        centers = _tensor(self.cluster_centers_)
        return x.to(centers.device), centers, as_tensor

    def _init_centers(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Initial centres [K, D] on ``x``'s device in the centres' dtype, with no host read: the given
        array, K distinct points (``"random"``), or greedy k-means++ (:meth:`_kmeans_plusplus`)."""
        k, n, dtype = self._k, x.shape[0], _master_dtype(x.dtype)
        if not isinstance(self.init, str):
            init = torch.as_tensor(self.init)
            if init.shape[1] != x.shape[1]:
                raise ValueError(f"init has dimension {init.shape[1]} but x has {x.shape[1]}")
            return init.to(device=x.device, dtype=dtype).clone()
        if self.init == "random":
            return x[torch.randperm(n, generator=g, device=x.device)[:k]].to(dtype)
        return x.index_select(0, self._kmeans_plusplus(x, g)).to(dtype)

    def _kmeans_plusplus(self, x: torch.Tensor, g: torch.Generator, trials: int | None = None) -> torch.Tensor:
        """The indices [K] of greedy k-means++'s centres (Arthur & Vassilvitskii 2007; scikit-learn's
        ``_kmeans_plusplus``): the first centre uniform; then ``trials`` (``2 + int(ln K)``) candidates drawn
        with probability proportional to the squared distance ``D_i`` to the nearest centre so far (inverse CDF
        of a float64 cumulative sum), and the candidate whose addition gives the lowest potential
        ``sum_i min(D_i, |x_i - c|^2)`` kept; its row of ``min(D, |x - c|^2)`` is the next ``D``.  One pass over
        X per centre (:func:`kmeans_trials`), all on the device, no host read."""
        k, n = self._k, x.shape[0]
        trials = trials or _local_trials(k)
        first = torch.randint(n, (1,), generator=g, device=x.device)
        picks = [first]
        unset = torch.full((n,), float("inf"), device=x.device, dtype=_master_dtype(x.dtype))
        best = kmeans_trials(x, x.index_select(0, first), unset, backend=self._kernel_backend, validate=False)[0][0]
        for _ in range(1, k):
            pick, best = self._greedy_centre(x, best, g, trials)
            picks.append(pick)
        return torch.cat(picks)

    def _greedy_centre(self, x, best, g, trials: int):
        """One step of greedy k-means++: ``(the kept point's index [1], the next D)``."""
        n = x.shape[0]
        cdf = torch.cumsum(best, 0, dtype=torch.float64)
        total = cdf[-1:]
        u = torch.rand(trials, generator=g, device=x.device, dtype=torch.float64)
        drawn = torch.searchsorted(cdf, u * total)
        # every point on a chosen centre (a zero or non-finite total): draw uniformly
        drawn = torch.where((total > 0) & torch.isfinite(total), drawn, (u * n).long()).clamp_max(n - 1)
        dist, pot = kmeans_trials(x, x.index_select(0, drawn), best, backend=self._kernel_backend, validate=False)
        kept = torch.argmin(pot).reshape(1)  # not [0-dim]: indexing by that reads the host
        return drawn.index_select(0, kept), dist.index_select(0, kept)[0]

    def _update(self, x, labels, dist, centers):
        """One M-step on the device: the means of the clusters, every cluster left empty re-seeded first
        (:func:`_reseed`: the farthest points are moved into them).  Returns (centres, clusters re-seeded)."""
        sums, counts = kmeans_update(x, labels, self._k, backend=self._kernel_backend, validate=False)
        sums, counts, moves = _reseed(x, labels, dist, sums.double(), counts)
        means = sums / counts.clamp_min(1)[:, None].double()
        return torch.where(counts[:, None] > 0, means, centers.double()).to(centers.dtype), moves

    def _lloyd_step(self, x, centers, labels, dist, inertia, tol_abs):
        """One Lloyd iteration on the device: the update, the assignment and the inertia of the new centres,
        whether to accept them (exact Lloyd never raises the inertia; a rise can only be rounding at
        convergence, a near-tie resolved differently: then the previous solution stays and the run stops)
        and whether the run may stop after them (labels unchanged or shift <= tol, never while a cluster is
        empty unless the inertia is 0: with fewer distinct points than clusters a re-seeded point ties with
        its twin's centre and leaves again, and there is nothing left to lower).  Returns ``(centres, labels,
        distances, inertia, accept, done, clusters re-seeded)``."""
        new, n_empty = self._update(x, labels, dist, centers)
        new_labels, new_dist = self._assign(x, new)
        new_inertia = self._inertia(x, new, new_labels, new_dist)
        shift = ((new.double() - centers.double()) ** 2).sum()
        unchanged = (new_labels == labels).all()
        empty = (_counts(new_labels, self._k) == 0).any()
        done = (unchanged | (shift <= tol_abs)) & (~empty | (new_inertia == 0))
        return new, new_labels, new_dist, new_inertia, new_inertia <= inertia, done, n_empty

    def _lloyd(self, x, centers, tol_abs):
        """Lloyd iterations with every quantity on the device.  The host reads whether the run is still
        going once every ``check_every`` iterations, and the history once at the end: an iteration after
        the stop only computes (its result is discarded), so results equal those of a check per iteration."""
        labels, dist = self._assign(x, centers)
        inertia = self._inertia(x, centers, labels, dist)
        zero = torch.zeros((), dtype=torch.int64, device=x.device)
        running, n_iter, reseeded, history = torch.ones((), dtype=torch.bool, device=x.device), zero, zero, [inertia]
        for it in range(1, self.max_iter + 1):
            new, new_labels, new_dist, new_inertia, accept, done, n_empty = self._lloyd_step(
                x, centers, labels, dist, inertia, tol_abs)
            step = running & accept
            centers, labels = torch.where(step, new, centers), torch.where(step, new_labels, labels)
            dist, inertia = torch.where(step, new_dist, dist), torch.where(step, new_inertia, inertia)
            n_iter, reseeded = n_iter + step, reseeded + step * n_empty
            history.append(new_inertia)
            running = step & ~done
            if it % self.check_every == 0 and it < self.max_iter and not _to_host(running):
                break
        counts = _counts(labels, self._k)
        n_iter, reseeded, used, *history = _to_host(torch.stack([n_iter.double(), reseeded.double(),
                                                                 (counts > 0).sum().double(), *history]))
        n_iter = int(n_iter)
        history = history[:n_iter + 1]  # the iterations taken are the first n_iter
        return centers, labels, history[-1], n_iter, history, int(reseeded), counts, int(used)

    def _tol_abs(self, x) -> torch.Tensor:
        """``tol`` times the mean per-feature variance of ``x`` (float64, two passes in row chunks, no host read)."""
        if self.tol == 0:
            return torch.zeros((), dtype=torch.float64, device=x.device)
        step = _row_chunk(x)
        mean = sum(x[i:i + step].double().sum(0) for i in range(0, x.shape[0], step)) / x.shape[0]
        var = sum(((x[i:i + step].double() - mean) ** 2).sum(0) for i in range(0, x.shape[0], step)) / x.shape[0]
        return self.tol * var.mean()

    # -----------------------------------------------------------------------------------------
    # Public API.

    def _atomically(self, step) -> "KMeans":
        """Run ``step(trial)`` on a shallow copy and adopt its state only if it succeeds (every fitted
        attribute is replaced, never changed in place): a failed fit leaves ``self`` as it was."""
        trial = copy.copy(self)
        step(trial)
        self.__dict__.update(trial.__dict__)
        return self

    def _publish(self, as_tensor: bool):
        """Fitted arrays as the caller's kind: tensors stay, numpy callers get numpy arrays (CPU)."""
        for name in ("cluster_centers_", "labels_", "counts_"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _out(_tensor(value), as_tensor))

    def fit(self, x, y=None, sample_weight=None):
        """Cluster ``x`` [N, D]; returns ``self``.  A fit that fails leaves the estimator as it was.
        ``y`` is ignored (scikit-learn's signature); ``sample_weight`` must be ``None`` (not supported)."""
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported by sslcore's KMeans: pass None")
        as_tensor = _is_tensor_out(x)
        x = _as_points(x)
        self._check_k(x.shape[0])
        return self._atomically(lambda trial: trial._fit(x)._publish(as_tensor))

    def _fit(self, x):
        self._reset()
        self.n_features_in_ = x.shape[1]
        if self.backend == "faiss":
            return self._fit_faiss(x)
        if self.batch_size is not None:
            return self._fit_minibatch(x)
        g = self._new_generator(x.device, self._seed())
        tol_abs = self._tol_abs(x)
        best = None
        for _ in range(self._n_runs()):
            run = self._lloyd(x, self._init_centers(x, g), tol_abs)
            if best is None or run[2] < best[2]:
                best = run
        centers, labels, inertia, n_iter, history, reseeded, counts, used = best
        if used < self._k:  # scikit-learn warns the same way
            warnings.warn(f"number of distinct clusters ({used}) found smaller than n_clusters ({self._k}): "
                          "possibly duplicate points in x", RuntimeWarning, stacklevel=5)
        self.cluster_centers_ = centers
        self.labels_ = labels
        self.inertia_ = inertia
        self.n_iter_ = n_iter
        self.inertia_history_ = history
        self.counts_ = counts
        self.n_reseeded_ = reseeded
        return self

    def _fit_faiss(self, x):
        try:
            import faiss
        except ImportError as e:
            raise ImportError("backend='faiss' needs the faiss package (pip install faiss-cpu)") from e
        import numpy as np

        seed = self._seed()
        g = self._new_generator(x.device, seed)
        xn = np.ascontiguousarray(x.detach().float().cpu().numpy())
        best = None
        for r in range(self._n_runs()):
            init = self._init_centers(x, g)
            km = faiss.Kmeans(x.shape[1], self._k, niter=int(self.max_iter), seed=(seed + r) % 2 ** 31,
                              verbose=False, min_points_per_centroid=1, max_points_per_centroid=max(256, x.shape[0]))
            km.train(xn, init_centroids=np.ascontiguousarray(init.detach().float().cpu().numpy()))
            centers = torch.from_numpy(np.array(km.centroids, copy=True)).to(device=x.device, dtype=x.dtype)
            labels, _ = self._assign(x, centers)
            inertia = float(_exact_inertia(x, centers, labels))
            if best is None or inertia < best[2]:
                best = (centers, labels, inertia, [float(v) for v in np.asarray(km.obj)])
        self.cluster_centers_, self.labels_, self.inertia_, self.inertia_history_ = best
        self.n_iter_ = self.max_iter
        self.counts_ = torch.bincount(self.labels_, minlength=self._k)
        return self

    def _fit_minibatch(self, x):
        n, bs = x.shape[0], self.batch_size
        g = self._new_generator(x.device, self._seed())
        self._generator = g
        # initialise on a random subset of 3 * batch_size points (scikit-learn's init_size), at least K
        m = min(n, max(3 * bs, self._k))
        sub = x[torch.randperm(n, generator=g, device=x.device)[:m]]
        self.cluster_centers_ = self._init_centers(sub, g)
        self.counts_ = torch.zeros(self._k, dtype=torch.int64, device=x.device)
        for _ in range(self.max_iter):
            perm = torch.randperm(n, generator=g, device=x.device)
            for i in range(0, n, bs):
                self._minibatch_step(x[perm[i:i + bs]])
            self.n_iter_ += 1
        labels, _ = self._assign(x, self.cluster_centers_)
        self.labels_ = labels
        self.inertia_ = float(_exact_inertia(x, self.cluster_centers_, labels))
        self.inertia_history_ = [self.inertia_]
        return self

    def _minibatch_step(self, xb):
        """scikit-learn MiniBatchKMeans step: ``c_k <- (n_k c_k + sum_batch_k) / (n_k + b_k)``,
        i.e. each point moves its centre with learning rate 1 / (running count)."""
        centers = self.cluster_centers_
        labels, _ = self._assign(xb, centers)
        sums, b = kmeans_update(xb, labels, self._k, backend=self._kernel_backend)
        hit = b > 0
        old = self.counts_.double()
        new_counts = self.counts_ + b
        upd = (centers.double() * old[:, None] + sums.double()) / new_counts.clamp_min(1)[:, None].double()
        centers = torch.where(hit[:, None], upd, centers.double()).to(centers.dtype)
        self.cluster_centers_ = centers
        self.counts_ = new_counts
        self.n_steps_ += 1
        return labels

    def partial_fit(self, x, y=None):
        """One mini-batch step on ``x`` [B, D] (the first call initialises the centres from it,
        so it must hold at least ``n_clusters`` points); returns ``self``.  ``labels_`` and
        ``inertia_`` then describe this batch against the updated centres.  A step that fails
        leaves the estimator as it was."""
        as_tensor = _is_tensor_out(x)
        x = _as_points(x)
        return self._atomically(lambda trial: trial._partial_fit(x)._publish(as_tensor))

    def _partial_fit(self, x):
        if self.cluster_centers_ is None:
            self._check_k(x.shape[0])
            self._generator = self._new_generator(x.device, self._seed())
            self.n_features_in_ = x.shape[1]
            self.cluster_centers_ = self._init_centers(x, self._generator)
            self.counts_ = torch.zeros(self._k, dtype=torch.int64, device=x.device)
        else:
            self._check_dim(x)
            self.cluster_centers_, self.counts_ = _tensor(self.cluster_centers_), _tensor(self.counts_)
            x = x.to(self.cluster_centers_.device)
            if self.counts_ is None:  # fitted by fit() with full batches: its counts become the prior
                self.counts_ = torch.zeros(self._k, dtype=torch.int64, device=x.device)
        self._minibatch_step(x)
        labels, _ = self._assign(x, self.cluster_centers_)
        self.labels_ = labels
        self.inertia_ = float(_exact_inertia(x, self.cluster_centers_, labels))
        return self

    def predict(self, x):
        """Index of the nearest centre (int64 [N]) of each row of ``x``."""
        x, centers, as_tensor = self._points_for_centres(x)
        return _out(self._assign(x, centers)[0], as_tensor)

    def fit_predict(self, x, y=None, sample_weight=None):
        """``fit(x).labels_``."""
        return self.fit(x, sample_weight=sample_weight).labels_

    def transform(self, x):
        """Euclidean distances (not squared, as scikit-learn's) of each row of ``x`` to every centre: [N, K]
        in the centres' dtype, computed per row chunk (``torch.cdist``; no copy of ``x`` in that dtype)."""
        x, centers, as_tensor = self._points_for_centres(x)
        step = _row_chunk(x)
        out = torch.cat([torch.cdist(x[i:i + step].to(centers.dtype), centers) for i in range(0, x.shape[0], step)])
        return _out(out, as_tensor)

    def fit_transform(self, x, y=None, sample_weight=None):
        """``fit(x).transform(x)``."""
        return self.fit(x, sample_weight=sample_weight).transform(x)

    def score(self, x, y=None) -> float:
        """Minus the inertia of ``x`` against the fitted centres (scikit-learn's: higher is better); one host
        read for the value."""
        x, centers, _ = self._points_for_centres(x)
        labels, _ = self._assign(x, centers)
        return -_to_host(_exact_inertia(x, centers, labels))

    def transform_distances(self, x):
        """Squared distance (fp32 [N]; fp64 for fp64 points) of each row of ``x`` to its nearest centre."""
        x, centers, as_tensor = self._points_for_centres(x)
        return _out(self._assign(x, centers)[1], as_tensor)

    # -----------------------------------------------------------------------------------------
    # Persistence.

    def state_dict(self) -> dict:
        """Configuration and fitted state (tensors on CPU; ``labels_`` is not stored)."""
        self._check_fitted()
        init = self.init if isinstance(self.init, str) else torch.as_tensor(self.init).detach().cpu()
        counts = _tensor(self.counts_)
        n_init = self.n_init if isinstance(self.n_init, str) else int(self.n_init)
        return {
            "format": _FORMAT,
            "config": {"n_clusters": self._k, "n_init": n_init, "max_iter": int(self.max_iter), "tol": float(self.tol),
                       "random_state": None if self.random_state is None else int(self.random_state),
                       "batch_size": None if self.batch_size is None else int(self.batch_size),
                       "backend": self.backend},  # Python numbers: torch.load(weights_only=True) refuses numpy
            "init": init,
            "cluster_centers": _tensor(self.cluster_centers_).detach().cpu(),
            "counts": None if counts is None else counts.detach().cpu(),
            "inertia": self.inertia_,
            "n_iter": self.n_iter_,
            "n_steps": self.n_steps_,
            "inertia_history": [float(v) for v in self.inertia_history_],
        }

    def load_state_dict(self, state: dict):
        """Adopt a :meth:`state_dict`'s fitted state (as tensors)."""
        if not isinstance(state, dict) or state.get("format") not in (1, _FORMAT):
            raise ValueError("not a KMeans state dict (missing or unknown 'format')")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"the KMeans state dict lacks {', '.join(missing)}")
        centers = state["cluster_centers"]
        if not isinstance(centers, torch.Tensor) or centers.dim() != 2 or not centers.is_floating_point():
            raise ValueError(f"the KMeans state's cluster_centers must be a float [K, D] tensor, got "
                             f"{getattr(centers, 'shape', type(centers).__name__)}")
        if centers.shape[0] != self.n_clusters:
            raise ValueError(f"state has {centers.shape[0]} centres but n_clusters={self.n_clusters}")
        self._reset()
        self.cluster_centers_ = centers
        self.n_features_in_ = centers.shape[1]
        self.counts_ = state["counts"]
        self.inertia_ = state["inertia"]
        self.n_iter_ = state["n_iter"]
        self.n_steps_ = state["n_steps"]
        self.inertia_history_ = list(state["inertia_history"])
        return self

    def save(self, path) -> None:
        """Write :meth:`state_dict` to ``path`` atomically and never through a link."""
        atomic_torch_save(path, self.state_dict(), "KMeans state")

    @classmethod
    def load(cls, path, map_location="cpu") -> "KMeans":
        """A fitted :class:`KMeans` from a file written by :meth:`save` (``torch.load(weights_only=True)``;
        format-1 files, with ``seed`` for ``random_state``, load too); a ``ValueError`` naming the file when
        it is missing, unreadable or not a whole KMeans state."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"KMeans file {path!r} does not exist")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch.load raises many types on bad files
            raise ValueError(f"KMeans file {path!r} is corrupted or not a torch file: {e}") from None
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or "init" not in state:
            raise ValueError(f"{path!r} does not hold a KMeans state dict (written by KMeans.save)")
        config = dict(state["config"])
        if state.get("format") == 1 and "seed" in config:
            config["random_state"] = config.pop("seed")
        try:
            km = cls(**config, init=state["init"])
            return km.load_state_dict(state)
        except (TypeError, ValueError) as e:
            raise ValueError(f"KMeans file {path!r} holds an unusable state: {e}") from None

    def __repr__(self):
        init = self.init if isinstance(self.init, str) else "array"
        return (f"KMeans(n_clusters={self.n_clusters}, init={init!r}, n_init={self.n_init!r}, "
                f"max_iter={self.max_iter}, tol={self.tol}, random_state={self.random_state}, "
                f"batch_size={self.batch_size}, backend={self.backend!r})")


def kmeans_plusplus(x, n_clusters: int, *, random_state: int | None = None, n_local_trials: int | None = None,
                    backend: str = "auto"):
    """scikit-learn's ``kmeans_plusplus``: ``(centers [K, D], indices [K])``, the greedy k-means++ centres of ``x``
    [N, D] and their rows -- the initialisation :class:`KMeans` runs, the same centres for the same
    ``random_state`` (``n_local_trials`` candidates per centre, ``2 + int(ln K)`` by default).  One pass over
    ``x`` per centre on its device (:func:`~sslcore.kernels.kmeans.kmeans_trials`); fp16/bf16 points give fp32
    centres; numpy in, numpy out (docs/architecture.md, "k-means")."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be one of ('auto', 'triton', 'torch'), got {backend!r}")
    if n_local_trials is not None and (not _is_int(n_local_trials) or n_local_trials < 1):
        raise ValueError(f"n_local_trials must be None or an integer >= 1, got {n_local_trials!r}")
    km = KMeans(n_clusters, random_state=random_state, backend=backend)  # checks n_clusters and random_state
    as_tensor = _is_tensor_out(x)
    x = _as_points(x)
    km._check_k(x.shape[0])
    indices = km._kmeans_plusplus(x, km._new_generator(x.device, km._seed()), n_local_trials and int(n_local_trials))
    return _out(x.index_select(0, indices).to(_master_dtype(x.dtype)), as_tensor), _out(indices, as_tensor)
