"""Trainer, checkpoints, probes and the ``sslcore`` CLI on tiny digits runs (torch loss backend, CPU)."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from sklearn.datasets import make_blobs

import sslcore.train.loop as loop
from sslcore.cli import main
from sslcore.data import load_dataset
from sslcore.methods import METHODS
from sslcore.models import create_encoder
from sslcore.train import (
    CheckpointError,
    PretrainConfig,
    TrainingInterrupted,
    evaluate_checkpoint,
    knn_accuracy,
    linear_classifier,
    linear_probe,
    load_checkpoint,
    pretrain,
    weighted_knn,
)

TINY = dict(epochs=2, batch_size=32, limit=64, backend="torch")


def _read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _without_time(rows):
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def _assert_same_online_head(a, b):
    """Two checkpoints' online linear heads (weights, BatchNorm statistics, momentum buffers) are equal."""
    flat_a, flat_b = (torch.cat([t.double() for t in _tensors(c["online_linear"])]) for c in (a, b))
    assert torch.equal(flat_a, flat_b)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj.flatten()]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted 2-epoch run, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("tiny")
    return out, pretrain(PretrainConfig(out=str(out), baselines=True, **TINY))


def test_pretrain_writes_metrics_summary_and_checkpoint(tiny_run):
    out, summary = tiny_run
    rows = _read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    online = {"online_linear_train_top1", "online_linear_top1"}  # on by default for image data
    assert all(set(r) == {"epoch", "loss", "lr", "time", *online} and math.isfinite(r["loss"]) for r in rows)
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in online)
    assert json.loads((out / "summary.json").read_text()) == summary
    for name in ("trained", "random_init", "raw_pixels"):
        assert set(summary["probes"][name]) == {"linear", "knn", "linear_top5", "knn_top5"}  # scikit-learn's: opt-in
        assert all(0.0 <= v <= 1.0 for v in summary["probes"][name].values())
    assert summary["augment"] == "digits" and summary["peak_lr"] == summary["base_lr"] * 32 / 256
    assert summary["environment"]["torch"] == torch.__version__ and summary["environment"]["timm"]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(r["img_s"] > 0 and r["mem_mib"] > 0 for r in steps)
    assert len({r["img_s"] for r in steps}) > 1  # each step's own rate, not one value repeated over a flush
    assert all(r["grad_norm"] > 0 for r in steps)  # on every step, without --clip-grad
    assert yaml.safe_load((out / "config.yaml").read_text()) == PretrainConfig(baselines=True, **TINY).settings()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["method"] == "simclr" and ckpt["config"]["limit"] == 64
    assert not list(out.glob("*.tmp"))  # the atomic write left no temp file


def test_resume_after_interruption_is_bit_identical(tiny_run, tmp_path, interrupted):
    full_out, _ = tiny_run
    interrupted(lambda: pretrain(PretrainConfig(out=str(tmp_path), **TINY)))  # killed after epoch 1's checkpoint
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1

    pretrain(PretrainConfig(out=str(tmp_path), resume="", **TINY))
    resumed, full = load_checkpoint(tmp_path / "checkpoint.pt"), load_checkpoint(full_out / "checkpoint.pt")
    assert resumed["epoch"] == 2
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert _without_time(_read_metrics(tmp_path)) == _without_time(_read_metrics(full_out))
    _assert_same_online_head(resumed, full)


def test_resume_restores_the_global_rng_for_random_masks(tmp_path, interrupted):
    """MAE draws its masks from torch's global RNG: the checkpoint carries that state too."""
    tiny = dict(TINY, method="mae")
    full = pretrain(PretrainConfig(out=str(tmp_path / "full"), **tiny))
    interrupted(lambda: pretrain(PretrainConfig(out=str(tmp_path / "cut"), **tiny)))
    torch.rand(100)  # whatever else draws from the global RNG in between must not matter
    resumed = pretrain(PretrainConfig(out=str(tmp_path / "cut"), resume="", **tiny))
    assert resumed["final_loss"] == full["final_loss"]
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt")["model"] for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["barlowtwins", "vicreg"])
def test_redundancy_reduction_methods_train_from_the_cli_and_resume_bit_identically(method, tmp_path, interrupted,
                                                                                      capsys, monkeypatch):
    """Barlow Twins and VICReg from the CLI on digits (BYOL's views, their defaults) and shapes; a run killed after
    epoch 1 resumes to the uninterrupted run's weights and BatchNorm statistics, bit for bit.  (Probes stubbed:
    they are the same for every method and tested above.)"""
    monkeypatch.setattr(loop, "probe", lambda data, encoder, **kw: {"linear": 0.0, "knn": 0.0})
    tiny = dict(TINY, method=method)
    assert main(["pretrain", "--method", method, "--epochs", "2", "--batch-size", "32", "--limit", "64",
                 "--backend", "torch", "--out", str(tmp_path / "full")]) == 0
    assert f"{method} on digits: 2 epochs" in capsys.readouterr().out
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert full["config"]["augment"] == "auto" and math.isfinite(_read_metrics(tmp_path / "full")[-1]["loss"])
    interrupted(lambda: pretrain(PretrainConfig(out=str(tmp_path / "cut"), **tiny)))
    pretrain(PretrainConfig(out=str(tmp_path / "cut"), resume="", **tiny))
    resumed = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert resumed["epoch"] == 2 and resumed["model"].keys() == full["model"].keys()
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert main(["pretrain", "--method", method, "--data", "shapes:noisy,n=64,test=40,size=16", "--epochs", "1",
                 "--batch-size", "32", "--backend", "torch", "--out", str(tmp_path / "shapes")]) == 0



@pytest.mark.parametrize("at_step", [1, 2])  # inside epoch 1; at epoch 1's last step (2 steps per epoch)
def test_ctrl_c_saves_a_checkpoint_that_resumes_bit_identically(at_step, tiny_run, tmp_path, monkeypatch):
    full_out, _ = tiny_run
    real_lr_at, calls = loop.lr_at, []

    def lr_at_then_ctrl_c(*args):  # the trainer calls lr_at once per step, before the step
        calls.append(1)
        if len(calls) == at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(*args)

    monkeypatch.setattr(loop, "lr_at", lr_at_then_ctrl_c)
    previous = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN under nohup / `make test &`
    with pytest.raises(TrainingInterrupted) as stop:
        pretrain(PretrainConfig(out=str(tmp_path), **TINY))
    assert len(calls) == at_step and (stop.value.epoch, stop.value.step) == ((1, 1) if at_step == 1 else (2, 0))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    if at_step == 1:
        assert ckpt["epoch"] == 0 and ckpt["position"]["step"] == 1 and ckpt["position"]["losses"].shape == (1,)
    else:
        assert ckpt["epoch"] == 1 and "position" not in ckpt
    assert signal.getsignal(signal.SIGINT) is previous  # the handler was put back
    monkeypatch.setattr(loop, "lr_at", real_lr_at)

    pretrain(PretrainConfig(out=str(tmp_path), resume="", **TINY))
    resumed, full = load_checkpoint(tmp_path / "checkpoint.pt"), load_checkpoint(full_out / "checkpoint.pt")
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert _without_time(_read_metrics(tmp_path)) == _without_time(_read_metrics(full_out))
    _assert_same_online_head(resumed, full)


def test_stop_request_puts_back_an_ignored_sigint():
    """A run started with SIGINT ignored (nohup, a background job) still stops on it and leaves it ignored."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with loop._StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_malformed_mid_epoch_position_is_refused(tiny_run, tmp_path, edit_checkpoint):
    bad = edit_checkpoint(tiny_run[0] / "checkpoint.pt", tmp_path / "bad.pt", epoch=1,
                          position={"step": 1, "perm": torch.arange(5), "losses": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="malformed mid-epoch position"):
        pretrain(PretrainConfig(out=str(tmp_path / "run"), resume=str(bad), **TINY))


def test_eval_on_another_dataset_or_domain(tmp_path, capsys):
    shapes = "shapes:plain,n=64,test=40,size=16"
    pretrain(PretrainConfig(out=str(tmp_path), **{**TINY, "data": shapes, "epochs": 1}))
    ckpt = str(tmp_path / "checkpoint.pt")
    r = evaluate_checkpoint(ckpt, data="shapes:outline,n=64,test=40,size=16")
    assert r["data"].startswith("shapes:outline") and r["trained_on"] == shapes and r["n_test"] == 40
    assert 0 <= r["linear"] <= 1 and 0 <= r["knn"] <= 1
    assert main(["eval", "--checkpoint", ckpt, "--data", "shapes:noisy,n=64,test=40,size=16"]) == 0
    assert "trained on " + shapes in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="trained on --data shapes.*digits has 1-channel"):
        evaluate_checkpoint(ckpt, data="digits")


def test_encoder_specs():
    small = create_encoder("resnet18:small", in_chans=3)
    assert small.conv1.stride == (1, 1) and small.conv1.kernel_size == (3, 3)
    x = torch.rand(2, 3, 32, 32)
    feats = []
    handle = small.layer4.register_forward_hook(lambda m, i, o: feats.append(o))
    assert small(x).shape == (2, 512) and feats[0].shape[-2:] == (4, 4)  # 32 / 8, not 1x1
    handle.remove()
    vit = create_encoder("vit_tiny_patch16_224:img_size=32,patch_size=4", in_chans=3)
    assert vit(x).shape == (2, vit.num_features)
    for spec, message in (("vit_tiny_patch16_224:small", "for timm ResNets"),
                          ("resnet18:wide", "unknown encoder option"),
                          ("smallcnn:small", "takes no options"), ("resnet18:depth=3", "does not take")):
        with pytest.raises(ValueError, match=message):
            create_encoder(spec, in_chans=3)


def test_resume_with_other_options_is_refused(tiny_run, tmp_path):
    out, _ = tiny_run
    lr = PretrainConfig().lr
    with pytest.raises(CheckpointError, match=re.escape(f"lr={lr!r} (now {2 * lr!r})")):
        pretrain(PretrainConfig(out=str(tmp_path), resume=str(out / "checkpoint.pt"), **{**TINY, "lr": 2 * lr}))


def test_bad_checkpoints_are_refused(tiny_run, tmp_path, edit_checkpoint):
    good = torch.load(tiny_run[0] / "checkpoint.pt", weights_only=True)
    missing = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(missing)

    garbage, truncated = tmp_path / "garbage.pt", tmp_path / "truncated.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    truncated.write_bytes((tiny_run[0] / "checkpoint.pt").read_bytes()[:1000])
    run = tmp_path / "run"
    for path in (garbage, truncated):
        with pytest.raises(CheckpointError, match="corrupted"):
            evaluate_checkpoint(path)
        with pytest.raises(CheckpointError, match="corrupted"):
            pretrain(PretrainConfig(out=str(run), resume=str(path), **TINY))

    other = edit_checkpoint(tiny_run[0] / "checkpoint.pt", tmp_path / "other.pt", method="moco",
                            config={**good["config"], "method": "moco"})
    with pytest.raises(CheckpointError, match="from method 'moco', not 'simclr'"):
        pretrain(PretrainConfig(out=str(run), resume=str(other), **TINY))
    assert not run.exists()  # refused before anything was loaded or written

    key = next(iter(good["model"]))
    reshaped = edit_checkpoint(tiny_run[0] / "checkpoint.pt", tmp_path / "reshaped.pt",
                               model={**good["model"], key: torch.zeros(3)})
    with pytest.raises(CheckpointError, match="shape"):
        evaluate_checkpoint(reshaped)


def test_bad_config_values_name_the_option():
    with pytest.raises(ValueError, match="unknown method .nosuch.; valid methods: simclr"):
        PretrainConfig(method="nosuch")
    with pytest.raises(ValueError, match="unknown dataset 'mnist' for --data; valid: digits"):
        PretrainConfig(data="mnist")
    for name in ("epochs", "batch_size", "lr", "temperature"):
        with pytest.raises(ValueError, match="--" + name.replace("_", "-")):
            PretrainConfig(**{name: 0})
    with pytest.raises(ValueError, match="batch_size .* larger than the training set"):
        pretrain(PretrainConfig(batch_size=128, limit=64, backend="torch", out="unused"))
    assert not os.path.exists("unused")  # the run folder it created for its lock is gone again


@pytest.mark.parametrize("args, message", [
    (["--method", "nosuch"], "--method: invalid choice: 'nosuch' (choose from "),
    (["--data", "mnist"], "--data: unknown dataset 'mnist' for --data; valid: digits"),
    (["--epochs", "0"], "--epochs: must be an integer >= 1, got '0'"),
    (["--batch-size", "-4"], "--batch-size: must be an integer >= 1, got '-4'"),
    (["--lr", "0"], "--lr: must be a number in (0, 1], got '0'"),
    (["--temperature", "-0.1"], "--temperature: must be a number >= 1e-08, got '-0.1'"),
    (["--lr", "nan"], "--lr: must be a number in (0, 1], got 'nan'"),
])
def test_cli_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err
    if "--method" in args:
        assert "simclr" in err.split("choose from")[1]


def test_cli_pretrain_then_eval(tmp_path, capsys):
    assert main(["pretrain", "--epochs", "1", "--batch-size", "32", "--limit", "64", "--backend", "torch",
                 "--baselines", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "linear@1" in printed and "kNN200@1" in printed and "random init" in printed and "raw pixels" in printed
    assert main(["eval", "--checkpoint", str(tmp_path / "checkpoint.pt")]) == 0
    assert "simclr on digits (trained on digits), epoch 1" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exc:
        main(["eval", "--checkpoint", str(tmp_path / "nope.pt")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    run = subprocess.run([sys.executable, "-m", "sslcore", "pretrain", "--data", "cifar"], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "unknown dataset 'cifar'" in run.stderr


def test_probes_solve_an_easy_problem():
    x, y = make_blobs(n_samples=400, centers=5, n_features=16, cluster_std=1.0, random_state=0)
    assert linear_probe(x[:300], y[:300], x[300:], y[300:]) > 0.95
    assert knn_accuracy(x[:300], y[:300], x[300:], y[300:]) > 0.95
    t, labels = torch.from_numpy(x).float(), torch.from_numpy(y)
    assert weighted_knn(t[:300], labels[:300], t[300:], labels[300:])["knn_top1"] > 0.95
    assert linear_classifier(t[:300], labels[:300], t[300:], labels[300:])["linear_top1"] > 0.95
    shuffled = labels[torch.randperm(400, generator=torch.Generator().manual_seed(0))]  # labels unrelated to x
    assert linear_classifier(t[:300], shuffled[:300], t[300:], shuffled[300:])["linear_top1"] < 0.5
    assert weighted_knn(t[:300], shuffled[:300], t[300:], shuffled[300:])["knn_top1"] < 0.5


def test_torch_probes_match_their_definitions():
    """The k-NN vote by hand for one query, top-5 counts, and the linear probe against scikit-learn's."""
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 6, generator=g), torch.randn(7, 6, generator=g)
    y_train, y_test = torch.randint(0, 8, (50,), generator=g), torch.randint(0, 8, (7,), generator=g)
    got = weighted_knn(train, y_train, test, y_test, k=10, temperature=0.1)
    sim = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    hits1 = hits5 = 0
    for i in range(7):
        s, idx = sim[i].topk(10)
        votes = torch.zeros(8).index_add_(0, y_train[idx], (s / 0.1).exp())
        hits1 += int(votes.argmax() == y_test[i])
        hits5 += int(y_test[i] in votes.topk(5).indices)
    assert got == {"knn_top1": hits1 / 7, "knn_top5": hits5 / 7}
    x, y = make_blobs(n_samples=300, centers=4, n_features=8, cluster_std=4.0, random_state=1)
    t, labels = torch.from_numpy(x).float(), torch.from_numpy(y)
    sk = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert linear_classifier(t[:200], labels[:200], t[200:], labels[200:])["linear_top1"] == pytest.approx(sk, abs=0.02)


def test_one_probe_family_is_reported_and_scikit_learns_is_opt_in():
    """``probe`` reports the torch family under ``linear``/``knn`` (top-1; ``*_top5`` beside them); scikit-learn's
    come only when asked, under their own names, and agree with the torch linear probe within a couple of points."""
    from sslcore.train.evaluate import probe

    data = load_dataset("digits")
    reported = probe(data, None)
    assert set(reported) == {"linear", "knn", "linear_top5", "knn_top5"}
    both = probe(data, None, sklearn=True)
    assert set(both) == set(reported) | {"sklearn_linear", "sklearn_knn"}
    assert both["linear"] == reported["linear"] and abs(both["linear"] - both["sklearn_linear"]) < 0.03


def test_digits_split_and_augment_are_deterministic():
    data = load_dataset("digits")
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert np.bincount(data.y_test.numpy()).min() >= 35  # stratified
    views = [data.augment(data.x_train[:16], torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(views[0], views[1]) and not torch.equal(views[0], data.x_train[:16])


def test_online_linear_head_leaves_the_backbone_untouched(tmp_path):
    """Its step reads detached eval-mode features: the backbone's gradients, BatchNorm statistics, modes and the
    global RNG are as they were."""
    from sslcore.train.online import online_head

    data = load_dataset("digits")
    torch.manual_seed(0)
    model = METHODS["simclr"].create(data, encoder="smallcnn", backend="torch")
    x = data.model_input(data.x_train[:32])
    model.loss([x, x.flip(-1)]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    model.projector.eval()  # a submodule's own mode is kept too
    head = online_head(None, model, data, torch.device("cpu"))
    head.step(model, x, data.y_train[:32], progress=0.0)
    head.epoch_metrics(model, data, device=torch.device("cpu"))  # the test split's pass
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng) and model.training and not model.projector.training
    assert head.head[1].weight.abs().sum() > 0  # the head itself learned
    assert online_head(False, model, data, torch.device("cpu")) is None


def test_a_run_with_the_online_linear_head_trains_the_same_weights(tmp_path):
    tiny = dict(TINY, method="mae")  # MAE draws its masks from torch's global RNG: the head must not
    runs = {flag: pretrain(PretrainConfig(out=str(tmp_path / str(flag)), online_linear=flag, **tiny))
            for flag in (True, False)}
    with_head, without = (load_checkpoint(tmp_path / str(flag) / "checkpoint.pt") for flag in (True, False))
    assert "online_linear" not in without and "online_linear_top1" not in _read_metrics(tmp_path / "False")[0]
    assert all(torch.equal(with_head["model"][k], v) for k, v in without["model"].items())
    assert runs[True]["final_loss"] == runs[False]["final_loss"]
    with pytest.raises(CheckpointError, match="no usable online linear head state; resume it with online_linear: "
                                              "false"):  # a checkpoint without the head is not continued with one
        pretrain(PretrainConfig(out=str(tmp_path / "more"), resume=str(tmp_path / "False" / "checkpoint.pt"),
                                **dict(tiny, epochs=3)))


def test_online_linear_head_learns_separable_features():
    """On features that separate the classes, the head's held-out accuracy climbs far above chance."""
    from sslcore.train.online import OnlineLinear

    data = load_dataset("digits")
    model = torch.nn.Flatten()  # raw pixels: a linear probe gets ~95% on digits
    head = OnlineLinear(64, 10, torch.device("cpu"))
    x, y = data.model_input(data.x_train), data.y_train
    for epoch in range(5):
        for i in range(0, len(x) - 63, 64):
            head.step(model, x[i:i + 64], y[i:i + 64], progress=epoch / 5)
    row = head.epoch_metrics(model, data, device=torch.device("cpu"))
    assert row["online_linear_top1"] > 0.85 and row["online_linear_train_top1"] > 0.8


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [loop.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-3


def test_benchmark_trains_each_method_on_one_budget(tmp_path, capsys):
    assert main(["benchmark", "--data", "digits", "--methods", "simclr", "--epochs", "1", "--limit", "64",
                 "--batch-size", "32", "--backend", "torch", "--out", str(tmp_path), "-o", "simclr.proj_dim=16"]) == 0
    printed = capsys.readouterr().out
    assert all(word in printed for word in ("linear probe", "train time", "simclr", "random init", "raw pixels"))
    result = json.loads((tmp_path / "results.json").read_text())
    summary = json.loads((tmp_path / "simclr" / "summary.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["simclr"] and result["options"] == {"simclr": {"proj_dim": 16}}
    assert result["rows"][0]["linear"] == summary["probes"]["trained"]["linear"]
    assert result["baselines"][1] == {"method": "raw pixels", **summary["probes"]["raw_pixels"]}


def test_benchmark_over_seeds_writes_one_results_file_the_report_renders(tmp_path, capsys):
    from sslcore.experiments.benchmark import benchmark_markdown, benchmark_plot

    results = tmp_path / "benchmark.json"
    argv = ["benchmark", "--data", "digits", "--methods", "simclr,simclr-attn", "--epochs", "1", "--limit", "64",
            "--batch-size", "32", "--backend", "torch", "--out", str(tmp_path / "runs"), "--seeds", "3,4",
            "--results-out", str(results)]
    assert main(argv) == 0
    r = json.loads(results.read_text())
    assert r["seeds"] == [3, 4] and r["command"] == "sslcore " + " ".join(argv)
    for seed, run in zip((3, 4), r["runs"]):  # each seed's own run folder, its numbers as trained
        summary = json.loads((tmp_path / "runs" / f"seed-{seed}" / "simclr" / "summary.json").read_text())
        assert summary["config"]["seed"] == seed and run["rows"][0]["linear"] == summary["probes"]["trained"]["linear"]
    text = benchmark_markdown(r)
    assert text in capsys.readouterr().out and "2 seeds (3, 4)" in text and "SimCLR-Attn > SimCLR" in text
    lin = [run["rows"][0]["linear"] for run in r["runs"]]
    mean, std = 100 * sum(lin) / 2, 100 * abs(lin[0] - lin[1]) / 2 ** 0.5
    gains = [100 * (run["rows"][0]["linear"] - run["rows"][0]["init_linear"]) for run in r["runs"]]
    g_mean, g_std = sum(gains) / 2, abs(gains[0] - gains[1]) / 2 ** 0.5
    assert f"| simclr | {mean:.1f} ± {std:.1f} | {g_mean:.1f} ± {g_std:.1f} |" in text  # beside its random init
    summary = json.loads((tmp_path / "runs" / "seed-3" / "simclr" / "summary.json").read_text())
    assert r["runs"][0]["rows"][0]["init_linear"] == summary["probes"]["random_init"]["linear"]
    benchmark_plot(r, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000
    with pytest.raises(SystemExit):  # the results file is never overwritten without --overwrite
        main(argv)
    assert "exists" in capsys.readouterr().err and json.loads(results.read_text()) == r
    with pytest.raises(SystemExit):
        main(["benchmark", "--seeds", "1,1"])
    assert "distinct" in capsys.readouterr().err


def test_benchmark_options_methods_and_errors():
    from sslcore.experiments.benchmark import method_option, options_per_method, select_methods

    digits = load_dataset("digits")
    chosen = select_methods(None, digits)
    assert "simclr" in chosen and all(digits.kind in METHODS[m].data_kinds for m in chosen)
    per = options_per_method(["simclr"], [method_option("proj_dim=32"), method_option("simclr.proj_hidden=64")])
    assert per == {"simclr": {"proj_dim": 32, "proj_hidden": 64}}
    with pytest.raises(ValueError, match="none of simclr takes option 'depth'"):
        options_per_method(["simclr"], [method_option("depth=3")])
    with pytest.raises(argparse.ArgumentTypeError, match="known METHOD"):
        method_option("nosuch.depth=3")


def test_a_run_no_longer_than_its_warmup_is_warned(tmp_path):
    """--epochs <= --warmup-epochs: the schedule never reaches its peak nor decays; the user hears it."""
    with pytest.warns(UserWarning, match=r"--epochs 1 <= --warmup-epochs 3: the learning rate rises"):
        pretrain(PretrainConfig(out=str(tmp_path / "w"), **{**TINY, "epochs": 1, "limit": 32}))


@pytest.mark.parametrize("method", ["byol", "mocov3"])
def test_momentum_target_methods_train_from_the_cli_and_resume_bit_identically(method, tmp_path, interrupted, capsys):
    """BYOL and MoCo v3 (issue 22) train from ``sslcore pretrain`` with their defaults (the ``byol`` recipe); a run
    killed after epoch 1 and resumed equals the uninterrupted one: the EMA target networks (and their BatchNorm
    statistics) come back from the checkpoint, the momentum schedule's progress from the update count."""
    args = ["pretrain", "--method", method, "--epochs", "2", "--batch-size", "32", "--limit", "64",
            "--backend", "torch"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    assert f"{method} on digits: 2 epochs" in capsys.readouterr().out
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    cut = dict(TINY, method=method, out=str(tmp_path / "cut"))
    interrupted(lambda: pretrain(PretrainConfig(**cut)))
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1
    pretrain(PretrainConfig(**cut, resume=""))
    resumed = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    targets = [k for k in full["model"] if k.startswith("target_")]
    assert targets and any(not torch.equal(full["model"][k], full["model"][k.replace("target_", "")])
                           for k in targets if k.endswith("weight"))  # the target lags the online networks
    for key, value in full["model"].items():
        assert torch.equal(resumed[key], value), key
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["augment"] == "byol"
    assert summary["temperature"] == (1.0 if method == "mocov3" else None)  # MoCo v3's own, by encoder type (CNN)


def test_benchmark_scales_simsiam_multi_s_memory_and_shows_each_encoder_s_random_init(tmp_path, monkeypatch):
    from sslcore.experiments import benchmark

    assert [benchmark.scaled_mix_epoch(e) for e in (1, 20, 40, 100, 1000)] == [2, 2, 3, 6, 52]  # 51/1000 of the run
    seen = {}

    def fake_pretrain(cfg):  # the options each method gets and one summary per encoder, without training
        seen[cfg.method] = cfg.options
        probes = {"trained": {"linear": 0.9, "knn": 0.8}, "raw_pixels": {"linear": 0.95, "knn": 0.9},
                  "random_init": {"linear": 0.7 if cfg.method == "mae" else 0.8, "knn": 0.6}}
        return {"probes": probes, "final_loss": 1.0, "train_time_s": 1.0, "encoder": cfg.encoder, "n_train": 10,
                "encoder_class": "VisionTransformer" if cfg.method == "mae" else "SmallCNN",
                "n_test": 5, "device": "cpu", "temperature": None, "config": {"options": cfg.options}}

    monkeypatch.setattr("sslcore.train.pretrain", fake_pretrain)  # benchmark imports it when it runs
    r = benchmark.run_benchmark("digits", ["simsiam-multi", "mae"], out=str(tmp_path), epochs=40)
    assert seen["simsiam-multi"]["mix_epoch"] == 3 and "mix_epoch" not in seen["mae"]
    assert [b["method"] for b in r["baselines"]] == ["random init (smallcnn)", "random init (VisionTransformer of mae)",
                                                     "raw pixels"]
    assert r["baselines"][1]["linear"] == 0.7
    benchmark.run_benchmark("digits", ["simsiam-multi"], out=str(tmp_path), epochs=40,
                            options=[benchmark.method_option("mix_epoch=30")])
    assert seen["simsiam-multi"]["mix_epoch"] == 30  # a given mix_epoch is kept


def test_benchmark_claims_say_not_tested_when_the_memory_never_mixed_in():
    from sslcore.experiments.benchmark import benchmark_claims

    def result(mix, multi):
        runs = [{"rows": [{"method": "simsiam", "linear": 0.9}, {"method": "simsiam-multi", "linear": 0.9 + d}],
                 "baselines": [], "options": {"simsiam-multi": mix}} for d in multi]
        return {"config": {"epochs": 20}, "runs": runs}

    old = benchmark_claims(result({}, [0.0, 0.0, 0.0]))[0]  # a file before the scaling: mix_epoch 52 of 20
    assert old["verdict"] == "not tested" and "epoch 52 of 20" in old["why_untested"]
    mixed = benchmark_claims(result({"mix_epoch": 2}, [0.011, 0.012, 0.010]))[0]
    assert mixed["verdict"] == "reproduced" and mixed["bar"] == 1.0  # the paper's +1.0 point, reached
