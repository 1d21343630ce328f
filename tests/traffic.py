"""Bytes that torch ops move, counted on the meta device (shapes only, nothing computed): the byte models of
docs/architecture.md (ContraNorm's call, a KMeans.fit iteration) are checked with it at the goal shapes."""
import collections

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

VIEWS = {"aten::view", "aten::_unsafe_view", "aten::t", "aten::transpose", "aten::expand", "aten::slice",
         "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::alias", "aten::as_strided",
         "aten::permute", "aten::reshape", "aten::empty", "aten::empty_like", "aten::new_empty", "aten::empty_strided",
         "aten::new_empty_strided", "aten::lift_fresh", "aten::_reshape_alias", "aten::split", "aten::unbind",
         "aten::diagonal", "aten::view_as", "aten::expand_as", "aten::promote_types"}
WRITE_ONLY = {"aten::copy_", "aten::fill_", "aten::zero_"}
GATHERS = {"aten::index", "aten::index_select"}
MATMULS = {"aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::mm", "aten::addmm"}


class Traffic(TorchDispatchMode):
    """Bytes each torch op moves on ``device``: tensors read plus tensors written (views and allocations free;
    an ``out=`` tensor written once; an in-place tensor read and written; ``index_fill_`` its index and the
    elements it fills; a gather (``index``, ``index_select``) its index and the rows it gathers, not all of
    its source).  sslcore's custom ops are opened up (their bodies run under the mode), so the cuBLAS
    calls and small ops inside them count.  ``baddbmm(..., out_dtype=, out=)`` is shaped here: its meta
    decomposition (torch 2.11-2.14) takes ``out_dtype`` for ``beta``."""

    def __init__(self, device):
        super().__init__()
        self.device, self.bytes = torch.device(device), collections.Counter()

    def _nbytes(self, t):
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) and t.device == self.device else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs, name = kwargs or {}, func._schema.name
        if func.namespace == "sslcore":
            with self:
                return OPDEFS[name]._init_fn(*args, **kwargs)
        if func is torch.ops.aten.baddbmm.dtype_out and args[0].device.type == "meta":
            a, b, out = args[1], args[2], kwargs["out"]
            assert out.shape == (a.shape[0], a.shape[1], b.shape[2]) and a.shape[2] == b.shape[1]
        else:
            out = func(*args, **kwargs)
        if name == "aten::index_fill_":
            moved = self._nbytes(args[2]) + args[2].numel() * args[0].element_size()
        elif name in GATHERS and args[0].device == self.device:
            index = args[1] if name == "aten::index" else [args[2]]
            moved = 2 * self._nbytes(out) + sum(map(self._nbytes, index))
        elif name not in VIEWS:
            moved = sum(map(self._nbytes, out if isinstance(out, (tuple, list)) else [out]))
            schema = func._schema.arguments
            for arg, value in zip(schema, list(args) + [kwargs.get(a.name) for a in schema[len(args):]]):
                written = arg.alias_info is not None and arg.alias_info.is_write
                out_variant = func._overloadname.startswith("out") or func._overloadname.endswith("_out")
                if not written or not (out_variant or name in WRITE_ONLY):
                    moved += sum(map(self._nbytes, value if isinstance(value, (tuple, list)) else [value]))
        else:
            moved = 0
        self.bytes[name] += moved
        return out
