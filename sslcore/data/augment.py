"""Random views of image batches on the device, every random number from a ``torch.Generator``.

An augmentation is two steps: ``sample(n, shape, generator)`` draws each image's parameters on the CPU
(a few numbers per image: crop box, flip, jitter factors, blur sigma, ...), and ``apply(x, params)``
applies them to a batch on its device as batched tensor maths.  The trainer draws the parameters of
the *global* batch and each rank applies its own rows to its own shard, so a data-parallel run makes
the same views as one process, and a run is reproducible and resumable from the generator's state
alone.  ``aug(x, generator)`` does both on one batch.

torchvision's v2 transforms draw from torch's global RNG, one set per call, per image in a worker;
here every image of a batch gets its own parameters on the device.  The recipes
(:func:`build_recipe`) are SimCLR's, BYOL's and MAE's, and ``shifts``, whose ops (edge map, stripes,
inversion, noise) span domain shifts; what each op draws is in its docstring.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import rgb_to_grayscale

from . import AUGMENT_CHOICES, RECIPES

# RGB -> YIQ and back: a hue shift by angle h is a rotation by h in the (I, Q) plane.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB = torch.linalg.inv(_YIQ)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, *shape) -> torch.Tensor:
    return torch.rand(n, *shape, generator=generator) * (hi - lo) + lo


def _chance(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def _probability(name: str, p: float) -> None:
    if not 0 <= p <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")


def _rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, 1, 1, 1)


class Augment:
    """Base of every augmentation: ``sample`` draws per-image parameters, ``apply`` uses them."""

    def sample(self, n: int, shape: Sequence[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Parameters of ``n`` images of shape ``shape`` ``(C, H, W)``: CPU tensors whose first dimension is ``n``."""
        return {}

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        params = self.sample(len(x), x.shape[1:], generator)
        return self.apply(x, {k: v.to(x.device) for k, v in params.items()})


class Compose(Augment):
    """The ops in order; each one's parameters are drawn in that order."""

    def __init__(self, *ops: Augment):
        self.ops = ops

    def sample(self, n, shape, generator):
        params = {}
        for i, op in enumerate(self.ops):
            params.update({f"{i}.{k}": v for k, v in op.sample(n, shape, generator).items()})
            shape = getattr(op, "out_shape", lambda s: s)(shape)
        return params

    def apply(self, x, params):
        for i, op in enumerate(self.ops):
            x = op.apply(x, {k.partition(".")[2]: v for k, v in params.items() if k.startswith(f"{i}.")})
        return x


class RandomResizedCrop(Augment):
    """A box of area fraction ``s ~ U(scale)`` and aspect ``r ~ logU(ratio)`` per image, width ``sqrt(s r)``
    and height ``sqrt(s / r)`` (fractions of the side, clipped to 1 so the box never leaves the image;
    torchvision retries instead of clipping), at a uniform position, resampled bilinearly to ``size``
    (default: the input's size).  With ``flip_p`` the box is also mirrored horizontally with that
    probability (one affine map does both).  Downscaling is not antialiased."""

    def __init__(self, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 size: int | tuple[int, int] | None = None, flip_p: float = 0.0):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale!r}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio!r}")
        _probability("flip_p", flip_p)
        self.scale, self.ratio, self.flip_p = scale, ratio, flip_p
        self.size = (size, size) if isinstance(size, int) else size

    def out_shape(self, shape):
        return (shape[0], *self.size) if self.size else tuple(shape)

    def sample(self, n, shape, generator):
        area = _uniform(n, *self.scale, generator)
        aspect = torch.exp(_uniform(n, math.log(self.ratio[0]), math.log(self.ratio[1]), generator))
        w, h = torch.sqrt(area * aspect).clamp(max=1.0), torch.sqrt(area / aspect).clamp(max=1.0)
        cx, cy = _uniform(n, -1, 1, generator) * (1 - w), _uniform(n, -1, 1, generator) * (1 - h)
        flip = _chance(n, self.flip_p, generator)
        return {"box": torch.stack([w, h, cx, cy], 1), "flip": flip}

    def apply(self, x, params):
        w, h, cx, cy = params["box"].to(x.dtype).unbind(1)
        sign = torch.where(params["flip"], -1.0, 1.0).to(x.dtype)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([w * sign, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        grid = F.affine_grid(theta, [len(x), x.shape[1], *self.out_shape(x.shape[1:])[1:]], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ColorJitter(Augment):
    """With probability ``p``, in this fixed order (torchvision shuffles it): brightness ``x * b``,
    contrast ``g + c (x - g)`` around the image's mean grey ``g``, saturation ``y + s (x - y)`` around
    each pixel's grey ``y``, hue as a rotation by ``2 pi h`` of the YIQ chroma plane (a linear stand-in
    for the HSV hue shift), with ``b, c, s ~ U(1 -+ strength)`` and ``h ~ U(-hue, hue)``, clamped to
    [0, 1] after each step.  Grey images (one channel) get brightness and contrast only."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1,
                 p: float = 0.8):
        _probability("ColorJitter p", p)
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p

    def sample(self, n, shape, generator):
        b, c, s = (_uniform(n, 1 - v, 1 + v, generator) for v in (self.brightness, self.contrast, self.saturation))
        return {"bcs": torch.stack([b, c, s], 1), "hue": _uniform(n, -self.hue, self.hue, generator),
                "on": _chance(n, self.p, generator)}

    def apply(self, x, params):
        b, c, s = (v.to(x.dtype).view(-1, 1, 1, 1) for v in params["bcs"].unbind(1))
        out = (x * b).clamp(0, 1)
        grey = rgb_to_grayscale(out) if x.shape[1] == 3 else out
        mean = grey.mean((1, 2, 3), keepdim=True)
        out = (mean + c * (out - mean)).clamp(0, 1)
        if x.shape[1] == 3:
            grey = rgb_to_grayscale(out)
            out = (grey + s * (out - grey)).clamp(0, 1)
            angle = params["hue"].to(x.dtype) * (2 * math.pi)
            cos, sin, one, zero = torch.cos(angle), torch.sin(angle), torch.ones_like(angle), torch.zeros_like(angle)
            rot = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                               torch.stack([zero, sin, cos], 1)], 1)  # [B, 3, 3] acting on (Y, I, Q)
            mix = _RGB.to(x) @ rot @ _YIQ.to(x)
            out = torch.einsum("bij,bjhw->bihw", mix, out).clamp(0, 1)
        return torch.where(_rows(params["on"]), out, x)


class Grayscale(Augment):
    """With probability ``p``, the image's grey levels in every channel (a no-op on grey images)."""

    def __init__(self, p: float = 0.2):
        _probability("Grayscale p", p)
        self.p = p

    def sample(self, n, shape, generator):
        return {"on": _chance(n, self.p, generator)}

    def apply(self, x, params):
        if x.shape[1] != 3:
            return x
        return torch.where(_rows(params["on"]), rgb_to_grayscale(x, num_output_channels=3), x)


class GaussianBlur(Augment):
    """With probability ``p``, a Gaussian blur of standard deviation ``sigma ~ U(sigma)`` pixels, separable,
    with a kernel of about ``kernel_fraction`` of the image's side (odd, >= 3; SimCLR: 10 %) and
    reflected borders."""

    def __init__(self, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0), kernel_fraction: float = 0.1):
        _probability("GaussianBlur p", p)
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"blur sigma must satisfy 0 < lo <= hi, got {sigma!r}")
        self.p, self.sigma, self.kernel_fraction = p, sigma, kernel_fraction

    def sample(self, n, shape, generator):
        return {"sigma": _uniform(n, *self.sigma, generator), "on": _chance(n, self.p, generator)}

    def kernel_size(self, side: int) -> int:
        return max(3, int(side * self.kernel_fraction) // 2 * 2 + 1)

    def apply(self, x, params):
        b, c, h, w = x.shape
        k = min(self.kernel_size(min(h, w)), (min(h, w) - 1) // 2 * 2 + 1)
        if k < 3:
            return x
        offsets = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
        weights = torch.exp(-0.5 * (offsets / params["sigma"].to(x.dtype)[:, None]) ** 2)
        weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, k]
        out = F.pad(x.reshape(1, b * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
        out = F.conv2d(out, weights.view(b * c, 1, 1, k), groups=b * c)
        out = F.conv2d(out, weights.view(b * c, 1, k, 1), groups=b * c).view(b, c, h, w)
        return torch.where(_rows(params["on"]), out, x)


class Solarize(Augment):
    """With probability ``p``, every value ``v >= threshold`` becomes ``1 - v`` (images in [0, 1])."""

    def __init__(self, p: float = 0.2, threshold: float = 0.5):
        _probability(f"{type(self).__name__} p", p)
        self.p, self.threshold = p, threshold

    def sample(self, n, shape, generator):
        return {"on": _chance(n, self.p, generator)}

    def apply(self, x, params):
        return torch.where(_rows(params["on"]) & (x >= self.threshold), 1 - x, x)


def _range(name: str, lo_hi: tuple[float, float], lo: float = 0.0, hi: float = float("inf")) -> None:
    if not lo <= lo_hi[0] <= lo_hi[1] <= hi:
        raise ValueError(f"{name} must satisfy {lo:g} <= low <= high <= {hi:g}, got {lo_hi!r}")


class EdgeMap(Augment):
    """With probability ``p``, ``(1 - b) x + b E(x)``, ``b ~ U(strength)``: ``E`` is each channel's Sobel gradient
    magnitude over 4 (replicated borders), clamped to [0, 1], so a step of height ``h`` becomes a 2-pixel line
    of value ``h`` on black: an outline drawing of the image."""

    def __init__(self, p: float = 0.5, strength: tuple[float, float] = (0.0, 1.0)):
        _probability("EdgeMap p", p)
        _range("EdgeMap strength", strength, hi=1.0)
        self.p, self.strength = p, strength

    def sample(self, n, shape, generator):
        return {"strength": _uniform(n, *self.strength, generator), "on": _chance(n, self.p, generator)}

    def apply(self, x, params):
        c = x.shape[1]
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype)
        kernels = torch.stack([sobel, sobel.T])[:, None].repeat(c, 1, 1, 1)  # [2C, 1, 3, 3]: d/dx, d/dy per channel
        grad = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels, groups=c).unflatten(1, (c, 2))
        edges = (grad.pow(2).sum(2).sqrt() / 4).clamp(0, 1)
        b = params["strength"].to(x.dtype).view(-1, 1, 1, 1)
        return torch.where(_rows(params["on"]), x + b * (edges - x), x)


class StripeOverlay(Augment):
    """With probability ``p``, stripes of a random colour ``k ~ U(0, 1)^C`` blended in: ``x + a s (k - x)``,
    ``a ~ U(strength)``, ``s = (1 + sin(2 pi u / T + phase)) / 2`` along a direction at a uniform angle, period
    ``T ~ U(period)`` as a fraction of the image's side, uniform phase: a texture over the image."""

    def __init__(self, p: float = 0.5, strength: tuple[float, float] = (0.0, 0.8),
                 period: tuple[float, float] = (0.15, 0.4)):
        _probability("StripeOverlay p", p)
        _range("StripeOverlay strength", strength, hi=1.0)
        if not 0 < period[0] <= period[1]:
            raise ValueError(f"StripeOverlay period must satisfy 0 < low <= high, got {period!r}")
        self.p, self.strength, self.period = p, strength, period

    def sample(self, n, shape, generator):
        return {"strength": _uniform(n, *self.strength, generator), "period": _uniform(n, *self.period, generator),
                "angle": _uniform(n, 0, math.pi, generator), "phase": _uniform(n, 0, 2 * math.pi, generator),
                "colour": torch.rand(n, shape[0], generator=generator), "on": _chance(n, self.p, generator)}

    def apply(self, x, params):
        h, w = x.shape[-2:]
        ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5)[:, None]
        xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5)[None, :]
        angle, period, phase, a = (params[k].to(x.dtype).view(-1, 1, 1)
                                   for k in ("angle", "period", "phase", "strength"))
        along = torch.cos(angle) * xs + torch.sin(angle) * ys  # [B, H, W]
        stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * along / (period * min(h, w)) + phase)
        colour = params["colour"].to(x.dtype)[:, :, None, None]
        out = x + (a * stripes)[:, None] * (colour - x)
        return torch.where(_rows(params["on"]), out, x)


class Invert(Solarize):
    """With probability ``p``, ``1 - x``: lightness inverted (a dark shape on a pale ground); a
    :class:`Solarize` of every value."""

    def __init__(self, p: float = 0.5):
        super().__init__(p, threshold=-math.inf)


class GaussianNoise(Augment):
    """With probability ``p``, lower contrast and pixel noise: ``0.5 + c (x - 0.5) + sigma e``, clamped to
    [0, 1], with ``c ~ U(contrast)``, ``sigma ~ U(sigma)`` and ``e ~ N(0, 1)`` per pixel.  The noise is drawn
    by :meth:`sample` (a full image of numbers per image, unlike the other ops)."""

    def __init__(self, p: float = 0.5, sigma: tuple[float, float] = (0.0, 0.3),
                 contrast: tuple[float, float] = (0.5, 1.0)):
        _probability("GaussianNoise p", p)
        _range("GaussianNoise sigma", sigma)
        _range("GaussianNoise contrast", contrast)
        self.p, self.sigma, self.contrast = p, sigma, contrast

    def sample(self, n, shape, generator):
        return {"sigma": _uniform(n, *self.sigma, generator), "contrast": _uniform(n, *self.contrast, generator),
                "noise": torch.randn(n, *shape, generator=generator), "on": _chance(n, self.p, generator)}

    def apply(self, x, params):
        c, sigma = (params[k].to(x.dtype).view(-1, 1, 1, 1) for k in ("contrast", "sigma"))
        out = (0.5 + c * (x - 0.5) + sigma * params["noise"].to(x.dtype)).clamp(0, 1)
        return torch.where(_rows(params["on"]), out, x)


class Normalize(Augment):
    """``(x - mean) / std`` per channel; draws nothing."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def apply(self, x, params=None):
        return (x - self.mean.to(x).view(1, -1, 1, 1)) / self.std.to(x).view(1, -1, 1, 1)


class Identity(Augment):
    """No change (the default next step of an op, and the pipeline of an un-augmented view)."""

    def apply(self, x, params):
        return x


def shift_ops() -> list[Augment]:
    """The domain-shift ops of the ``shifts`` recipe, in order, at their training ranges: edge map (p 0.25,
    strength 0-1), stripes (p 0.4, strength 0-0.8, period 15-40 % of the side), inversion (p 0.5), noise
    (p 0.4, sigma 0-0.3, contrast 0.5-1)."""
    return [EdgeMap(0.25), StripeOverlay(0.4), Invert(0.5), GaussianNoise(0.4)]


class RGBAugment(Compose):
    """Random resized crop + horizontal flip, colour jitter (prob. ``jitter_p``), grey (prob. ``gray_p``):
    the ``light`` recipe (MoCo v2's strengths, no blur), the default of the ``shapes`` data."""

    def __init__(self, scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip_p: float = 0.5, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, jitter_p: float = 0.8, gray_p: float = 0.2):
        for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("gray_p", gray_p)):
            _probability(name, p)
        super().__init__(RandomResizedCrop(scale, ratio, flip_p=flip_p),
                         ColorJitter(brightness, contrast, saturation, hue, p=jitter_p), Grayscale(gray_p))

    def apply(self, x, params):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"RGBAugment expects images [B, 3, H, W], got shape {tuple(x.shape)}")
        return super().apply(x, params)


class MultiCrop:
    """Multi-crop (SwAV): ``global_views`` crops at ``global_size`` and ``local_views`` smaller crops at
    ``local_size``, each followed by ``then`` (e.g. jitter and blur).  ``views(x, generator)`` returns the
    list, global crops first.  A library building block; the trainer's multi-crop is the ``dino`` recipe."""

    def __init__(self, global_size: int, local_size: int, *, global_views: int = 2, local_views: int = 6,
                 global_scale: tuple[float, float] = (0.14, 1.0), local_scale: tuple[float, float] = (0.05, 0.14),
                 flip_p: float = 0.5, then: Augment | None = None):
        then = then or Identity()
        self.crops = ([Compose(RandomResizedCrop(global_scale, size=global_size, flip_p=flip_p), then)] * global_views
                      + [Compose(RandomResizedCrop(local_scale, size=local_size, flip_p=flip_p), then)] * local_views)

    def views(self, x: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        return [crop(x, generator) for crop in self.crops]


class Recipe:
    """The views of one step: view ``i`` is ``pipelines[i % len(pipelines)]`` (BYOL's two views differ),
    or with ``repeat_last`` ``pipelines[min(i, len - 1)]`` (multi-crop: the last pipeline makes every view
    past the others, DINO's local crops), then ``normalize``.  ``views(x, generator, n, batch=, rows=)``:
    parameters are drawn for ``batch`` images (the global batch) and ``rows`` of them (this rank's shard)
    applied to ``x``."""

    def __init__(self, name: str, pipelines: Sequence[Augment], normalize: Augment | None = None, *,
                 repeat_last: bool = False):
        self.name, self.pipelines, self.normalize = name, list(pipelines), normalize
        self.repeat_last = repeat_last

    def views(self, x: torch.Tensor, generator: torch.Generator, n: int, *, batch: int | None = None,
              rows: slice | None = None) -> list[torch.Tensor]:
        batch, rows = batch or len(x), rows or slice(None)
        out = []
        for i in range(n):
            pipe = self.pipelines[min(i, len(self.pipelines) - 1) if self.repeat_last else i % len(self.pipelines)]
            params = {k: v[rows].to(x.device, non_blocking=True)
                      for k, v in pipe.sample(batch, x.shape[1:], generator).items()}
            view = pipe.apply(x, params)
            out.append(self.normalize.apply(view) if self.normalize is not None else view)
        return out


def _byol_view(flip_p: float, blur_p: float, solarize_p: float, side: int) -> Compose:
    return Compose(RandomResizedCrop((0.08, 1.0), flip_p=flip_p), ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
                   Grayscale(0.2), GaussianBlur(blur_p, kernel_fraction=23 / 224), Solarize(solarize_p))


def _dino_view(scale: tuple[float, float], size: int, flip_p: float, blur_p: float, solarize_p: float) -> Compose:
    return Compose(RandomResizedCrop(scale, size=size, flip_p=flip_p), ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
                   Grayscale(0.2), GaussianBlur(blur_p, kernel_fraction=23 / 224), Solarize(solarize_p))


def dino_local_size(image_size: int) -> int:
    """The side of DINO's local crops for images of side ``image_size``: 96/224 of it (the authors' 96 px at
    224), at least 4 px."""
    return max(4, round(image_size * 96 / 224))


def build_recipe(name: str, *, image_size: int, flips: bool = True, own: Augment | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Recipe:
    """The recipe ``name`` (one of :data:`RECIPES`) for images of side ``image_size``; ``flips=False`` for data
    where a mirror image is another class (digits); ``own``: the data's own augmentation (``digits``);
    ``mean``/``std``: the data's normalisation, applied to every view.

    * ``simclr`` (Chen et al. 2020): crop of area 8-100 %, flip, colour jitter of strength s, i.e.
      0.8s/0.8s/0.8s/0.2s (p 0.8), grey (p 0.2), Gaussian blur (p 0.5, kernel 10 % of the side); s = 1,
      and at 32 px and below s = 0.5 without blur, as the authors' CIFAR-10 recipe.
    * ``byol`` (Grill et al. 2020): crop 8-100 %, flip, jitter 0.4/0.4/0.2/0.1 (p 0.8), grey (p 0.2),
      blur p 1.0 / 0.1 and solarize p 0.0 / 0.2 in view 1 / view 2.
    * ``dino`` (Caron et al. 2021), multi-crop: two global crops of area 40-100 % at the image's side, BYOL's
      ops on each (blur p 1.0 / 0.1, solarize p 0 / 0.2), then any further views as local crops of area
      5-40 % at :func:`dino_local_size` (blur p 0.5); the view count is the method's ``n_views``.
    * ``mae`` (He et al. 2022): crop of area 20-100 % and flip only.
    * ``light``: :class:`RGBAugment` (crop 20-100 %, flip, jitter 0.4/0.4/0.4/0.1, grey; no blur).
    * ``shifts``: ``light``, then the domain shifts of :func:`shift_ops` (edge map, stripes, inversion, noise;
      each at a random strength with its probability): a family whose fixed-strength members are the
      target domains of the transfer study (docs/methods.md, ArCL).
    * ``digits``: the data's own augmentation (:class:`~sslcore.data.digits.DigitsAugment`).
    * ``none``: the images as they are.
    """
    flip_p = 0.5 if flips else 0.0
    if name == "simclr":
        s = 1.0 if image_size > 32 else 0.5
        ops = [RandomResizedCrop((0.08, 1.0), flip_p=flip_p), ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=0.8),
               Grayscale(0.2)]
        if image_size > 32:
            ops.append(GaussianBlur(0.5))
        pipelines = [Compose(*ops)]
    elif name == "byol":
        pipelines = [_byol_view(flip_p, 1.0, 0.0, image_size), _byol_view(flip_p, 0.1, 0.2, image_size)]
    elif name == "dino":
        local = _dino_view((0.05, 0.4), dino_local_size(image_size), flip_p, 0.5, 0.0)
        pipelines = [_dino_view((0.4, 1.0), image_size, flip_p, 1.0, 0.0),
                     _dino_view((0.4, 1.0), image_size, flip_p, 0.1, 0.2), local]
        return Recipe(name, pipelines, Normalize(mean, std) if mean is not None else None, repeat_last=True)
    elif name == "mae":
        pipelines = [RandomResizedCrop((0.2, 1.0), flip_p=flip_p)]
    elif name in ("light", "shifts"):
        shifts = shift_ops() if name == "shifts" else []
        pipelines = [Compose(RandomResizedCrop((0.2, 1.0), flip_p=flip_p), ColorJitter(), Grayscale(), *shifts)]
    elif name == "digits":
        if own is None:
            raise ValueError("--augment digits is the digits data's own augmentation; this data has none")
        pipelines = [own]
    elif name == "none":
        pipelines = [Identity()]
    else:
        raise ValueError(f"unknown augmentation recipe {name!r}; valid: {', '.join(RECIPES)}")
    return Recipe(name, pipelines, Normalize(mean, std) if mean is not None else None)


__all__ = ["AUGMENT_CHOICES", "RECIPES", "Augment", "ColorJitter", "Compose", "EdgeMap", "GaussianBlur",
           "GaussianNoise", "Grayscale", "Identity", "Invert", "MultiCrop", "Normalize", "RGBAugment",
           "RandomResizedCrop", "Recipe", "Solarize", "StripeOverlay", "build_recipe", "dino_local_size", "shift_ops"]
