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
