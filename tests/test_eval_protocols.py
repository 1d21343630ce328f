"""``sslcore eval --protocol linear|finetune`` on a tiny digits checkpoint, from Python and from the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from sslcore.cli import main
from sslcore.train import PretrainConfig, load_checkpoint, pretrain
from sslcore.train.protocols import check_protocol_args, evaluate_protocol, results_path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    pretrain(PretrainConfig(out=str(out), epochs=1, batch_size=32, limit=64, backend="torch", online_linear=False))
    return out / "checkpoint.pt"


def test_linear_protocol_learns_writes_its_file_and_leaves_the_backbone(ckpt, monkeypatch):
    import sslcore.train.protocols as protocols

    loaded = {}
    real_load = protocols.load_encoder

    def load_and_keep(*args):  # the model the protocol trains on, to check that it stays frozen
        model, c, data = real_load(*args)
        loaded["model"] = model
        return model, c, data

    monkeypatch.setattr(protocols, "load_encoder", load_and_keep)
    r = evaluate_protocol(ckpt, "linear", epochs=2, batch_size=128, seed=1)
    saved = load_checkpoint(ckpt)["model"]
    assert all(torch.equal(v.cpu(), saved[k]) for k, v in loaded["model"].state_dict().items())  # BN stats too
    assert r["top1"] > 0.3 and r["top5"] >= r["top1"]  # 10 classes: chance is 0.1
    assert (r["protocol"], r["epochs"], r["batch_size"], r["lr"], r["weight_decay"]) == ("linear", 2, 128, 0.1, 0.0)
    path = results_path(ckpt, "linear")
    assert path == ckpt.parent / "eval-linear.json" and json.loads(path.read_text()) == r
    again = evaluate_protocol(ckpt, "linear", epochs=2, batch_size=128, seed=1, write=False)
    assert again["top1"] == r["top1"]  # --seed fixes order, crops and init
    with pytest.raises(ValueError, match="--protocol linear's results file .* already exists"):  # never overwritten
        evaluate_protocol(ckpt, "linear", epochs=1)
    assert json.loads(path.read_text()) == r
    other = ckpt.parent / "eval-finetune.json"
    other.write_text("someone's notes\n")  # a file sslcore did not write is kept even with --overwrite
    with pytest.raises(ValueError, match="is not an eval-finetune results file sslcore wrote"):
        evaluate_protocol(ckpt, "finetune", epochs=1, overwrite=True)
    other.unlink()


def test_finetune_protocol_trains_the_encoder(ckpt, monkeypatch):
    import sslcore.train.protocols as protocols

    loaded = {}
    real_load = protocols.load_encoder
    monkeypatch.setattr(protocols, "load_encoder", lambda *a: loaded.setdefault("r", real_load(*a)))
    r = evaluate_protocol(ckpt, "finetune", epochs=1, batch_size=128, write=False)
    saved = load_checkpoint(ckpt)["model"]
    model = loaded["r"][0]
    changed = [k for k, v in model.encoder.state_dict().items() if not torch.equal(v.cpu(), saved[f"encoder.{k}"])]
    projector = model.projector.state_dict().items()
    assert changed and all(torch.equal(v.cpu(), saved[f"projector.{k}"]) for k, v in projector)
    assert r["optimizer"] == "adamw" and r["peak_lr"] == pytest.approx(1e-3 * 128 / 256) and 0.0 <= r["top1"] <= 1.0
    assert not results_path(ckpt, "finetune").exists()


def test_cli_eval_protocols(ckpt, capsys):
    assert main(["eval", "--checkpoint", str(ckpt), "--protocol", "finetune", "--epochs", "1", "--batch-size",
                 "256", "--lr", "0.002"]) == 0
    out = capsys.readouterr().out
    r = json.loads((ckpt.parent / "eval-finetune.json").read_text())
    assert "--protocol finetune" in out and f"top-1 {r['top1']:.2%}" in out and r["lr"] == 0.002


@pytest.mark.parametrize("args, message", [
    (["--protocol", "linear", "--epochs", "0"], "--epochs"),
    (["--protocol", "linear", "--lr", "-1"], "--lr must be a number in (0, 10], got -1.0"),
    (["--protocol", "finetune", "--weight-decay", "1.5"], "--weight-decay must be a number in [0, 1)"),
    (["--protocol", "probe", "--epochs", "3"], "--epochs set the training of --protocol linear or finetune"),
    (["--protocol", "sgd"], "invalid choice: 'sgd'"),
    (["--protocol", "linear", "--batch-size", "5000", "--overwrite"], "--batch-size 5000 is larger than the training"),
])
def test_cli_eval_protocol_errors_name_the_argument(ckpt, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", str(ckpt), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not list(ckpt.parent.glob("eval-*.json.tmp"))


def test_protocol_settings():
    assert check_protocol_args("probe") == {}
    assert check_protocol_args("linear", epochs=5) == {"epochs": 5, "lr": 0.1, "batch_size": 256, "weight_decay": 0.0}
    with pytest.raises(ValueError, match="--protocol must be one of probe, linear, finetune"):
        check_protocol_args("knn")
    with pytest.raises(ValueError, match="--epochs must be an integer >= 1, got 2.5"):
        check_protocol_args("linear", epochs=2.5)
