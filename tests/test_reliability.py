"""Issue 13's guarantees: no run clobbers another, bad input gets a clear error naming the argument
before any work, checkpoints are verified, fits are atomic.  CLI cases run in-process through
``sslcore.cli.main`` on tiny data; probes are stubbed out where they are not the subject."""
from __future__ import annotations

import pytest

import sslcore.train.loop as loop
from sslcore.cli import main
from sslcore.methods import METHODS

SHAPES = "shapes:n=32,test=16,size=8"
TEXT = "pystdlib:16:4"


@pytest.fixture
def no_probes(monkeypatch):
    """The trainer's three probes return a constant (they are not what these tests check)."""
    monkeypatch.setattr(loop, "probe", lambda data, encoder: {"linear": 0.0, "knn": 0.0})


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
