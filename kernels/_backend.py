"""Backend dispatch and small launch helpers shared by every kernel family.

``backend="auto" | "triton" | "torch"`` (the environment variable ``SSLCORE_BACKEND`` overrides
``"auto"``):

* ``auto``   -- Triton on CUDA tensors; the Triton interpreter when ``TRITON_INTERPRET=1``;
  otherwise the plain-torch path.  A CUDA tensor is never silently sent to the torch path.
* ``triton`` -- Triton; a clear error where it cannot run.
* ``torch``  -- the plain-torch path (correct on any device).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

try:  # triton is a Linux-only dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

BACKENDS = ("auto", "triton", "torch")
HAS_TRITON = triton is not None


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_int_scalars() -> None:
    """Triton before 3.7 interprets a scalar kernel argument as a one-element array and takes its Python
    int with ``int(array)``, which NumPy 2.4 refuses for arrays of one dimension: every loop bound over a
    runtime size (``range(0, K, BLOCK_N)``) then fails.  Triton 3.7 takes ``int(array.squeeze())``; this
    gives the interpreter of 3.6 the same, for the interpreter only (compiled kernels never run it)."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "sslcore_int_scalars", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.sslcore_int_scalars = True
    interpreter._patch_lang_tensor = patched


if HAS_TRITON and interpreting() and tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
    _interpreter_int_scalars()


class KernelSpec(NamedTuple):
    """One compiled variant of a kernel, for the ahead-of-time compile test (tests/aot.py).

    ``args`` maps every non-constexpr parameter to an example value as a launch would pass it
    (tensors, ints, floats, None): the test derives each argument's type and its launch-time
    specialisation (``tt.divisibility = 16``, ints equal to 1 made constant) from these values,
    exactly as Triton's launcher does.  ``mma``: the kernel's main loop runs on tensor cores.
    """
    name: str
    fn: object
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    mma: bool


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` for tensors on ``device`` to ``"triton"`` or ``"torch"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("SSLCORE_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"SSLCORE_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        if device.type == "cuda":
            if not HAS_TRITON:
                raise RuntimeError("CUDA tensors need triton (pip install triton), or pass backend='torch'")
            return "triton"
        return "triton" if HAS_TRITON and interpreting() and device.type == "cpu" else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if device.type == "cpu" and not interpreting():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend='triton' does not run on {device.type} tensors")
    return backend


def new_output(shape, *, device, dtype) -> torch.Tensor:
    """An uninitialised kernel output; poisoned when ``SSLCORE_POISON=1`` (the tests set it) so
    that an element a kernel fails to write shows up: NaN for floats, -1 for integers."""
    out = torch.empty(shape, device=device, dtype=dtype)
    if os.environ.get("SSLCORE_POISON", "0") == "1":
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ---------------------------------------------------------------------------------------------
# Argument checks: each raises a ValueError / TypeError naming the argument, before any work.

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(name: str, t, ndim: int | tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def check_positive(name: str, value: float) -> None:
    """A finite number > 0.  Not while ``torch.compile`` traces: a float argument can then be a
    ``SymFloat`` (after a recompile for a new value), whose value is unknown; modules check theirs
    when built."""
    if torch.compiler.is_compiling():
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def validating(device: torch.device, validate: bool | None = None) -> bool:
    """Whether to run the checks that read tensor *values* (finiteness, index ranges).

    They need the data on the host, which on CUDA is a synchronisation per call: there they run
    only when asked (``validate=True`` or ``SSLCORE_VALIDATE=1``).  On the CPU they are free and
    always run unless ``validate=False``.  Never while ``torch.compile`` traces.
    """
    if torch.compiler.is_compiling():
        return False
    if validate is not None:
        return bool(validate)
    return device.type == "cpu" or os.environ.get("SSLCORE_VALIDATE", "0") == "1"


class _UnitRows(torch.autograd.Function):
    """``x / max(|x|, eps)`` row-wise (F.normalize's convention), with the norm taken in fp32 (fp64 for
    fp64) after dividing each row by its largest magnitude: no overflow for any finite input (fp16 rows
    of 2e4, fp32 rows of 1e19).  Saves only the [..., 1] reciprocal norms beside ``x``."""

    @staticmethod
    def forward(ctx, x, eps):
        wide = torch.promote_types(x.dtype, torch.float32)
        amax = x.abs().amax(-1, keepdim=True).to(wide)
        amax = torch.where(amax > 0, amax, 1.0)
        r = 1.0 / (torch.linalg.vector_norm(x.to(wide) / amax, dim=-1, keepdim=True) * amax).clamp_min(eps)
        ctx.save_for_backward(x, r)
        y = x.to(wide) * r
        # No ``.to()`` that is a no-op: on torch 2.11 a traced Function whose output is such a cast gets a
        # zero gradient (tests/test_compile_grads.py).
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, r = ctx.saved_tensors
        wide = r.dtype
        y, g = x.to(wide) * r, g.to(wide)
        return (r * (g - y * (y * g).sum(-1, keepdim=True))).to(x.dtype), None


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero), in ``x``'s dtype; see :class:`_UnitRows`."""
    return _UnitRows.apply(x, eps)


def check_finite(name: str, t: torch.Tensor) -> None:
    """NaN propagates through amax/amin and Inf lands in one of them: two reductions, no bool copy of ``t``."""
    if t.numel() and not bool(torch.isfinite(t.amax()) & torch.isfinite(t.amin())):
        raise ValueError(f"{name} contains NaN or Inf")


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
