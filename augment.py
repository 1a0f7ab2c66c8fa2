"""Batched image augmentation on the device, every random parameter drawn per image (algorithm-free, shared).

torchvision's v2 transforms draw one set of parameters per call, so a batch would get one crop and one jitter for
all its images; a per-image PIL pipeline is slow. Here every op takes a batch [B, C, H, W] of floats in [0, 1] and
per-image parameters [B], and is written with tensor ops (affine grids, colour matrices, histograms), so it runs as
a few kernels per batch on a GPU.

- simclr_augment: SimCLR's augmentation, as in SCAN's config: RandomResizedCrop + horizontal flip, colour jitter
  (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale with p 0.2. T. Chen et al., "A Simple Framework for Contrastive
  Learning of Visual Representations", ICML 2020, https://arxiv.org/abs/2002.05709
- strong_augment: SCAN's strong augmentation ("ours" in SCAN's code): flip, then 4 ops drawn with replacement from
  14 RandAugment-style ops (E. D. Cubuk et al., "RandAugment", https://arxiv.org/abs/1909.13719), each with a
  uniformly random magnitude, then Cutout. W. Van Gansbeke et al., "SCAN: Learning to Classify Images without
  Labels", ECCV 2020, https://arxiv.org/abs/2005.12320
- random_resized_crop_flip, color_jitter, affine, and the single ops, each usable alone.

Colour ops are the identity on 1-channel images. Each op is tested against PIL or torchvision (tests/test_augment.py).
"""
import math

import torch
import torch.nn.functional as F


def normalize(x, mean, std):  # float images [B, C, H, W] in [0, 1] -> per-channel standardised
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in (mean, std))
    return (x - mean) / std


def _v(t):  # per-image values [B] -> [B, 1, 1, 1], to broadcast over images
    return t.view(-1, 1, 1, 1)


def affine(x, theta, padding_mode="zeros"):
    """Warp each image by its own 2x3 matrix theta [B, 2, 3] (output -> input coordinates in [-1, 1], pixel centres
    as affine_grid(align_corners=False)); the grid is written in place, cheaper than affine_grid's batched matmul."""
    B, C, H, W = x.shape
    xs = ((torch.arange(W, device=x.device) * 2 + 1) / W - 1).view(1, 1, W)
    ys = ((torch.arange(H, device=x.device) * 2 + 1) / H - 1).view(1, H, 1)
    t = theta.view(B, 6, 1, 1)
    grid = torch.empty(B, H, W, 2, device=x.device)                            # input (x, y) of every output pixel
    torch.add(t[:, 0] * xs + t[:, 2], t[:, 1] * ys, out=grid[..., 0])
    torch.add(t[:, 3] * xs + t[:, 5], t[:, 4] * ys, out=grid[..., 1])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def random_resized_crop_flip(x, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5, padding_mode="border"):
    """RandomResizedCrop + horizontal flip as one affine warp per image (sides clipped to the image instead of
    torchvision's rejection loop)."""
    B, dev = x.shape[0], x.device
    area = torch.empty(B, device=dev).uniform_(*scale)                         # crop area / image area
    aspect = torch.exp(torch.empty(B, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w, h = torch.sqrt(area * aspect).clamp(max=1.0), torch.sqrt(area / aspect).clamp(max=1.0)  # crop side / side
    cx = (torch.rand(B, device=dev) * 2 - 1) * (1 - w)                         # crop centre; the crop stays inside
    cy = (torch.rand(B, device=dev) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(B, device=dev) < flip_p, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    return affine(x, theta, padding_mode)


def grayscale(x):  # ITU-R 601 luma [B, 1, H, W]
    return x if x.shape[1] == 1 else 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def blend(x, y, f):  # PIL's ImageEnhance: factor f [B]; 0 gives y, 1 gives x
    return (_v(f) * x + (1 - _v(f)) * y).clamp(0, 1)


def adjust_brightness(x, f):
    return blend(x, torch.zeros_like(x), f)


def adjust_contrast(x, f):
    return blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):  # a colour op: the identity on 1-channel images
    return x if x.shape[1] == 1 else blend(x, grayscale(x), f)


def hue_matrix(shift):
    """[B, 3, 3] RGB matrices rotating the chroma plane of YIQ by shift [B] turns, luma kept: DALI's linear hue
    rotation, close to torchvision's RGB -> HSV -> RGB hue shift without the round trip."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=shift.device)
    c, s = torch.cos(2 * math.pi * shift), torch.sin(2 * math.pi * shift)
    rot = torch.zeros(len(shift), 3, 3, device=shift.device)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, c, -s, s, c
    return torch.linalg.inv(yiq) @ rot @ yiq


def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8, grayscale_p=0.0):
    """ColorJitter as torchvision draws it (factors in [1-s, 1+s], hue in [-hue, hue], the four ops in a random
    order), applied with probability p, every parameter per image. Each op is affine in RGB, so per image they
    compose into one matrix A [C, C] and offset t [C], y = A x + t, applied in one pass with one clamp at the end;
    RandomGrayscale(grayscale_p), which follows the jitter in SimCLR, is folded in too. On 1-channel images
    saturation, hue and grayscale are the identity by construction."""
    B, C, dev = x.shape[0], x.shape[1], x.device
    u = torch.rand(B, 4, device=dev) * 2 - 1                                   # in [-1, 1]; 0 = identity
    u[torch.rand(B, device=dev) >= p] = 0.0
    b, c, s = 1 + brightness * u[:, 0], 1 + contrast * u[:, 1], 1 + saturation * u[:, 2]
    w = torch.tensor([0.299, 0.587, 0.114] if C == 3 else [1.0], device=dev)  # luma weights [C]
    eye = torch.eye(C, device=dev).expand(B, C, C)
    sat = s.view(B, 1, 1) * eye + (1 - s.view(B, 1, 1)) * w.view(1, 1, C)      # blend with grayscale [B, C, C]
    hue_m = hue_matrix(hue * u[:, 3]) if C == 3 else eye
    A, t = eye.clone(), torch.zeros(B, C, device=dev)
    mean_rgb = x.mean((2, 3))                                                  # [B, C], for contrast's grey level
    order = torch.rand(B, 4, device=dev).argsort(1)                            # a random permutation per image
    for step in range(4):
        grey = ((A @ mean_rgb.unsqueeze(2)).squeeze(2) + t) @ w                # [B] mean luma of the current image
        candidates = [(b.view(B, 1, 1) * A, b.view(B, 1) * t),                                  # brightness
                      (c.view(B, 1, 1) * A, c.view(B, 1) * t + ((1 - c) * grey).view(B, 1)),   # contrast
                      (sat @ A, (sat @ t.unsqueeze(2)).squeeze(2)),                             # saturation
                      (hue_m @ A, (hue_m @ t.unsqueeze(2)).squeeze(2))]                         # hue
        op = order[:, step]
        A = torch.stack([m for m, _ in candidates])[op, torch.arange(B)]       # [B, C, C]
        t = torch.stack([v for _, v in candidates])[op, torch.arange(B)]       # [B, C]
    gray = (torch.rand(B, device=dev) < grayscale_p).view(B, 1, 1)             # every channel := luma
    to_gray = w.view(1, 1, C).expand(1, C, C)
    A, t = torch.where(gray, to_gray @ A, A), torch.where(gray[:, :, 0], (to_gray @ t.unsqueeze(2)).squeeze(2), t)
    y = t.view(B, C, 1, 1).expand_as(x).clone()                                # y = A x + t, a channel at a time
    for j in range(C):
        y.addcmul_(A[:, :, j].view(B, C, 1, 1), x[:, j:j + 1])
    return y.clamp_(0, 1)


def simclr_augment(images, mean, std, crop_min=0.2):
    """SimCLR's augmentation (as SCAN's config): crop + flip, colour jitter (p 0.8), grayscale (p 0.2), normalise."""
    x = random_resized_crop_flip(images.float() / 255, scale=(crop_min, 1.0))
    return normalize(color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.8, grayscale_p=0.2), mean, std)


# SCAN's strong augmentation ("ours" in SCAN's augment.py): flip, 4 of 14 ops drawn with replacement, each with a
# uniformly random magnitude u in [0, 1], then normalise, then Cutout.
def autocontrast(x):  # stretch every channel of every image to [0, 1]
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-8), x)


def equalize(x):
    """PIL's ImageOps.equalize per channel on 256 levels, with batched scatter_add histograms."""
    B, C, H, W = x.shape
    q = (x * 255).round().long().clamp(0, 255).view(B * C, H * W)
    hist = torch.zeros(B * C, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float))
    last_bin = 255 - (hist > 0).flip(1).float().argmax(1, keepdim=True)        # highest level used
    step = torch.div(H * W - hist.gather(1, last_bin), 255, rounding_mode="floor")  # [B*C, 1]
    lut = torch.div(hist.cumsum(1) - hist + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1),
                    rounding_mode="floor").clamp(max=255)
    return torch.where(step > 0, lut.gather(1, q) / 255, q.float() / 255).view(B, C, H, W)


def solarize(x, threshold):  # invert the pixels >= threshold [B] (1 + 1/255: the identity)
    return x + (x >= _v(threshold)) * (1 - 2 * x)


def posterize(x, bits):  # keep the top bits [B] of each 8-bit value
    step = _v(2.0 ** (8 - bits))
    return torch.floor((x * 255).round() / step) * step / 255


def sharpness(x, f):
    """PIL's ImageEnhance.Sharpness: blend with the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, borders
    untouched. The 3x3 sum is two shifted 3-sums: no conv2d, whose CPU kernel is rebuilt for every batch size."""
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]                         # [B, C, H-2, W] vertical 3-sums
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]                     # [B, C, H-2, W-2] 3x3 sums
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = (box + 4 * x[:, :, 1:-1, 1:-1]) / 13
    return blend(x, smooth, f)


def warp_matrix(kind, u):
    """[B, 2, 3] matrices of the geometric ops for magnitudes u [B] (0.5: identity): rotate +-30 degrees, shear x/y
    +-0.1 (PIL's ShearX/Y on square images), translate x/y +-10% of the side (the side is 2 in [-1, 1] coords)."""
    m = 2 * u - 1
    theta = torch.eye(2, 3, device=u.device).repeat(len(u), 1, 1)
    if kind == "rotate":
        a = m * math.pi / 6
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    else:
        row, col = {"shear_x": (0, 1), "shear_y": (1, 0), "translate_x": (0, 2), "translate_y": (1, 2)}[kind]
        theta[:, row, col] = (0.2 if col == 2 else 0.1) * m
    return theta


STRONG_OPS = [None,                                                            # identity: nothing to compute
              lambda x, u: autocontrast(x),
              lambda x, u: equalize(x),
              lambda x, u: affine(x, warp_matrix("rotate", u)),
              lambda x, u: solarize(x, u * 256 / 255),                         # threshold 0..256 of 255
              lambda x, u: adjust_saturation(x, 0.05 + 0.9 * u),               # PIL's "Color", factor 0.05..0.95
              lambda x, u: adjust_contrast(x, 0.05 + 0.9 * u),
              lambda x, u: adjust_brightness(x, 0.05 + 0.9 * u),
              lambda x, u: sharpness(x, 0.05 + 0.9 * u),
              lambda x, u: affine(x, warp_matrix("shear_x", u)),
              lambda x, u: affine(x, warp_matrix("shear_y", u)),
              lambda x, u: affine(x, warp_matrix("translate_x", u)),
              lambda x, u: affine(x, warp_matrix("translate_y", u)),
              lambda x, u: posterize(x, torch.floor(4 + 5 * u).clamp(max=8))]  # 4..8 bits


def apply_per_image(x, choice, u, ops):
    """Image i gets ops[choice[i]](x_i, u_i). Sorted by op once, each op runs on one contiguous slice of the batch:
    one host sync per call (the slice sizes), not one per op."""
    order = choice.argsort()
    xs, us, start, parts = x[order], u[order], 0, []
    for op, n in zip(ops, torch.bincount(choice, minlength=len(ops)).tolist()):
        parts.append(xs[start:start + n] if op is None or n == 0 else op(xs[start:start + n], us[start:start + n]))
        start += n
    return torch.empty_like(x).index_copy_(0, order, torch.cat(parts))


def cutout(x, max_frac=0.5):
    """One square hole per image, side uniform in 1..max_frac * H, centre anywhere (clipped), filled with 0."""
    B, C, H, W = x.shape
    dev = x.device
    side = torch.randint(1, int(max_frac * H) + 1, (B, 1, 1), device=dev)
    y0 = torch.randint(0, H, (B, 1, 1), device=dev) - side // 2
    x0 = torch.randint(0, W, (B, 1, 1), device=dev) - side // 2
    ys, xs = torch.arange(H, device=dev).view(1, H, 1), torch.arange(W, device=dev).view(1, 1, W)
    hole = (ys >= y0) & (ys < y0 + side) & (xs >= x0) & (xs < x0 + side)      # [B, H, W]
    return x.masked_fill(hole.unsqueeze(1), 0.0)


def strong_augment(images, mean, std, num_ops=4):
    """SCAN's strong augmentation: flip, num_ops ops drawn with replacement from the 14 with a random magnitude each,
    normalise, Cutout (one hole of up to half the side)."""
    B, dev = images.shape[0], images.device
    x = torch.where(_v(torch.rand(B, device=dev) < 0.5), images.flip(3), images).float() / 255
    for _ in range(num_ops):
        x = apply_per_image(x, torch.randint(0, len(STRONG_OPS), (B,), device=dev), torch.rand(B, device=dev),
                            STRONG_OPS)
    return cutout(normalize(x, mean, std), 0.5)
