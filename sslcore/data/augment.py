"""SimCLR-style random views of RGB images in [0, 1], batched, every random number from the generator passed in.

torchvision's v2 transforms draw their parameters from torch's global RNG (and one set per call),
so they cannot give each image of a batch its own parameters from a ``torch.Generator``; the ops
are written here as batched tensor maths instead (grey levels with torchvision's
``rgb_to_grayscale``).  A run is then reproducible and resumable from the generator's state alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import rgb_to_grayscale

# RGB -> YIQ and back: a hue shift by angle h is a rotation by h in the (I, Q) plane.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB = torch.linalg.inv(_YIQ)


class RGBAugment:
    """Random resized crop + horizontal flip, colour jitter (prob. ``jitter_p``), grey (prob. ``gray_p``).

    Per image: crop area fraction ``s ~ U(scale)`` and aspect ``r ~ logU(ratio)`` give the crop's
    width ``sqrt(s r)`` and height ``sqrt(s / r)`` (fractions of the side, clipped to 1, so a crop
    never leaves the image; torchvision retries instead of clipping), a uniform position, resampled
    bilinearly to the input size.  Colour jitter, in this fixed order (torchvision shuffles it):
    brightness ``x * b``, contrast ``g + c (x - g)`` around the image's mean grey ``g``, saturation
    ``y + s (x - y)`` around each pixel's grey ``y``, hue as a rotation by ``2 pi h`` of the YIQ
    chroma plane (a linear stand-in for the HSV hue shift), with ``b, c, s ~ U(1 -+ strength)`` and
    ``h ~ U(-hue, hue)``, clamped to [0, 1] after each step.
    """

    def __init__(self, scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip_p: float = 0.5, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, jitter_p: float = 0.8, gray_p: float = 0.2):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale!r}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio!r}")
        for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("gray_p", gray_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        self.scale, self.ratio, self.flip_p = scale, ratio, flip_p
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.jitter_p, self.gray_p = jitter_p, gray_p

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"RGBAugment expects images [B, 3, H, W], got shape {tuple(x.shape)}")
        b = x.shape[0]

        def uniform(lo, hi, *shape):
            return (torch.rand(b, *shape, generator=generator) * (hi - lo) + lo).to(x)

        def chance(p):
            return (torch.rand(b, generator=generator) < p).to(x.device).view(b, 1, 1, 1)

        area = uniform(*self.scale)
        aspect = torch.exp(uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        w, h = torch.sqrt(area * aspect).clamp(max=1.0), torch.sqrt(area / aspect).clamp(max=1.0)
        cx, cy = uniform(-1, 1) * (1 - w), uniform(-1, 1) * (1 - h)
        flip = torch.where(chance(self.flip_p).view(b), -1.0, 1.0).to(x)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([w * flip, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

        jittered = self._jitter(out, uniform)
        out = torch.where(chance(self.jitter_p), jittered, out)
        gray = rgb_to_grayscale(out, num_output_channels=3)
        return torch.where(chance(self.gray_p), gray, out)

    def _jitter(self, x: torch.Tensor, uniform) -> torch.Tensor:
        x = (x * uniform(1 - self.brightness, 1 + self.brightness, 1, 1, 1)).clamp(0, 1)
        mean = rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True)
        x = (mean + uniform(1 - self.contrast, 1 + self.contrast, 1, 1, 1) * (x - mean)).clamp(0, 1)
        grey = rgb_to_grayscale(x)
        x = (grey + uniform(1 - self.saturation, 1 + self.saturation, 1, 1, 1) * (x - grey)).clamp(0, 1)
        angle = uniform(-self.hue, self.hue) * (2 * math.pi)
        cos, sin, one, zero = torch.cos(angle), torch.sin(angle), torch.ones_like(angle), torch.zeros_like(angle)
        rot = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                           torch.stack([zero, sin, cos], 1)], 1)  # [B, 3, 3] acting on (Y, I, Q)
        mix = _RGB.to(x) @ rot @ _YIQ.to(x)
        return torch.einsum("bij,bjhw->bihw", mix, x).clamp(0, 1)
