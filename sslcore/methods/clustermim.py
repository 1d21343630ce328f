"""ClusterMIM (docs/methods.md, "ClusterMIM, MAE and TCAS"): masked image modelling whose targets are k-means tokens.

Each masked patch's target is its token under a fitted tokenizer (pixel or feature k-means),
computed in fp32 without gradient on the same augmented image the encoder sees; the loss is the
cross-entropy of ``Linear(decoder_dim -> K)`` over the masked patches only.
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from ..checks import Backend, PositiveInt, Seed, UnitInterval, Width
from ..functional import to_float
from ..tokenizers import FeatureTokenizer, PixelTokenizer, RandomTokenizer, load_tokenizer
from .mae import MAE, MaskedImageModel


def build_tokenizer(spec: str, data, *, n_clusters: int | None, patch_size: int, seed: int = 0,
                    backend: str = "auto"):
    """The tokenizer named by ``spec`` for ``data``, fitted on its training images (unless loaded);
    ``backend`` is the k-means kernels' backend."""
    in_chans = data.in_chans
    if spec == "random":
        return RandomTokenizer(patch_size, 50 if n_clusters is None else n_clusters, seed=seed)
    if spec == "pixel":
        tok = PixelTokenizer(patch_size, 50 if n_clusters is None else n_clusters, in_chans=in_chans, seed=seed,
                             backend=backend)
    elif spec.startswith("feature:"):
        source = spec.partition(":")[2]
        if timm.is_model(source):  # a timm ViT sized for the data's images
            (name, kwargs), checkpoint = MaskedImageModel.encoder_spec(data, source, patch_size), None
        else:
            (name, kwargs), checkpoint = feature_model_spec(source, data), source
        tok = FeatureTokenizer(name, 1000 if n_clusters is None else n_clusters, model_kwargs=kwargs,
                               checkpoint=checkpoint, seed=seed, backend=backend)
        if tok.patch_size != patch_size:
            raise ValueError(f"the feature model's patch size {tok.patch_size} differs from the encoder's {patch_size}")
    else:
        tok = load_tokenizer(spec, patch_size=patch_size)
        if n_clusters is not None and tok.n_clusters != n_clusters:
            raise ValueError(f"tokenizer {spec!r} has {tok.n_clusters} clusters, not n_clusters={n_clusters}")
        return tok
    return tok.fit(to_float(data.x_train))


def feature_model_spec(checkpoint: str, data) -> tuple[str, dict]:
    """The timm name and kwargs of the ViT encoder saved in an ``mae``/``clustermim`` checkpoint."""
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        config = ckpt["config"]
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise ValueError(f"feature tokenizer checkpoint {checkpoint!r} is missing or not an sslcore checkpoint: "
                         f"{e}") from None
    if config.get("method") not in ("mae", "clustermim"):
        raise ValueError(f"feature tokenizer checkpoint {checkpoint!r} is from method {config.get('method')!r}; "
                         "use an mae or clustermim checkpoint (its encoder is a ViT with patch tokens)")
    return MaskedImageModel.encoder_spec(data, config["encoder"], config.get("options", {}).get("patch_size"))


class ClusterMIM(MaskedImageModel):
    """``loss = CE(head(decoder(...))[masked], tokenizer.encode(images)[masked])`` with optional label
    smoothing; the tokenizer is a frozen submodule (saved with the model's checkpoints)."""

    name = "clustermim"

    def __init__(self, encoder_name: str, encoder_kwargs: dict, tokenizer, *, label_smoothing: UnitInterval = 0.0,
                 **kwargs):
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
        super().__init__(encoder_name, encoder_kwargs, tokenizer.n_clusters, **kwargs)
        self.tokenizer = tokenizer.requires_grad_(False)
        self.label_smoothing = label_smoothing

    @classmethod
    def create(cls, data, *, encoder: str, tokenizer: str = "pixel", n_clusters: Width | None = None,
               patch_size: PositiveInt | None = None, seed: Seed = 0, backend: Backend = "auto",
               **options) -> "ClusterMIM":
        name, kwargs = cls.encoder_spec(data, encoder, patch_size)
        tok = build_tokenizer(tokenizer, data, n_clusters=n_clusters, patch_size=kwargs["patch_size"], seed=seed,
                              backend=backend)
        return cls(name, kwargs, tok, **options)

    def patch_loss(self, pred, images, mask, index=None):
        with torch.no_grad():
            extra = {"index": index} if self.tokenizer.needs_index else {}
            target = self.tokenizer.encode(images.float(), **extra)
        return F.cross_entropy(pred[mask].float(), target[mask], label_smoothing=self.label_smoothing)


__all__ = ["MAE", "ClusterMIM", "build_tokenizer"]
