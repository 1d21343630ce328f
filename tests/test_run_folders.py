"""A run folder holds only what sslcore wrote: ``--overwrite`` removes a previous run's recorded files and
nothing else, never through a link, a refused run leaves the folder as it was, and the old run survives
until the new one has its first checkpoint (each case is a defect of the 2026-12-07 reliability review)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from PIL import Image

import sslcore.train.loop as loop
from sslcore.cli import main
from sslcore.train import load_checkpoint
from sslcore.train.rundir import LOCK_NAME, MANIFEST, PREVIOUS, RunDirectory, read_manifest

TINY = ["--data", "shapes:n=32,test=16,size=8", "--epochs", "1", "--batch-size", "16", "--backend", "torch"]


def _cli(*args):
    """The exit status of ``sslcore ARGS`` (usage errors exit through SystemExit)."""
    try:
        return main(list(args))
    except SystemExit as e:
        return e.code


def _pretrain(out, *args):
    return _cli("pretrain", *TINY, "--out", str(out), *args)


@pytest.fixture(autouse=True)
def no_probes(monkeypatch):
    monkeypatch.setattr(loop, "probe", lambda data, encoder, **kw: {"linear": 0.0, "knn": 0.0})


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    assert _pretrain(out, "--epochs", "2") == 0
    return out


def _state(folder):
    """Every entry under ``folder``: files by content, links by target, folders by name."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


def _user_folder(root):
    """A folder of a user's own files, named like a run's (the review's defect 1)."""
    u = root / "u"
    (u / "tensorboard" / "otherexp").mkdir(parents=True)
    (u / "config.yaml").write_text("mine: 1\n")
    (u / "summary.json").write_text("{}")
    (u / "metrics.jsonl").write_text("x\n")
    (u / "tensorboard" / "otherexp" / "events.out").write_text("ev")
    (u / "notes.txt").write_text("n")
    return u


def test_overwrite_refuses_a_folder_no_run_recorded_and_touches_nothing(tmp_path, capsys):
    u = _user_folder(tmp_path)
    (u / ".lock").write_text("another tool's lock")
    (u / ".data.1234.tmp").write_text("another tool's temp")
    before = _state(u)
    for extra in ([], ["--overwrite"]):
        assert _pretrain(u, *extra) == 2
        assert _state(u) == before, "a refused run changed the folder"
    err = capsys.readouterr().err
    assert "already holds" in err and f"no sslcore run's manifest ({MANIFEST})" in err


def test_overwrite_names_files_the_manifest_does_not_list(finished, capsys):
    (finished / "notes.txt").write_text("mine")
    (finished / "tensorboard" / "otherexp").mkdir()
    (finished / "tensorboard" / "events.out.tfevents.other").write_text("theirs")
    before = _state(finished)
    assert _pretrain(finished, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "holds files no sslcore run recorded there: notes.txt, tensorboard/events.out.tfevents.other, " \
           "tensorboard/otherexp" in err
    assert _state(finished) == before


def test_the_manifest_lists_exactly_what_the_run_wrote(finished):
    listed = read_manifest(finished)
    written = {str(p.relative_to(finished)) for p in finished.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(listed) == written and any(n.startswith("tensorboard/events.out.tfevents.") for n in listed)
    assert _pretrain(finished, "--overwrite", "--seed", "3") == 0  # replaces exactly those
    assert load_checkpoint(finished / "checkpoint.pt")["config"]["seed"] == 3
    assert not (finished / PREVIOUS).exists() and len(list((finished / "tensorboard").iterdir())) == 1


@pytest.mark.parametrize("name", [LOCK_NAME, "checkpoint.pt", "metrics.jsonl", "tensorboard", MANIFEST])
def test_a_link_where_a_run_writes_is_refused_and_its_target_untouched(finished, tmp_path, name, capsys):
    precious = tmp_path / "precious"
    precious.mkdir() if name == "tensorboard" else precious.write_text("precious")
    target = finished / name
    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    target.symlink_to(precious)
    before, outside = _state(finished), _state(tmp_path)
    for args in (["--overwrite"], ["--resume", "--epochs", "3"]):
        assert _pretrain(finished, *args) == 2
    assert _state(finished) == before and _state(tmp_path) == outside
    assert "symbolic link" in capsys.readouterr().err


def _image_folder(root, bad: bool):
    for k in range(2):
        for i in range(12):
            path = root / f"c{k}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (9, 9), (20 * i, 100 * k, 7)).save(path)
    if bad:  # decoded lazily: fails in the first epoch, wherever the split puts them
        for k in range(2):
            for i in range(6):
                (root / f"c{k}" / f"{i}.png").write_bytes(os.urandom(64))


def test_overwrite_by_a_run_that_fails_before_its_first_checkpoint_restores_the_old_run(finished, tmp_path, capsys):
    _image_folder(tmp_path / "imgs", bad=True)
    before = _state(finished)
    code = _cli("pretrain", "--data", f"imagefolder:{tmp_path / 'imgs'},size=8", "--epochs", "1", "--batch-size", "8",
                "--backend", "torch", "--workers", "0", "--out", str(finished), "--overwrite")
    assert code == 2 and "cannot decode" in capsys.readouterr().err
    assert _state(finished) == before, "the old run is not whole again"


def test_a_run_killed_while_the_old_run_is_aside_gets_it_back_on_the_next_start(finished):
    before = _state(finished)
    run = RunDirectory(finished, overwrite=True).__enter__()
    run.set_aside_previous()
    run.begin()
    (finished / "config.yaml").write_text("the new run's")  # then SIGKILL: no __exit__, the kernel drops the lock
    os.close(run._fd)
    with RunDirectory(finished, continuing=True):
        pass
    assert _state(finished) == before


def test_a_run_killed_after_its_first_checkpoint_keeps_it_and_drops_the_old_run(finished):
    run = RunDirectory(finished, overwrite=True).__enter__()
    run.set_aside_previous()
    run.begin()
    (finished / "checkpoint.pt").write_bytes(b"the new run's checkpoint")
    os.close(run._fd)  # killed before the old run's files were deleted
    with RunDirectory(finished, continuing=True):
        pass
    assert not (finished / PREVIOUS).exists()
    assert (finished / "checkpoint.pt").read_bytes() == b"the new run's checkpoint"
    assert not (finished / "summary.json").exists()


def test_a_manifest_cannot_name_files_outside_the_run(finished, tmp_path, capsys):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    manifest = json.loads((finished / MANIFEST).read_text())
    manifest["files"] += ["../outside.txt", "/etc/hostname", "tensorboard/../../outside.txt", "notes.txt"]
    (finished / MANIFEST).write_text(json.dumps(manifest))
    (finished / "notes.txt").write_text("mine")
    assert _pretrain(finished, "--overwrite") == 2
    assert "notes.txt" in capsys.readouterr().err and outside.read_text() == "keep"
    (finished / "notes.txt").unlink()
    assert _pretrain(finished, "--overwrite") == 0
    assert outside.read_text() == "keep"


def test_a_lock_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    """The review's defect 23: a FIFO named like the lock (opening it for writing would block, or fail with
    EINVAL); the run refuses, names it, and leaves it."""
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / LOCK_NAME)
    with pytest.raises(ValueError, match="is not a regular file"):
        with RunDirectory(out, continuing=False, overwrite=False, enabled=True):
            pass
    assert os.path.exists(out / LOCK_NAME) and not (out / LOCK_NAME).is_file()
