"""Issue 13's guarantees: no run clobbers another, bad input gets a clear error naming the argument
before any work, checkpoints are verified, fits are atomic.  CLI cases run in-process through
``sslcore.cli.main`` on tiny data; probes are stubbed out where they are not the subject."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import sslcore.train.loop as loop
from sslcore.cli import main
from sslcore.methods import METHODS
from sslcore.train import load_checkpoint
from sslcore.train.rundir import LOCK_NAME, RunDirectory

SHAPES = "shapes:n=32,test=16,size=8"
TEXT = "pystdlib:16:4"
TINY = ["--data", SHAPES, "--epochs", "1", "--batch-size", "16", "--backend", "torch"]


def _pretrain(out, *args):
    return main(["pretrain", *TINY, "--out", str(out), *args])


@pytest.fixture
def no_probes(monkeypatch):
    """The trainer's three probes return a constant (they are not what these tests check)."""
    monkeypatch.setattr(loop, "probe", lambda data, encoder: {"linear": 0.0, "knn": 0.0})


@pytest.fixture
def no_work(monkeypatch):
    """Data loading fails the test: the case must be refused before it."""
    def load(spec):
        raise AssertionError(f"loaded --data {spec} before refusing the run")
    monkeypatch.setattr(loop, "load_dataset", load)


@pytest.fixture
def finished(tmp_path_factory, no_probes):
    """A finished 2-epoch tiny run's folder (probes stubbed)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _pretrain(out, "--epochs", "2") == 0
    return out


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# ---------------------------------------------------------------------------------------------
# 1. Data lost: one run per folder, no silent reuse, no stale temporaries.


def test_a_second_run_on_a_held_folder_fails_at_once_naming_the_holder(tmp_path, capsys, no_work):
    out = tmp_path / "run"
    with RunDirectory(out):
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["command"]
        with pytest.raises(SystemExit) as exc:
            _pretrain(out)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"--out {out} is in use by another run (pid {os.getpid()} on " in err
    assert not out.exists()  # the lock file goes with its holder, and so does the folder it created


def test_a_killed_holder_leaves_the_folder_free(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(out / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        with pytest.raises(ValueError, match="is in use by another run"):
            RunDirectory(out).__enter__()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with RunDirectory(out):  # the kernel released the dead process's lock
        assert (out / LOCK_NAME).exists()


def test_a_fresh_run_into_a_finished_run_is_refused_and_overwrite_waits_until_ready(finished, capsys):
    before = _files(finished)
    with pytest.raises(SystemExit) as exc:
        _pretrain(finished, "--seed", "1")
    assert exc.value.code == 2
    assert "already holds checkpoint.pt, metrics.jsonl, summary.json: continue that run with --resume, replace " \
           "it with --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused after the lock and the data, before the first step
        _pretrain(finished, "--seed", "1", "--overwrite", "--batch-size", "64")
    assert "larger than the training set" in capsys.readouterr().err
    assert _files(finished) == before  # nothing of the old run was touched

    assert _pretrain(finished, "--seed", "1", "--overwrite") == 0
    assert load_checkpoint(finished / "checkpoint.pt")["config"]["seed"] == 1
    assert [json.loads(line)["epoch"] for line in (finished / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((finished / "summary.json").read_text())["epochs"] == 1
    assert sorted(_files(finished)) == ["checkpoint.pt", "metrics.jsonl", "summary.json"]


def test_stale_temporaries_of_dead_writers_are_removed_at_start(finished, no_probes):
    stale = finished / ".checkpoint.pt.999999.tmp"
    stale.write_bytes(b"half a checkpoint")
    (finished / ".summary.json.12.tmp").write_bytes(b"{")
    assert _pretrain(finished, "--epochs", "3", "--resume") == 0
    assert sorted(p.name for p in finished.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "summary.json"]


# ---------------------------------------------------------------------------------------------
# Eval: every method on the data it trains on; data of the other kind refused before loading.


@pytest.mark.parametrize("method", sorted(METHODS))
def test_eval_works_for_every_method_on_its_data(method, tmp_path, capsys, no_probes):
    data = SHAPES if "image" in METHODS[method].data_kinds else TEXT
    out = tmp_path / "run"
    assert main(["pretrain", "--method", method, "--data", data, "--epochs", "1", "--batch-size", "16",
                 "--limit", "16", "--backend", "torch", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    assert f"{method} on {data} (trained on {data}), epoch 1" in capsys.readouterr().out
    other = TEXT if data == SHAPES else SHAPES
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data", other])
    assert exc.value.code == 2 and f"--data {other} is" in capsys.readouterr().err


def test_eval_on_token_data_of_another_shape_says_what_differs(tmp_path, capsys, no_probes):
    assert main(["pretrain", "--method", "ar", "--data", TEXT, "--epochs", "1", "--batch-size", "16",
                 "--encoder", "transformer-tiny", "--out", str(tmp_path)]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--data", "pystdlib:32:4"])
    assert exc.value.code == 2 and "pystdlib has sequences of 32 tokens over a vocabulary of 256" in \
        capsys.readouterr().err


def test_lock_holder_is_reported_even_before_it_wrote_itself(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        start = time.perf_counter()
        with pytest.raises(ValueError, match="a process that has not yet recorded itself"):
            RunDirectory(out).__enter__()
        assert time.perf_counter() - start < 5  # refused at once, not after waiting
    finally:
        os.close(fd)
