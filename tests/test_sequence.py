"""Token-sequence pretraining: the transformer's attention masks, the four objectives (ar, mlm, dear, vlm),
their generation metrics, the byte corpora and the trainer on a tiny ``text:PATH`` corpus (CPU, tiny models)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from sslcore.data import load_dataset
from sslcore.data.text import TokenData, load_pystdlib, split_files
from sslcore.methods import create_model
from sslcore.methods.dear import DEAR
from sslcore.methods.mlm import MLM
from sslcore.methods.sequence_base import prompt_lengths, step_generator
from sslcore.methods.vlm import VLM
from sslcore.models.sequence import SequenceTransformer
from sslcore.train import PretrainConfig, load_checkpoint, pretrain

TINY = dict(dim=32, depth=2, heads=4, mlp_ratio=2.0)


def _data(n: int = 64, length: int = 16, vocab: int = 256, seed: int = 0) -> TokenData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, (2 * n, length), generator=g)
    y = torch.arange(2 * n) % 2
    return TokenData("random", x[:n], y[:n], x[n:], y[n:], vocab_size=vocab)


def _method(cls, data, **options):
    model = SequenceTransformer(data.vocab_size, data.seq_len, causal=cls.causal, **TINY)
    return cls(model, **options)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_is_causal_or_bidirectional_as_claimed(causal, seed):
    model = SequenceTransformer(50, 12, causal=causal, **TINY).eval()
    x = torch.randint(50, (3, 12))
    j = 7
    x2 = x.clone()
    x2[:, j] = (x[:, j] + 1) % 50  # change one "future" token
    with torch.no_grad():
        before, after = model.logits(model.hidden(x)), model.logits(model.hidden(x2))
    past_same = torch.equal(before[:, :j], after[:, :j])
    assert past_same == causal  # causal: no prediction before j can see x_j; bidirectional: all can
    assert not torch.allclose(before[:, j:], after[:, j:])


def test_ar_prediction_ignores_future_tokens_through_the_method(seed):
    data = _data(length=10)
    ar = create_model("ar", data, encoder="transformer-tiny").eval()
    x = data.x_test[:4]
    x2 = x.clone()
    x2[:, 6:] = torch.randint(256, x2[:, 6:].shape)
    with torch.no_grad():
        p1 = ar.next_token_logits(ar.encoder.hidden(x[:, :-1]))
        p2 = ar.next_token_logits(ar.encoder.hidden(x2[:, :-1]))
    assert torch.equal(p1[:, :6], p2[:, :6])  # predictions of x_1..x_6 only read x_0..x_5


def test_mlm_masks_a_fixed_count_at_uniform_positions():
    data = _data(length=40)
    mlm = _method(MLM, data, mask_ratio=0.15)
    mask = mlm.draw_mask(20000, 40, torch.Generator().manual_seed(0))
    assert (mask.sum(1) == round(0.15 * 40)).all()
    freq = mask.double().mean(0)  # each position masked with probability 6/40; binomial sd ~ 0.0025
    assert (freq - 6 / 40).abs().max() < 0.015


def test_vlm_ratios_are_uniform_and_half_the_masks_are_suffixes():
    length, n_rows = 64, 20000
    vlm = _method(VLM, _data(length=length), min_ratio=0.15, max_ratio=0.85, suffix_prob=0.5)
    mask = vlm.draw_mask(n_rows, length, torch.Generator().manual_seed(1))
    counts = mask.sum(1)
    first = mask.double().argmax(1)
    is_suffix = (first == length - counts) & mask[:, -1]  # the masked positions are exactly the last `count`
    assert abs(is_suffix.double().mean().item() - 0.5) < 0.02  # binomial sd 0.0035
    assert counts.min() >= round(0.15 * length) and counts.max() <= round(0.85 * length)
    for part in (is_suffix, ~is_suffix):  # both kinds draw n = round(r L) with r ~ U[0.15, 0.85]
        ratios = counts[part].double() / length
        jitter = (torch.rand(len(ratios), generator=torch.Generator().manual_seed(2)) - 0.5) / length
        assert stats.kstest((ratios + jitter).numpy(), "uniform", args=(0.15, 0.7)).pvalue > 1e-3
    only_suffix = _method(VLM, _data(length=length), suffix_prob=1.0).draw_mask(500, length, None)
    assert only_suffix[:, -1].all() and (only_suffix.int().diff(dim=1) >= 0).all()  # 0...0 1...1 in every row


@pytest.mark.parametrize("length", [5, 16, 64])
def test_targets_per_sequence_counts_the_supervised_tokens(length):
    data = _data(length=length)
    for name in ("ar", "dear"):
        assert create_model(name, data, encoder="transformer-tiny").targets_per_sequence(length) == length - 1
    mlm = _method(MLM, data, mask_ratio=0.15)
    assert mlm.targets_per_sequence(length) == mlm.draw_mask(4, length, None).sum(1)[0].item()
    for lo, hi in ((0.15, 0.85), (0.5, 0.5), (0.01, 0.3)):  # the expected mask size, against 40000 drawn masks
        vlm = _method(VLM, data, min_ratio=lo, max_ratio=hi)
        drawn = vlm.draw_mask(40000, length, torch.Generator().manual_seed(0)).sum(1).double()
        assert abs(vlm.targets_per_sequence(length) - drawn.mean().item()) < 4 * drawn.std().item() / 200 + 1e-9


def test_dear_targets_are_the_tokens_at_the_drawn_offsets():
    length, k_max = 20, 4
    data = _data(length=length)
    dear = _method(DEAR, data, max_offset=k_max)
    offsets = dear.draw_offsets(5000, length, torch.Generator().manual_seed(0))
    t = torch.arange(length - 1)
    assert (offsets >= 1).all() and (offsets <= (length - 1 - t).clamp(max=k_max)).all()
    assert set(offsets[:, 0].unique().tolist()) == set(range(1, k_max + 1))  # every offset is drawn
    assert offsets[:, -1].eq(1).all()  # the last position can only predict the last token
    x = torch.arange(length).expand(5000, -1) * 3 % 256
    assert torch.equal(dear.targets(x, offsets), x.gather(1, t + offsets))
    assert torch.equal(dear.targets(x, offsets), (t + offsets) * 3 % 256)
    # the loss is the cross-entropy against exactly these targets (same (epoch, index) -> same offsets)
    xb, index = data.x_train[:8], torch.arange(8)
    loss = dear.loss([xb], index=index, epoch=3)
    k = dear.draw_offsets(8, length, step_generator(index, 3))
    expected = F.cross_entropy(dear.offset_logits(dear.encoder.hidden(xb[:, :-1]), k).flatten(0, 1),
                               dear.targets(xb, k).flatten())
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize("method", ["ar", "mlm", "dear", "vlm"])
def test_a_few_training_steps_lower_each_loss(method):
    torch.manual_seed(0)
    data = load_pystdlib("24", per_class=8)
    model = create_model(method, data, encoder="transformer-tiny")
    x, index = data.x_train[:32], torch.arange(32)

    def fixed_loss():  # same (epoch, index): same masks/offsets before and after
        with torch.no_grad():
            return model.loss([x], index=index, epoch=1).item()

    before = fixed_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(12):
        loss = model.loss([x], index=index, epoch=step + 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < before - 0.5


def test_generation_metrics_follow_their_definitions():
    data = _data(n=16, length=12)
    torch.manual_seed(0)
    ar = create_model("ar", data, encoder="transformer-tiny", prompts=(0.5, 9)).eval()
    out = ar.evaluate(data)
    x = data.x_test
    with torch.no_grad():
        logits = ar.encoder.logits(ar.encoder.hidden(x[:, :-1]))
    nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # nll[:, t-1] = -log p(x_t | x_<t)
    assert out["gen_loss@50%"] == pytest.approx(nll[:, 5:].mean().item(), rel=1e-5)
    assert out["gen_loss@9"] == pytest.approx(nll[:, 8:].mean().item(), rel=1e-5)
    assert out["gen_ppl@9"] == pytest.approx(math.exp(out["gen_loss@9"]))
    mlm = create_model("mlm", data, encoder="transformer-tiny", prompts=(3, 11), left_to_right=True).eval()
    out = mlm.evaluate(data)
    # with a one-token continuation, one pass and left to right are the same prediction
    assert out["gen_loss@11"] == pytest.approx(out["gen_loss_l2r@11"], rel=1e-5)
    assert out["gen_loss@3"] != pytest.approx(out["gen_loss_l2r@3"], rel=1e-5)


def _corpus(root, files_per_class=4, size=300):
    for c, cls in enumerate(["alpha", "beta", "gamma"]):
        for i in range(files_per_class):
            f = root / cls / ("sub" if i % 2 else "") / f"f{i}.txt"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(bytes((c * 40 + i + j) % 256 for j in range(size + 10 * i)))
    return root


def test_corpus_split_is_deterministic_by_file_and_disjoint(tmp_path):
    a, b = _corpus(tmp_path / "a"), _corpus(tmp_path / "elsewhere" / "b")
    for cls in ("alpha", "beta", "gamma"):
        files_a = list((a / cls).rglob("*.txt"))
        train, test = split_files(files_a, a / cls)
        assert train and test and not set(train) & set(test) and set(train) | set(test) == set(files_a)
        again = split_files(list(reversed(files_a)), a / cls)
        assert (train, test) == again
        moved = split_files(list((b / cls).rglob("*.txt")), b / cls)  # same split wherever the corpus lives
        assert [f.relative_to(b) for f in moved[1]] == [f.relative_to(a) for f in test]
    da, db = load_dataset(f"text:{a}:32"), load_dataset(f"text:{b}:32")
    assert da.classes == ("alpha", "beta", "gamma") and da.seq_len == 32 and da.kind == "tokens"
    assert torch.equal(da.x_train, db.x_train) and torch.equal(da.x_test, db.x_test)
    # snippets of train and test never share a file: each snippet's file is identified by its first byte pattern
    assert not {tuple(r) for r in da.x_train.tolist()} & {tuple(r) for r in da.x_test.tolist()}
    hist = da.raw_features(da.x_test)
    assert hist.shape == (len(da.x_test), 256) and torch.allclose(hist.sum(1), torch.ones(len(hist), dtype=hist.dtype))


def test_pystdlib_is_deterministic_balanced_and_file_disjoint():
    d1, d2 = load_pystdlib("64", per_class=40), load_pystdlib("64", per_class=40)
    assert torch.equal(d1.x_train, d2.x_train) and torch.equal(d1.y_test, d2.y_test)
    assert len(d1.classes) == 10 and d1.x_train.dtype == torch.long and d1.x_train.max() < 256
    assert d1.y_train.bincount().tolist() == [40] * 10 and d1.y_test.bincount().tolist() == [10] * 10


def test_image_tokens_are_pixel_tokenizer_grids_with_the_image_mask_ratio():
    data = load_dataset("imagetokens:2:8:digits")
    assert data.kind == "tokens" and data.vocab_size == 8 and data.seq_len == 16  # 8x8 digits, 2x2 patches
    assert data.x_train.min() >= 0 and data.x_train.max() < 8 and len(data.x_test) == len(data.y_test)
    assert create_model("mlm", data, encoder="transformer-tiny").mask_ratio == 0.75
    assert create_model("mlm", _data(), encoder="transformer-tiny").mask_ratio == 0.15


def test_bad_input_raises_naming_the_argument(tmp_path):
    data = _data(length=8)
    with pytest.raises(ValueError, match="seq_len"):
        load_dataset("pystdlib:1")
    with pytest.raises(ValueError, match="seq_len"):
        SequenceTransformer(256, 1)
    with pytest.raises(ValueError, match="max_offset"):
        create_model("dear", data, encoder="transformer-tiny", max_offset=8)
    for bad in (0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            create_model("mlm", data, encoder="transformer-tiny", mask_ratio=bad)
    with pytest.raises(ValueError, match="min_ratio"):
        create_model("vlm", data, encoder="transformer-tiny", min_ratio=0.0)
    with pytest.raises(ValueError, match="max_ratio"):
        create_model("vlm", data, encoder="transformer-tiny", max_ratio=1.0)
    with pytest.raises(ValueError, match="prompts"):
        create_model("ar", data, encoder="transformer-tiny", prompts=(8,))
    with pytest.raises(ValueError, match="prompts"):
        prompt_lengths((1.5,), 8)
    with pytest.raises(ValueError, match="encoder"):
        create_model("ar", data, encoder="resnet18")
    with pytest.raises(ValueError, match="token sequences"):
        create_model("vlm", load_dataset("digits"), encoder="transformer-tiny")
    with pytest.raises(ValueError, match="no such folder"):
        load_dataset(f"text:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_dataset(f"text:{tmp_path / 'empty'}")
    corpus = _corpus(tmp_path / "c", size=20)
    with pytest.raises(ValueError, match="class 'alpha' has no (train|test) snippets"):
        load_dataset(f"text:{corpus}:64")


def test_pretrain_and_resume_on_a_tiny_text_corpus(tmp_path, interrupted):
    corpus = _corpus(tmp_path / "corpus", files_per_class=6, size=300)
    cfg = dict(method="dear", data=f"text:{corpus}:32", encoder="transformer-tiny", epochs=2, batch_size=8,
               warmup_epochs=0, options={"eval_samples": 16})
    summary = pretrain(PretrainConfig(out=str(tmp_path / "full"), **cfg))
    assert summary["eval"]["eval_samples"] == 16 and math.isfinite(summary["eval"]["gen_loss@50%"])
    assert 0 <= summary["probes"]["trained"]["linear"] <= 1
    interrupted(lambda: pretrain(PretrainConfig(out=str(tmp_path / "part"), **cfg)))  # killed after epoch 1
    pretrain(PretrainConfig(out=str(tmp_path / "part"), resume="", **cfg))
    full, part = (load_checkpoint(tmp_path / d / "checkpoint.pt")["model"] for d in ("full", "part"))
    assert all(torch.equal(full[k], part[k]) for k in full)  # offsets come from (epoch, index): bit-exact resume
