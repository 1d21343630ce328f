"""``sslcore export``: the backbone as safetensors that timm loads with ``strict=True`` (a ResNet and ViTs), and the
timm-free SmallCNN file that loads into ``SmallCNN``; real timm, real safetensors."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sslcore.train.loop as loop
from sslcore.cli import main
from sslcore.models import SmallCNN
from sslcore.train import PretrainConfig, load_encoder, pretrain

SHAPES = "shapes:n=16,test=4,size=16"


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """``trained(method, encoder)``: the checkpoint of a one-step run."""
    monkeypatch.setattr(loop, "probe", lambda data, encoder, **kw: {})

    def run(method, encoder):
        out = tmp_path / f"{method}-{encoder.partition(':')[0]}"
        pretrain(PretrainConfig(method=method, data=SHAPES, encoder=encoder, epochs=1, batch_size=16, backend="torch",
                                out=str(out), tensorboard=False))
        return out / "checkpoint.pt"
    return run


def _features(model, x):
    return model.eval()(x)


@pytest.mark.parametrize("method, encoder", [
    ("simclr", "resnet18"),
    ("simclr", "vit_tiny_patch16_224:img_size=16,patch_size=8,depth=2"),
    ("mae", "smallcnn"),  # MAE's ViT for the data's images: the kwargs come from the method
])
def test_timm_loads_the_export_strictly_and_computes_the_same_features(method, encoder, trained, tmp_path, capsys):
    ckpt, out = trained(method, encoder), tmp_path / "backbone.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    snippet = printed.split("load it with:\n", 1)[1]
    namespace = {}
    exec(snippet, namespace)  # the printed recipe: timm.create_model(..., pretrained=True, pretrained_cfg_overlay=...)
    model = namespace["model"]
    ours = load_encoder(ckpt)[0].encoder
    assert isinstance(model, type(ours)) and "pretrained_cfg_overlay" in snippet
    exported = load_file(out)
    assert set(exported) == set(model.state_dict()) == set(ours.state_dict())  # timm's key names, no classifier
    for key, value in ours.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(_features(model, x), _features(ours, x))
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "timm" and meta["method"] == method and meta["producer"] == "sslcore"
    short = dict(exported)
    short.pop(next(k for k in short if k.endswith(".weight")))
    save_file(short, tmp_path / "short.safetensors")
    with pytest.raises(RuntimeError, match="Missing key"):  # timm loads strictly: one key short fails
        exec(snippet.replace(repr(str(out)), repr(str(tmp_path / "short.safetensors"))), {})


def test_the_small_stem_resnet_and_smallcnn_load_without_sslcore_s_builders(trained, tmp_path, capsys):
    ckpt = trained("simclr", "resnet18:small")
    out = tmp_path / "small.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    snippet = capsys.readouterr().out.split("load it with:\n", 1)[1]
    namespace = {}
    exec(snippet, namespace)  # timm.create_model, the stem swapped by hand, load_state_dict(strict=True)
    assert namespace["model"].conv1.kernel_size == (3, 3) and "strict=True" in snippet

    ckpt = trained("simclr", "smallcnn")
    out = tmp_path / "cnn.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "SmallCNN(**{'in_chans': 3})" in capsys.readouterr().out
    cnn = SmallCNN(in_chans=3)
    cnn.load_state_dict(load_file(out), strict=True)  # no timm involved
    ours = load_encoder(ckpt)[0].encoder
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(_features(cnn, x), _features(ours, x))


def test_export_refuses_to_overwrite_and_names_what_is_wrong(trained, tmp_path, capsys):
    ckpt = trained("simclr", "smallcnn")
    out = tmp_path / "cnn.safetensors"
    out.write_bytes(b"someone else's file")
    with pytest.raises(SystemExit) as exc:
        main(["export", "--checkpoint", str(ckpt), "--out", str(out)])
    assert exc.value.code == 2 and "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"someone else's file"
    with pytest.raises(SystemExit) as exc:  # --overwrite replaces only an export sslcore wrote
        main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--overwrite"])
    assert exc.value.code == 2 and f"--out {out} is not a backbone export sslcore wrote" in capsys.readouterr().err
    assert out.read_bytes() == b"someone else's file"
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as exc:  # the review's defect 21: the checkpoint itself as --out
        main(["export", "--checkpoint", str(ckpt), "--out", str(ckpt), "--overwrite"])
    assert exc.value.code == 2 and "is not a backbone export sslcore wrote" in capsys.readouterr().err
    assert ckpt.read_bytes() == before
    mine = tmp_path / "mine.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(mine)]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(mine), "--overwrite"]) == 0
    link = tmp_path / "link.safetensors"
    link.symlink_to(mine)
    with pytest.raises(SystemExit) as exc:
        main(["export", "--checkpoint", str(ckpt), "--out", str(link), "--overwrite"])
    assert exc.value.code == 2 and f"--out {link} is a symbolic link" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # defect 22: a folder, named as the option, not a temporary file
        main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path), "--overwrite"])
    assert exc.value.code == 2 and f"--out {tmp_path} is a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.safetensors")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "no" / "dir.safetensors")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    pretrain(PretrainConfig(method="ar", data="pystdlib:16:4", encoder="transformer-tiny", epochs=1, batch_size=16,
                            out=str(tmp_path / "ar"), tensorboard=False))
    with pytest.raises(SystemExit) as exc:
        main(["export", "--checkpoint", str(tmp_path / "ar" / "checkpoint.pt"), "--out", str(tmp_path / "ar.st")])
    assert exc.value.code == 2 and "writes image backbones" in capsys.readouterr().err
