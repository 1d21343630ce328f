"""The AR-vs-MLM study: equalised target budgets, the results file (every seed, the command), the verdicts
computed from the seeds and the results block and plot rendered from the file (CPU, tiny budget)."""
from __future__ import annotations

import copy
import json

import pytest

from sslcore.cli import build_parser
from sslcore.data import load_dataset
from sslcore.experiments.ar_vs_mlm import CLAIMS, OBJECTIVES, main_from_args, markdown, plan, plot, run, verdicts


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Two seeds of the --quick study (1 AR epoch on 256 sequences of imagetokens:digits)."""
    return run(quick=True, seeds=(0, 1), eval_samples=8, device="cpu", out=str(tmp_path_factory.mktemp("runs")),
               results_out="out/ar-vs-mlm.json")


def test_equalise_targets_gives_every_objective_ar_s_target_count():
    data = load_dataset("imagetokens:digits")  # L = 16, image mask ratio 0.75
    p = plan(data, 20, "targets")
    assert {n: p[n]["targets_per_sequence"] for n in ("ar", "dear", "mlm")} == {"ar": 15, "dear": 15, "mlm": 12}
    assert p["ar"]["epochs"] == p["dear"]["epochs"] == 20 and p["mlm"]["epochs"] == 25  # 20 * 15 / 12
    assert p["vlm"]["epochs"] == round(20 * 15 / p["vlm"]["targets_per_sequence"])
    steps = data.n_train // 64
    for n in OBJECTIVES:
        assert p[n]["steps"] == p[n]["epochs"] * steps
        assert abs(p[n]["targets_seen"] / p["ar"]["targets_seen"] - 1) < 0.05  # equal up to rounding the epochs
    same = plan(data, 20, "epochs", limit=640, batch_size=32)
    assert {q["epochs"] for q in same.values()} == {20} and same["mlm"]["steps"] == 20 * 640 // 32
    assert same["mlm"]["targets_seen"] < same["ar"]["targets_seen"]
    with pytest.raises(ValueError, match="equalise"):
        plan(data, 20, "tokens")
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="epochs"):
            plan(data, bad, "targets")


def test_results_keep_every_seed_the_plan_and_the_command(results, tmp_path):
    assert results["study"] == "ar-vs-mlm"
    assert sorted((r["seed"], r["objective"]) for r in results["runs"]) == sorted(
        (s, n) for s in (0, 1) for n in OBJECTIVES)
    assert results["command"].startswith("sslcore ar-vs-mlm --quick --eval-samples 8 --seeds 0,1 --threads ")
    assert results["command"].endswith("--results-out out/ar-vs-mlm.json")
    assert results["config"]["limit"] == 256 and results["objectives"]["mlm"]["epochs"] == 1
    assert 0 < results["histogram"]["linear"] < 1 and all(0 <= r["linear"] <= 1 for r in results["runs"])
    assert all("gen_loss_l2r@50%" in r["eval"] for r in results["runs"] if r["objective"] in ("mlm", "vlm"))
    assert results["objectives"]["vlm-nosuffix"]["epochs"] == results["objectives"]["vlm"]["epochs"]
    assert 0.5 < results["position_onehot"]["linear"] <= 1 and all(0 <= r["pos_linear"] <= 1 for r in results["runs"])
    assert results["objectives"]["vlm-nosuffix"]["options"] == {"suffix_prob": 0.0}
    json.dumps(results)  # the file main_from_args writes


def test_verdicts_follow_the_paired_rule(results):
    r = copy.deepcopy(results)

    def set_values(name, key, values):
        for row in r["runs"]:
            if row["objective"] == name:
                row[key] = values[row["seed"]]

    set_values("ar", "linear", [0.80, 0.80])
    set_values("mlm", "linear", [0.83, 0.831])  # +3.0, +3.1 points: p = 0.010 on 1 df, mean >= the 1-point bar
    set_values("dear", "linear", [0.85, 0.70])  # +5, -10: the seeds disagree
    v = {x["claim"]: x for x in verdicts(r)}
    mlm, dear = v["MLM > AR on classification"], v["dear narrows AR's classification gap (dear > ar)"]
    assert mlm["deltas"] == pytest.approx([3, 3.1]) and mlm["p"] == pytest.approx(0.0104, abs=1e-4)
    assert mlm["verdict"] == "reproduced"
    assert dear["mean"] == pytest.approx(-2.5) and dear["verdict"] == "not shown"
    set_values("mlm", "linear", [0.83, 0.81])  # +3, +1: both seeds agree, but p = 0.30
    assert verdicts(r)[0]["verdict"] == "not shown"
    set_values("mlm", "linear", [0.70, 0.701])
    assert verdicts(r)[0]["verdict"] == "contradicted"
    set_values("mlm", "linear", [0.805, 0.805])  # every seed agrees exactly, but by less than a point
    assert verdicts(r)[0]["verdict"] == "not shown"
    set_values("ar", "pos_linear", [0.90, 0.90])
    set_values("mlm", "pos_linear", [0.85, 0.851])
    assert v["MLM > AR on classification (position-aware probe)"]["measure"] == "pos_linear"
    assert {x["claim"]: x for x in verdicts(r)}["MLM > AR on classification (position-aware probe)"]["verdict"] \
        == "contradicted"
    for row in r["runs"]:  # generation: mlm 0.1 nats above ar by the chain rule, 0.1 below it in one pass
        if row["objective"] in ("ar", "mlm"):
            worse = row["objective"] == "mlm"
            row["eval"].update({f"gen_loss@{p}%": 2.0 - 0.1 * worse for p in (25, 50, 75)})
            row["eval"].update({f"gen_loss_l2r@{p}%": 2.0 + 0.1 * worse for p in (25, 50, 75) if worse})
    gen = {x["claim"]: x for x in verdicts(r)}["AR > MLM on generation"]
    assert gen["measure"] == "l2r" and gen["deltas"] == pytest.approx([0.1, 0.1]) and gen["verdict"] == "reproduced"
    assert [x["claim"] for x in verdicts(r)] == list(CLAIMS)
    old = copy.deepcopy(r)  # a file from before the ablation and the position-aware probe: those claims drop out
    old["objectives"].pop("vlm-nosuffix")
    old.pop("position_onehot")
    old["runs"] = [{k: v for k, v in x.items() if "pos" not in k} for x in old["runs"]
                   if x["objective"] != "vlm-nosuffix"]
    assert len(verdicts(old)) == len(CLAIMS) - 2 and "position-wise" not in markdown(old)


def test_markdown_and_plot_render_the_file(results, tmp_path):
    text = markdown(results)
    assert f"`{results['command']}`" in text and "No temperature" in text and "token histogram" in text
    for v in verdicts(results):
        assert v["claim"] in text and v["verdict"] in text
    ar = [100 * r["linear"] for r in results["runs"] if r["objective"] == "ar"]  # per-seed percentages, then
    mean = sum(ar) / 2  # their mean (scaling after the sum can round the other way at a .x5 boundary)
    std = abs(ar[0] - ar[1]) / 2 ** 0.5
    assert f"| ar | {mean:.1f} ± {std:.1f} |" in text
    final = [r["final_loss"] for r in results["runs"] if r["objective"] == "vlm"]
    assert f"{sum(final) / 2:.3f} ± {abs(final[0] - final[1]) / 2 ** 0.5:.3f} |" in text  # the train-loss column
    plot(results, tmp_path / "a.png")
    plot(results, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # deterministic


def test_command_line_defaults_and_bad_arguments(tmp_path, capsys):
    args = build_parser().parse_args(["ar-vs-mlm"])
    assert args.seeds == (0, 1, 2) and args.equalise == "targets" and args.data == "imagetokens:digits"
    for bad in (["--seeds", "0,0"], ["--seeds", "a"], ["--seeds", ""], ["--equalise", "tokens"],
                ["--epochs", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["ar-vs-mlm", *bad])
        assert bad[0] in capsys.readouterr().err
    existing = tmp_path / "r.json"
    existing.write_text("{}")
    args = build_parser().parse_args(["ar-vs-mlm", "--quick", "--results-out", str(existing),
                                      "--out", str(tmp_path / "runs")])
    with pytest.raises(ValueError, match="--results-out"):
        main_from_args(args)
    assert existing.read_text() == "{}" and not (tmp_path / "runs").exists()  # refused before any work
    for seeds in ((), (0, 0), (-1,)):  # the API checks its seeds as the command line does, before any work
        with pytest.raises(ValueError, match="--seeds must be distinct integers >= 0"):
            run(seeds=seeds, out=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_objectives_train_a_subset_and_its_claims_only(tmp_path, capsys):
    """``--objectives ar,mlm`` (the classification claim's budget): only those run, the command says so, and
    only the claims between them are judged; a bad list is a usage error naming the option."""
    assert build_parser().parse_args(["ar-vs-mlm", "--objectives", "mlm,ar"]).objectives == ("ar", "mlm")
    for bad, says in ((["--objectives", "ar,mlmm"], "did you mean 'mlm'"), (["--objectives", "ar,ar"], "distinct")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["ar-vs-mlm", *bad])
        err = capsys.readouterr().err
        assert "--objectives" in err and says in err
    with pytest.raises(ValueError, match="objectives"):
        plan(load_dataset("imagetokens:digits"), 20, "targets", objectives=("ar", "gpt"))
    r = run(quick=True, seeds=(0,), eval_samples=8, device="cpu", out=str(tmp_path / "runs"), objectives=("ar", "mlm"),
            results_out="out/r.json")
    assert list(r["objectives"]) == ["ar", "mlm"] and {x["objective"] for x in r["runs"]} == {"ar", "mlm"}
    assert "--objectives ar,mlm" in r["command"]
    assert {v["claim"] for v in verdicts(r)} == {c for c, (_, pair) in CLAIMS.items() if set(pair) == {"ar", "mlm"}}
    assert "| dear |" not in markdown(r)
