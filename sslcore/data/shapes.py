"""``shapes``: a seeded, procedurally drawn RGB image set (10 shape classes) in several rendering domains.

Every image is one shape (class = its kind) at a random position, size and rotation.  The
*geometry* (class, centre, radius, angle) comes from ``seed`` alone, so every domain draws the
same shapes in the same order with the same labels: ``shapes:plain`` and ``shapes:textured`` with
equal settings are the same data set rendered two ways, ready for transfer studies.  The
*rendering* (colours, texture, noise) is drawn from ``(seed, domain)``.

Domains (:data:`DOMAINS`):

- ``plain``: a bright, saturated shape on a dark, flat background;
- ``textured``: the shape on stripes of two random colours (random frequency and orientation);
- ``shifted``: colours inverted in lightness, a dark shape on a pale background;
- ``noisy``: ``plain`` at lower contrast plus Gaussian pixel noise (sigma 0.2);
- ``outline``: only the shape's 2-pixel outline, on a dark background.

Spec: ``shapes[:DOMAIN][,size=32][,n=4000][,test=1000][,seed=0]`` (``n``/``test``: train and
test images).  Generated in memory in about a second for the defaults.
"""
from __future__ import annotations

import math
import os

import torch

CLASSES = ("circle", "ring", "triangle", "square", "pentagon", "star", "cross", "ellipse", "bar", "cut-disc")
DOMAINS = ("plain", "textured", "shifted", "noisy", "outline")
DEFAULTS = dict(size=32, n=4000, test=1000, seed=0)
PEAK_COPIES = 5  # drawing needs about five float32 copies of the images at its peak (measured: noisy domain)


def parse_spec(spec: str) -> tuple[str, dict[str, int]]:
    """``"textured,size=64"`` -> ``("textured", {"size": 64, "n": 4000, ...})``; ``""`` -> the plain defaults."""
    domain, settings = "plain", dict(DEFAULTS)
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            if key not in DOMAINS:
                raise ValueError(f"unknown shapes domain {key!r} in --data shapes:{spec}; valid: {', '.join(DOMAINS)}")
            domain = key
        elif key not in DEFAULTS:
            raise ValueError(f"unknown shapes setting {key!r} in --data shapes:{spec}; valid: {', '.join(DEFAULTS)}")
        else:
            try:
                settings[key] = int(value)
            except ValueError:
                raise ValueError(f"shapes setting {key} must be an integer, got {value!r}") from None
    if settings["size"] < 8:
        raise ValueError(f"shapes size must be >= 8 pixels, got {settings['size']}")
    if settings["n"] < 1 or settings["test"] < 1:
        raise ValueError(f"shapes n and test must be >= 1, got n={settings['n']}, test={settings['test']}")
    images = settings["n"] + settings["test"]
    need = PEAK_COPIES * images * 3 * settings["size"] ** 2 * 4
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ValueError(f"--data shapes:{spec} needs about {need / 2 ** 30:,.0f} GiB of memory to draw {images} "
                         f"images of {settings['size']}x{settings['size']} pixels, more than this machine's "
                         f"{have / 2 ** 30:,.0f} GiB: lower size, n or test")
    return domain, settings


def geometry(n: int, *, size: int, seed: int) -> dict[str, torch.Tensor]:
    """Balanced labels (shuffled), radius ``R ~ U(0.22, 0.38) * size`` px, a centre that keeps the
    shape inside the frame, angle ``~ U(0, 2 pi)``."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randperm(n, generator=g) % len(CLASSES)
    radius = (0.22 + 0.16 * torch.rand(n, generator=g)) * size
    room = size / 2 - radius - 1
    centre = (torch.rand(n, 2, generator=g) * 2 - 1) * room[:, None] + size / 2
    angle = torch.rand(n, generator=g) * 2 * math.pi
    return {"label": label, "radius": radius, "centre": centre, "angle": angle}


def _inside(kind: str, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance-like field in pixels (> 0 inside) of a shape of radius ``r`` at the origin,
    in its own rotated frame (``u``, ``v``)."""
    rho, phi = torch.sqrt(u * u + v * v), torch.atan2(v, u)

    def polygon(k):  # distance to the nearest edge line of a regular k-gon of circumradius r
        sector = 2 * math.pi / k
        return r * math.cos(math.pi / k) - rho * torch.cos(torch.remainder(phi, sector) - sector / 2)

    if kind == "circle":
        return r - rho
    if kind == "ring":
        return torch.minimum(r - rho, rho - 0.55 * r)
    if kind in ("triangle", "square", "pentagon"):
        return polygon({"triangle": 3, "square": 4, "pentagon": 5}[kind])
    if kind == "star":  # 5 points: the boundary radius falls linearly from r at a tip to 0.45 r between tips
        sector = 2 * math.pi / 5
        tip = (torch.remainder(phi, sector) / sector * 2 - 1).abs()
        return r * (0.45 + 0.55 * tip) - rho
    if kind == "cross":
        w = 0.3 * r
        return torch.maximum(torch.minimum(r - u.abs(), w - v.abs()), torch.minimum(w - u.abs(), r - v.abs()))
    if kind == "ellipse":
        return (1 - torch.sqrt((u / r) ** 2 + (v / (0.55 * r)) ** 2)) * 0.55 * r
    if kind == "bar":
        return torch.minimum(r - u.abs(), 0.3 * r - v.abs())
    if kind == "cut-disc":  # a disc with the part beyond a chord at 0.3 r cut off
        return torch.minimum(r - rho, 0.3 * r - v)
    raise ValueError(f"unknown shape {kind!r}")


def _coverage(geom: dict[str, torch.Tensor], size: int, *, outline: bool) -> torch.Tensor:
    """Anti-aliased coverage ``[N, 1, size, size]`` in [0, 1] of each image's shape (or its outline)."""
    n = len(geom["label"])
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    out = torch.empty(n, 1, size, size)
    for k, kind in enumerate(CLASSES):
        idx = (geom["label"] == k).nonzero().squeeze(1)
        if not len(idx):
            continue
        dx = xs - geom["centre"][idx, 0, None, None]
        dy = ys - geom["centre"][idx, 1, None, None]
        cos, sin = torch.cos(geom["angle"][idx])[:, None, None], torch.sin(geom["angle"][idx])[:, None, None]
        d = _inside(kind, cos * dx + sin * dy, -sin * dx + cos * dy, geom["radius"][idx, None, None])
        cover = torch.minimum(d + 0.5, 2.5 - d) if outline else d + 0.5
        out[idx, 0] = cover.clamp(0, 1)
    return out


def _hsv(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV in [0, 1] -> RGB ``[N, 3, 1, 1]``: ``v - v s clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 h) mod 6``."""
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0]) + 6 * h[:, None], 6)
    rgb = v[:, None] - v[:, None] * s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)
    return rgb[:, :, None, None]


def render(geom: dict[str, torch.Tensor], domain: str, *, size: int, seed: int) -> torch.Tensor:
    """Images ``[N, 3, size, size]`` in [0, 1] of ``geom`` in ``domain``."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown shapes domain {domain!r}; valid: {', '.join(DOMAINS)}")
    n = len(geom["label"])
    g = torch.Generator().manual_seed(seed * len(DOMAINS) + DOMAINS.index(domain) + 1)

    def uniform(lo, hi, *shape):
        return torch.rand(n, *shape, generator=g) * (hi - lo) + lo

    cover = _coverage(geom, size, outline=domain == "outline")
    fg = _hsv(uniform(0, 1), uniform(0.6, 1), uniform(0.75, 1))
    bg = _hsv(uniform(0, 1), uniform(0, 0.4), uniform(0, 0.25))
    if domain == "textured":
        ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
        turn, period, phase = uniform(0, math.pi), uniform(3, 8), uniform(0, 2 * math.pi)
        along = (torch.cos(turn)[:, None, None] * xs + torch.sin(turn)[:, None, None] * ys)
        stripes = (0.5 + 0.5 * torch.sin(2 * math.pi * along / period[:, None, None] + phase[:, None, None]))[:, None]
        bg2 = _hsv(uniform(0, 1), uniform(0.2, 0.8), uniform(0.2, 0.7))
        bg = bg + (bg2 - bg) * stripes
    elif domain == "shifted":
        fg, bg = 1 - fg, 1 - bg
    x = bg + (fg - bg) * cover
    if domain == "noisy":
        x = 0.5 + 0.6 * (x - 0.5) + 0.2 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def load(domain: str = "plain", *, size: int = 32, n: int = 4000, test: int = 1000,
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x_train, y_train, x_test, y_test``: the first ``n`` shapes for training, the next ``test`` for testing."""
    geom = geometry(n + test, size=size, seed=seed)
    x, y = render(geom, domain, size=size, seed=seed), geom["label"]
    return x[:n], y[:n], x[n:], y[n:]
