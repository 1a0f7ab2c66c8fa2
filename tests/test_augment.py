"""Tests of augment.py: batched augmentation with per-image parameters, each op against PIL or torchvision.

    python -m pytest tests/test_augment.py -q
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

import augment

torch.set_num_threads(1)


def images(B=64, C=3, S=32, seed=0):
    return torch.randint(0, 256, (B, C, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("C,S", [(3, 32), (1, 28)])
def test_shapes_ranges_and_per_image_randomness(C, S):
    x = images(32, C, S)
    x[:] = x[0]                                                                # 32 copies of one image
    mean, std = (0.5,) * C, (0.25,) * C
    for fn in (augment.simclr_augment, augment.strong_augment):
        torch.manual_seed(0)
        out = fn(x, mean, std)
        assert out.shape == (32, C, S, S) and out.dtype == torch.float32 and torch.isfinite(out).all()
        raw = out * 0.25 + 0.5                                                 # un-normalised
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
        distinct = len({tuple(o.flatten().tolist()) for o in out})
        assert distinct >= 30, f"{fn.__name__}: copies of one image must get independent parameters ({distinct})"


def test_identity_at_zero_magnitude():
    x = images(16).float() / 255
    B = len(x)
    one, zero, half = torch.ones(B), torch.zeros(B), torch.full((B,), 0.5)   # u = 0.5: no motion
    assert torch.allclose(augment.random_resized_crop_flip(x, scale=(1, 1), ratio=(1, 1), flip_p=0), x, atol=1e-5)
    assert torch.allclose(augment.color_jitter(x, p=0.0), x, atol=1e-5)
    assert torch.allclose(augment.color_jitter(x, 0, 0, 0, 0, p=1.0), x, atol=1e-6)
    warps = [augment.affine(x, augment.warp_matrix(k, half))
             for k in ["rotate", "shear_x", "shear_y", "translate_x", "translate_y"]]
    for y in [*warps, augment.adjust_brightness(x, one), augment.adjust_contrast(x, one),
              augment.adjust_saturation(x, one), augment.sharpness(x, one), augment.posterize(x, 8 * one),
              augment.solarize(x, one + 1 / 255)]:
        assert torch.allclose(y, x, atol=1e-5)
    assert torch.allclose(augment.hue_matrix(zero), torch.eye(3).expand(B, 3, 3), atol=1e-5)


def test_affine_equals_torch_affine_grid_for_random_matrices():
    x = torch.rand(8, 3, 12, 10)
    theta = torch.randn(8, 2, 3) * 0.5 + torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    for padding in ["zeros", "border", "reflection"]:
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        reference = F.grid_sample(x, grid, padding_mode=padding, align_corners=False)
        assert torch.allclose(augment.affine(x, theta, padding), reference, atol=1e-5)


def test_pixel_ops_match_pil():
    x8 = images(6, 3, 16, seed=4)
    x = x8.float() / 255
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in x8]
    back = lambda ims: torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in ims]).float() / 255
    assert torch.allclose(augment.equalize(x), back([ImageOps.equalize(im) for im in pil]), atol=1.5 / 255)
    assert torch.allclose(augment.autocontrast(x), back([ImageOps.autocontrast(im) for im in pil]), atol=1.5 / 255)
    five, hundred = torch.full((6,), 5.0), torch.full((6,), 100 / 255)
    assert torch.allclose(augment.posterize(x, five), back([ImageOps.posterize(im, 5) for im in pil]), atol=1e-6)
    assert torch.allclose(augment.solarize(x, hundred), back([ImageOps.solarize(im, 100) for im in pil]), atol=1e-6)
    for f in [0.0, 0.5]:                                                       # 0: PIL's SMOOTH filter itself
        pil_sharp = back([ImageEnhance.Sharpness(im).enhance(f) for im in pil])
        assert torch.allclose(augment.sharpness(x, torch.full((6,), f)), pil_sharp, atol=1.5 / 255)
    # a 90-degree rotation by grid_sample is exact on pixel centres (PIL rotates counter-clockwise); u = 2: 90 degrees
    rot = augment.affine(x, augment.warp_matrix("rotate", torch.full((6,), 2.0)))
    assert torch.allclose(rot, back([im.rotate(90) for im in pil]), atol=1e-4)


def test_apply_per_image_equals_a_loop_over_images():
    x = images(40, 3, 8, seed=5).float() / 255
    g = torch.Generator().manual_seed(0)
    choice, u = torch.randint(0, len(augment.STRONG_OPS), (40,), generator=g), torch.rand(40, generator=g)
    out = augment.apply_per_image(x, choice, u, augment.STRONG_OPS)
    for i in range(40):
        op = augment.STRONG_OPS[choice[i]]
        expected = x[i:i + 1] if op is None else op(x[i:i + 1], u[i:i + 1])
        assert torch.allclose(out[i:i + 1], expected, atol=1e-5), (i, int(choice[i]))


def test_hue_keeps_luma_and_colour_ops_are_identity_on_grayscale():
    x = torch.rand(8, 3, 8, 8) * 0.5 + 0.25
    m = augment.hue_matrix(torch.full((8,), 0.1))
    y = torch.einsum("bij,bjhw->bihw", m, x)
    assert torch.allclose(augment.grayscale(y), augment.grayscale(x), atol=1e-5) and not torch.allclose(y, x, atol=1e-2)
    g = torch.rand(8, 1, 8, 8)
    torch.manual_seed(0)
    assert torch.allclose(augment.color_jitter(g, 0, 0, 0.4, 0.1, p=1.0), g, atol=1e-6)   # saturation, hue: no-ops
    assert torch.allclose(augment.color_jitter(g, 0, 0, 0, 0, p=1.0, grayscale_p=1.0), g, atol=1e-6)
    rgb = torch.rand(4, 3, 8, 8)
    gray = augment.color_jitter(rgb, 0, 0, 0, 0, p=0.0, grayscale_p=1.0)      # the folded RandomGrayscale
    assert torch.allclose(gray, augment.grayscale(rgb).expand_as(rgb), atol=1e-5)


def test_color_jitter_equals_torchvision_for_one_fixed_order():
    """Brightness then contrast then saturation, one factor each: the same as torchvision's functional ops."""
    import torchvision.transforms.functional as TF
    x = torch.rand(1, 3, 8, 8) * 0.5 + 0.2                                     # no value saturates on the way
    torch.manual_seed(0)
    # draw what color_jitter draws (factors, the p-mask, the order), then replay it with torchvision in that order
    u = torch.rand(1, 4) * 2 - 1
    torch.rand(1)
    order = torch.rand(1, 4).argsort(1)[0].tolist()
    torch.manual_seed(0)
    ours = augment.color_jitter(x, 0.4, 0.4, 0.4, 0.0, p=1.0)
    y = x[0]
    for op in order:
        if op == 0:
            y = TF.adjust_brightness(y, 1 + 0.4 * float(u[0, 0]))
        elif op == 1:
            y = TF.adjust_contrast(y, 1 + 0.4 * float(u[0, 1]))
        elif op == 2:
            y = TF.adjust_saturation(y, 1 + 0.4 * float(u[0, 2]))
    assert torch.allclose(ours[0], y, atol=1e-4), (ours[0] - y).abs().max()  # luma weights: 0.299 vs 0.2989


def test_cutout_one_square_hole():
    x = torch.ones(200, 1, 32, 32)
    out = augment.cutout(x, 0.5)
    for o in out[:, 0]:
        rows, cols = (o == 0).any(1).nonzero().squeeze(1), (o == 0).any(0).nonzero().squeeze(1)
        if len(rows):  # a rectangle (a square clipped by the border) with side <= 16
            assert (o[rows.min():rows.max() + 1, cols.min():cols.max() + 1] == 0).all()
            assert len(rows) <= 16 and len(cols) <= 16
    assert (out == 0).sum((1, 2, 3)).float().mean() > 20                     # holes exist


def test_simclr_crop_min_sets_the_smallest_crop_area(monkeypatch):
    seen = []
    real = augment.random_resized_crop_flip
    monkeypatch.setattr(augment, "random_resized_crop_flip",
                        lambda x, scale, **kw: seen.append(scale) or real(x, scale, **kw))
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    augment.simclr_augment(x, (0.5,), (0.25,))
    augment.simclr_augment(x, (0.5,), (0.25,), crop_min=0.6)
    assert seen == [(0.2, 1.0), (0.6, 1.0)]
