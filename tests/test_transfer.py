"""``sslcore transfer``: the targets lie in the training family, the study's numbers and verdicts come from its
runs, and its results file renders (docs/methods.md, ArCL)."""
from __future__ import annotations

import json

import pytest
import torch

from sslcore.cli import main
from sslcore.data.augment import shift_ops
from sslcore.experiments import report, transfer

TINY = ["--data", "shapes:plain,size=16,n=64,test=40", "--views", "2,3", "--seeds", "0,1", "--epochs", "1",
        "--batch-size", "32", "--backend", "torch", "--threads", "1"]
RANGES = {"EdgeMap": ("strength",), "StripeOverlay": ("strength", "period"), "Invert": (),
          "GaussianNoise": ("sigma", "contrast")}


def test_every_target_is_a_fixed_setting_inside_the_training_family():
    """Reachable by the augmentation: each target op is one of the ``shifts`` ops, always on, at a fixed
    setting inside that op's training range (the shift is an unseen strength or mixture, not a new op)."""
    family = {type(op).__name__: op for op in shift_ops()}
    assert set(RANGES) == set(family)
    for name, (_, ops) in transfer.TARGETS.items():
        order = [list(family).index(type(op).__name__) for op in ops.ops]
        assert order == sorted(order), f"{name}: ops out of the family's order"
        for op in ops.ops:
            train = family[type(op).__name__]
            assert op.p == 1.0 and train.p > 0
            for attr in RANGES[type(op).__name__]:
                lo, hi = getattr(op, attr)
                assert lo == hi and getattr(train, attr)[0] <= lo <= getattr(train, attr)[1], (name, attr)


def test_render_targets_is_deterministic_and_shifts_every_image():
    from sslcore.data import load_dataset

    data = load_dataset("shapes:plain,size=16,n=8,test=4")
    a = transfer.render_targets(data, torch.Generator().manual_seed(0))
    b = transfer.render_targets(data, torch.Generator().manual_seed(0))
    assert list(a) == list(transfer.TARGETS)
    for name, (train, test) in a.items():
        assert torch.equal(train, b[name][0]) and torch.equal(test, b[name][1])
        assert train.shape == data.x_train.shape and 0 <= train.min() and train.max() <= 1
        assert ((train - data.x_train).abs().flatten(1).amax(1) > 0.1).all(), name
    torch.testing.assert_close(a["inverted"][1], 1 - data.x_test)


def test_verdicts_follow_the_paired_test_and_the_bar():
    assert transfer._verdict([3.0, 2.5, 3.5]) == "reproduced"  # p = 0.0091
    assert transfer._verdict([3.0, 2.5, 1.0]) == "not shown"  # every seed gains, but p = 0.069
    assert transfer._verdict([5.0, 2.0, -0.5]) == "not shown"  # one seed disagrees
    assert transfer._verdict([1.0, 1.1, 0.9]) == "not shown"  # p = 0.0033, but the interval stays under 2 points
    assert transfer._verdict([1.5, 1.8, 1.2]) == "reproduced"  # p = 0.013 and the interval reaches 2 points
    assert transfer._verdict([-3.0, -2.0, -4.0]) == "contradicted"
    assert transfer._verdict([0.0, 0.0]) == "identical"
    assert transfer._verdict([-0.01, -0.02, -0.015], lower_is_better=True) == "lower"
    assert transfer._verdict([-0.01, 0.02], lower_is_better=True) == "mixed"


def test_the_study_runs_records_and_renders(tmp_path, capsys):
    out, results_out = tmp_path / "runs", tmp_path / "transfer.json"
    args = [*TINY, "--out", str(out), "--results-out", str(results_out)]
    assert main(["transfer", *args]) == 0
    assert "| ArCL vs SimCLR |" in capsys.readouterr().out
    results = json.loads(results_out.read_text())
    cfg = results["config"]
    assert results["command"].startswith("sslcore transfer --data shapes:plain,size=16,n=64,test=40 --views 2,3 "
                                         "--seeds 0,1 --epochs 1 --batch-size 32")
    assert (cfg["views"], cfg["seeds"], cfg["metric_views"], cfg["augment"]) == ([2, 3], [0, 1], 3, "shifts")
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [
        (m, s) for s in (0, 1) for m in ("simclr", "arcl-m2", "arcl-m3")]
    assert [b["method"] for b in results["baselines"]] == ["random init", "random init", "raw pixels"]
    runs = {(r["method"], r["seed"]): r for r in results["runs"]}
    for (method, seed), r in runs.items():
        summary = json.loads((out / f"{method}-seed{seed}" / "summary.json").read_text())
        assert summary["augment"] == "shifts" and r["temperature"] == 0.5  # each method's own default
        assert r["source"] == pytest.approx(summary["probes"]["trained"]["linear"])  # the same probe, the same data
        assert set(r["transfer"]) == set(r["refit"]) == set(transfer.TARGETS)
        assert 0 <= r["worst_pair"]["representation"] <= 4 and r["between"]["representation"] > 0
        if method == "arcl-m2":  # ArCL with two views trains exactly as SimCLR
            simclr = {k: v for k, v in runs["simclr", seed].items() if k not in ("method", "train_time_s")}
            assert {k: v for k, v in r.items() if k not in ("method", "train_time_s")} == simclr
    m2, m3 = transfer.comparisons(results)
    assert m2["views"] == 2 and m2["worst_verdict"] == m2["average_verdict"] == m2["distance_verdict"] == "identical"
    assert [c["claim"] for c in transfer.claims(results)] == ["ArCL (m = 3) > SimCLR, worst-target transfer",
                                                                "ArCL (m = 3) > SimCLR, average-target transfer"]
    s0 = [transfer.summarise(runs[k, 0]) for k in ("arcl-m3", "simclr")]
    assert m3["worst"][0] == pytest.approx(100 * (s0[0]["worst"] - s0[1]["worst"]))
    block = report.render("transfer", results)
    assert results["command"] in block and "| ArCL m = 3 |" in block and "m = 3 views" in block
    assert "2 seeds, mean ± std. Budget: 1 epoch, batch 32, encoder `smallcnn`" in block
    assert "Temperature: each method's default (ArCL 0.5, SimCLR 0.5)" in block
    assert "NT-Xent is ln(2·batch − 1) = 4.143 when" in block  # batch 32
    row = next(line for line in block.splitlines() if line.startswith("| ArCL m = 3 |")).split(" | ")
    pair = [runs["arcl-m3", s] for s in (0, 1)]
    assert row[-2:] == [report.mean_std([r["between"]["projection"] for r in pair], digits=3),
                        report.mean_std([r["final_loss"] for r in pair], digits=3) + " |"]
    given = {**results, "config": {**cfg, "temperature": 0.5}}
    assert "Temperature: given by --temperature (ArCL 0.5, SimCLR 0.5)" in report.render("transfer", given)
    transfer.plot(results, tmp_path / "transfer.png")
    assert (tmp_path / "transfer.png").stat().st_size > 10_000
    # no run overwrites another: the results file, then the run folders, each refused without --overwrite
    with pytest.raises(SystemExit):
        main(["transfer", *args])
    assert "--results-out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["transfer", *TINY, "--out", str(out), "--results-out", str(tmp_path / "other.json")])
    assert "already holds the runs" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--data", "digits"], "trains on a shapes domain"),
    (["--views", "1,4"], "--views must be distinct integers >= 2"),
    (["--seeds", "0,0"], "--seeds must be distinct integers >= 0"),
    (["--views", "2,x"], "comma-separated integers"),
    (["--metric-views", "1"], "--metric-views"),
    (["--epochs", "0"], "--epochs"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["transfer", *args, "--out", str(tmp_path / "runs")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
