"""Test setup: without a CUDA device, Triton kernels run through the interpreter.

TRITON_INTERPRET must be set before triton is imported (it decides at @triton.jit time), so this
happens at the top of conftest, before anything imports sslcore.  Outputs of kernel launches
are NaN-poisoned (SSLCORE_POISON=1) so an element a kernel fails to write fails the comparison.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["SSLCORE_POISON"] = "1"

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (runs on the lent GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def no_host_sync():
    """``with no_host_sync(): ...`` runs ops under ``torch.cuda.set_sync_debug_mode("error")``: a host
    synchronisation inside raises (GPU tests put the ops' forward and backward there, and compare
    outside)."""
    import contextlib

    @contextlib.contextmanager
    def mode():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return mode


class _NoHostReads(TorchDispatchMode):
    """Fails on the ATen ops that read tensor values on the host: each is a synchronisation on CUDA."""
    READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim", "aten::equal",
             "aten::is_nonzero", "aten::masked_select", "aten::unique_consecutive"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.READS:
            raise AssertionError(f"{func._schema.name}: a host synchronisation on CUDA")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_host_reads():
    """``with no_host_reads(): ...`` fails if the ops inside read a tensor value on the host (the CPU
    stand-in for the GPU tests' sync debug mode: the same driver code runs on both)."""
    return _NoHostReads


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure through the test id's repr)."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


@pytest.fixture
def edit_checkpoint():
    """``edit_checkpoint(src, dst, **changes)`` writes checkpoint ``src`` with entries replaced by ``changes``
    to ``dst`` with a fresh checksum, as a deliberate (or buggy) writer would: what the checks after the
    checksum must catch.  Returns ``dst``."""
    from sslcore.train.checkpoint import save_checkpoint

    def edit(src, dst, **changes):
        state = {k: v for k, v in torch.load(src, weights_only=True).items()
                 if k not in ("format", "version", "checksum")}
        save_checkpoint(dst, **{**state, **changes})
        return dst
    return edit


@pytest.fixture
def interrupted(monkeypatch):
    """``interrupted(run)`` calls ``run()`` as if the process were killed right after its first
    checkpoint was written (a KeyboardInterrupt out of ``save_checkpoint``)."""
    import sslcore.train.loop as loop

    real_save = loop.save_checkpoint

    def save_then_crash(path, **state):
        real_save(path, **state)
        raise KeyboardInterrupt

    def call(run):
        monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
        try:
            with pytest.raises(KeyboardInterrupt):
                run()
        finally:
            monkeypatch.setattr(loop, "save_checkpoint", real_save)
    return call
