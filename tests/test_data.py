"""Datasets behind ``--data``: shapes (domains), CIFAR pickle archives, image folders, and the RGB augmentation."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sslcore.data import RGBAugment, load_dataset, shapes

SMALL = "n=60,test=20,size=16"


# --- shapes ------------------------------------------------------------------------------------------------

def test_shapes_are_deterministic_balanced_and_in_range():
    a, b = load_dataset(f"shapes:{SMALL}"), load_dataset(f"shapes:plain,{SMALL}")
    assert a.name == "shapes-plain" and a.x_train.shape == (60, 3, 16, 16) and a.x_test.shape == (20, 3, 16, 16)
    for x, y in ((a.x_train, b.x_train), (a.y_train, b.y_train), (a.x_test, b.x_test)):
        assert torch.equal(x, y)
    assert 0 <= a.x_train.min() and a.x_train.max() <= 1
    labels = torch.cat([a.y_train, a.y_test])
    assert torch.bincount(labels, minlength=10).tolist() == [8] * 10  # 80 images, 10 classes
    other = load_dataset(f"shapes:{SMALL},seed=1")
    assert not torch.equal(other.x_train, a.x_train)


def test_shapes_domains_render_the_same_shapes_differently():
    plain = load_dataset(f"shapes:plain,{SMALL}")
    for domain in shapes.DOMAINS[1:]:
        other = load_dataset(f"shapes:{domain},{SMALL}")
        assert torch.equal(other.y_train, plain.y_train) and torch.equal(other.y_test, plain.y_test)
        assert (other.x_train - plain.x_train).abs().mean() > 0.05, domain
    # same geometry: the shape's pixels (where plain differs from its flat background) sit in the same place
    g = shapes.geometry(1, size=32, seed=3)
    cover = shapes._coverage(g, 32, outline=False)[0, 0] > 0.5
    for domain in ("plain", "shifted"):
        img = shapes.render(g, domain, size=32, seed=0)[0]
        corner = img[:, 0, 0][:, None, None]
        assert ((img - corner).abs().sum(0) > 0.05).eq(cover).float().mean() > 0.95, domain


@pytest.mark.parametrize("kind, area", [("circle", math.pi), ("square", 2.0), ("ring", math.pi * (1 - 0.55 ** 2)),
                                        ("triangle", 3 * math.sqrt(3) / 4), ("cross", 4 * 0.3 * 2 - 4 * 0.3 ** 2)])
def test_shape_coverage_has_the_shape_area(kind, area):
    r, size = 20.0, 64
    geom = {"label": torch.tensor([shapes.CLASSES.index(kind)]), "radius": torch.tensor([r]),
            "centre": torch.tensor([[32.0, 32.0]]), "angle": torch.tensor([0.3])}
    covered = shapes._coverage(geom, size, outline=False).sum().item()
    assert covered == pytest.approx(area * r * r, rel=0.03)


@pytest.mark.parametrize("spec, message", [
    ("shapes:watercolour", "unknown shapes domain 'watercolour'"),
    ("shapes:plain,colour=3", "unknown shapes setting 'colour'"),
    ("shapes:n=ten", "shapes setting n must be an integer, got 'ten'"),
    ("shapes:size=4", "shapes size must be >= 8"),
])
def test_shapes_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(spec)


# --- RGB augmentation --------------------------------------------------------------------------------------

def test_rgb_augment_is_driven_by_the_generator():
    x = load_dataset(f"shapes:{SMALL}").x_train[:8]
    aug = RGBAugment()
    v1, v2 = aug(x, torch.Generator().manual_seed(7)), aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(v1, v2) and v1.shape == x.shape and 0 <= v1.min() and v1.max() <= 1
    assert not torch.equal(v1, aug(x, torch.Generator().manual_seed(8)))
    twins = aug(x[:1].expand(4, -1, -1, -1), torch.Generator().manual_seed(0))
    assert not torch.equal(twins[0], twins[1])  # each image draws its own parameters


def test_rgb_augment_identity_and_grey():
    x = load_dataset(f"shapes:textured,{SMALL}").x_train[:4]
    identity = RGBAugment(scale=(1, 1), ratio=(1, 1), flip_p=0, jitter_p=0, gray_p=0)
    torch.testing.assert_close(identity(x, torch.Generator()), x)
    flipped = RGBAugment(scale=(1, 1), ratio=(1, 1), flip_p=1, jitter_p=0, gray_p=0)(x, torch.Generator())
    torch.testing.assert_close(flipped, x.flip(-1))
    grey = RGBAugment(gray_p=1)(x, torch.Generator())
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    with pytest.raises(ValueError, match="scale"):
        RGBAugment(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="gray_p"):
        RGBAugment(gray_p=2)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        RGBAugment()(torch.zeros(2, 1, 8, 8), torch.Generator())


# --- CIFAR archives ----------------------------------------------------------------------------------------

def _batch(n, seed, labels_key=b"labels", classes=10):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            labels_key: rng.integers(0, classes, n).tolist(), b"batch_label": b"fake"}


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def cifar10_dir(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        _dump(root / f"data_batch_{i}", _batch(4, i))
    _dump(root / "test_batch", _batch(3, 9))
    return tmp_path


def test_cifar10_reads_the_pickle_archive(cifar10_dir):
    data = load_dataset(f"cifar10:{cifar10_dir}")  # the parent folder: cifar-10-batches-py is found inside
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32) and data.in_chans == 3
    assert data.x_train.dtype == torch.uint8  # as stored: the pipeline makes it float on the device
    first = _batch(4, 1)
    expected = torch.from_numpy(first[b"data"][1].reshape(3, 32, 32))
    assert torch.equal(data.x_train[1], expected)  # channel-major rows, batches in order
    assert data.y_train[:4].tolist() == first[b"labels"] and data.y_test.tolist() == _batch(3, 9)[b"labels"]
    assert torch.equal(load_dataset(f"cifar10:{cifar10_dir / 'cifar-10-batches-py'}").x_train, data.x_train)


def test_cifar100_uses_fine_labels(tmp_path):
    _dump(tmp_path / "train", _batch(5, 1, b"fine_labels", 100))
    _dump(tmp_path / "test", _batch(2, 2, b"fine_labels", 100))
    data = load_dataset(f"cifar100:{tmp_path}")
    assert data.x_train.shape == (5, 3, 32, 32)
    assert data.y_train.tolist() == _batch(5, 1, b"fine_labels", 100)[b"fine_labels"]


def test_cifar_bad_paths_and_files(cifar10_dir, tmp_path):
    root = cifar10_dir / "cifar-10-batches-py"
    with pytest.raises(ValueError, match="needs the folder"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="is not a folder"):
        load_dataset(f"cifar10:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="lacks train, test"):
        load_dataset(f"cifar100:{root}")
    (root / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3.* not a readable python-pickle batch"):
        load_dataset(f"cifar10:{root}")
    _dump(root / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"expected uint8 \[N, 3072\]"):
        load_dataset(f"cifar10:{root}")
    _dump(root / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(ValueError, match="lacks b'data' or b'labels'"):
        load_dataset(f"cifar10:{root}")
    _dump(root / "data_batch_3", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]})
    with pytest.raises(ValueError, match="labels outside 0..9"):
        load_dataset(f"cifar10:{root}")
    _dump(root / "data_batch_3", print)  # a pickle that names a callable: refused, not run
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        load_dataset(f"cifar10:{root}")
    (root / "test_batch").unlink()
    with pytest.raises(ValueError, match="lacks test_batch"):
        load_dataset(f"cifar10:{root}")


# --- image folders -----------------------------------------------------------------------------------------

def _png(path, h, w, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (value, value, value)).save(path)


def test_imagefolder_with_train_and_val(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for k, cls in enumerate(("cat", "dog")):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", 10 + i, 14, 100 * k + i)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    data = load_dataset(f"imagefolder:{tmp_path},size=8")
    assert data.x_train.shape == (6, 3, 8, 8) and data.x_test.shape == (2, 3, 8, 8)
    assert data.y_train.tolist() == [0, 0, 0, 1, 1, 1] and data.y_test.tolist() == [0, 1]
    assert data.x_train[4].mul(255).round().unique().tolist() == [101.0]  # dog/1.png, flat 101, resized


def test_imagefolder_split_is_deterministic(tmp_path):
    for k, cls in enumerate(("a", "b", "c")):
        for i in range(5):
            _png(tmp_path / cls / f"{i}.png", 6, 6, 10 * k + i)
    one, two = load_dataset(f"imagefolder:{tmp_path},size=6"), load_dataset(f"imagefolder:{tmp_path},size=6")
    assert torch.equal(one.x_test, two.x_test) and one.y_test.tolist() == [0, 1, 2]
    assert one.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    pixels = sorted(torch.cat([one.x_train, one.x_test])[:, 0, 0, 0].mul(255).round().tolist())
    assert pixels == sorted(10.0 * k + i for k in range(3) for i in range(5))  # a partition of the files
    other = load_dataset(f"imagefolder:{tmp_path},size=6,seed=1")
    assert not torch.equal(other.x_test, one.x_test)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="needs a folder"):
        load_dataset("imagefolder:")
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "empty").mkdir()
    _png(tmp_path / "full" / "0.png", 4, 4, 0)
    with pytest.raises(ValueError, match="empty hold no images"):
        load_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "empty" / "bad.png").write_bytes(b"not a png")
    for i in (1, 2):
        _png(tmp_path / "full" / f"{i}.png", 4, 4, i)
        _png(tmp_path / "empty" / f"{i}.png", 4, 4, i)
    data = load_dataset(f"imagefolder:{tmp_path}")  # files are listed, not decoded, when the data is loaded
    with pytest.raises(ValueError, match="cannot decode .*bad.png"):
        torch.cat([data.x_train, data.x_test])
    with pytest.raises(ValueError, match="crop must lie in"):
        load_dataset(f"imagefolder:{tmp_path},size=8,crop=9")


@pytest.mark.parametrize("labels, shown", [
    ([float("nan"), 1.0], "dtype float64"), ([2.7, 1.0], "dtype float64"), (["a", "b"], "dtype <U1"),
    (np.array(["a", 1], dtype=object), "dtype object"), ([True, False], "dtype bool")])
def test_cifar_labels_must_be_integers(cifar10_dir, labels, shown):
    """NaN labels trained and then crashed in the probes; 2.7 silently became class 2; strings and object
    arrays crashed in numpy."""
    root = cifar10_dir / "cifar-10-batches-py"
    _dump(root / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8), b"labels": labels})
    with pytest.raises(ValueError, match=f"data_batch_2' has b'labels' of {shown}.*expected integers in 0..9"):
        load_dataset(f"cifar10:{root}")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_pickles_of_every_protocol_load(cifar10_dir, protocol):
    """Python 3 writes protocol 2 bytes as _codecs.encode(text, 'latin1') and protocol 5 arrays through
    numpy's _frombuffer: both used to be refused as if the file were malicious."""
    root = cifar10_dir / "cifar-10-batches-py"
    for i in range(1, 6):
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump({**_batch(4, i), b"data": np.asarray(_batch(4, i)[b"data"])}, f, protocol=protocol)
    data = load_dataset(f"cifar10:{root}")
    assert torch.equal(data.x_train[:4].flatten(1), torch.from_numpy(_batch(4, 1)[b"data"]))
    assert data.y_train[:4].tolist() == _batch(4, 1)[b"labels"]


class _Reduces:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload, message", [
    (_Reduces(__import__("codecs").encode, "x", "rot13"), "refusing _codecs.encode"),
    (_Reduces(__import__("codecs").encode, b"x", "latin1"), "refusing _codecs.encode"),
    (_Reduces(np._core.numeric._frombuffer, b"\0" * 8, np.dtype(object), (1,), "C"), "refusing numpy _frombuffer"),
    (_Reduces(np._core.numeric._frombuffer, "text", np.dtype(np.uint8), (4,), "C"), "refusing numpy _frombuffer"),
])
def test_cifar_protocol_stand_ins_take_only_what_numpy_writes(cifar10_dir, payload, message):
    root = cifar10_dir / "cifar-10-batches-py"
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": payload, b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match=message):
        load_dataset(f"cifar10:{root}")


@pytest.mark.parametrize("decoder", ["torchvision", "pillow"])
def test_imagefolder_16_bit_png_keeps_its_range(tmp_path, decoder):
    """Pillow's I;16 -> RGB clipped at 255: a full-range ramp decoded almost all white (mean 254.5, 7 values)."""
    from sslcore.data.imagefolder import decode

    ramp = np.linspace(0, 65535, 1600).reshape(40, 40).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"
    img = decode(tmp_path / "ramp.png", 40, decoder)
    assert img.dtype == torch.uint8 and torch.equal(img[0], img[2])
    assert abs(img.float().mean().item() - 127.5) < 1 and img.unique().numel() > 200
    assert torch.equal(img[0], torch.from_numpy(np.rint(ramp / 257).astype(np.uint8)))


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("PNG", "P"), ("JPEG", "RGB"),
                                       ("WEBP", "RGB"), ("GIF", "P")])
def test_imagefolder_decoders_agree(tmp_path, fmt, mode):
    """torchvision.io and Pillow give the same pixels (lossless formats exactly; JPEG within the IDCT's rounding:
    the two libjpeg-turbo builds may differ by a level or two), and auto is one of them."""
    from sslcore.data.imagefolder import decode

    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((23, 31, 3)) * 255).astype(np.uint8))
    img = rgb.convert(mode) if mode != "P" else rgb.quantize(64)
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}))
    tv, pil, auto = (decode(path, 23, d) for d in ("torchvision", "pillow", "auto"))
    assert tv.shape == pil.shape == (3, 23, 23) and tv.dtype == pil.dtype == torch.uint8
    tol = 2 if fmt == "JPEG" else 0
    assert (tv.int() - pil.int()).abs().max() <= tol, (fmt, mode)
    assert torch.equal(auto, tv)  # a small JPEG: no draft to gain, so torchvision


def test_imagefolder_auto_takes_the_jpeg_draft_for_large_jpegs(tmp_path, monkeypatch):
    from sslcore.data import imagefolder

    Image.new("RGB", (200, 160), (10, 200, 30)).save(tmp_path / "big.jpg")
    used = []
    monkeypatch.setattr(imagefolder, "_torchvision",
                        lambda path: used.append("tv") or torch.zeros(3, 8, 8, dtype=torch.uint8))
    imagefolder.decode(tmp_path / "big.jpg", 32)  # 160 >= 2 x 32: Pillow's draft
    imagefolder.decode(tmp_path / "big.jpg", 96)  # 160 < 2 x 96: torchvision
    assert used == ["tv"]
    with pytest.raises(ValueError, match="imagefolder setting decoder must be one of auto, torchvision, pillow"):
        load_dataset(f"imagefolder:{tmp_path},decoder=nvjpg")


def test_imagefolder_nvjpeg_batch_path_equals_decoding_one_by_one(tmp_path, monkeypatch):
    """decoder=nvjpeg's batched path (decode_jpeg on a list, resized on its device), run here on the CPU: the same
    pixels as the per-item torchvision path for JPEGs of odd sizes, a greyscale JPEG and a PNG among them, in the
    batch's order; a broken file is named.  On CUDA the same call runs nvJPEG (owed: a GPU run)."""
    from sslcore.data.imagefolder import FolderItems, decode, decode_batch
    from sslcore.data.pipeline import loader, sequential_loader

    rng = np.random.default_rng(1)
    files = []
    for i, (w, h, mode, fmt) in enumerate([(37, 29, "RGB", "JPEG"), (23, 41, "L", "JPEG"), (30, 30, "RGB", "PNG"),
                                           (64, 51, "RGB", "JPEG")]):
        img = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).convert(mode)
        files.append(tmp_path / f"{i}.{fmt.lower()}")
        img.save(files[-1], fmt)
    batch = decode_batch(files, 19, device="cpu")
    assert batch.shape == (4, 3, 19, 19) and batch.dtype == torch.uint8 and batch.device.type == "cpu"
    for f, img in zip(files, batch):
        assert torch.equal(img, decode(f, 19, "torchvision")), f
    items = FolderItems(files, 19, "nvjpeg", device="cpu")
    index, got = items.__getitems__([3, 0])
    assert index.tolist() == [3, 0] and torch.equal(got, batch[[3, 0]])
    (tmp_path / "bad.jpg").write_bytes(files[0].read_bytes()[:200])  # a JPEG cut short
    broken = FolderItems([files[0], tmp_path / "bad.jpg"], 19, "nvjpeg", device="cpu").__getitems__([0, 1])
    assert "cannot decode" in broken.message and "bad.jpg" in broken.message
    for make in (lambda: loader(items, [[0, 1]], workers=2), lambda: sequential_loader(items, 2, workers=1)):
        with pytest.raises(ValueError, match="--workers .*decoder=nvjpeg decodes on the GPU in the main process"):
            make()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="decoder=nvjpeg decodes on a CUDA GPU .* use decoder=auto"):
        FolderItems(files, 19, "nvjpeg")
    from sslcore.data.imagefolder import parse_spec

    assert parse_spec(f"{tmp_path},decoder=nvjpeg")[1]["decoder"] == "nvjpeg"


def test_imagefolder_decompression_bomb_names_the_file(tmp_path):
    from sslcore.data.imagefolder import decode

    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")  # 200 M pixels in a few KB
    with pytest.raises(ValueError, match=r"cannot decode '.*bomb.png': Image size \(200000000 pixels\) exceeds"):
        decode(tmp_path / "bomb.png", 32)


def test_imagefolder_hidden_folders_and_files_are_not_classes(tmp_path):
    for cls in ("cat", "dog", ".ipynb_checkpoints", ".git"):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", 4, 4, i)
    (tmp_path / ".git" / "HEAD").write_text("ref")
    _png(tmp_path / "cat" / "._3.png", 4, 4, 0)  # a macOS resource fork beside the image
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert sorted(set(data.y_train.tolist() + data.y_test.tolist())) == [0, 1]
    assert not any(f.name.startswith(".") or f.parent.name.startswith(".") for f in data.files_train + data.files_test)


def test_imagefolder_layout_errors_say_what_is_wrong(tmp_path):
    for cls in ("a", "b"):
        _png(tmp_path / "train" / cls / "0.png", 4, 4, 0)
    with pytest.raises(ValueError, match="has train/ but no val/ or test/ beside it"):
        load_dataset(f"imagefolder:{tmp_path}")
    flat = tmp_path / "flat"
    for i in range(3):
        _png(flat / "a" / f"{i}.png", 4, 4, i)
    (flat / "b").symlink_to(flat / "a")
    with pytest.raises(ValueError, match="class folders a and b are the same folder"):
        load_dataset(f"imagefolder:{flat}")
    with pytest.raises(ValueError, match="unknown imagefolder setting 'bogus'.*settings: size, crop, seed, decoder"):
        load_dataset(f"imagefolder:{flat},bogus=3")
    with pytest.raises(ValueError, match="unknown imagefolder setting 'bogus'"):
        load_dataset(f"imagefolder:{flat},bogus=3,size=8")
    odd = tmp_path / "odd,x=1"  # a folder whose own name looks like a setting is still read
    for cls in ("a", "b"):
        for i in range(3):
            _png(odd / cls / f"{i}.png", 4, 4, i)
    assert load_dataset(f"imagefolder:{odd},size=4").n_train == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_a_decode_error_in_a_loader_worker_is_its_own_message(tmp_path, workers):
    """A worker's error used to reach the user as 'Caught ValueError in DataLoader worker process 0.
    Original Traceback ...'."""
    from sslcore.data.imagefolder import FolderItems
    from sslcore.data.pipeline import sequential_loader

    for i in range(3):
        _png(tmp_path / f"{i}.png", 4, 4, i)
    (tmp_path / "3.png").write_bytes(b"")
    items = FolderItems(sorted(tmp_path.glob("*.png")), 4)
    with pytest.raises(ValueError) as exc:
        list(sequential_loader(items, 2, workers=workers))
    assert str(exc.value).startswith("imagefolder: cannot decode ") and "3.png" in str(exc.value)
    assert "Traceback" not in str(exc.value) and "worker" not in str(exc.value)
