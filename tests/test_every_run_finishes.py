"""Every run can finish: probes adapt to small data and to one class, ``summary.json`` is always written,
``--resume`` of a run whose probes never ran runs them, and a signal in the probes (or in the last step)
stops cleanly with a resumable checkpoint (the 2026-12-07 reliability review's defects 11, 12 and 15)."""
from __future__ import annotations

import json
import os
import signal

import pytest
from PIL import Image

import sslcore.train.loop as loop
from sslcore.cli import main
from sslcore.train import load_checkpoint


def _cli(*args):
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def _folder(root, classes: int, per_class: int):
    for k in range(classes):
        for i in range(per_class):
            path = root / f"c{k}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (9, 9), (15 * i, 100 * k, 7)).save(path)
    return root


def _pretrain(data, out, *args):
    return _cli("pretrain", "--data", data, "--epochs", "2", "--batch-size", "4", "--backend", "torch",
                "--out", out, *args)


@pytest.mark.parametrize("classes, per_class", [(1, 15), (2, 10)])
def test_small_or_one_class_data_trains_probes_and_writes_its_summary(tmp_path, classes, per_class):
    """Fewer than 20 training images (scikit-learn's k-NN asked for 20 neighbours) or one class (its
    logistic regression refused): the probes adapt and the summary is written."""
    data = f"imagefolder:{_folder(tmp_path / 'imgs', classes, per_class)},size=8"
    assert _pretrain(data, tmp_path / "run", "--baselines") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for probes in summary["probes"].values():
        assert {"linear", "knn"} <= probes.keys() and all(0 <= v <= 1 for v in probes.values())
    if classes == 1:  # one class: every classifier predicts it, and every test image has it
        assert summary["probes"]["trained"]["linear"] == 1.0


@pytest.fixture
def data(tmp_path):
    return f"imagefolder:{_folder(tmp_path / 'imgs', 2, 10)},size=8"


def test_resume_of_a_run_that_died_in_its_probes_runs_them(tmp_path, data, monkeypatch, capsys):
    real = loop.probe

    def dies(*a, **kw):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(loop, "probe", dies)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        _pretrain(data, out)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2 and not (out / "summary.json").exists()
    loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    monkeypatch.setattr(loop, "probe", real)
    assert _cli("pretrain", "--resume", out / "checkpoint.pt") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] == loss and summary["probes"]["trained"]["knn"] >= 0
    assert _cli("pretrain", "--resume", out / "checkpoint.pt") == 2  # now nothing is missing
    assert "leaves nothing to train" in capsys.readouterr().err


@pytest.mark.parametrize("when", ["probes", "last step"])
def test_a_signal_in_the_probes_or_the_last_step_stops_cleanly(tmp_path, data, monkeypatch, capsys, when):
    real_probe, real_forward, calls = loop.probe, loop._MethodLoss.forward, []

    def probe(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_probe(*a, **kw)

    def forward(self, views, **kw):
        calls.append(1)
        if len(calls) == 2 * (16 // 4):  # the last step of the last epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, views, **kw)

    if when == "probes":
        monkeypatch.setattr(loop, "probe", probe)
    else:
        monkeypatch.setattr(loop._MethodLoss, "forward", forward)
    out = tmp_path / "run"
    assert _pretrain(data, out) == 130
    err = capsys.readouterr().err
    assert "stopped before the probes of epoch 2 finished" in err and "--resume" in err and "Traceback" not in err
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2 and not (out / "summary.json").exists()
    monkeypatch.setattr(loop, "probe", real_probe)
    assert _cli("pretrain", "--resume", out / "checkpoint.pt") == 0 and (out / "summary.json").exists()


def test_a_metrics_line_cut_short_does_not_block_resume(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert _pretrain(data, out, "--epochs", "1") == 0
    metrics = out / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:-20])  # a kill during the append
    assert _cli("pretrain", "--resume", out / "checkpoint.pt", "--epochs", "2") == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [2]
    metrics.write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')  # damage inside: named, never guessed
    assert _cli("pretrain", "--resume", out / "checkpoint.pt", "--epochs", "3") == 2
    assert f"{metrics} line 2 is damaged" in capsys.readouterr().err
