"""``python -m bench data``: the image-folder pipeline's decoding, images per second per worker, by decoder.

One process and one thread stand for one data-loader worker: :class:`sslcore.data.imagefolder.FolderItems`
decodes every file of a generated folder (photo-like JPEGs of 500 x 375, ImageNet's typical size, and PNGs of
the same) to ``size x size`` with each decoder (Pillow with JPEG draft, torchvision.io, and ``auto``; on a
machine with CUDA also ``nvjpeg``, the batch's JPEGs on the GPU), best of a few passes over the files.  The
rows go to ``bench/results/`` like the kernels' (``img_s`` per worker; ``median_ms`` per image).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.harness import environment
from sslcore.data.imagefolder import DECODERS, FolderItems

SOURCE = (500, 375)


def decoders() -> tuple[str, ...]:
    """The decoders this machine can run: nvjpeg needs CUDA."""
    return tuple(d for d in DECODERS if d != "nvjpeg" or torch.cuda.is_available())


def _folder(root: Path, n: int) -> dict[str, list[Path]]:
    """``n`` JPEGs and ``n`` PNGs: smooth gradients with blobs and mild noise, so they compress like photos."""
    rng = np.random.default_rng(0)
    w, h = SOURCE
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    files = {"jpeg": [], "png": []}
    for i in range(n):
        base = np.stack([np.sin(6 * xx * (1 + c) + i) + np.cos(5 * yy * (2 - c) - i) for c in range(3)], -1)
        for _ in range(4):
            cx, cy, r = rng.random(3) * (1, 0.75, 0.2)
            base += 1.5 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (r ** 2 + 1e-3))[..., None] * rng.random(3)
        img = np.clip(60 * base + 110 + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
        for fmt, ext in (("jpeg", "jpg"), ("png", "png")):
            path = root / f"{i}.{ext}"
            Image.fromarray(img).save(path, quality=90) if fmt == "jpeg" else Image.fromarray(img).save(path)
            files[fmt].append(path)
    return files


def rows(quick: bool = False, sizes: tuple[int, ...] = (32, 224), passes: int = 3) -> list[dict]:
    n = 8 if quick else 48
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker's share
    env = environment()
    out = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = _folder(Path(tmp), n)
            for fmt, paths in files.items():
                for size in sizes:
                    for decoder in decoders():
                        items = FolderItems(paths, size, decoder)
                        items.__getitems__(list(range(min(2, n))))  # warm-up: imports, allocator
                        best = float("inf")
                        for _ in range(1 if quick else passes):
                            t = time.perf_counter()
                            index, batch = items.__getitems__(list(range(n)))
                            best = min(best, time.perf_counter() - t)
                        assert batch.shape == (n, 3, size, size)
                        out.append({**env, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "op": "imagefolder decode",
                                    "impl": decoder, "dtype": "uint8",
                                    "shape": {"format": f"{fmt} {SOURCE[0]}x{SOURCE[1]}", "size": size, "files": n},
                                    "median_ms": 1e3 * best / n, "img_s": n / best, "peak_extra_mib": None,
                                    "tflops": None, "frac_bf16_peak": None, "compile_s": None, "status": "ok",
                                    "note": "one process, one thread: one data-loader worker; best of "
                                            f"{1 if quick else passes} passes"})
    finally:
        torch.set_num_threads(threads)
    return out
