"""The device-side augmentations: per-image parameters from a generator, sharding, each op against its definition."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from sslcore.data import load_dataset
from sslcore.data.augment import (
    RECIPES,
    ColorJitter,
    Compose,
    EdgeMap,
    GaussianBlur,
    GaussianNoise,
    Grayscale,
    Invert,
    MultiCrop,
    Normalize,
    RandomResizedCrop,
    Solarize,
    StripeOverlay,
    build_recipe,
    shift_ops,
)
from sslcore.data.digits import DigitsAugment

SHAPES = "shapes:n=24,test=4,size=16"


def _images(n=8, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", [r for r in RECIPES if r != "digits"])
def test_a_rank_s_rows_of_the_global_batch_are_the_views_of_one_process(name):
    """What makes data-parallel views equal one process's: parameters drawn for the global batch, rows applied."""
    x = _images(8, 48)
    recipe = build_recipe(name, image_size=48, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.3))
    whole = recipe.views(x, torch.Generator().manual_seed(3), 2)
    for rows in (slice(0, 4), slice(4, 8)):
        g = torch.Generator().manual_seed(3)
        part = recipe.views(x[rows], g, 2, batch=8, rows=rows)
        for a, b in zip(part, whole):
            torch.testing.assert_close(a, b[rows], rtol=0, atol=1e-6)
    again = recipe.views(x, torch.Generator().manual_seed(3), 2)
    assert all(torch.equal(a, b) for a, b in zip(again, whole))
    if name != "none":
        twins = recipe.views(x[:1].expand(4, -1, -1, -1), torch.Generator().manual_seed(0), 1)[0]
        assert not torch.equal(twins[0], twins[1])  # each image draws its own parameters


def test_digits_augment_shards_like_the_rgb_recipes():
    x = load_dataset("digits").x_train[:8]
    recipe = build_recipe("digits", image_size=8, own=DigitsAugment())
    whole = recipe.views(x, torch.Generator().manual_seed(1), 2)
    part = recipe.views(x[2:5], torch.Generator().manual_seed(1), 2, batch=8, rows=slice(2, 5))
    assert all(torch.equal(a, b[2:5]) for a, b in zip(part, whole))
    with pytest.raises(ValueError, match="digits data's own augmentation"):
        build_recipe("digits", image_size=8)


def test_random_resized_crop_identity_resize_and_flip():
    x = _images(3, 8)
    full = RandomResizedCrop(scale=(1, 1), ratio=(1, 1))
    torch.testing.assert_close(full(x, torch.Generator()), x)
    up = RandomResizedCrop(scale=(1, 1), ratio=(1, 1), size=16)(x, torch.Generator())
    torch.testing.assert_close(up, F.interpolate(x, size=16, mode="bilinear", align_corners=False))
    flipped = RandomResizedCrop(scale=(1, 1), ratio=(1, 1), flip_p=1)(x, torch.Generator())
    torch.testing.assert_close(flipped, x.flip(-1))
    small = RandomResizedCrop(scale=(0.1, 0.2), size=(4, 6))(x, torch.Generator().manual_seed(0))
    assert small.shape == (3, 3, 4, 6)
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCrop(scale=(0.5, 0.2))


def test_gaussian_blur_is_torchvision_s_at_the_drawn_sigma():
    x = _images(4, 32)
    blur = GaussianBlur(p=1.0, sigma=(0.5, 2.0), kernel_fraction=0.25)
    params = blur.sample(4, x.shape[1:], torch.Generator().manual_seed(0))
    out = blur.apply(x, params)
    k = blur.kernel_size(32)
    for i in range(4):
        sigma = float(params["sigma"][i])
        torch.testing.assert_close(out[i], gaussian_blur(x[i], [k, k], [sigma, sigma]), rtol=0, atol=1e-5)
    off = GaussianBlur(p=0.0)(x, torch.Generator())
    assert torch.equal(off, x)


def test_solarize_jitter_and_normalize():
    x = _images(4, 8)
    sol = Solarize(p=1.0)(x, torch.Generator())
    torch.testing.assert_close(sol, torch.where(x >= 0.5, 1 - x, x))
    assert torch.equal(Solarize(p=0.0)(x, torch.Generator()), x)
    grey = torch.rand(4, 1, 8, 8)
    jittered = ColorJitter(0.4, 0.4, 0.4, 0.1, p=1.0)(grey, torch.Generator().manual_seed(0))
    assert jittered.shape == grey.shape and 0 <= jittered.min() and jittered.max() <= 1
    assert not torch.equal(jittered, grey)
    torch.testing.assert_close(Normalize((0.5,) * 3, (0.25,) * 3).apply(x), (x - 0.5) / 0.25)


def test_recipes_do_what_they_say():
    x = torch.full((6, 3, 16, 16), 0.7)  # one flat colour: only the colour ops can change it
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(build_recipe("mae", image_size=16).views(x, g, 1)[0], x)  # crop + flip: flat stays
    assert torch.equal(build_recipe("none", image_size=16).views(x, g, 1)[0], x)
    assert (build_recipe("simclr", image_size=16).views(x, g, 1)[0] - x).abs().max() > 0.05
    byol = build_recipe("byol", image_size=16)
    assert len(byol.pipelines) == 2
    blur0, blur1 = (pipe.ops[3] for pipe in byol.pipelines)
    sol0, sol1 = (pipe.ops[4] for pipe in byol.pipelines)
    assert (blur0.p, blur1.p, sol0.p, sol1.p) == (1.0, 0.1, 0.0, 0.2)
    cifar, imagenet = (build_recipe("simclr", image_size=side).pipelines[0].ops for side in (32, 96))
    assert not any(isinstance(op, GaussianBlur) for op in cifar)
    assert any(isinstance(op, GaussianBlur) for op in imagenet)
    assert (cifar[1].brightness, cifar[1].hue, imagenet[1].brightness, imagenet[1].hue) == (0.4, 0.1, 0.8, 0.2)
    ramp = torch.linspace(0, 1, 16).expand(2, 3, 16, 16).contiguous()  # a mirror shows
    views = build_recipe("mae", image_size=16, flips=False).views(ramp, torch.Generator().manual_seed(0), 8)
    assert all((v[..., 1:] >= v[..., :-1] - 1e-6).all() for v in views)  # never mirrored: still increasing
    normalised = build_recipe("none", image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3).views(x, g, 1)[0]
    torch.testing.assert_close(normalised, (x - 0.5) / 0.5)
    with pytest.raises(ValueError, match="unknown augmentation recipe 'moco'"):
        build_recipe("moco", image_size=16)


def test_edge_map_draws_each_step_as_a_two_pixel_line_of_its_height():
    x = torch.zeros(2, 3, 8, 8)
    x[:, :, :, 4:] = torch.tensor([0.8, 0.5, 0.0]).view(1, 3, 1, 1)  # a vertical step between columns 3 and 4
    edges = EdgeMap(p=1.0, strength=(1.0, 1.0))(x, torch.Generator())
    line = torch.zeros(8)
    line[3:5] = 1.0
    torch.testing.assert_close(edges, line * x[:, :, :, -1:])  # columns 3, 4 carry the step's height per channel
    half = EdgeMap(p=1.0, strength=(0.5, 0.5))(x, torch.Generator())
    torch.testing.assert_close(half, (x + edges) / 2)
    assert torch.equal(EdgeMap(p=0.0)(x, torch.Generator()), x)
    with pytest.raises(ValueError, match="EdgeMap strength"):
        EdgeMap(strength=(0.5, 1.5))


def test_stripes_blend_a_drawn_colour_along_a_sine_grating():
    x = _images(3, 12)
    op = StripeOverlay(p=1.0, strength=(0.6, 0.6), period=(0.25, 0.25))
    params = op.sample(3, x.shape[1:], torch.Generator().manual_seed(0))
    out = op.apply(x, params)
    ys, xs = torch.meshgrid(torch.arange(12) + 0.5, torch.arange(12) + 0.5, indexing="ij")
    for i in range(3):
        along = torch.cos(params["angle"][i]) * xs + torch.sin(params["angle"][i]) * ys
        s = 0.5 + 0.5 * torch.sin(2 * math.pi * along / 3 + params["phase"][i])  # period 0.25 x 12 px
        torch.testing.assert_close(out[i], x[i] + 0.6 * s * (params["colour"][i].view(3, 1, 1) - x[i]))
    assert torch.equal(StripeOverlay(p=1.0, strength=(0.0, 0.0))(x, torch.Generator()), x)
    with pytest.raises(ValueError, match="period"):
        StripeOverlay(period=(0.0, 0.2))


def test_invert_and_noise_are_their_formulas():
    x = _images(4, 8)
    torch.testing.assert_close(Invert(p=1.0)(x, torch.Generator()), 1 - x)
    assert torch.equal(Invert(p=0.0)(x, torch.Generator()), x)
    op = GaussianNoise(p=1.0, sigma=(0.2, 0.2), contrast=(0.6, 0.6))
    params = op.sample(4, x.shape[1:], torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.apply(x, params), (0.5 + 0.6 * (x - 0.5) + 0.2 * params["noise"]).clamp(0, 1))
    torch.testing.assert_close(GaussianNoise(p=1.0, sigma=(0, 0), contrast=(1, 1))(x, torch.Generator()), x)
    with pytest.raises(ValueError, match="GaussianNoise sigma"):
        GaussianNoise(sigma=(0.3, 0.1))


def test_the_shifts_recipe_is_light_then_the_shift_ops():
    ops = build_recipe("shifts", image_size=16).pipelines[0].ops
    assert [type(op) for op in ops] == [RandomResizedCrop, ColorJitter, Grayscale, EdgeMap, StripeOverlay, Invert,
                                        GaussianNoise]
    assert [type(op) for op in ops[3:]] == [type(op) for op in shift_ops()]
    x = torch.full((64, 3, 16, 16), 0.2)
    views = build_recipe("shifts", image_size=16).views(x, torch.Generator().manual_seed(0), 1)[0]
    assert (views.mean((1, 2, 3)) > 0.6).any()  # some views inverted: out of reach of the light recipe


def test_multi_crop_gives_global_then_local_views():
    crops = MultiCrop(16, 8, global_views=2, local_views=3, then=Compose(Solarize(0.5)))
    views = crops.views(_images(4, 24), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3


def test_datasets_choose_their_recipe_and_normalisation():
    digits, shapes = load_dataset("digits"), load_dataset(SHAPES)
    assert (digits.recipe, digits.flips, digits.mean) == ("digits", False, None)
    assert (shapes.recipe, shapes.flips, shapes.mean) == ("light", True, None)
    from sslcore.data import resolve_recipe
    assert resolve_recipe("auto", None, digits) == "digits" and resolve_recipe("auto", "mae", digits) == "mae"
    assert resolve_recipe("byol", "mae", shapes) == "byol"
    tokens = load_dataset("pystdlib:16:4")
    assert resolve_recipe("auto", None, tokens) == "none"
    with pytest.raises(ValueError, match="token data, which takes no image augmentation"):
        resolve_recipe("simclr", None, tokens)
