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
