"""scikit-learn's bundled handwritten digits (8x8 grey, 1797 images, 10 classes; no download)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .augment import Augment

SPLIT_SEED, TEST_FRACTION = 0, 0.2


def load(*, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified 80/20 split: ``x_train, y_train, x_test, y_test``; images ``[N, 1, 8, 8]`` in [0, 1]."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=TEST_FRACTION,
                                           random_state=seed, stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


class DigitsAugment(Augment):
    """Batched random views of small grey images, each image with its own parameters.

    Random affine (rotation, zoom, shift in pixels), contrast jitter, a random erased square, and
    Gaussian noise.  Every random number comes from the ``generator`` passed in (on the CPU), so a
    run is reproducible and resumable from the generator's state.  No flips: a mirrored 2 is no 2.
    """

    def __init__(self, degrees: float = 15.0, scale: tuple[float, float] = (0.8, 1.15), shift: float = 1.0,
                 contrast: float = 0.3, erase: int = 3, erase_p: float = 0.5, noise: float = 0.1):
        self.degrees, self.scale, self.shift, self.contrast = degrees, scale, shift, contrast
        self.erase, self.erase_p, self.noise = erase, erase_p, noise

    def sample(self, n, shape, generator):
        _, h, w = shape

        def uniform(lo, hi, *size):
            return torch.rand(n, *size, generator=generator) * (hi - lo) + lo

        angle = uniform(-self.degrees, self.degrees) * (math.pi / 180)
        zoom = uniform(*self.scale)
        shift = uniform(-self.shift, self.shift, 2) * torch.tensor([2 / w, 2 / h])  # pixels -> [-1, 1] units
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        contrast = uniform(1 - self.contrast, 1 + self.contrast)
        top = torch.randint(0, h - self.erase + 1, (n, 1), generator=generator)
        left = torch.randint(0, w - self.erase + 1, (n, 1), generator=generator)
        in_rows = (torch.arange(h) >= top) & (torch.arange(h) < top + self.erase)
        in_cols = (torch.arange(w) >= left) & (torch.arange(w) < left + self.erase)
        erased = in_rows[:, :, None] & in_cols[:, None, :] & (torch.rand(n, 1, 1, generator=generator) < self.erase_p)
        noise = torch.randn(n, *shape, generator=generator)
        return {"theta": theta, "contrast": contrast, "erased": erased, "noise": noise}

    def apply(self, x, params):
        grid = F.affine_grid(params["theta"].to(x), list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
        out = out * params["contrast"].to(x).view(-1, 1, 1, 1)
        out = out.masked_fill(params["erased"][:, None], 0.0)
        return out + self.noise * params["noise"].to(x)
