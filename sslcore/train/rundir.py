"""A run directory that one run holds at a time and no run reuses by accident.

* **Lock.** ``OUT/.lock`` is locked with ``fcntl.flock`` for the whole run (training, probes,
  summary); the holder's pid, host, start time and command are written into it.  A second run
  on the same folder fails at once, naming the holder.  The kernel drops the lock when the
  holder dies (even on SIGKILL), so a crashed run never blocks the next one.  The lock file is
  removed when the run ends; a process that opened it just before is told so by its inode and
  tries again.
* **Stale temporaries.** A checkpoint or summary is written to ``.NAME.<pid>.tmp`` and renamed
  into place; a process killed in between leaves that file behind.  Only the lock holder ever
  writes in the folder, so once the lock is ours every such file is a dead process's, and is removed.
* **No silent reuse.** A folder that already holds files is refused unless the run continues the
  checkpoint in it (``--resume``) or was told ``--overwrite``.  Overwriting deletes the previous
  run's files (:data:`RUN_FILES`, nothing else) only at :meth:`RunDirectory.replace_previous`, which
  the trainer calls after every check, the data and the model are ready: a run refused or
  failing before its first step leaves the old run whole.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
from pathlib import Path

LOCK_NAME = ".lock"
RUN_FILES = ("checkpoint.pt", "config.yaml", "metrics.jsonl", "steps.jsonl", "summary.json", "tensorboard")  # sorted
TEMP = re.compile(r"\.(.+)\.(\d+)\.tmp")  # what checkpoint.atomic_write leaves when killed mid-write


class RunDirectoryError(ValueError):
    """The run directory is unusable, held by another run, or holds a run this one must not replace."""


class RunDirectory:
    """Context manager holding ``out`` for one run (see the module docstring); ``enabled=False`` (the
    other ranks of a distributed run) makes it a no-op.  ``continuing``: this run resumes the
    checkpoint in ``out``, so the folder may hold that run's files."""

    def __init__(self, out, *, continuing: bool = False, overwrite: bool = False, enabled: bool = True):
        self.path, self.continuing, self.overwrite, self.enabled = Path(out), continuing, overwrite, enabled
        self._fd, self._created = None, False

    def __enter__(self) -> "RunDirectory":
        if not self.enabled:
            return self
        self._lock()
        try:
            self._remove_stale_temporaries()
            held = sorted(p.name for p in self.path.iterdir() if p.name != LOCK_NAME)
            if held and not (self.continuing or self.overwrite):
                raise RunDirectoryError(
                    f"--out {self.path} already holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''}: "
                    "continue that run with --resume, replace it with --overwrite, or choose another --out")
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._unlock()

    def replace_previous(self) -> None:
        """With ``overwrite``: delete the previous run's :data:`RUN_FILES` (call it when the new run is ready)."""
        if self.enabled and self.overwrite:
            for name in RUN_FILES:
                path = self.path / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)

    def _lock(self) -> None:
        lock = self.path / LOCK_NAME
        for _ in range(10):  # retries only when a finishing holder removes the file or folder under us
            try:
                self._created = self._created or not self.path.exists()
                self.path.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise RunDirectoryError(f"--out {self.path} exists and is not a directory") from None
            except OSError as e:
                raise RunDirectoryError(f"--out {self.path}: cannot create the run directory: {e.strerror}") from None
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise RunDirectoryError(f"--out {self.path}: cannot create the lock file: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise RunDirectoryError(f"--out {self.path}: cannot lock {lock}: {e.strerror}") from None
                raise RunDirectoryError(f"--out {self.path} is in use by another run ({holder}); wait for it to "
                                        "finish or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed this file after we opened it
                os.close(fd)
                continue
            self._fd = fd
            _write_holder(fd)
            return
        raise RunDirectoryError(f"--out {self.path}: could not lock {lock} (it keeps being removed)")

    def _unlock(self) -> None:
        if self._fd is None:
            return
        (self.path / LOCK_NAME).unlink(missing_ok=True)  # still ours: nobody else holds it
        os.close(self._fd)
        self._fd = None
        if self._created:
            try:
                self.path.rmdir()  # the run wrote nothing: leave no empty folder behind
            except OSError:
                pass

    def _remove_stale_temporaries(self) -> None:
        for p in self.path.iterdir():
            if TEMP.fullmatch(p.name) and p.is_file():
                p.unlink(missing_ok=True)


def _write_holder(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(holder) + "\n").encode())


def _read_holder(fd: int) -> str:
    """The lock holder as text (pid, host, since, command), or a plain note when it has not written itself yet."""
    try:
        h = json.loads(os.pread(fd, 65536, 0))
        return f"pid {h['pid']} on {h['host']} since {h['since']}: {h['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet recorded itself"
