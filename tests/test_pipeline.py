"""Issue 14's trainer on real data: the streaming pipeline (workers, sharded order, memory, exact resume), the
GPU recipe run on the CPU (precision, compile, accumulation, optimizers), probes during training, tracking
and configs.  Tiny shapes; probes are stubbed where they are not the subject."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import sslcore.train.loop as loop
from sslcore.cli import main
from sslcore.data import load_dataset
from sslcore.methods import create_model
from sslcore.train import PretrainConfig, load_checkpoint, pretrain
from sslcore.train.config import build_config

SHAPES = "shapes:n=32,test=8,size=16"


@pytest.fixture
def no_probes(monkeypatch):
    monkeypatch.setattr(loop, "probe", lambda data, encoder, **kw: {"linear": 0.0, "knn": 0.0})


def _folder(root, n, size, *, val=4, seed=0):
    """``n`` training and ``val`` validation PNGs of random noise in two classes: ``root/{train,val}/c{0,1}``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", val)):
        for i in range(count):
            path = root / split / f"c{i % 2}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return root


def _model(out):
    return load_checkpoint(out / "checkpoint.pt")["model"]


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# 1. Streaming data


MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import sslcore.train.tracking as tracking
    from sslcore.train import PretrainConfig, pretrain
    rss, real = [], tracking.RunLog.step
    def step(self, *args, **kwargs):  # the resident set at every optimizer step
        rss.append(int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20)
        return real(self, *args, **kwargs)
    tracking.RunLog.step = step
    pretrain(PretrainConfig(data=f"imagefolder:{sys.argv[1]},size=192", augment="mae", workers=2, epochs=1,
                            encoder="vit_tiny_patch16_224:img_size=192,patch_size=32,depth=1,embed_dim=32,num_heads=2",
                            batch_size=32, backend="torch", out=sys.argv[2], tensorboard=False))
    print(json.dumps(max(rss[-2:])))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc (Linux)")
def test_an_image_folder_streams_through_workers_and_memory_does_not_grow_with_its_size(tmp_path):
    """Pretrain (2 workers, then the probes over every image) on 128 and on 512 PNGs of 192 x 192: the resident
    set at the last two optimizer steps of each run is the same.  Decoding the folder into memory, as sslcore
    did before, adds 384 x 442 KB of float32 = 170 MB for the larger folder (measured +167 MB with this script).
    Equal windows: the maximum over the larger run's 14 steps after warm-up against the smaller run's 2 was
    biased upward by sampling alone (a +65.7 MiB flake on a loaded machine)."""
    peaks = {}
    for n in (128, 512):
        folder = _folder(tmp_path / f"images{n}", n, 192)
        run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(folder), str(tmp_path / f"run{n}")],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[n] = json.loads(run.stdout.strip().splitlines()[-1])
        summary = json.loads((tmp_path / f"run{n}" / "summary.json").read_text())
        assert summary["n_train"] == n and summary["workers"] == 2 and "knn_top5" in summary["probes"]["trained"]
    assert peaks[512] - peaks[128] < 60, peaks  # MiB; run-to-run noise is about 30


def test_workers_do_not_change_the_run_and_a_resume_mid_epoch_is_bit_identical(tmp_path, monkeypatch, no_probes):
    """The same run with 0 and 2 workers, and with 2 workers stopped by Ctrl-C inside epoch 1 and resumed from
    the checkpoint alone (its config restored): the same weights and losses, bit for bit.  Two batches per
    optimizer step, so the stop falls on an accumulation boundary."""
    folder = _folder(tmp_path / "images", 48, 20)
    base = ["pretrain", "--data", f"imagefolder:{folder},size=20,crop=16", "--epochs", "2", "--batch-size", "8",
            "--accumulate", "2", "--backend", "torch", "--augment", "simclr", "--no-tensorboard"]
    assert main([*base, "--workers", "0", "--out", str(tmp_path / "w0")]) == 0
    assert main([*base, "--workers", "2", "--out", str(tmp_path / "w2")]) == 0
    real_lr_at, calls = loop.lr_at, []

    def lr_at_then_ctrl_c(*args):  # once per optimizer step
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(*args)

    monkeypatch.setattr(loop, "lr_at", lr_at_then_ctrl_c)
    assert main([*base, "--workers", "2", "--out", str(tmp_path / "cut")]) == 130
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ckpt["epoch"] == 0 and ckpt["position"]["step"] == 4  # 2 optimizer steps of 2 batches
    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    assert main(["pretrain", "--resume", str(tmp_path / "cut" / "checkpoint.pt")]) == 0
    reference = _model(tmp_path / "w0")
    for run in ("w2", "cut"):
        other = _model(tmp_path / run)
        assert all(torch.equal(other[k], v) for k, v in reference.items()), run
        assert _losses(tmp_path / run) == _losses(tmp_path / "w0")
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # 3 optimizer steps per epoch, none logged twice


def test_the_sampler_gives_each_rank_its_shard_of_the_global_order():
    from sslcore.data.pipeline import ShardBatchSampler

    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    ranks = [ShardBatchSampler(20, 8, world=2, rank=r) for r in range(2)]
    for r in ranks:
        r.set_epoch(perm, first_step=1)
    assert len(ranks[0]) == 1  # 20 // 8 = 2 steps, from step 1
    (a,), (b,) = (list(r) for r in ranks)
    assert a + b == perm[8:16].tolist()
    with pytest.raises(ValueError, match="split evenly over 3 processes"):
        ShardBatchSampler(20, 8, world=3, rank=0)


# ---------------------------------------------------------------------------------------------
# 2. The GPU recipe (on the CPU here)


def test_accumulated_batches_give_the_gradient_of_one_large_batch(tmp_path, no_probes):
    """MAE on a LayerNorm ViT, no augmentation: 2 x 8 accumulated is one step of 16 (the same images, masks
    and learning rate), up to float rounding."""
    common = dict(method="mae", data=SHAPES, epochs=1, limit=32, augment="none", backend="torch", tensorboard=False)
    pretrain(PretrainConfig(out=str(tmp_path / "big"), batch_size=16, **common))
    pretrain(PretrainConfig(out=str(tmp_path / "acc"), batch_size=8, accumulate=2, **common))
    big, acc = _model(tmp_path / "big"), _model(tmp_path / "acc")
    for key, value in big.items():
        torch.testing.assert_close(acc[key], value, rtol=1e-4, atol=1e-6, msg=key)
    moved = [k for k, v in big.items() if v.is_floating_point() and not torch.equal(v, acc[k])]
    assert moved  # float rounding differs somewhere: the two paths really ran
    steps = [json.loads(line) for line in (tmp_path / "acc" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2]


def test_bf16_autocast_runs_on_the_cpu_and_fp16_needs_cuda(tmp_path, no_probes, capsys):
    s = pretrain(PretrainConfig(data=SHAPES, epochs=1, batch_size=16, backend="torch", precision="bf16",
                                out=str(tmp_path / "bf16"), tensorboard=False))
    assert s["precision"] == "bf16" and np.isfinite(s["final_loss"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exc:
            main(["pretrain", "--data", SHAPES, "--precision", "fp16", "--out", str(tmp_path / "fp16")])
        assert exc.value.code == 2 and "--precision fp16 needs a CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "fp16").exists()


def test_fp16_loss_scaling_resumes_with_its_scale(tmp_path, monkeypatch, no_probes, interrupted):
    """The fp16 path (refused on the CPU by the CLI; its autocast and GradScaler do run here): the first steps
    overflow and halve the scale, and a resume restores the scale, so the run continues bit for bit."""
    monkeypatch.setattr(loop, "resolve_precision", lambda precision, device: torch.float16)
    common = dict(data=SHAPES, epochs=2, batch_size=16, backend="torch", tensorboard=False)
    full = pretrain(PretrainConfig(out=str(tmp_path / "full"), **common))
    scale = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["scaler"]["scale"]
    assert full["precision"] == "fp16" and scale < 2.0 ** 16  # the initial scale backed off
    interrupted(lambda: pretrain(PretrainConfig(out=str(tmp_path / "cut"), **common)))
    pretrain(PretrainConfig(out=str(tmp_path / "cut"), resume="", **common))
    assert all(torch.equal(a, b) for a, b in zip(_model(tmp_path / "full").values(), _model(tmp_path / "cut").values()))
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["scaler"]["scale"] == scale


def test_compile_traces_the_training_step(tmp_path, monkeypatch, no_probes):
    """``--compile`` wraps the step in ``torch.compile``; Dynamo traces it here with the eager backend (Inductor's
    code generation takes about 40 s on 2 CPU cores and runs on the GPU machine), and the run is unchanged."""
    traced, real_compile = [], torch.compile

    def compile_eagerly(module, **kwargs):
        traced.append(module)
        return real_compile(module, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    common = dict(epochs=1, batch_size=16, limit=32, backend="torch", tensorboard=False)
    plain = pretrain(PretrainConfig(out=str(tmp_path / "plain"), **common))
    compiled = pretrain(PretrainConfig(out=str(tmp_path / "compiled"), compile=True, **common))
    assert len(traced) == 1 and compiled["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-6)


def test_optimizers_take_their_parameter_groups_and_method_defaults():
    from timm.optim import Lamb, Lars

    data = load_dataset(SHAPES)
    vit = create_model("simclr", data, encoder="vit_tiny_patch16_224:img_size=16,patch_size=8,depth=1")
    names = {id(p): n for n, p in vit.named_parameters()}
    cfg = PretrainConfig(data=SHAPES, batch_size=512, lr=0.3, weight_decay=1e-4, optimizer="lars")
    opt = loop.build_optimizer(cfg, vit)
    assert isinstance(opt, Lars) and opt.defaults["momentum"] == 0.9 and opt.defaults["lr"] == pytest.approx(0.6)
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert {"encoder.pos_embed", "encoder.cls_token", "encoder.norm.weight", "encoder.blocks.0.attn.qkv.bias",
            "projector.1.weight"} <= groups[0.0]  # projector.1: the head's BatchNorm
    decayed = groups[1e-4]
    assert all(vit.get_parameter(n).dim() >= 2 for n in decayed) and "encoder.blocks.0.attn.qkv.weight" in decayed
    assert len(groups[0.0]) + len(groups[1e-4]) == len(names)
    whole = loop.build_optimizer(PretrainConfig(data=SHAPES, weight_decay_all=True), vit)
    assert [g["weight_decay"] for g in whole.param_groups] == [1e-4]
    sgd = loop.build_optimizer(PretrainConfig(data=SHAPES, optimizer="sgd"), vit)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and not sgd.defaults["nesterov"]
    mae = create_model("mae", data, encoder="smallcnn")
    adamw = loop.build_optimizer(PretrainConfig(method="mae", data=SHAPES), mae)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.95)
    lamb = loop.build_optimizer(PretrainConfig(method="mae", data=SHAPES, optimizer="lamb"), mae)
    assert isinstance(lamb, Lamb) and lamb.defaults["betas"] == (0.9, 0.95)
    assert isinstance(loop.build_optimizer(PretrainConfig(method="mae", data=SHAPES, optimizer="sgd"), mae),
                      torch.optim.SGD)  # no betas for SGD


def test_lars_clipping_and_probes_every_epoch(tmp_path):
    s = pretrain(PretrainConfig(data=SHAPES, epochs=2, batch_size=16, lr=0.3, optimizer="lars", clip_grad=1.0,
                                eval_every=1, backend="torch", out=str(tmp_path), tensorboard=False))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({"knn", "knn_top5", "linear", "linear_top5"} <= set(r) for r in rows)
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(r["grad_norm"] > 0 for r in steps)
    assert s["optimizer"] == "lars" and s["peak_lr"] == pytest.approx(0.3 * 16 / 256)
    assert set(s["probes"]) == {"trained"}  # baselines only with --baselines


def test_new_flags_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    def load(spec):
        raise AssertionError(f"loaded --data {spec} before refusing the run")
    monkeypatch.setattr(loop, "load_dataset", load)
    for args, message in ((["--accumulate", "0"], "argument --accumulate: must be an integer >= 1, got '0'"),
                          (["--clip-grad", "-1"], "argument --clip-grad: must be a number > 0, got '-1'"),
                          (["--workers", "-2"], "argument --workers: must be an integer >= 0, got '-2'"),
                          (["--eval-every", "x"], "argument --eval-every: must be an integer >= 0, got 'x'"),
                          (["--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
                          (["--augment", "randaug"], "argument --augment: invalid choice: 'randaug'"),
                          (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
                          (["--data", "pystdlib", "--method", "ar", "--augment", "simclr"],
                           "--augment simclr: --data pystdlib is token data"),
                          (["--data", "imagefolder:/x,crop=40"], "imagefolder crop must lie in [1, size=32]"),
                          (["--config", str(tmp_path / "missing.yaml")], "--config")):
        with pytest.raises(SystemExit) as exc:
            main(["pretrain", "--out", str(tmp_path / "run"), *args])
        assert exc.value.code == 2 and message in capsys.readouterr().err, args
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# 3. Tracking and configs


def test_tensorboard_events_or_a_clear_message_without_it(tmp_path, monkeypatch, no_probes, capsys):
    pytest.importorskip("tensorboard")
    pretrain(PretrainConfig(data=SHAPES, epochs=1, batch_size=16, backend="torch", out=str(tmp_path / "tb")))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard")).Reload()
    assert {"step/loss", "step/lr", "step/img_s", "epoch/loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("step/loss")] == [1, 2]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    pretrain(PretrainConfig(data=SHAPES, epochs=1, batch_size=16, backend="torch", out=str(tmp_path / "none")))
    assert "tensorboard is not installed: no event files (pip install tensorboard" in capsys.readouterr().out
    assert not (tmp_path / "none" / "tensorboard").exists() and (tmp_path / "none" / "steps.jsonl").exists()


def test_wandb_sink_offline_logs_the_same_scalars_outside_the_run_folder(tmp_path, monkeypatch, no_probes):
    """``--wandb PROJECT`` in wandb's offline mode: a run file in WANDB_DIR holding the step and epoch scalars and
    the settings (read from the record bytes: wandb >= 0.20 has no Python reader), nothing of wandb's in the run
    folder; a bad project name or a missing package is refused before any work."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    out = tmp_path / "run"
    pretrain(PretrainConfig(data=SHAPES, epochs=1, batch_size=16, backend="torch", out=str(out), tensorboard=False,
                            wandb="sslcore-test", seed=123457))
    files = list((tmp_path / "wb").rglob("run-*.wandb"))
    assert len(files) == 1
    record = files[0].read_bytes()
    for key in (b"step/loss", b"step/img_s", b"step/grad_norm", b"epoch/loss", b"123457"):
        assert key in record, key
    assert not any("wandb" in p.name for p in out.rglob("*"))
    with pytest.raises(ValueError, match="--wandb 'a/b': a Weights & Biases project name"):
        PretrainConfig(data=SHAPES, wandb="a/b")
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    with pytest.raises(ValueError, match="the wandb package is not installed"):
        PretrainConfig(data=SHAPES, wandb="p")


def test_config_yaml_replays_a_run_and_resume_restores_its_config(tmp_path, no_probes, capsys):
    first = tmp_path / "first"
    args = ["--data", SHAPES, "--epochs", "1", "--batch-size", "16", "--backend", "torch", "--seed", "3",
            "--optimizer", "sgd", "--lr", "0.05", "-o", "proj_dim=16", "--no-tensorboard"]
    assert main(["pretrain", *args, "--out", str(first)]) == 0
    settings = yaml.safe_load((first / "config.yaml").read_text())
    assert settings["seed"] == 3 and settings["optimizer"] == "sgd" and settings["options"] == {"proj_dim": 16}
    assert not {"out", "resume", "overwrite"} & set(settings)
    assert main(["pretrain", "--config", str(first / "config.yaml"), "--out", str(tmp_path / "replay")]) == 0
    assert all(torch.equal(a, b) for a, b in zip(_model(first).values(), _model(tmp_path / "replay").values()))
    assert main(["pretrain", "--config", str(first / "config.yaml"), "--seed", "4", "--out", str(tmp_path / "s4")]) == 0
    assert load_checkpoint(tmp_path / "s4" / "checkpoint.pt")["config"]["seed"] == 4  # given options win

    assert main(["pretrain", "--resume", str(first / "checkpoint.pt"), "--epochs", "2"]) == 0  # nothing else retyped
    resumed = load_checkpoint(first / "checkpoint.pt")
    assert resumed["epoch"] == 2 and resumed["config"]["optimizer"] == "sgd" and resumed["config"]["seed"] == 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--resume", str(first / "checkpoint.pt"), "--epochs", "3", "--lr", "0.01", "--seed", "3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--lr 0.01 (the checkpoint's run has 0.05)" in err and "--seed" not in err

    bad = tmp_path / "bad.yaml"
    for text, message in (("lr: 0.1\nlearning_rate: 2\n", "unknown setting(s) 'learning_rate'"),
                          ("out: elsewhere\n", "sets out: give those on the command line"),
                          ("- 1\n", "must hold a mapping"), ("lr: [unclosed\n", "is not valid YAML"),
                          ("lr: 7\n", "--lr must be a number in (0, 1], got 7")):
        bad.write_text(text)
        with pytest.raises(SystemExit) as exc:
            main(["pretrain", "--config", str(bad), "--out", str(tmp_path / "never")])
        assert exc.value.code == 2 and message in capsys.readouterr().err, text
    assert not (tmp_path / "never").exists()


def test_build_config_merges_defaults_file_checkpoint_and_given(tmp_path, no_probes):
    pretrain(PretrainConfig(data=SHAPES, epochs=1, batch_size=16, backend="torch", limit=16, out=str(tmp_path / "r"),
                            tensorboard=False))
    cfg = build_config({"resume": str(tmp_path / "r" / "checkpoint.pt"), "epochs": 2, "device": "cpu"})
    assert (cfg.limit, cfg.data, cfg.out, cfg.device, cfg.epochs) == (16, SHAPES, str(tmp_path / "r"), "cpu", 2)
    with pytest.raises(ValueError, match="--limit 8 .the checkpoint's run has 16"):
        build_config({"resume": str(tmp_path / "r" / "checkpoint.pt"), "limit": 8})
