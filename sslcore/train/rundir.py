"""A run directory that one run holds at a time, holding only what sslcore wrote there.

* **Lock.** ``OUT/.sslcore-lock`` is locked with ``fcntl.flock`` for the whole run (training, probes,
  summary); the holder's pid, host, start time and command are written into it.  A second run on the
  same folder fails at once, naming the holder.  The kernel drops the lock when the holder dies (even on
  SIGKILL), so a crashed run never blocks the next one.  The lock file is opened without following a link
  and must be a regular file; it is removed when the run ends (a process that opened it just before is
  told so by its inode and tries again).
* **Manifest.** ``OUT/.sslcore-run.json`` lists every file the runs in the folder wrote (:data:`RUN_FILES`
  and each TensorBoard event file), recorded before the file is made (an event file: as soon as TensorBoard's
  writer has made it; a run killed in between leaves a file the manifest lacks, so the folder is refused).
  ``--overwrite`` removes only those: a folder holding anything else (a user's notes, another experiment's
  events, a project's sources) is refused, naming the files, and so is a link where sslcore writes.
* **The old run survives until the new one has a checkpoint.** ``--overwrite`` moves the previous run's
  files into ``OUT/.sslcore-previous/`` (:meth:`RunDirectory.set_aside_previous`, called once the new run
  has its data and model); they are deleted when the new run has written its first checkpoint
  (:meth:`RunDirectory.committed`) and put back if it fails before that.  A run killed in between leaves
  that folder: the next run on ``OUT`` finishes the job (puts the old run back, or deletes it if the new run
  had reached its checkpoint) once it holds the lock.
* **Refusals change nothing.** Checks run before anything is written; a refused run leaves the folder as
  it was.  Stale temporaries (``.NAME.<pid>.sslcore.tmp`` of a run's own files, see
  :func:`sslcore.files.atomic_write`) are removed only once the lock is held and the folder accepted.

See docs/architecture.md, "What sslcore writes".
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shlex
import shutil
import socket
import stat
import sys
from pathlib import Path

from ..files import NOFOLLOW, TEMP, atomic_write

LOCK_NAME = ".sslcore-lock"
MANIFEST = ".sslcore-run.json"
PREVIOUS = ".sslcore-previous"
TENSORBOARD = "tensorboard"
RUN_FILES = ("checkpoint.pt", "config.yaml", "metrics.jsonl", "steps.jsonl", "summary.json")  # sorted
MANIFEST_FORMAT = "sslcore-run-files"


class RunDirectoryError(ValueError):
    """The run directory is unusable, held by another run, or holds files this run must not replace."""


def _listing(names, limit: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_manifest(folder: Path) -> list[str] | None:
    """The files a folder's manifest lists (relative paths), or None without a (valid) manifest."""
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return [f for f in files if _plain_relative(f)]


def _plain_relative(name: str) -> bool:
    """A manifest entry sslcore could have written: ``NAME`` or ``tensorboard/NAME``, nothing that climbs out."""
    parts = Path(name).parts
    return (len(parts) == 1 and parts[0] in RUN_FILES) or (len(parts) == 2 and parts[0] == TENSORBOARD
                                                            and parts[1] not in ("", ".", ".."))


class RunDirectory:
    """Context manager holding ``out`` for one run (see the module docstring); ``enabled=False`` (the
    other ranks of a distributed run) makes it a no-op.  ``continuing``: this run resumes the checkpoint in
    ``out``, so the folder may hold that run's files (and others: a resume deletes nothing)."""

    def __init__(self, out, *, continuing: bool = False, overwrite: bool = False, enabled: bool = True):
        self.path, self.continuing, self.overwrite, self.enabled = Path(out), continuing, overwrite, enabled
        self._fd, self._created, self._aside, self._files = None, False, False, []

    # -- entering: lock, recover, check ---------------------------------------------------------------

    def __enter__(self) -> "RunDirectory":
        if not self.enabled:
            return self
        self._lock()
        try:
            self._recover_interrupted_overwrite()
            self._check_contents()
            self._remove_stale_temporaries()
            self._files = (read_manifest(self.path) or []) if self.continuing else []
        except BaseException:
            self._unlock()
            raise
        return self

    def _check_contents(self) -> None:
        """Refuse a link where the run writes; a fresh run refuses any file, ``--overwrite`` any file that the
        manifest does not list."""
        links = [n for n in (*RUN_FILES, TENSORBOARD, MANIFEST, PREVIOUS) if (self.path / n).is_symlink()]
        if links:
            raise RunDirectoryError(f"--out {self.path} holds symbolic link(s) where a run writes: {_listing(links)}; "
                                    "sslcore never writes through one: remove them or choose another --out")
        if self.continuing:
            return
        held = [p.name for p in self.path.iterdir() if p.name != LOCK_NAME and not _own_temp(p)]
        if not held:
            return
        if not self.overwrite:
            shown = [n for n in held if n != MANIFEST] or held
            raise RunDirectoryError(
                f"--out {self.path} already holds {_listing(shown, 5)}: continue that run with --resume, replace it "
                "with --overwrite, or choose another --out")
        listed = read_manifest(self.path)
        if listed is None:
            raise RunDirectoryError(f"--out {self.path} holds {_listing(held, 5)} but no sslcore run's manifest "
                                    f"({MANIFEST}): --overwrite replaces only the files a run recorded there; "
                                    "move them away or choose another --out")
        foreign = [n for n in held if n not in (*listed, MANIFEST, TENSORBOARD)]
        events = self.path / TENSORBOARD
        if events.exists():
            if not events.is_dir():
                foreign.append(TENSORBOARD)
            else:
                foreign += [f"{TENSORBOARD}/{p.name}" for p in events.iterdir()
                            if f"{TENSORBOARD}/{p.name}" not in listed or p.is_symlink() or not p.is_file()]
        if foreign:
            raise RunDirectoryError(f"--out {self.path} holds files no sslcore run recorded there: "
                                    f"{_listing(foreign)}; --overwrite replaces only a previous run's own files: "
                                    "move these away or choose another --out")

    def _remove_stale_temporaries(self) -> None:
        for p in self.path.iterdir():
            if _own_temp(p):
                p.unlink(missing_ok=True)

    # -- the run's files ------------------------------------------------------------------------------

    def begin(self) -> None:
        """Record the run's own files in the manifest (before any is written)."""
        if self.enabled:
            self.record(*RUN_FILES)

    def record(self, *names: str) -> None:
        """Add ``names`` (relative to the folder) to the manifest, before they are made."""
        new = [n for n in names if n not in self._files]
        if self.enabled and new:
            self._files += new
            atomic_write(self.path / MANIFEST, (json.dumps({"format": MANIFEST_FORMAT, "files": self._files},
                                                           indent=1) + "\n").encode(), "run manifest")

    def set_aside_previous(self) -> None:
        """With ``overwrite``: move the previous run's files aside (call it when the new run is ready to
        train); they are deleted at :meth:`committed` and put back if the run ends before it."""
        if not (self.enabled and self.overwrite):
            return
        listed = read_manifest(self.path) or []
        aside = self.path / PREVIOUS
        aside.mkdir()
        for name in [MANIFEST, *listed]:  # the manifest first: a run killed midway then restores, never deletes
            src = self.path / name
            if src.is_file() and not src.is_symlink():
                (aside / name).parent.mkdir(exist_ok=True)
                os.rename(src, aside / name)
        _remove_if_empty(self.path / TENSORBOARD)
        self._aside = True

    def committed(self) -> None:
        """The new run has its first checkpoint: the previous run's set-aside files go."""
        if self._aside:
            shutil.rmtree(self.path / PREVIOUS)
            self._aside = False

    def _restore_previous(self, new_files) -> None:
        """Remove the files this (failed) run wrote and put the previous run's back."""
        for name in [*new_files, MANIFEST]:
            p = self.path / name
            if p.is_file() and not p.is_symlink():
                p.unlink()
        _remove_if_empty(self.path / TENSORBOARD)
        aside = self.path / PREVIOUS
        for p in sorted(aside.rglob("*"), key=lambda q: len(q.parts)):
            dest = self.path / p.relative_to(aside)
            if p.is_dir():
                dest.mkdir(exist_ok=True)
            else:
                os.rename(p, dest)
        shutil.rmtree(aside)

    def _recover_interrupted_overwrite(self) -> None:
        """A run killed between setting the old run aside and its first checkpoint left ``PREVIOUS``: put the
        old run back, or drop it if the new run had its checkpoint."""
        aside = self.path / PREVIOUS
        if aside.is_symlink() or not aside.is_dir():
            return
        listed = read_manifest(self.path) or []
        if "checkpoint.pt" in listed and (self.path / "checkpoint.pt").is_file():
            shutil.rmtree(aside)
        else:
            self._restore_previous(listed)

    # -- leaving ----------------------------------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled:
            return
        try:
            if self._aside:  # the run ended before its first checkpoint: the old run comes back
                self._restore_previous(self._files)
                self._aside = False
        finally:
            self._unlock()

    # -- the lock ---------------------------------------------------------------------------------------

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
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | NOFOLLOW | os.O_NONBLOCK, 0o644)
            except FileNotFoundError:
                continue
            except OSError as e:
                why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
                raise RunDirectoryError(f"--out {self.path}: cannot open the lock file {lock}: {why}") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise RunDirectoryError(f"--out {self.path}: the lock file {lock} is not a regular file; remove it")
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
                same = os.fstat(fd).st_ino == os.stat(lock, follow_symlinks=False).st_ino
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


def _own_temp(p: Path) -> bool:
    """A temporary file a run's :func:`atomic_write` left behind (a run file's, or the manifest's)."""
    m = TEMP.fullmatch(p.name)
    return bool(m) and m.group("name") in (*RUN_FILES, MANIFEST) and p.is_file() and not p.is_symlink()


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


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
