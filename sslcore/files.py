"""Writing files without losing anyone else's: sslcore replaces only what it wrote, never through a link.

* :func:`check_output` -- before any work, whether a command may write ``path``: not a symbolic link, not a
  folder, in a folder that exists; an existing file only with ``overwrite`` *and* when ``owned(path)`` says
  sslcore wrote it (an export, a tokenizer, a study's results: each command knows its own files).
* :func:`atomic_write` -- the bytes go to a temporary file beside ``path`` (created exclusively, never
  through a link: ``.NAME.<pid>.sslcore.tmp``) and are renamed over it, so ``path`` holds the old or the
  new bytes, never a mix; errors name the option and ``path``, not the temporary file.
* :func:`append_text` -- appends that refuse a link (the run's JSON-lines records).

See docs/architecture.md, "What sslcore writes".
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Callable

TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.sslcore\.tmp")  # what atomic_write leaves if killed mid-write
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class OutputError(ValueError):
    """An output path sslcore must not write: a link, a folder, someone else's file, a missing folder."""


def temp_name(path: Path) -> Path:
    """The temporary file :func:`atomic_write` uses for ``path`` (in ``path``'s folder)."""
    return path.with_name(f".{path.name}.{os.getpid()}.sslcore.tmp")


def check_output(path, *, option: str, overwrite: bool, owned: Callable[[Path], bool] | None = None,
                 what: str = "file") -> Path:
    """``path`` as a :class:`~pathlib.Path` once it is fit to write (see the module docstring); otherwise an
    :class:`OutputError` naming ``option``.  ``owned(path)``: whether the existing file is sslcore's own
    ``what`` (None: any existing file is refused, even with ``overwrite``)."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{option} {path} is a symbolic link: sslcore never writes through one; give the "
                          "path of a real file")
    if path.exists():
        if path.is_dir():
            raise OutputError(f"{option} {path} is a folder: give the path of a file")
        if not overwrite:
            raise OutputError(f"{option} {path} already exists: choose another path, or pass --overwrite to "
                              "replace it")
        if owned is None or not owned(path):
            raise OutputError(f"{option} {path} is not {_article(what)} {what} sslcore wrote: --overwrite replaces "
                              "only those; choose another path")
    if not path.parent.is_dir():
        if path.parent.exists():
            raise OutputError(f"{option} {path}: {str(path.parent)!r} is not a folder")
        raise OutputError(f"{option} {path}: the folder {str(path.parent)!r} does not exist")
    return path


def _article(noun: str) -> str:
    return "an" if noun[:1] in "aeiou" else "a"


def atomic_write(path, data: bytes, what: str, *, option: str | None = None) -> None:
    """Write ``data`` to ``path`` through an exclusive temporary file and ``os.replace`` (module docstring).
    A link at ``path`` is refused, not replaced.  A full disk says so and leaves the old file; any other
    failure names ``option`` (or ``what``) and ``path``."""
    path = Path(path)
    label = f"{option} {path}" if option else f"the {what} {path}"
    if path.is_symlink():
        raise OutputError(f"{label} is a symbolic link: sslcore never writes through one")
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
    except OSError as e:
        raise OSError(e.errno, f"{label}: cannot write it: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.is_symlink():  # made while we wrote: still never replace a link
            raise OutputError(f"{label} is a symbolic link: sslcore never writes through one")
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"the disk is full: could not write the {what} {path} ({len(data):,} bytes); "
                          f"the previous {what} is intact. Free some space or write elsewhere") from None
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OSError(e.errno, f"{label}: cannot write it: {e.strerror}") from None
        raise


def atomic_torch_save(path, obj, what: str, *, option: str | None = None) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write` (checkpoints, tokenizers, k-means states)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getbuffer(), what, option=option)


def append_text(path, text: str) -> None:
    """Append ``text`` to ``path`` (created if missing), refusing a link at ``path``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{path} is a symbolic link: sslcore never writes through one") from None
        raise
    with os.fdopen(fd, "a") as f:
        f.write(text)


__all__ = ["NOFOLLOW", "OutputError", "TEMP", "append_text", "atomic_torch_save", "atomic_write", "check_output",
           "temp_name"]
