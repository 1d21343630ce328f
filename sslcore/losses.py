"""Loss modules with lightly's names, signatures and semantics, ``forward(out0, out1)``: the contrastive ones over
the fused InfoNCE op, ``NTXentLoss`` (with or without a memory bank), ``InfoNCELoss`` (MoCo/CLIP), ``DCLLoss``,
``DCLWLoss``; and ``NegativeCosineSimilarity``, ``BarlowTwinsLoss``, ``VICRegLoss``.  ``gather_distributed`` is
lightly's convention (each rank its own rows against every rank's keys; :mod:`sslcore.dist`), or ``"ring"``;
Barlow Twins' and VICReg's statistics are the global batch's (docs/methods.md).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import dist
from .checks import Backend, NonNegative, NonNegativeInt, PositiveInt, Probability, Temperature, check_value
from .functional import GATHER_MODES, _two_views, dcl, infonce_pairs, mises_fisher_weights, nt_xent
from .kernels import lse_similarity
from .kernels._backend import check_finite, unit_rows, validating


def _check_values(**tensors) -> None:
    """Each of ``tensors`` finite, where :func:`~sslcore.kernels._backend.validating` says values are read
    (always on the CPU; on CUDA with ``SSLCORE_VALIDATE=1``)."""
    for name, t in tensors.items():
        if validating(t.device):
            check_finite(name, t)


def _gather_mode(value):
    if value not in GATHER_MODES or isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"gather_distributed must be False, True or 'ring', got {value!r}")
    return value


def _bank_size(value) -> tuple[int, int | None]:
    """``memory_bank_size`` as ``(rows, dim or None)``: an int, or lightly's ``(rows, dim)``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"memory_bank_size must be an int or (rows, dim), got {value!r}")
        return (check_value("memory_bank_size rows", value[0], NonNegativeInt),
                check_value("memory_bank_size dim", value[1], NonNegativeInt))
    return check_value("memory_bank_size", value, NonNegativeInt), None


@torch.no_grad()
def ring_write(buffer: torch.Tensor, ptr: torch.Tensor, batch: torch.Tensor, *, wrap: bool,
               finite_only: bool = False) -> None:
    """Write ``batch`` into the ring ``buffer`` [R, D] at row ``ptr`` (a 0-dim int64 tensor) and move ``ptr``
    on by its rows, both in place, without reading ``ptr`` on the host (no synchronisation on a GPU;
    ``torch.compile`` traces it).  ``wrap``: rows past the end go on at row 0; else they are dropped and
    ``ptr`` goes back to 0 once the end is reached (lightly's memory bank).  ``finite_only``: a row holding
    NaN or Inf is not written (its slot keeps what it holds), still without a host read."""
    size, n = buffer.shape[0], batch.shape[0]
    start = ptr
    if n > size:  # only `size` rows can land: the first ones (dropping), the last ones (wrapping)
        batch = batch[n - size:] if wrap else batch[:size]
        start = ptr + (n - size) if wrap else ptr
    at = start + torch.arange(batch.shape[0], device=buffer.device)
    rows = at % size  # distinct: at most `size` rows are written
    values = batch.to(buffer.dtype)
    if not wrap:  # rows past the end keep what they hold
        values = torch.where((at < size)[:, None], values, buffer[rows])
    if finite_only:
        values = torch.where(torch.isfinite(values).all(1, keepdim=True), values, buffer[rows])
    buffer.index_copy_(0, rows, values)
    end = ptr + n
    ptr.copy_(end % size if wrap else torch.where(end >= size, 0, end))


class _MemoryBank(nn.Module):
    """A bank of past embeddings (a persistent buffer, so it checkpoints and loads into a fresh module):
    ``(rows, dim)`` random unit vectors from a fixed seed, or, given rows alone, made at the first batch
    (a state dict of a used bank still loads: the empty buffer takes its shape)."""

    def __init__(self, size):
        super().__init__()
        self.rows, dim = _bank_size(size)
        self.register_buffer("bank", self._fresh(dim) if self.rows and dim else torch.empty(0))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))

    def _fresh(self, dim: int, like: torch.Tensor | None = None) -> torch.Tensor:
        bank = nn.functional.normalize(torch.randn(self.rows, dim, generator=torch.Generator().manual_seed(0)), dim=1)
        return bank if like is None else bank.to(like.device, like.dtype)

    def contents(self, like: torch.Tensor) -> torch.Tensor:
        """The bank as it is before this batch (made now if it is the first), detached."""
        if self.bank.numel() == 0:
            self.bank = self._fresh(like.shape[1], like)
        if self.bank.shape[1] != like.shape[1]:
            raise ValueError(f"the embeddings have dimension {like.shape[1]} but the memory bank's is "
                             f"{self.bank.shape[1]}")
        return self.bank.detach().to(like.dtype, copy=True)  # a copy: the enqueue after the loss writes the bank

    @torch.no_grad()
    def enqueue(self, batch: torch.Tensor) -> None:
        """Write ``batch`` over the oldest rows (a ring buffer at a pointer); a batch reaching the end
        fills the rest and starts over at row 0, the remainder dropped, as lightly does.  Rows holding NaN or
        Inf are not written: where inputs are not checked (CUDA without validation), a bad batch still cannot
        poison the bank for every later call."""
        ring_write(self.bank, self.bank_ptr, batch, wrap=False, finite_only=True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "bank")
        if saved is not None and self.bank.numel() == 0 and saved.numel():
            self.bank = torch.empty_like(saved, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent (lightly's ``NTXentLoss``): ``forward(out0, out1)`` on two views ``[N, D]``.

    Without a memory bank: rows ``[out0; out1]``, positive of each row the other view of its sample,
    negatives every other row (of every rank with ``gather_distributed``).  With ``memory_bank_size``
    (rows, or lightly's ``(rows, dim)``): MoCo-style, ``l_i = -s(out0_i, out1_i) + log(exp s(out0_i, out1_i)
    + sum_k exp s(out0_i, bank_k))`` over out0's rows, the bank holding past out1 rows (every rank's
    with ``gather_distributed``), updated when out0 requires grad.  ``weight`` [N] (no bank): a per-pair
    weight on the alignment term.  See docs/methods.md.
    """

    def __init__(self, temperature: Temperature = 0.5, memory_bank_size: int | tuple[int, int] = 0,
                 gather_distributed: bool | str = False, backend: Backend = "auto"):
        super().__init__()
        self.temperature = check_value("temperature", temperature, Temperature)
        self.gather_distributed = _gather_mode(gather_distributed)
        self.backend = check_value("backend", backend, Backend)
        self.memory = _MemoryBank(memory_bank_size)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        _two_views(out0, out1)
        if self.memory.rows:
            if weight is not None:
                raise ValueError("weight is for the in-batch form, not with a memory bank")
            _check_values(out0=out0, out1=out1)  # before anything reaches the bank
            return self._with_bank(out0, out1)
        world = dist.world_size() if self.gather_distributed else 1
        if out0.shape[0] * world == 1:
            return self._one_sample(out0, out1)
        return nt_xent(out0, out1, temperature=self.temperature, weight=weight,
                       gather_distributed=self.gather_distributed, backend=self.backend)

    @staticmethod
    def _one_sample(out0, out1):
        """lightly's value for a batch of one sample without a bank: its only logit is the positive, so the
        cross-entropy is 0 (with a zero gradient).  Said once: a last batch of one sample trains nothing."""
        _check_values(out0=out0, out1=out1)
        warnings.warn("NTXentLoss got a batch of 1 sample: with no other samples there are no negatives, so "
                      "the loss is 0 with no gradient (as lightly's); drop the last batch (drop_last=True) or "
                      "use a memory bank", UserWarning, stacklevel=3)
        return (out0.sum() + out1.sum()).to(torch.promote_types(out0.dtype, torch.float32)) * 0.0 + 0.0

    def _with_bank(self, out0, out1):
        q, k = unit_rows(out0), unit_rows(out1)
        bank = self.memory.contents(k)
        scale, wide = 1.0 / self.temperature, torch.promote_types(out0.dtype, torch.float32)
        positive = (q * k).sum(1).to(wide) * scale
        lse = torch.logaddexp(positive, lse_similarity(q, bank, scale=scale, unit_norm=True,
                                                       backend=self.backend).to(wide))
        if out0.requires_grad:
            self.memory.enqueue(dist.gather(k.detach()) if self.gather_distributed else k.detach())
        return (lse - positive).mean()


class InfoNCELoss(nn.Module):
    """Query/key InfoNCE (MoCo; CLIP with ``symmetric=True``): query i's positive is key i, the other keys
    of the batch (of every rank with ``gather_distributed``) and the memory bank its negatives.

    ``memory_bank_size`` (rows, or ``(rows, dim)``) keeps past keys (unit rows, detached, a ring buffer,
    every rank's with ``gather_distributed``), refreshed after each call in training mode; unlike lightly's
    ``NTXentLoss(memory_bank_size=...)``, the batch's other keys stay negatives too (docs/methods.md).
    """

    def __init__(self, temperature: Temperature = 0.2, memory_bank_size: int | tuple[int, int] = 0,
                 symmetric: bool = False, gather_distributed: bool | str = False, backend: Backend = "auto"):
        super().__init__()
        self.temperature = check_value("temperature", temperature, Temperature)
        self.symmetric = check_value("symmetric", symmetric, bool)
        self.gather_distributed = _gather_mode(gather_distributed)
        self.backend = check_value("backend", backend, Backend)
        self.memory = _MemoryBank(memory_bank_size)
        if self.symmetric and self.memory.rows:
            raise ValueError("symmetric=True (CLIP) does not take a memory bank")

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        for name, t in (("query", query), ("key", key)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        queue = self.memory.contents(key) if self.memory.rows else None
        loss = infonce_pairs(query, key, temperature=self.temperature, queue=queue, symmetric=self.symmetric,
                             gather_distributed=self.gather_distributed, backend=self.backend)
        if queue is not None and self.training:
            k = unit_rows(key.detach())
            self.memory.enqueue(dist.gather(k) if self.gather_distributed else k)
        return loss


class DCLLoss(nn.Module):
    """Decoupled contrastive learning (lightly's ``DCLLoss``): NT-Xent with the positive out of the
    denominator (:func:`sslcore.functional.dcl`); ``weight_fn(a, b) -> [N]``, called on the unit rows of each
    side as lightly's, weighs the positive term."""

    def __init__(self, temperature: Temperature = 0.1, weight_fn=None, gather_distributed: bool | str = False,
                 backend: Backend = "auto"):
        super().__init__()
        self.temperature = check_value("temperature", temperature, Temperature)
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(f"weight_fn must be callable (out0, out1) -> [N] weights, got {type(weight_fn).__name__}")
        self.weight_fn = weight_fn
        self.gather_distributed = _gather_mode(gather_distributed)
        self.backend = check_value("backend", backend, Backend)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        return dcl(out0, out1, temperature=self.temperature, weight_fn=self.weight_fn,
                   gather_distributed=self.gather_distributed, backend=self.backend)


class DCLWLoss(DCLLoss):
    """DCL with negative von Mises-Fisher weights on the positives (lightly's ``DCLWLoss``):
    ``w = 2 - N softmax(cos(out0_i, out1_i) / sigma)`` over the batch (every rank's pairs with
    ``gather_distributed``; lightly normalises each rank's alone: :func:`sslcore.functional.mises_fisher_weights`)."""

    def __init__(self, temperature: Temperature = 0.1, sigma: float = 0.5, gather_distributed: bool | str = False,
                 backend: Backend = "auto"):
        sigma = check_value("sigma", sigma, Temperature)
        super().__init__(temperature, lambda a, b: mises_fisher_weights(a, b, sigma, gather_distributed),
                         gather_distributed, backend)
        self.sigma = sigma


class DINOLoss(nn.Module):
    """DINO's self-distillation cross-entropy (lightly's ``DINOLoss``; Caron et al. 2021, docs/methods.md):
    ``forward(teacher_out, student_out, teacher_temp=None, epoch=None)`` on lists of views ``[B, output_dim]``,

    ``L = 1/(n B) sum_b sum_{t, s != t} -softmax((T_t - c) / tau_t) . log_softmax(S_s / tau_s)``

    over the pairs of teacher view ``t`` and student view ``s`` with ``s != t`` (the same view index: global
    crops come first in both lists), ``n`` their number.  ``tau_t`` is ``teacher_temp`` if given, else at
    ``epoch`` (from 0) the linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` over
    ``warmup_teacher_temp_epochs`` epochs (``torch.linspace``, as lightly and the authors), then
    ``teacher_temp``.  After the loss the centre (a buffer ``[1, 1, output_dim]``) moves:
    ``c <- m c + (1 - m) mean(T)``, the mean over the teacher views and the batch, averaged over ranks when
    torch.distributed runs (the loss itself is per sample: DDP's gradient average needs no gather).  A batch
    mean holding NaN or Inf leaves the centre as it is (checked on the device, without a host read).
    """

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_mode: str = "mean"):
        super().__init__()
        self.output_dim = check_value("output_dim", output_dim, PositiveInt)
        self.warmup_teacher_temp = check_value("warmup_teacher_temp", warmup_teacher_temp, Temperature)
        self.teacher_temp = check_value("teacher_temp", teacher_temp, Temperature)
        self.warmup_teacher_temp_epochs = check_value("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs,
                                                      NonNegativeInt)
        self.student_temp = check_value("student_temp", student_temp, Temperature)
        self.center_momentum = check_value("center_momentum", center_momentum, Probability)
        if center_mode != "mean":
            raise ValueError(f"center_mode must be 'mean' (the only mode, as lightly's), got {center_mode!r}")
        self.register_buffer("center", torch.zeros(1, 1, self.output_dim))

    def teacher_temperature(self, epoch: int | None = None) -> float:
        """``tau_t`` at ``epoch`` (from 0): ``linspace(warmup_teacher_temp, teacher_temp, E)[epoch]`` while
        ``epoch < E`` (``E = warmup_teacher_temp_epochs``), then ``teacher_temp``; ``teacher_temp`` if None."""
        e = self.warmup_teacher_temp_epochs
        if epoch is None or epoch >= e:
            return self.teacher_temp
        if epoch < 0:
            raise ValueError(f"epoch counts from 0, got {epoch}")
        return float(torch.linspace(self.warmup_teacher_temp, self.teacher_temp, e, dtype=torch.float64)[epoch])

    def _check(self, name: str, views) -> list[torch.Tensor]:
        if not isinstance(views, (list, tuple)) or not views:
            raise TypeError(f"{name} must be a non-empty list of tensors [B, output_dim], got {type(views).__name__}")
        for i, v in enumerate(views):
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a tensor, got {type(v).__name__}")
            if v.dim() != 2 or v.shape[1] != self.output_dim or v.shape != views[0].shape:
                raise ValueError(f"{name}[{i}] must be [B, {self.output_dim}] like {name}[0] "
                                 f"{tuple(views[0].shape)}, got {tuple(v.shape)}")
        return list(views)

    def forward(self, teacher_out: list[torch.Tensor], student_out: list[torch.Tensor],
                teacher_temp: float | None = None, epoch: int | None = None) -> torch.Tensor:
        teacher, student = self._check("teacher_out", teacher_out), self._check("student_out", student_out)
        if teacher[0].shape[0] != student[0].shape[0] or teacher[0].shape[0] == 0:
            raise ValueError(f"teacher_out and student_out need the same, non-zero batch size, got "
                             f"{teacher[0].shape[0]} and {student[0].shape[0]}")
        n_pairs = len(teacher) * len(student) - min(len(teacher), len(student))
        if n_pairs == 0:
            raise ValueError(f"DINOLoss needs a teacher view and a student view with different indices; got "
                             f"{len(teacher)} teacher and {len(student)} student view(s)")
        tau_t = self.teacher_temperature(epoch) if teacher_temp is None else check_value(
            "teacher_temp", teacher_temp, Temperature)
        _check_values(**{f"teacher_out[{i}]": v for i, v in enumerate(teacher)},
                      **{f"student_out[{i}]": v for i, v in enumerate(student)})
        wide = torch.promote_types(teacher[0].dtype, torch.float32)
        center = self.center[0].to(wide)
        p = [torch.softmax((t.to(wide) - center) / tau_t, dim=-1) for t in teacher]
        log_q = [torch.log_softmax(s.to(wide) / self.student_temp, dim=-1) for s in student]
        # sum over all (t, s) pairs, then take out the same-index ones: one pass over each view, no T x S loop
        total = (torch.stack(p).sum(0) * torch.stack(log_q).sum(0)).sum()
        total = total - sum((pi * qi).sum() for pi, qi in zip(p, log_q))
        self.update_center(teacher)
        return -total / (n_pairs * teacher[0].shape[0])

    @torch.no_grad()
    def update_center(self, teacher_out: list[torch.Tensor]) -> None:
        """``c <- m c + (1 - m) mean(teacher_out)`` over views and batch (and ranks), unless that mean is not
        finite."""
        batch_center = torch.stack([t.detach().to(self.center.dtype).sum(0) for t in teacher_out]).sum(0)
        batch_center = batch_center / (len(teacher_out) * teacher_out[0].shape[0])
        if dist.world_size() > 1:
            torch.distributed.all_reduce(batch_center)
            batch_center = batch_center / dist.world_size()
        new = self.center * self.center_momentum + batch_center * (1.0 - self.center_momentum)
        self.center.copy_(torch.where(torch.isfinite(batch_center).all(), new, self.center))


class NegativeCosineSimilarity(nn.Module):
    """``-mean cos(x0, x1)`` along ``dim`` (SimSiam's, BYOL's loss), as lightly's."""

    def __init__(self, dim: int = 1, eps: float = 1e-8):
        super().__init__()
        self.dim = check_value("dim", dim, int)
        self.eps = check_value("eps", eps, NonNegative)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        for name, t in (("x0", x0), ("x1", x1)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        _check_values(x0=x0, x1=x1)
        return -nn.functional.cosine_similarity(x0, x1, self.dim, self.eps).mean()


def _check_pair(out0, out1, least: int, why: str, world: int = 1) -> None:
    """Both ``[N, D]`` tensors of one shape with ``N * world >= least`` rows (``why`` says what needs them)."""
    _two_views(out0, out1)
    if out0.shape[0] * world < least:
        raise ValueError(f"out0 and out1 hold {out0.shape[0] * world} sample(s) in all; {why}")


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The d(d-1) off-diagonal entries of a square ``[d, d]`` matrix (a view, no copy)."""
    d = m.shape[0]
    return m.flatten()[1:].view(d - 1, d + 1)[:, :-1]


def _wide_pair(out0: torch.Tensor, out1: torch.Tensor, why: str, gather_distributed: bool):
    """Barlow Twins' and VICReg's two ``[N, D]`` embeddings checked (shapes, at least 2 rows over the ranks that
    share the batch, finite values) and widened to at least fp32, where their statistics are computed."""
    _check_pair(out0, out1, 2, why, dist.world_size() if gather_distributed else 1)
    _check_values(out0=out0, out1=out1)
    wide = torch.promote_types(out0.dtype, torch.float32)
    return out0.to(wide), out1.to(wide)


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins' redundancy reduction (lightly's ``BarlowTwinsLoss``; Zbontar et al. 2021)::

        C = BN(out0)^T BN(out1) / N,    L = sum_i (1 - C_ii)^2 + lambda_param sum_{i != j} C_ij^2

    ``BN`` standardises each feature over the batch (mean 0, biased variance 1, eps 1e-5, no affine), in
    float32 or wider with autocast off.  With ``gather_distributed`` the batch is the global one, as the
    authors': the means, the variances and C are sums all-reduced over ranks and divided by the global N,
    every rank returns the same loss, and the all-reduce's backward sums over ranks, so DDP's gradient
    average is the one-process gradient.  (lightly normalises each rank's batch alone and averages the
    ranks' C: not the one-process loss; docs/methods.md.)
    """

    def __init__(self, lambda_param: NonNegative = 5e-3, gather_distributed: bool = False):
        super().__init__()
        self.lambda_param = check_value("lambda_param", lambda_param, NonNegative)
        self.gather_distributed = check_value("gather_distributed", gather_distributed, bool)

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce_sum(x) if self.gather_distributed else x

    def _standardise(self, z: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        centred = z - self._sum(z.sum(0)) / n
        return centred * torch.rsqrt(self._sum(centred.square().sum(0)) / n + 1e-5)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        with torch.autocast(out0.device.type, enabled=False):
            a, b = _wide_pair(out0, out1, "BatchNorm over the batch needs at least 2", self.gather_distributed)
            n = self._sum(a.new_tensor(float(a.shape[0])))  # the global N, without a host read
            c = self._sum(self._standardise(a, n).T @ self._standardise(b, n)) / n
            return (torch.diagonal(c) - 1).square().sum() + self.lambda_param * _off_diagonal(c).square().sum()


class VICRegLoss(nn.Module):
    """VICReg (lightly's ``VICRegLoss``; Bardes et al. 2022) on ``[N, D]`` embeddings::

        L = lambda_param MSE(out0, out1) + mu_param (v(out0) + v(out1)) / 2 + nu_param (c(out0) + c(out1))
        v(Z) = mean_j relu(1 - sqrt(Var(z_j) + eps)),   c(Z) = sum_{i != j} Cov(Z)_ij^2 / D

    (unbiased variance and covariance), in float32 or wider with autocast off.  With ``gather_distributed``, as
    lightly's: the invariance term is this rank's rows' mean, the variance and covariance the gathered global
    batch's (the gather's backward sums over ranks), so the ranks' losses average to the one-process loss.
    """

    def __init__(self, lambda_param: NonNegative = 25.0, mu_param: NonNegative = 25.0, nu_param: NonNegative = 1.0,
                 gather_distributed: bool = False, eps: NonNegative = 1e-4):
        super().__init__()
        self.lambda_param = check_value("lambda_param", lambda_param, NonNegative)
        self.mu_param = check_value("mu_param", mu_param, NonNegative)
        self.nu_param = check_value("nu_param", nu_param, NonNegative)
        self.gather_distributed = check_value("gather_distributed", gather_distributed, bool)
        self.eps = check_value("eps", eps, NonNegative)

    def _variance_covariance(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``v(z)`` and ``c(z)`` from one covariance matrix (its diagonal is the variance)."""
        centred = z - z.mean(0)
        cov = centred.T @ centred / (z.shape[0] - 1)
        std = torch.sqrt(torch.diagonal(cov) + self.eps)
        return torch.relu(1 - std).mean(), _off_diagonal(cov).square().sum() / z.shape[1]

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        with torch.autocast(out0.device.type, enabled=False):
            a, b = _wide_pair(out0, out1, "the variance over the batch needs at least 2", self.gather_distributed)
            invariance = nn.functional.mse_loss(a, b)
            if self.gather_distributed:
                a, b = dist.gather(a), dist.gather(b)
            (var_a, cov_a), (var_b, cov_b) = self._variance_covariance(a), self._variance_covariance(b)
            return (self.lambda_param * invariance + self.mu_param * 0.5 * (var_a + var_b)
                    + self.nu_param * (cov_a + cov_b))


__all__ = ["BarlowTwinsLoss", "DCLLoss", "DCLWLoss", "DINOLoss", "InfoNCELoss", "NTXentLoss",
           "NegativeCosineSimilarity", "VICRegLoss"]
