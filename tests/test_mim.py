"""The MIM recipe's pieces (fixed sin-cos positions, MAE's patch-std floor), the oracle tokenizer and the
``mim-study`` / ``tcas-sweep`` studies (tiny runs, synthetic results for the renderers)."""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from sslcore.cli import build_parser, main
from sslcore.data import load_dataset
from sslcore.data.pipeline import to_float
from sslcore.experiments import clustermim as study
from sslcore.experiments.report import STUDIES
from sslcore.methods import create_model
from sslcore.metrics import tcas
from sslcore.models.mae import sincos_pos_embed
from sslcore.tokenizers import OracleTokenizer, PixelTokenizer, load_tokenizer, patchify


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def pixel5(digits):
    return PixelTokenizer(2, 5, in_chans=1, max_iter=10, backend="torch").fit(to_float(digits.x_train[:200]),
                                                                              progress=False)


def test_sincos_pos_embed_is_maes_formula():
    pos = sincos_pos_embed(8, 3, 4)  # dim 8: two frequencies per axis, w = 1 and 1/100
    assert pos.shape == (12, 8)
    r, c = 2, 3  # raster index 2 * 4 + 3
    expected = [math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100),
                math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100)]
    torch.testing.assert_close(pos[11], torch.tensor(expected))
    with pytest.raises(ValueError, match="divisible by 4, got 6"):
        sincos_pos_embed(6, 2, 2)


def test_mae_position_embeddings_are_fixed_and_not_trained(digits):
    model = create_model("mae", digits, encoder="smallcnn")
    enc = model.mae.encoder
    grid = tuple(enc.patch_embed.grid_size)
    assert not enc.pos_embed.requires_grad
    torch.testing.assert_close(enc.pos_embed[0, 1:], sincos_pos_embed(enc.embed_dim, *grid))
    assert enc.pos_embed[0, 0].abs().sum() == 0  # the CLS row
    assert "decoder_pos" in dict(model.mae.named_buffers())
    torch.testing.assert_close(model.mae.decoder_pos[0, 1:], sincos_pos_embed(model.mae.decoder_pos.shape[-1], *grid))
    assert not any(p is enc.pos_embed for p in model.parameters() if p.requires_grad)


def test_mae_target_floor_flattens_near_constant_patches_only(digits):
    mae = create_model("mae", digits, encoder="smallcnn")  # min_patch_std=0.02 by default
    exact = create_model("mae", digits, encoder="smallcnn", min_patch_std=0.0)  # MAE's norm_pix target
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, :2, :2] = torch.tensor([[0.5, 0.505], [0.495, 0.5]])  # patch 0: residue, std 0.004
    x[0, 0, :2, 2:4] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # patch 1: ink
    x[0, 0, 2:4, :2] = 0.3  # patch 4: constant
    ours, theirs = mae.targets(x)[0], exact.targets(x)[0]
    assert theirs[0].std() > 0.9  # MAE blows the residue up to about unit variance
    centred = patchify(x, 2)[0, 0] - patchify(x, 2)[0, 0].mean()
    torch.testing.assert_close(ours[0], centred / 0.02)  # ours: centred over the floor, std 0.2
    torch.testing.assert_close(ours[1], theirs[1])  # above the floor: MAE's target
    assert ours[4].abs().max() == 0 and theirs[4].abs().max() == 0
    with pytest.raises(ValueError, match="min_patch_std"):
        create_model("mae", digits, encoder="smallcnn", min_patch_std=-0.1)


def test_oracle_tokenizer_alignment_knob(digits, pixel5, tmp_path):
    labels = digits.y_train
    x, index = to_float(digits.x_train[:300]), torch.arange(300)
    kw = dict(num_patches=16, n_classes=10)
    pure = OracleTokenizer(pixel5, labels, rate=0.0, **kw)
    assert pure.n_clusters == 50
    tokens = pure.encode(x, index=index)
    torch.testing.assert_close(tokens, labels[:300, None].long() * 5 + pixel5.encode(x))
    assert tcas(tokens, labels[:300], 50, 10) == 0.0
    half = OracleTokenizer(pixel5, labels, rate=0.5, seed=1, **kw).encode(x, index=index)
    changed = (half // 5 != labels[:300, None]).float().mean().item()
    assert changed == pytest.approx(0.5 * 0.9, abs=0.03)  # a replaced class part is another class 9 times in 10
    assert torch.equal(half % 5, pixel5.encode(x))  # the pixel part is untouched
    blind = OracleTokenizer(pixel5, labels, rate=1.0, **kw).encode(x, index=index)
    assert tcas(blind, labels[:300], 50, 10) > tcas(half, labels[:300], 50, 10) > 0.3

    tok = OracleTokenizer(pixel5, labels, rate=0.5, seed=1, **kw)
    tok.save(tmp_path / "oracle.pt")
    assert torch.equal(load_tokenizer(tmp_path / "oracle.pt").encode(x, index=index), half)
    with pytest.raises(ValueError, match="index="):
        tok.encode(x)
    with pytest.raises(ValueError, match="index must lie in"):
        tok.encode(x[:2], index=torch.tensor([0, len(labels)]))
    with pytest.raises(ValueError, match="rate"):
        OracleTokenizer(pixel5, labels, rate=1.5, **kw)
    with pytest.raises(ValueError, match="labels must lie in"):
        OracleTokenizer(pixel5, labels, rate=0.5, num_patches=16, n_classes=5)


def test_clustermim_on_the_oracle_reads_the_batch_index(digits, pixel5, tmp_path):
    OracleTokenizer(pixel5, digits.y_train, num_patches=16, n_classes=10, rate=0.0).save(tmp_path / "o.pt")
    model = create_model("clustermim", digits, encoder="smallcnn", tokenizer=str(tmp_path / "o.pt"))
    x = to_float(digits.x_train[:8])
    torch.manual_seed(0)
    right = model.loss([x], index=torch.arange(8))
    torch.manual_seed(0)
    wrong = model.loss([x], index=torch.arange(8) + 1)  # other images' classes: other targets
    assert not torch.allclose(right, wrong)


def _synthetic_study(gain: float) -> dict:
    """Results of three seeds where pixel ClusterMIM beats MAE by ``gain`` (+- 0.5) points."""
    cfg = {"data": "digits", "n_train": 1437, "n_test": 360, "flips": False, "seeds": [0, 1, 2], "epochs": 5,
           "batch_size": 128, "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 1, "betas": [0.9, 0.95],
           "encoder": {"embed_dim": 64, "depth": 4, "num_heads": 4, "patch_size": 2}, "decoder_dim": 64,
           "decoder_depth": 2, "decoder_heads": 4, "mask_ratio": 0.75, "min_patch_std": 0.02, "limit": None,
           "threads": 1, "ks": [50], "random_k": 50}
    runs = []
    for seed, jitter in zip(cfg["seeds"], (-0.005, 0.0, 0.005)):
        mae = 0.8 + jitter
        runs.append({"seed": seed, "tokenizer": "mae", "K": None, "linear": mae, "knn": 0.7,
                     "random_init_linear": 0.7, "raw_pixels_linear": 0.95})
        for kind, acc in (("pixel", mae + gain / 100 + jitter), ("feature", mae), ("random", mae - 0.1)):
            runs.append({"seed": seed, "tokenizer": kind, "K": 50, "tcas": 0.8, "tcas_blind": 0.89, "nmi": 0.1,
                         "linear": acc, "knn": 0.6})
    return {"study": "mim-study", "command": "sslcore mim-study --epochs 5", "config": cfg, "runs": runs}


def test_study_verdicts_come_from_the_seeds(tmp_path):
    assert STUDIES["mim-study"][1:] == ("study_markdown", "study_plot", "study_claims_summary")
    verdict = {c["tokenizer"]: c["verdict"] for c in study.study_claims(_synthetic_study(5.0))}
    assert verdict == {"pixel": "reproduced", "feature": "not shown"}  # feature: every seed's difference is 0
    assert study.study_claims(_synthetic_study(-5.0))[0]["verdict"] == "contradicted"
    one = study.study_claims(_synthetic_study(1.0))[0]  # +0.5, +1.0, +1.5: p = 0.074 (scipy's ttest_1samp)
    assert one["p"] == pytest.approx(0.07418, abs=1e-5) and one["verdict"] == "not shown"
    text = study.study_markdown(_synthetic_study(5.0))
    assert "`sslcore mim-study --epochs 5`" in text and "5 epochs" in text and "No temperature" in text
    assert "| pixel k-means | 50 | 0.800 ± 0.000 | 0.890 ± 0.000 |" in text
    assert ("| ClusterMIM (pixel, K = 50) > MAE | +5.0 pts (95 % CI +3.8…+6.2; p = 0.0033; seeds +4.5, +5.0, "
            "+5.5) | reproduced |") in text
    assert "label-permuted TCAS |" not in text  # a file before the permutation null renders as it was
    newer = _synthetic_study(5.0)
    for r in newer["runs"]:
        if r["tokenizer"] != "mae":
            r["tcas_perm"] = 0.88
    assert "| pixel k-means | 50 | 0.800 ± 0.000 | 0.890 ± 0.000 | 0.880 ± 0.000 |" in study.study_markdown(newer)
    study.study_plot(_synthetic_study(5.0), tmp_path / "a.png")
    study.study_plot(_synthetic_study(5.0), tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_sweep_spearman_and_verdict(tmp_path):
    assert study.spearman([1, 2, 3, 4], [4, 3, 2, 1])[0] == pytest.approx(-1.0)
    assert all(math.isnan(v) for v in study.spearman([1, 2, 3], [5, 5, 5]))
    assert study.sweep_verdict(-0.9, 0.001) == "alignment with the label helps"
    assert study.sweep_verdict(0.9, 0.001) == "alignment with the label hurts"
    assert study.sweep_verdict(-0.9, 0.2) == "not shown"


def test_sweep_and_study_tiny_runs_write_their_results(tmp_path, monkeypatch):
    # k-means in torch: through the Triton interpreter the fits take minutes (the kernel has its own tests)
    monkeypatch.setattr(study, "PixelTokenizer", functools.partial(PixelTokenizer, backend="torch"))
    monkeypatch.setattr(study, "build_tokenizer", functools.partial(study.build_tokenizer, backend="torch"))
    res = tmp_path / "sweep.json"
    results = study.sweep(seeds=[0, 1], epochs=1, rates=[0.0, 1.0], limit=128, out=str(tmp_path / "sweep"),
                          results_out=str(res), command="sslcore tcas-sweep ...", log=lambda _: None)
    assert json.loads(res.read_text()) == results
    assert [(r["seed"], r["rate"]) for r in results["runs"]] == [(0, 0.0), (0, 1.0), (1, 0.0), (1, 1.0)]
    assert all(r["tcas"] == 0.0 for r in results["runs"] if r["rate"] == 0.0)  # held-out oracle at rho 0: pure
    assert all(r["tcas"] > 0.8 and r["augment"] == "mae" for r in results["runs"] if r["rate"] == 1.0)
    assert results["config"]["K"] == 50 and results["config"]["betas"] == [0.9, 0.95]
    assert results["config"]["n_train"] == 128 and results["config"]["epochs"] == 1
    text = study.sweep_markdown(results)
    assert "Spearman ρ_s (n = 4)" in text and "| 0.00 | 0.000 ± 0.000 |" in text
    study.sweep_plot(results, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    with pytest.raises(ValueError, match="--results-out .* already exists: .* --overwrite"):  # never overwrites
        study.sweep(seeds=[0], rates=[0.0, 1.0], out=str(tmp_path / "other"), results_out=str(res))

    results = study.study(seeds=[0], epochs=1, ks=[8], limit=128, out=str(tmp_path / "study"), log=lambda _: None)
    assert (tmp_path / "study" / "results.json").is_file()
    assert [(r["tokenizer"], r["K"]) for r in results["runs"]] == [("mae", None), ("pixel", 8), ("feature", 8),
                                                                    ("random", 8)]
    assert "random-init ViT / raw pixels" in study.study_markdown(results)
    with pytest.raises(ValueError, match="--out .* holds earlier runs"):
        study.study(seeds=[0], epochs=1, ks=[8], out=str(tmp_path / "study"), results_out=str(tmp_path / "x.json"))


def test_cli_records_the_command_and_refuses_to_overwrite(tmp_path, capsys):
    args = build_parser().parse_args(["tcas-sweep", "--seeds", "1,2", "--epochs", "7", "--rates", "0,0.5",
                                      "--threads", "1", "--results-out", "r.json"])
    assert study._command(args, "tcas-sweep", " --n-clusters 50") == (
        "sslcore tcas-sweep --data digits --seeds 1,2 --epochs 7 --n-clusters 50 --threads 1 --results-out r.json")
    res = tmp_path / "r.json"
    res.write_text("{}")
    with pytest.raises(SystemExit):
        main(["tcas-sweep", "--seeds", "3", "--epochs", "2", "--out", str(tmp_path / "o"), "--results-out", str(res)])
    assert "already exists: choose another path" in capsys.readouterr().err and res.read_text() == "{}"


@pytest.mark.parametrize("argv, message", [
    (["tcas-sweep", "--rates", "0.5"], "at least two distinct rates"),
    (["tcas-sweep", "--rates", "0,1.5"], "at least two distinct rates"),
    (["tcas-sweep", "--seeds", "0,0"], "--seeds must be distinct integers >= 0"),
    (["mim-study", "--n-clusters", "0"], "--n-clusters must be distinct integers >= 1"),
    (["mim-study", "--epochs", "0"], "--epochs: must be an integer >= 1"),
    # token data used to end in AttributeError: 'TokenData' object has no attribute 'image_shape'
    (["mim-study", "--quick", "--data", "pystdlib"], "argument --data: pystdlib is token data; this command"),
    (["tcas-sweep", "--quick", "--data", "pystdlib"], "argument --data: pystdlib is token data"),
    (["tcas", "--data", "pystdlib"], "argument --data: pystdlib is token data"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("run", [lambda out: study.study(data="pystdlib", out=out),
                                 lambda out: study.sweep(data="pystdlib", out=out),
                                 lambda out: study.tcas_table(["pixel"], "pystdlib", [None])])
def test_the_studies_refuse_token_data_by_name(tmp_path, run):
    with pytest.raises(ValueError, match="--data pystdlib is token data; the tokenizer studies take image data"):
        run(str(tmp_path / "o"))


def test_sweep_rejects_k_not_a_multiple_of_the_classes_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--n-clusters 45 must be a multiple of the 10 classes"):
        study.sweep(k=45, out=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
