"""Issue 13's guarantees: no run clobbers another, bad input gets a clear error naming the argument
before any work, checkpoints are verified, fits are atomic.  CLI cases run in-process through
``sslcore.cli.main`` on tiny data; probes are stubbed out where they are not the subject."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import sslcore.files as files
import sslcore.train.loop as loop
from sslcore import InfoNCELoss, KMeans, NTXentLoss
from sslcore.checks import describe
from sslcore.cli import main
from sslcore.layers import DContraNorm
from sslcore.methods import MAE, METHODS, option_parameters
from sslcore.methods.arcl import ArCL
from sslcore.metrics import tcas
from sslcore.models import SmallCNN
from sslcore.tokenizers import PixelTokenizer
from sslcore.train import CheckpointError, PretrainConfig, load_checkpoint, pretrain, save_checkpoint
from sslcore.train.config import TRAINER_OPTIONS
from sslcore.train.rundir import LOCK_NAME, MANIFEST, RUN_FILES, RunDirectory

SHAPES = "shapes:n=32,test=16,size=8"
TEXT = "pystdlib:16:4"
TINY = ["--data", SHAPES, "--epochs", "1", "--batch-size", "16", "--backend", "torch"]


_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8"
                     "cfc0000003010100c9fe92ef0000000049454e44ae426082")  # a 1x1 RGB PNG


def _pretrain(out, *args):
    return main(["pretrain", *TINY, "--out", str(out), *args])


@pytest.fixture
def no_probes(monkeypatch):
    """The trainer's three probes return a constant (they are not what these tests check)."""
    monkeypatch.setattr(loop, "probe", lambda data, encoder, **kw: {"linear": 0.0, "knn": 0.0})


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
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# 2. Bad input: a usage error naming the argument, before data loading, model building or any file.


@pytest.mark.parametrize("args, message", [
    (["-o", "proj_dim=abc"], "'proj_dim' of method 'simclr' must be an integer in [1, 16384] or None, got 'abc'"),
    (["-o", "proj_dim=-5"], "option 'proj_dim' of method 'simclr' must be an integer in [1, 16384] or None, got -5"),
    (["-o", "proj_dim=0"], "proj_dim' of method 'simclr' must be an integer in [1, 16384] or None, got 0"),
    (["-o", "proj_dim=1.5"], "proj_dim' of method 'simclr' must be an integer in [1, 16384] or None, got 1.5"),
    (["-o", "proj_dim=true"], "proj_dim' of method 'simclr' must be an integer in [1, 16384] or None, got 'true'"),
    (["-o", "proj_hidden=1000000000"], "proj_hidden' of method 'simclr' must be an integer in [1, 16384]"),
    (["-o", "temperature=nan"], "-o temperature must be a number >= 1e-08, got 'nan'"),
    (["--method", "moco", "-o", "momentum=1.5"], "option 'momentum' of method 'moco' must be a number in [0, 1)"),
    (["--method", "arcl", "-o", "base=byol"], "option 'base' of method 'arcl' must be one of 'simclr', 'moco'"),
    (["--method", "mae", "-o", "norm_pix_loss=1"], "option 'norm_pix_loss' of method 'mae' must be True or False"),
    (["-o", "backend=triton"], "-o backend is set by the trainer (--backend)"),
    (["-o", "proj_dim=8", "-o", "proj_dim=16"], "-o proj_dim is given twice (8 and 16)"),
    (["--temperature", "0.1", "-o", "temperature=5"], "the temperature is given twice, --temperature 0.1 and -o"),
    (["--temperature", "1e-40"], "argument --temperature: must be a number >= 1e-08, got '1e-40'"),
    (["--method", "simsiam", "--temperature", "0.3"], "method 'simsiam' has no temperature"),
    (["--lr", "1e30"], "argument --lr: must be a number in (0, 1], got '1e30'"),
    (["--lr", "1e-3", "--weight-decay", "20000"],
     "peak learning rate 6.25e-05 (--lr 0.001 x 16 / 256) x --weight-decay 20000 must be < 1"),
    (["--weight-decay", "inf"], "argument --weight-decay: must be a number >= 0, got 'inf'"),
    (["--seed", str(2 ** 64)], "argument --seed: must be an integer in [-9223372036854775808, 18446744073709551615]"),
    (["--device", "meta"], "argument --device: 'meta': training and probes run on cpu, cuda or mps, not meta"),
    (["--device", "mps"], "argument --device: 'mps': this torch build or machine has no MPS device"),
    (["--batch-size", "1"], "--batch-size 1 is too small for simclr: it needs at least 2 samples per batch"),
    (["--method", "moco", "--batch-size", "1"], "--batch-size 1 is too small for moco"),
    (["--data", "shapes:size=3000"], "--data shapes:size=3000 needs about"),
    (["--data", "pystdlib"], "method 'simclr' trains on image data; --data pystdlib is tokens data"),
    (["--method", "mae", "--data", "text:/nowhere"], "method 'mae' trains on image data; --data text:/nowhere is"),
    (["--method", "ar", "--data", "digits"], "method 'ar' trains on tokens data; --data digits is image data"),
    (["--method", "ar", "--data", "imagetokens:pystdlib"], "'pystdlib' is token data; imagetokens tokenizes an image"),
    (["--resume", "--overwrite"], "--resume continues a run and --overwrite starts a new one: give one"),
])
def test_bad_arguments_are_refused_before_any_work(args, message, tmp_path, capsys, no_work):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        _pretrain(out, *args)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "imagefolder:{folder},size=1"], "--encoder smallcnn cannot take 3-channel 1x1 images: Given input"),
    (["--data", "digits", "--encoder", "vit_tiny_patch16_224"], "--encoder vit_tiny_patch16_224 cannot take "
     "1-channel 8x8 images: Input height (8) doesn't match model (224); a timm ViT's input size is fixed"),
    (["--encoder", "resnet18:drop_rate=abc"], "--encoder resnet18:drop_rate=abc cannot take 3-channel"),
])
def test_an_encoder_that_cannot_take_the_images_is_refused_before_training(args, message, tmp_path, capsys,
                                                                             monkeypatch):
    """These trained into a traceback (conv output 0x0, timm's ViT size assertion, dropout's float('abc'))."""
    for cls in ("a", "b"):
        for i in range(20):
            (tmp_path / "images" / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / "images" / cls / f"{i}.png").write_bytes(_PNG)
    monkeypatch.setattr(loop, "save_checkpoint", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(SystemExit) as exc:
        _pretrain(tmp_path / "run", *[a.format(folder=tmp_path / "images") for a in args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_the_encoder_check_changes_no_state():
    """The trial forward runs in train mode: BatchNorm statistics, the mode and the CPU random stream are restored,
    so a checked encoder trains exactly as an unchecked one."""
    from sslcore.models import create_encoder

    torch.manual_seed(0)
    plain = create_encoder("resnet18:small,drop_rate=0.5", in_chans=3).eval()
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    checked = create_encoder("resnet18:small,drop_rate=0.5", in_chans=3, image_shape=(3, 8, 8)).eval()
    assert torch.equal(torch.rand(3), after_plain) and not checked.training
    for (name, a), (_, b) in zip(plain.state_dict().items(), checked.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_device_count_is_checked(tmp_path, capsys, no_work):
    with pytest.raises(SystemExit):
        _pretrain(tmp_path / "run", "--device", f"cuda:{torch.cuda.device_count()}")
    assert "CUDA device(s)" in capsys.readouterr().err


def test_absent_cuda_and_triton_on_cpu_are_refused(tmp_path, capsys, no_work, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        _pretrain(tmp_path / "run", "--device", "cuda")
    assert "argument --device: 'cuda': CUDA is not available on this machine" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a CPU machine outside the test suite
    with pytest.raises(SystemExit):
        _pretrain(tmp_path / "run", "--backend", "triton", "--device", "cpu")
    assert "--backend triton on --device cpu: " in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["file", "under a file", "unwritable", "too long"])
def test_unusable_out_is_refused_before_any_work(kind, tmp_path, capsys, no_work):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    if kind == "unwritable":
        if os.geteuid() == 0:
            out = "/proc/sslcore-run"  # root writes anywhere else
        else:
            (tmp_path / "ro").mkdir(mode=0o555)
            out = tmp_path / "ro" / "run"
    else:
        out = {"file": a_file, "under a file": a_file / "run", "too long": tmp_path / ("x" * 300)}[kind]
    with pytest.raises(SystemExit) as exc:
        _pretrain(out)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"--out {out}" in err
    assert {"file": "is not a directory", "under a file": "Not a directory", "unwritable": "cannot create the run",
            "too long": "File name too long"}[kind] in err


def test_every_method_option_has_a_checkable_domain_holding_its_default():
    for name in METHODS:
        for key, p in option_parameters(name).items():
            assert describe(p.annotation), (name, key)  # raises for an annotation the checker does not know
            cfg = PretrainConfig(method=name, data=SHAPES if "image" in METHODS[name].data_kinds else TEXT,
                                 **({} if p.default is None or key in TRAINER_OPTIONS
                                    else {"options": {key: p.default}}))
            assert cfg.options == ({} if p.default is None or key in TRAINER_OPTIONS or key == "temperature"
                                   else {key: p.default})


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
    assert ("already holds checkpoint.pt, config.yaml, metrics.jsonl, steps.jsonl, summary.json and 1 more: continue "
            "that run with --resume, replace it with --overwrite") in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused after the lock and the data, before the first step
        _pretrain(finished, "--seed", "1", "--overwrite", "--batch-size", "64")
    assert "larger than the training set" in capsys.readouterr().err
    assert _files(finished) == before  # nothing of the old run was touched

    assert _pretrain(finished, "--seed", "1", "--overwrite") == 0
    assert load_checkpoint(finished / "checkpoint.pt")["config"]["seed"] == 1
    assert [json.loads(line)["epoch"] for line in (finished / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((finished / "summary.json").read_text())["epochs"] == 1
    assert sorted(p.name for p in finished.iterdir()) == sorted([*RUN_FILES, MANIFEST, "tensorboard"])
    assert len(list((finished / "tensorboard").iterdir())) == 1  # the old run's event file went with it


def test_stale_temporaries_of_dead_writers_are_removed_at_start(finished, no_probes):
    stale = finished / ".checkpoint.pt.999999.sslcore.tmp"
    stale.write_bytes(b"half a checkpoint")
    (finished / ".summary.json.12.sslcore.tmp").write_bytes(b"{")
    (finished / ".data.1234.tmp").write_bytes(b"another tool's")  # not sslcore's: it stays
    assert _pretrain(finished, "--epochs", "3", "--resume") == 0
    assert sorted(p.name for p in finished.iterdir()) == sorted([*RUN_FILES, MANIFEST, "tensorboard", ".data.1234.tmp"])


# ---------------------------------------------------------------------------------------------
# 3. Resume and checkpoints: nothing silently wrong.


def test_resume_with_no_epochs_left_is_refused(finished, capsys):
    for epochs in ("1", "2"):
        with pytest.raises(SystemExit) as exc:
            _pretrain(finished, "--epochs", epochs, "--resume")
        assert exc.value.code == 2
        assert f"has already trained 2 epochs, and --epochs {epochs} leaves nothing to train" in capsys.readouterr().err
    assert load_checkpoint(finished / "checkpoint.pt")["epoch"] == 2


def test_a_flipped_byte_is_detected(finished, tmp_path, capsys):
    good = load_checkpoint(finished / "checkpoint.pt")
    raw = bytearray((finished / "checkpoint.pt").read_bytes())
    at = bytes(raw).find(good["optimizer"]["state"][0]["exp_avg"].numpy().tobytes()[:64])  # inside a tensor's bytes
    assert at > 0
    raw[at + 10] ^= 0xFF
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(raw)
    assert torch.load(flipped, weights_only=True)["epoch"] == 2  # torch itself notices nothing
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--checkpoint", str(flipped)])
    assert exc.value.code == 2 and "do not match the checksum" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"epoch": -3}, "has epoch -3, outside 0..2"),
    ({"epoch": 10 ** 9}, "has epoch 1000000000, outside 0..2"),
    ({"epoch": 1.5}, "has epoch 1.5"),
    ({"config": None}, "has a config of type NoneType, not a dict"),
    ({"config": [1, 2]}, "has a config of type list, not a dict"),
    ("no data", "has a config without data"),
])
def test_malformed_checkpoints_are_refused_by_resume_and_eval(change, message, finished, tmp_path, capsys,
                                                              edit_checkpoint):
    src = finished / "checkpoint.pt"
    if change == "no data":
        change = {"config": {k: v for k, v in load_checkpoint(src)["config"].items() if k != "data"}}
    bad = edit_checkpoint(src, tmp_path / "bad.pt", **change)
    for argv in (["eval", "--checkpoint", str(bad)],
                 ["pretrain", *TINY, "--epochs", "3", "--out", str(tmp_path / "run"), "--resume", str(bad)]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_optimizer_state_of_the_wrong_shape_and_nan_weights_are_refused(finished, tmp_path, edit_checkpoint):
    good = load_checkpoint(finished / "checkpoint.pt")
    opt = good["optimizer"]
    wrong = {**opt, "state": {**opt["state"], 0: {**opt["state"][0], "exp_avg": torch.zeros(1)}}}
    cfg = dict(data=SHAPES, epochs=3, batch_size=16, backend="torch", out=str(tmp_path / "run"))
    bad = edit_checkpoint(finished / "checkpoint.pt", tmp_path / "opt.pt", optimizer=wrong)
    with pytest.raises(CheckpointError, match=r"state 'exp_avg' of parameter 0 has shape \(1,\), the parameter "):
        pretrain(PretrainConfig(resume=str(bad), **cfg))
    key = next(k for k, v in good["model"].items() if v.is_floating_point())
    nan = edit_checkpoint(finished / "checkpoint.pt", tmp_path / "nan.pt",
                          model={**good["model"], key: torch.full_like(good["model"][key], float("nan"))})
    with pytest.raises(CheckpointError, match=rf"model\['{key}'\] holds NaN or Inf"):
        pretrain(PretrainConfig(resume=str(nan), **cfg))


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A real ENOSPC from the kernel: the temporary file's writes go to /dev/full."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"the previous checkpoint")
    real = files.os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: (os.close(fd), real(os.open("/dev/full", os.O_WRONLY),
                                                                                   mode))[1])
    with pytest.raises(OSError, match="the disk is full: could not write the checkpoint") as exc:
        save_checkpoint(path, epoch=1)
    assert exc.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"the previous checkpoint" and sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_a_run_that_fills_the_disk_stops_with_a_clear_error(tmp_path, capsys, monkeypatch, no_probes):
    """The second checkpoint write fails half-way with ENOSPC; the first checkpoint stays whole."""
    writes = []

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            writes.append(len(data))
            if len(writes) == 2:
                self.f.write(bytes(data)[:len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real = files.os.fdopen

    def fdopen(fd, mode):  # the checkpoint's temporary file fills the disk; every other file is written
        f = real(fd, mode)
        return FullDisk(f) if "checkpoint" in os.readlink(f"/proc/self/fd/{fd}") else f

    monkeypatch.setattr(files.os, "fdopen", fdopen)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        _pretrain(out, "--epochs", "3")
    assert exc.value.code == 1
    assert "the disk is full: could not write the checkpoint" in capsys.readouterr().err
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1 and not list(out.glob(".*.tmp"))


def test_a_nan_loss_names_the_options_that_cause_it(tmp_path, capsys, monkeypatch, no_probes):
    real = loop._MethodLoss.forward
    monkeypatch.setattr(loop._MethodLoss, "forward", lambda self, views, **kw: real(self, views, **kw) * float("nan"))
    with pytest.raises(SystemExit) as exc:
        _pretrain(tmp_path / "nan-loss", "--lr", "0.5", "--limit", "16")  # one step: the epoch's mean is NaN
    assert exc.value.code == 1
    assert ("training diverged in epoch 1: its mean loss is nan; lower --lr (now 0.5) or raise --temperature "
            "(now 0.5)") in capsys.readouterr().err

    def poisoned(self, views, **kw):  # weights blown up after a step: the next forward's check trips
        with torch.no_grad():
            next(self.parameters()).fill_(float("inf"))
        return real(self, views, **kw)
    monkeypatch.setattr(loop._MethodLoss, "forward", poisoned)
    with pytest.raises(SystemExit) as exc:
        _pretrain(tmp_path / "nan-weights")
    assert "training diverged in epoch 1: the weights hold NaN or Inf at step 1; lower --lr" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Temperatures: each method's own unless --temperature is given; printed and in summary.json.


def test_each_method_keeps_its_own_temperature_unless_one_is_given(tmp_path, capsys, no_probes):
    defaults = {m: p["temperature"].default for m in METHODS if "temperature" in (p := option_parameters(m))}
    assert defaults["simclr"] == 0.5 and defaults["moco"] == 0.2 and defaults["arcl"] is None  # None: its base's
    defaults["arcl"] = 0.5
    for name in METHODS:
        data = SHAPES if "image" in METHODS[name].data_kinds else TEXT
        assert PretrainConfig(method=name, data=data).temperature == defaults.get(name)
    assert PretrainConfig(temperature=0.3).temperature == 0.3
    assert PretrainConfig(options={"temperature": 0.3}).temperature == 0.3
    # ArCL takes its base's temperature: MoCo's 0.2 over a MoCo base (was SimCLR's 0.5 for both)
    assert PretrainConfig(method="arcl", data=SHAPES, options={"base": "moco"}).temperature == 0.2
    assert ArCL(SmallCNN(), base="moco").base.temperature == 0.2 and ArCL(SmallCNN()).base.criterion.temperature == 0.5
    assert _pretrain(tmp_path / "moco", "--method", "moco", "-o", "queue_size=64") == 0
    assert "moco on shapes:n=32,test=16,size=8: 1 epochs at temperature 0.2" in capsys.readouterr().out
    assert json.loads((tmp_path / "moco" / "summary.json").read_text())["temperature"] == 0.2
    assert _pretrain(tmp_path / "simclr", "--temperature", "0.3") == 0
    assert json.loads((tmp_path / "simclr" / "summary.json").read_text())["temperature"] == 0.3


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


# ---------------------------------------------------------------------------------------------
# Library: errors name the argument; failed fits change nothing.


@pytest.mark.parametrize("call, message", [
    (lambda: NTXentLoss(temperature="0.5"), "temperature must be a number >= 1e-08, got '0.5'"),
    (lambda: NTXentLoss(temperature=1e-40), "temperature must be a number >= 1e-08"),
    (lambda: tcas(torch.tensor([0, 1]), torch.tensor([0, 1]), 10 ** 9, 10 ** 6),
     "n_tokens x n_classes = 1,000,000,000 x 1,000,000 count cells is more than"),
    (lambda: DContraNorm(8)(torch.full((4, 8), float("nan"))), "x contains NaN or Inf"),
    (lambda: DContraNorm(8)([[0.0] * 8] * 4), "x must be a tensor, got list"),
    (lambda: InfoNCELoss(memory_bank_size=2.5), "memory_bank_size must be an integer >= 0, got 2.5"),
    (lambda: InfoNCELoss()(None, torch.randn(2, 4)), "query must be a tensor, got NoneType"),
    (lambda: PixelTokenizer(2, 4, in_chans=-1), "in_chans must be an integer >= 1, got -1"),
    (lambda: tcas(torch.tensor([0, 1]), torch.tensor([0, 1]), 5.5, 3), "n_tokens must be an integer >= 1, got 5.5"),
    (lambda: tcas(torch.tensor([0, 1]), torch.tensor([0, 1]), 5, True), "n_classes must be an integer >= 1"),
    (lambda: MAE("vit_tiny_patch16_224", {"patch_size": 2, "in_chans": 1}, decoder_heads=5),
     "decoder_dim (64) must be a multiple of decoder_heads (5)"),
])
def test_library_errors_name_the_argument(call, message):
    with pytest.raises((ValueError, TypeError)) as exc:
        call()
    assert message in str(exc.value)


def test_kmeans_load_of_bad_files_names_the_file(tmp_path):
    km = KMeans(3, backend="torch").fit(torch.randn(40, 4))
    km.save(tmp_path / "km.pt")
    (tmp_path / "random.pt").write_bytes(os.urandom(256))
    state = torch.load(tmp_path / "km.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "init"}, tmp_path / "no_init.pt")
    torch.save({k: v for k, v in state.items() if k != "cluster_centers"}, tmp_path / "no_centres.pt")
    for name, message in (("missing.pt", "does not exist"), ("random.pt", "is corrupted or not a torch file"),
                          ("no_init.pt", "does not hold a KMeans state dict"),
                          ("no_centres.pt", "lacks cluster_centers")):
        with pytest.raises(ValueError, match=message) as exc:
            KMeans.load(tmp_path / name)
        assert name in str(exc.value)
    assert torch.equal(KMeans.load(tmp_path / "km.pt").cluster_centers_, km.cluster_centers_)


def test_failed_fits_leave_the_tokenizer_and_kmeans_as_they_were(monkeypatch):
    images = torch.rand(16, 1, 4, 4)
    tok = PixelTokenizer(2, 4, in_chans=1, backend="torch").fit(images, progress=False)
    state, tokens = {k: v.clone() for k, v in tok.state_dict().items()}, tok.encode(images)
    for bad in (torch.rand(1, 1, 2, 2) * 10, torch.full((8, 1, 4, 4), float("nan"))):  # too few patches; NaN
        with pytest.raises(ValueError):
            tok.fit(bad, progress=False)
        assert all(torch.equal(v, state[k]) for k, v in tok.state_dict().items())
        assert torch.equal(tok.encode(images), tokens)

    km = KMeans(3, backend="torch").fit(torch.randn(40, 4))
    before = dict(vars(km))

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted half-way")
    monkeypatch.setattr("sslcore.cluster.kmeans_update", fail)
    for step in (km.fit, km.partial_fit):
        with pytest.raises(RuntimeError, match="half-way"):
            step(torch.randn(30, 4) + 5)
        assert vars(km).keys() == before.keys() and all(vars(km)[k] is v for k, v in before.items())


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
