"""``--config`` replays a run as the README says (options given beside it win; settings the method
resolved are resolved again), config files cannot blow up or be misread, and a resume names where its
settings come from (the 2026-12-07 reliability review's defects 14, 16, 17, 19, 20, 26)."""
from __future__ import annotations

import time

import pytest
import torch
import yaml

from sslcore.cli import main
from sslcore.train import PretrainConfig, load_checkpoint
from sslcore.train.config import DEFAULTED, build_config, read_config_file


def _written(tmp_path, **settings):
    """The config.yaml a run of ``settings`` writes."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(PretrainConfig(**settings).settings(), sort_keys=False))
    return str(path)


def test_config_yaml_says_which_settings_the_method_resolved(tmp_path):
    written = yaml.safe_load(open(_written(tmp_path, method="simclr")))
    assert written["temperature"] == 0.5 and written[DEFAULTED] == ["temperature"]
    assert yaml.safe_load(open(_written(tmp_path, method="simclr", temperature=0.3)))[DEFAULTED] == []


def test_options_beside_a_replayed_config_win(tmp_path):
    path = _written(tmp_path, method="simclr")
    assert build_config({"options": {"temperature": 0.2}}, config_file=path).temperature == 0.2
    assert build_config({"temperature": 0.3}, config_file=path).temperature == 0.3
    assert build_config({"method": "moco"}, config_file=path).temperature == PretrainConfig(method="moco").temperature
    assert build_config({"method": "mae", "data": "digits"}, config_file=path).temperature is None
    given = _written(tmp_path, method="simclr", temperature=0.3)  # a temperature the user gave is kept
    assert build_config({}, config_file=given).temperature == 0.3
    assert build_config({"method": "moco"}, config_file=given).temperature == 0.3


@pytest.mark.parametrize("text, message", [
    (b"\x98\x00\x01binary", "is not a text file"),
    (b"seed: 1\nseed: 2\n", "the setting 'seed' is given twice"),
    (b"a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nseed: *b\n",
     "aliases (*name) are not allowed"),
    (b"defaulted: [nonsense]\n", "defaulted must list settings"),
])
def test_a_bad_config_file_is_named_with_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=f"--config {path}") as e:
        read_config_file(str(path))
    assert message in str(e.value) and time.perf_counter() - t0 < 5


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    argv = ["pretrain", "--data", "shapes:n=32,test=16,size=8", "--epochs", "1", "--batch-size", "16", "--backend",
            "torch", "--out", str(out)]
    assert main(argv) == 0
    return out / "checkpoint.pt"


def test_resuming_a_cuda_fp16_run_on_a_cpu_machine_says_where_the_settings_come_from(finished, edit_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the checkpoint's device is available")
    config = {**load_checkpoint(finished)["config"], "device": "cuda", "precision": "fp16"}
    edited = edit_checkpoint(finished, finished, config=config)
    with pytest.raises(ValueError, match="takes --device cuda and --precision fp16 from the checkpoint's run: give "
                                         "--device cpu"):
        build_config({"resume": str(edited), "epochs": 2})
    assert build_config({"resume": str(edited), "epochs": 2, "device": "cpu", "precision": "fp32"}).device == "cpu"


def test_a_nan_optimizer_state_is_named_not_blamed_on_the_options(finished, edit_checkpoint, capsys):
    optimizer = load_checkpoint(finished)["optimizer"]
    first = next(iter(optimizer["state"]))
    optimizer["state"][first]["exp_avg"] = torch.full_like(optimizer["state"][first]["exp_avg"], float("nan"))
    edit_checkpoint(finished, finished, optimizer=optimizer)
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--resume", str(finished), "--epochs", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'exp_avg'" in err and "holds NaN or Inf (the optimizer state is damaged" in err
    assert "--lr" not in err
