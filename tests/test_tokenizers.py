"""Image tokenizers (pixel / feature / random k-means tokens), MAE and ClusterMIM.

Tokenizer fits use ``backend="torch"`` on thousands of patches; the fused assignment kernel itself
(through the interpreter) is checked on the encode of a few images.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sslcore.cli import main
from sslcore.data import load_dataset
from sslcore.methods import create_model
from sslcore.methods.clustermim import build_tokenizer
from sslcore.metrics import tcas
from sslcore.models.mae import random_masking
from sslcore.tokenizers import FeatureTokenizer, PixelTokenizer, RandomTokenizer, load_tokenizer, patchify, unpatchify
from sslcore.train import PretrainConfig, pretrain

TINY_VIT = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=1, num_heads=2)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def pixel_tok(digits):
    return PixelTokenizer(2, 12, in_chans=1, max_iter=20, backend="torch").fit(digits.x_train[:300], progress=False)


def test_patchify_is_mae_layout_and_inverts(seed):
    x = torch.randn(3, 3, 12, 8)
    p = patchify(x, 4)
    assert p.shape == (3, 6, 48)
    # patch (row 1, col 0) holds x[:, :, 4:8, 0:4] laid out (p, p, C)
    assert torch.equal(p[:, 2], x[:, :, 4:8, 0:4].permute(0, 2, 3, 1).reshape(3, 48))
    assert torch.equal(unpatchify(p, 4, 3, 12, 8), x)


def test_pixel_tokens_are_nearest_normalised_patch_centres(pixel_tok, digits):
    x = digits.x_test[:7]
    tokens = pixel_tok.encode(x)  # auto backend: the Triton kernel (interpreter here)
    assert tokens.shape == (7, 16) and tokens.dtype == torch.int64
    xn = (x.double() - pixel_tok.mean.double()[:, None, None]) / pixel_tok.std.double()[:, None, None]
    d = torch.cdist(patchify(xn, 2).flatten(0, 1), pixel_tok.centers.double())
    best = d.min(1, keepdim=True).values
    picked = d.gather(1, tokens.view(-1, 1))
    assert torch.allclose(picked, best, rtol=0, atol=1e-5)  # the nearest centre, up to fp32 ties
    train = digits.x_train[:300].double()
    assert torch.allclose(pixel_tok.mean.double(), train.mean().view(1), atol=1e-6)
    assert torch.allclose(pixel_tok.std.double(), train.std(unbiased=False).view(1), atol=1e-6)


def test_pixel_tokenizer_fit_from_a_loader_streams_minibatches(pixel_tok, digits):
    data = torch.utils.data.TensorDataset(digits.x_train[:300], digits.y_train[:300])
    streamed = PixelTokenizer(2, 12, in_chans=1, max_iter=3, batch_size=64, backend="torch").fit(data, progress=False)
    assert torch.allclose(streamed.mean, pixel_tok.mean) and torch.allclose(streamed.std, pixel_tok.std)

    def inertia(tok):
        xn = tok.patches(digits.x_test).flatten(0, 1).double()
        return float(torch.cdist(xn, tok.centers.double()).min(1).values.pow(2).sum())

    assert inertia(streamed) < 1.3 * inertia(pixel_tok)


def test_tokenizer_save_load_round_trip_and_mismatch(pixel_tok, digits, tmp_path):
    path = tmp_path / "tok.pt"
    pixel_tok.save(path)
    loaded = load_tokenizer(path, patch_size=2, dim=4)
    assert isinstance(loaded, PixelTokenizer) and not list(tmp_path.glob("*.tmp"))
    assert torch.equal(loaded.encode(digits.x_test[:5]), pixel_tok.encode(digits.x_test[:5]))
    with pytest.raises(ValueError, match="saved for patch_size=2, not 4"):
        load_tokenizer(path, patch_size=4)
    with pytest.raises(ValueError, match="saved for dimension 4, not 12"):
        load_tokenizer(path, dim=12)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupted"):
        load_tokenizer(bad)
    torch.save({"format": "other"}, bad)
    with pytest.raises(ValueError, match="not an sslcore tokenizer"):
        load_tokenizer(bad)


def test_tokenizer_bad_input(pixel_tok, digits):
    with pytest.raises(ValueError, match="not a multiple of patch_size=2"):
        pixel_tok.encode(torch.zeros(2, 1, 7, 8))
    with pytest.raises(ValueError, match="3 channels"):
        pixel_tok.encode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        pixel_tok.encode(torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match="n_clusters"):
        PixelTokenizer(2, 0, in_chans=1)
    with pytest.raises(ValueError, match="patch_size"):
        PixelTokenizer(0, 4, in_chans=1)
    with pytest.raises(ValueError, match="n_clusters=50 is more than the 32 patches"):
        PixelTokenizer(2, 50, in_chans=1, backend="torch").fit(digits.x_train[:2], progress=False)
    nan = digits.x_train[:10].clone()
    nan[3, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        PixelTokenizer(2, 4, in_chans=1, backend="torch").fit(nan, progress=False)
    with pytest.raises(RuntimeError, match="not fitted"):
        PixelTokenizer(2, 4, in_chans=1).encode(digits.x_train[:2])


def test_feature_tokenizer_uses_patch_tokens_without_cls(digits, tmp_path):
    tok = FeatureTokenizer("vit_tiny_patch16_224", 6, model_kwargs=TINY_VIT, max_iter=10, backend="torch")
    assert tok.patch_size == 2 and tok.dim == 16
    tok.fit(digits.x_train[:40], progress=False)
    x = digits.x_test[:5]
    with torch.no_grad():
        expected = tok.model.forward_features(x)[:, 1:]
    assert torch.allclose(tok.patches(x), expected)
    d = torch.cdist(expected.flatten(0, 1).double(), tok.centers.double())
    assert torch.allclose(d.gather(1, tok.encode(x).view(-1, 1)), d.min(1, keepdim=True).values, atol=1e-5)
    tok.save(tmp_path / "f.pt")
    loaded = load_tokenizer(tmp_path / "f.pt")
    assert torch.equal(loaded.encode(x), tok.encode(x))  # the frozen model's weights travel in the file
    with pytest.raises(ValueError, match=r"shape \[B, 1, 8, 8\]"):
        tok.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="timm model name"):
        FeatureTokenizer("no_such_model", 4)


def test_feature_tokenizer_from_an_mae_checkpoint(digits, tmp_path):
    pretrain(PretrainConfig(method="mae", epochs=1, batch_size=32, limit=64, backend="torch", out=str(tmp_path)))
    ckpt = tmp_path / "checkpoint.pt"
    small = dataclasses.replace(digits, x_train=digits.x_train[:100])  # the tokenizer fits on x_train
    tok = build_tokenizer(f"feature:{ckpt}", small, n_clusters=5, patch_size=2, backend="torch")
    weights = torch.load(ckpt, weights_only=True)["model"]
    assert torch.equal(tok.model.pos_embed, weights["encoder.pos_embed"])
    assert tok.encode(digits.x_test[:3]).shape == (3, 16)
    named = build_tokenizer("feature:vit_tiny_patch16_224", small, n_clusters=5, patch_size=2, backend="torch")
    assert named.model.patch_embed.img_size == (8, 8) and named.encode(digits.x_test[:3]).shape == (3, 16)
    simclr = tmp_path / "simclr"
    pretrain(PretrainConfig(epochs=1, batch_size=32, limit=64, backend="torch", out=str(simclr)))
    with pytest.raises(ValueError, match="from method 'simclr'"):
        build_tokenizer(f"feature:{simclr / 'checkpoint.pt'}", small, n_clusters=5, patch_size=2)


def test_tcas_separates_aligned_from_random_tokens(digits):
    random_tok = RandomTokenizer(2, 20, seed=1)
    tokens = random_tok.encode(digits.x_test)
    assert torch.equal(tokens, random_tok.encode(digits.x_test))  # seeded
    assert tcas(tokens, digits.y_test, 20, 10) == pytest.approx(0.9, abs=0.01)
    pure = digits.y_test[:, None].expand(-1, 16)  # a class-pure tokenizer: token = class
    assert tcas(pure, digits.y_test, 10, 10) == 0.0


def test_random_masking_keeps_a_quarter_per_sample(seed):
    keep, mask = random_masking(64, 16, 0.75, "cpu")
    assert keep.shape == (64, 4) and torch.equal(mask.sum(1), torch.full((64,), 12))
    assert not mask.gather(1, keep).any()
    assert len({tuple(sorted(k.tolist())) for k in keep}) > 30  # per sample, not one shared mask
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 16, 1.0, "cpu")


def test_mae_encoder_sees_only_visible_patches(digits, seed):
    model = create_model("mae", digits, encoder="smallcnn").eval()
    x = digits.x_train[:4].clone()
    keep = torch.tensor([[0, 5, 10, 15]] * 4)
    before = model.mae.encode_visible(x, keep)
    x[:, :, 0:2, 2:4] += 5.0  # patch 1: masked
    assert torch.allclose(model.mae.encode_visible(x, keep), before)
    x[:, :, 2:4, 2:4] += 5.0  # patch 5: visible
    assert not torch.allclose(model.mae.encode_visible(x, keep), before)


def test_mae_encoder_tokens_are_layer_normalised(digits, seed):
    """MAE normalises the encoder's tokens before the decoder (and DINO's patch tokens, which the feature
    tokenizer stands in for, are normalised): timm's ViT with global_pool="avg" would move that norm after
    the pooling, leaving the tokens raw, unless built with fc_norm=False."""
    model = create_model("mae", digits, encoder="smallcnn").eval()
    norm = model.mae.encoder.norm
    assert isinstance(norm, torch.nn.LayerNorm)
    seen = []  # the norm's input: the blocks' raw tokens
    handle = norm.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        tokens = model.mae.encode_visible(digits.x_train[:4], torch.tensor([[0, 5, 10, 15]] * 4))
    handle.remove()
    assert len(seen) == 1
    # normalising the raw tokens, not the output again: LN(LN(t)) differs from LN(t) by ~eps/var(t), which a
    # fixed tolerance cannot bound for tokens of small variance (a random init flaked at 5.6e-4)
    expected = F.layer_norm(seen[0], norm.normalized_shape, eps=norm.eps)  # weight 1, bias 0 at init
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


def test_mae_loss_is_normalised_pixel_error_on_masked_patches(digits, seed):
    model = create_model("mae", digits, encoder="smallcnn")
    x = digits.x_train[:8]
    torch.manual_seed(3)
    loss = model.loss([x])
    torch.manual_seed(3)
    pred, mask = model.mae(x, 0.75)
    target = patchify(x, 2)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = ((pred - target) ** 2).mean(-1)[mask].mean()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_clustermim_targets_and_two_steps_lower_the_loss(digits, pixel_tok, tmp_path, seed):
    pixel_tok.save(tmp_path / "tok.pt")
    model = create_model("clustermim", digits, encoder="smallcnn", tokenizer=str(tmp_path / "tok.pt"),
                         label_smoothing=0.1)
    assert model.mae.head.out_features == 12
    x = digits.x_train[:64]
    torch.manual_seed(5)
    loss = model.loss([x])
    torch.manual_seed(5)
    pred, mask = model.mae(x, 0.75)
    expected = F.cross_entropy(pred[mask], pixel_tok.encode(x)[mask], label_smoothing=0.1)
    assert torch.allclose(loss, expected, atol=1e-5)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # 3e-3 overshot in 5 of 30 seeds; 1e-3 in none
    losses = []
    for _ in range(3):  # the same masks every step: the loss on them must fall
        torch.manual_seed(5)
        step_loss = model.loss([x])
        losses.append(step_loss.item())
        opt.zero_grad()
        step_loss.backward()
        opt.step()
    assert losses[2] < losses[0]
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.tokenizer.parameters())


def test_clustermim_and_mae_options_and_errors(digits, tmp_path):
    with pytest.raises(ValueError, match="needs a timm ViT encoder"):
        create_model("mae", digits, encoder="resnet18")
    with pytest.raises(ValueError, match="not a multiple of patch_size=3"):
        create_model("mae", digits, encoder="smallcnn", patch_size=3)
    with pytest.raises(ValueError, match="mask_ratio"):
        create_model("mae", digits, encoder="smallcnn", mask_ratio=0.0)
    with pytest.raises(ValueError, match="has no option 'queue_size'"):
        create_model("clustermim", digits, encoder="smallcnn", queue_size=4)
    with pytest.raises(ValueError, match="missing, corrupted"):
        create_model("clustermim", digits, encoder="smallcnn", tokenizer=str(tmp_path / "nope.pt"))


def test_cli_tcas_and_clustermim_pretrain(tmp_path, capsys):
    assert main(["tcas", "--tokenizer", "random", "--n-clusters", "8,16"]) == 0
    out = capsys.readouterr().out
    assert "TCAS" in out and "NMI" in out and out.count("random") == 2
    assert main(["pretrain", "--method", "clustermim", "--tokenizer", "random", "-o", "n_clusters=8", "--epochs", "1",
                 "--batch-size", "32", "--limit", "64", "--backend", "torch", "--out", str(tmp_path)]) == 0
    assert "clustermim" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["tcas", "--n-clusters", "0"])
    assert main(["tokenize", "--tokenizer", "random", "--n-clusters", "7", "--out", str(tmp_path / "t.pt")]) == 0
    assert load_tokenizer(tmp_path / "t.pt").n_clusters == 7


def test_tokenize_replaces_only_a_tokenizer_it_wrote(tmp_path, capsys):
    """The review's defects 21-22: an existing file that is no tokenizer (a checkpoint, say) is never replaced,
    and path errors name --out, not a temporary file."""
    mine, theirs, nowhere = tmp_path / "t.pt", tmp_path / "theirs.pt", tmp_path / "afile.pt" / "t.pt"
    argv = ["tokenize", "--tokenizer", "random", "--n-clusters", "7", "--out"]
    assert main(argv + [str(mine)]) == 0
    assert main(argv + [str(mine), "--overwrite"]) == 0
    torch.save({"model": {}}, theirs)
    before = theirs.read_bytes()
    for args, message in (([str(mine)], "already exists"),
                          ([str(theirs), "--overwrite"], f"--out {theirs} is not a tokenizer sslcore wrote"),
                          ([str(nowhere)], f"--out {nowhere}: the folder")):
        with pytest.raises(SystemExit) as e:
            main(argv + args)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert theirs.read_bytes() == before
