"""Discrete image tokenizers for ClusterMIM (docs/methods.md, "Tokenizers"): k-means over patches.

- :class:`PixelTokenizer`: patchify the normalised image (MAE's patch layout), k-means (K = 50).
- :class:`FeatureTokenizer`: the patch tokens of a frozen timm model (CLS/prefix tokens dropped,
  not L2-normalised), k-means (K = 1000).
- :class:`RandomTokenizer`: tokens drawn at random, independent of the image: the class-blind
  control for TCAS.
- :class:`OracleTokenizer`: (class, pixel-cluster) tokens whose class part is replaced at random
  with rate ``rate``: a knob on class alignment at constant K.  It reads the labels, so it is a
  controlled experiment (``sslcore tcas-sweep``), not a usable tokenizer.

``fit(images_or_loader)`` learns the centres (a tensor: full-batch Lloyd; a dataset or loader:
streaming mini-batch k-means); ``encode(images)`` gives ``LongTensor[B, num_patches]``, each
patch's nearest centre by squared L2 through the fused assignment kernel (fp32 vectors: TF32 products on
the Triton path, exact on torch; docs/architecture.md, "k-means").  A tokenizer
is an ``nn.Module`` (centres and statistics are buffers), so ``.to(device)`` moves it, and
``save``/:func:`load_tokenizer` keep it in one file.
"""
from __future__ import annotations

import os
from typing import Iterator

import timm
import torch
from torch import nn
from tqdm import tqdm

from .checks import PositiveInt, Probability, check_value
from .cluster import KMeans
from .files import atomic_torch_save
from .kernels.kmeans import kmeans_assign

__all__ = ["FeatureTokenizer", "OracleTokenizer", "PixelTokenizer", "RandomTokenizer", "load_tokenizer", "patchify",
           "unpatchify"]

_FORMAT = "sslcore-tokenizer"


def _check_images(images: torch.Tensor, patch_size: int, in_chans: int | None = None, name: str = "images"):
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a tensor [B, C, H, W], got {got}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if in_chans is not None and images.shape[1] != in_chans:
        raise ValueError(f"{name} have {images.shape[1]} channels, the tokenizer was built for {in_chans}")
    h, w = images.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"{name} of size {h}x{w} are not a multiple of patch_size={patch_size}")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), p*p*C]`` in raster order, each patch laid out (p, p, C) as in MAE."""
    _check_images(images, patch_size)
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, in_chans: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`patchify`."""
    b, p = patches.shape[0], patch_size
    x = patches.reshape(b, height // p, width // p, p, p, in_chans)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, in_chans, height, width)


def _batches(data, batch_size: int) -> Iterator[torch.Tensor]:
    """Image batches from a tensor, a dataset (items ``x`` or ``(x, y, ...)``) or a loader of such batches."""
    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size)
        return
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, torch.utils.data.DataLoader):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size)
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


class _Tokenizer(nn.Module):
    """``kind`` and ``config()`` rebuild a tokenizer; ``save`` stores them with its buffers.  A tokenizer
    with ``needs_index`` takes ``encode(images, index=...)``, the images' positions in its data."""

    kind = ""
    needs_index = False

    def config(self) -> dict:
        raise NotImplementedError

    def save(self, path, *, option: str | None = None) -> None:
        """One file (``torch.load(weights_only=True)``-safe), written atomically, never through a link
        (:func:`sslcore.files.atomic_write`; ``option`` names the path in errors)."""
        state = {"format": _FORMAT, "kind": self.kind, "config": self.config(),
                 "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}
        atomic_torch_save(path, state, "tokenizer", option=option)


def is_tokenizer_file(path) -> bool:
    """Whether ``path`` holds a tokenizer :meth:`_Tokenizer.save` wrote (read without unpickling code)."""
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 -- unreadable or not a torch file: not ours
        return False
    return isinstance(state, dict) and state.get("format") == _FORMAT


class _KMeansTokenizer(_Tokenizer):
    """Shared part: centres (buffer), ``fit`` over patch vectors from :meth:`patches`, ``encode``."""

    def __init__(self, n_clusters: int, patch_size: int, dim: int, *, max_iter: int, batch_size: int, seed: int,
                 backend: str):
        super().__init__()
        for name, value in (("n_clusters", n_clusters), ("max_iter", max_iter), ("batch_size", batch_size)):
            check_value(name, value, PositiveInt)
        self.n_clusters, self.patch_size, self.dim = n_clusters, patch_size, dim
        self.max_iter, self.batch_size, self.seed, self.backend = max_iter, batch_size, seed, backend
        self.register_buffer("centers", torch.zeros(n_clusters, dim))
        self.register_buffer("fitted", torch.tensor(False))

    def config(self) -> dict:
        return {"n_clusters": self.n_clusters, "max_iter": self.max_iter, "batch_size": self.batch_size,
                "seed": self.seed, "backend": self.backend}

    def _device(self) -> torch.device:
        return self.centers.device

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """The vectors k-means clusters, ``[B, num_patches, dim]`` fp32."""
        raise NotImplementedError

    def _prepare(self, data) -> None:
        """A pass over the data before clustering (statistics); nothing by default."""

    @torch.no_grad()
    def fit(self, data, *, progress: bool = True) -> "_KMeansTokenizer":
        """Learn the centres from images: a ``[N, C, H, W]`` tensor (all patches, full-batch Lloyd) or a
        dataset / loader (streamed: ``max_iter`` passes of mini-batch k-means).  Returns ``self``.
        A fit that fails leaves the tokenizer as it was (centres, statistics, ``fitted``)."""
        saved = {name: b.clone() for name, b in self._buffers.items() if b is not None}
        try:
            self._fit(data, progress)
        except BaseException:
            for name, b in saved.items():
                self._buffers[name].copy_(b)
            raise
        return self

    def _fit(self, data, progress: bool) -> None:
        self._prepare(data)
        km = KMeans(self.n_clusters, max_iter=self.max_iter, random_state=self.seed, backend=self.backend)
        desc = f"{self.kind} tokenizer"
        if isinstance(data, torch.Tensor):
            chunks = [self.patches(x).flatten(0, 1) for x in tqdm(_batches(data, self.batch_size), desc=desc,
                                                                  disable=not progress, leave=False)]
            points = torch.cat(chunks)
            if points.shape[0] < self.n_clusters:
                raise ValueError(f"n_clusters={self.n_clusters} is more than the {points.shape[0]} patches to fit")
            km.fit(points)
        else:
            km.max_iter = 1
            for _ in tqdm(range(self.max_iter), desc=desc, disable=not progress, leave=False):
                for x in _batches(data, self.batch_size):
                    km.partial_fit(self.patches(x).flatten(0, 1))
            if km.cluster_centers_ is None:
                raise ValueError("the data to fit the tokenizer on is empty")
        self.centers.copy_(km.cluster_centers_.to(self.centers))
        self.fitted.fill_(True)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B, num_patches]``: the nearest centre (squared L2 of fp32 vectors; TF32 products on the
        Triton path) of each patch."""
        if not bool(self.fitted):
            raise RuntimeError(f"the {self.kind} tokenizer is not fitted: call fit() or load a saved one")
        x = self.patches(images)
        labels, _ = kmeans_assign(x.flatten(0, 1).float(), self.centers.float(),
                                  backend="auto" if self.backend == "faiss" else self.backend)
        return labels.view(x.shape[0], x.shape[1])

class PixelTokenizer(_KMeansTokenizer):
    """k-means over raw patches: ``patchify((x - mean) / std, p)`` with per-channel mean/std of the fitted
    images (no per-patch normalisation), ``dim = p*p*C``."""

    kind = "pixel"

    def __init__(self, patch_size: int, n_clusters: int = 50, *, in_chans: int = 3, max_iter: int = 100,
                 batch_size: int = 1024, seed: int = 0, backend: str = "auto"):
        check_value("patch_size", patch_size, PositiveInt)
        check_value("in_chans", in_chans, PositiveInt)
        super().__init__(n_clusters, patch_size, patch_size * patch_size * in_chans, max_iter=max_iter,
                         batch_size=batch_size, seed=seed, backend=backend)
        self.in_chans = in_chans
        self.register_buffer("mean", torch.zeros(in_chans))
        self.register_buffer("std", torch.ones(in_chans))

    def config(self) -> dict:
        return {**super().config(), "patch_size": self.patch_size, "in_chans": self.in_chans}

    def _prepare(self, data) -> None:
        total, total_sq, count = torch.zeros(self.in_chans, dtype=torch.float64), 0.0, 0
        for x in _batches(data, self.batch_size):
            _check_images(x, self.patch_size, self.in_chans)
            x = x.double().transpose(0, 1).flatten(1).cpu()
            total, total_sq, count = total + x.sum(1), total_sq + (x * x).sum(1), count + x.shape[1]
        if count == 0:
            raise ValueError("the data to fit the tokenizer on is empty")
        if not bool(torch.isfinite(total).all() & torch.isfinite(total_sq).all()):
            raise ValueError("the images to fit the tokenizer on contain non-finite values (NaN or Inf)")
        mean = total / count
        self.mean.copy_(mean)
        self.std.copy_((total_sq / count - mean * mean).clamp_min(1e-12).sqrt())

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.patch_size, self.in_chans)
        x = images.to(self._device(), torch.float32)
        x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        return patchify(x, self.patch_size)


class FeatureTokenizer(_KMeansTokenizer):
    """k-means over the patch tokens of a frozen timm model ``timm.create_model(model, **model_kwargs)``.

    ``checkpoint``: weights for it — a state dict file, or an sslcore pretraining checkpoint (its
    ``encoder.*`` weights).  ViTs give ``forward_features`` tokens minus the prefix (CLS) tokens;
    CNNs give their final feature map's positions.  Nothing is downloaded: a bare timm name is a
    randomly initialised model unless ``checkpoint`` is given.
    """

    kind = "feature"

    def __init__(self, model: str, n_clusters: int = 1000, *, model_kwargs: dict | None = None,
                 checkpoint: str | None = None, max_iter: int = 100, batch_size: int = 256, seed: int = 0,
                 backend: str = "auto"):
        if not isinstance(model, str) or not timm.is_model(model):
            raise ValueError(f"model must be a timm model name, got {model!r}")
        self.model_name, self.model_kwargs, self.checkpoint = model, dict(model_kwargs or {}), checkpoint
        net = timm.create_model(model, num_classes=0, **self.model_kwargs)
        if checkpoint is not None:
            net.load_state_dict(_encoder_weights(checkpoint))
        net.requires_grad_(False).eval()
        with torch.no_grad():
            probe = net.forward_features(torch.zeros(1, *self._input_shape(net)))
        dim = probe.shape[1] if probe.dim() == 4 else probe.shape[-1]
        patch = getattr(getattr(net, "patch_embed", None), "patch_size", (None,))[0]
        super().__init__(n_clusters, patch, dim, max_iter=max_iter, batch_size=batch_size, seed=seed,
                         backend=backend)
        self.model = net

    @staticmethod
    def _input_shape(net) -> tuple[int, int, int]:
        c, h, w = net.pretrained_cfg.get("input_size", (3, 224, 224))
        pe = getattr(net, "patch_embed", None)
        if pe is not None and getattr(pe, "img_size", None) is not None:
            h, w = pe.img_size
            c = pe.proj.in_channels
        return c, h, w

    def config(self) -> dict:
        return {**super().config(), "model": self.model_name, "model_kwargs": self.model_kwargs}

    def train(self, mode: bool = True):  # the feature model stays frozen in eval mode
        super().train(mode)
        self.model.eval()
        return self

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        c, h, w = self._input_shape(self.model)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (c, h, w):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must have shape [B, {c}, {h}, {w}] for {self.model_name}, got {got}")
        feats = self.model.forward_features(images.to(self._device(), torch.float32)).float()
        if feats.dim() == 4:  # CNN feature map [B, C, h, w]
            return feats.flatten(2).transpose(1, 2)
        return feats[:, getattr(self.model, "num_prefix_tokens", 0):]


class RandomTokenizer(_Tokenizer):
    """Class-blind control: every patch gets a token drawn uniformly from ``n_clusters``, independent of
    the image (seeded, so a call is reproducible)."""

    kind = "random"

    def __init__(self, patch_size: int, n_clusters: int = 50, *, seed: int = 0):
        super().__init__()
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
            raise ValueError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
        self.patch_size, self.n_clusters, self.seed = patch_size, n_clusters, seed

    def config(self) -> dict:
        return {"patch_size": self.patch_size, "n_clusters": self.n_clusters, "seed": self.seed}

    def fit(self, data, *, progress: bool = True) -> "RandomTokenizer":
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.patch_size)
        b, _, h, w = images.shape
        g = torch.Generator().manual_seed(self.seed)
        n = (h // self.patch_size) * (w // self.patch_size)
        return torch.randint(self.n_clusters, (b, n), generator=g).to(images.device)


class OracleTokenizer(_Tokenizer):
    """``token = class_part * K_pix + pixel.encode(images)``, ``K = n_classes * K_pix``: the class part of
    patch j of image i is ``labels[i]``, replaced with probability ``rate`` by a class drawn uniformly
    (drawn once from ``seed``: a fixed table ``[len(labels), num_patches]``).  ``rate`` 0: every token is
    class-pure (TCAS 0); 1: the class part is class-blind.  It reads the labels: a controlled experiment
    on alignment at constant K, not a usable tokenizer.  ``encode(images, index)``: ``index`` [B] are the
    images' positions in ``labels``."""

    kind = "oracle"
    needs_index = True

    def __init__(self, pixel: PixelTokenizer, labels: torch.Tensor, *, num_patches: int, n_classes: int,
                 rate: float, seed: int = 0):
        super().__init__()
        if not isinstance(pixel, PixelTokenizer):
            raise ValueError(f"pixel must be a PixelTokenizer, got {type(pixel).__name__}")
        check_value("num_patches", num_patches, PositiveInt)
        check_value("n_classes", n_classes, PositiveInt)
        check_value("rate", rate, Probability)
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.is_floating_point() or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty 1-D integer tensor, got shape {tuple(labels.shape)}")
        if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
            raise ValueError(f"labels must lie in [0, n_classes={n_classes})")
        self.pixel, self.patch_size = pixel, pixel.patch_size
        self.num_patches, self.n_classes, self.rate, self.seed = num_patches, n_classes, rate, seed
        self.n_clusters = n_classes * pixel.n_clusters
        g = torch.Generator().manual_seed(seed)
        shape = (len(labels), num_patches)
        replace = torch.rand(shape, generator=g) < rate
        drawn = torch.randint(n_classes, shape, generator=g)
        self.register_buffer("classes", torch.where(replace, drawn, labels.long()[:, None].expand(shape)))

    def config(self) -> dict:
        return {"pixel": self.pixel.config(), "n_images": len(self.classes), "num_patches": self.num_patches,
                "n_classes": self.n_classes, "rate": self.rate, "seed": self.seed}

    @torch.no_grad()
    def encode(self, images: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if index is None:
            raise ValueError("the oracle tokenizer reads labels: give encode(images, index=...), the images' "
                             "positions in its labels")
        index = torch.as_tensor(index).to(self.classes.device)
        if index.shape != images.shape[:1] or index.is_floating_point():
            raise ValueError(f"index must be integers [B] for B={images.shape[0]} images, got {tuple(index.shape)}")
        if int(index.min()) < 0 or int(index.max()) >= len(self.classes):
            raise ValueError(f"index must lie in [0, {len(self.classes)}), the labels the tokenizer was built on")
        pixel = self.pixel.encode(images)
        if pixel.shape[1] != self.num_patches:
            raise ValueError(f"images have {pixel.shape[1]} patches, the tokenizer was built for {self.num_patches}")
        return self.classes[index].to(pixel.device) * self.pixel.n_clusters + pixel


def _encoder_weights(path) -> dict:
    """A state dict from a file: a plain state dict, or an sslcore checkpoint's ``encoder.*`` weights."""
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on bad files
        raise ValueError(f"checkpoint {str(path)!r} is missing, corrupted or not a torch file: {e}") from None
    if isinstance(state, dict) and state.get("format") == "sslcore-checkpoint":
        state = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    if not isinstance(state, dict) or not state:
        raise ValueError(f"checkpoint {str(path)!r} holds no model weights")
    return state


def load_tokenizer(path, *, patch_size: int | None = None, dim: int | None = None) -> _Tokenizer:
    """A tokenizer saved by ``save``; ``patch_size``/``dim``, when given, must match the saved ones."""
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"tokenizer file {str(path)!r} is missing, corrupted or not a torch file: {e}") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{str(path)!r} is not an sslcore tokenizer file")
    config = dict(state["config"])
    if state["kind"] == "pixel":
        tok = PixelTokenizer(**config)
    elif state["kind"] == "feature":
        tok = FeatureTokenizer(config.pop("model"), **config)
    elif state["kind"] == "random":
        tok = RandomTokenizer(**config)
    elif state["kind"] == "oracle":
        n_images = config.pop("n_images")
        tok = OracleTokenizer(PixelTokenizer(**config.pop("pixel")), torch.zeros(n_images, dtype=torch.long),
                              **config)
    else:
        raise ValueError(f"{str(path)!r} holds an unknown tokenizer kind {state['kind']!r}")
    if patch_size is not None and tok.patch_size != patch_size:
        raise ValueError(f"tokenizer {str(path)!r} was saved for patch_size={tok.patch_size}, not {patch_size}")
    if dim is not None and getattr(tok, "dim", dim) != dim:
        raise ValueError(f"tokenizer {str(path)!r} was saved for dimension {tok.dim}, not {dim}")
    tok.load_state_dict(state["state_dict"])
    return tok
