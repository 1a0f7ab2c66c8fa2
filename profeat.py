"""profeat.py: ProFeat_s and ProFeat_e (unsupervised image clustering by progressive feature refinement), in one file.

Kim, Im, Cho, "ProFeat: Unsupervised Image Clustering via Progressive Feature Refinement" (../shared/papers/003_*.txt),
built on SCAN (Van Gansbeke et al., ECCV 2020; ../shared/papers/000_*.txt). For t = 1..--iterations and each of the
E ensemble members e (E = 1: ProFeat_s, E > 1: ProFeat_e):

  1. representation  t = 1: SimCLR, i.e. Eq. (1) where only the two views of one image are positives. t > 1: fine-tune
                     g_e and p_e with Eq. (1) on confident images of each batch only: positives = the views of one
                     image + every pair of images of the same confident cluster (ProFeat_s, threshold t_s, Sec. 2.2) or
                     connected by the ensemble's agreement count (ProFeat_e, Eq. (3), thresholds t_e, t_c, Sec. 2.4);
                     negatives = all the other pairs among the kept images.
  2. clustering      mine M neighbours in the projected space p(g_e(x)); train h_e on an auxiliary copy g'_e of g_e
                     with SCAN's loss, Eq. (2) (g_e itself is never updated here); optionally self-label (t_f).
The test split is evaluated after every iteration (the paper's Fig. 1); one member is kept at the end.
The augmentations, backbones, SCAN loss and helpers are copies of scan.py's (kept identical on purpose).
The authors released no code: every place where the paper leaves a choice open is marked "CHOICE:".

Usage: python profeat.py --dataset cifar10 --device cuda                 (ProFeat_s, paper settings)
       python profeat.py --dataset cifar10 --ensemble 5 --device cuda    (ProFeat_e)
       python profeat.py --dataset synthetic --quick                     (whole pipeline in seconds on a CPU)
"""
import argparse
import ctypes
import copy
import json
import math
import os
import sys
import time
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics
from knn import knn

# ----------------------------------------------------------------------------------------------------------------
# 1. Arguments
# ----------------------------------------------------------------------------------------------------------------
# The paper's settings (Sec. 3) and SCAN's per-dataset configs; any other dataset uses the cifar10 values, except t_c.
PAPER_DEFAULTS = {
    "cifar10": dict(t_s=0.99, t_c=20, iterations=10, scan_epochs=50, scan_batch_size=128, finetune=True),
    "cifar20": dict(t_s=0.99, t_c=10, iterations=10, scan_epochs=100, scan_batch_size=512, finetune=True),
    "stl10": dict(t_s=0.95, t_c=1, iterations=100, scan_epochs=100, scan_batch_size=128, finetune=False,
                  pretext_split="train+unlabeled"),
}
# --quick: a smoke run. t_s and t_f drop to 0.8 because a few SCAN epochs never make predictions 0.99-confident.
QUICK = dict(arch="smallcnn", width=16, subset=500, iterations=2, pretext_epochs=6, refine_epochs=2, scan_epochs=3,
             finetune_epochs=1, num_heads=2, batch_size=250, scan_batch_size=125, finetune_batch_size=250, lr=0.1,
             lr_min=0.001, scan_lr=1e-3, finetune_lr=1e-3, t_s=0.8, t_f=0.8, num_neighbors=10)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ProFeat: alternate confident-pair representation refinement and SCAN clustering.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="cifar10", help="cifar10 | cifar20 | cifar100 | stl10 | fashion-mnist | mnist | imagefolder:PATH | synthetic")
    a("--data-root", default="./data", help="where datasets are stored / downloaded")
    a("--train-split", default="train", help="split clustered and refined on")
    a("--pretext-split", default=None, help="split of the first (SimCLR) representation step (default: train; stl10: train+unlabeled)")
    a("--test-split", default="test", help="split evaluated after each iteration")
    a("--image-size", type=int, default=None, help="resize images to this size (imagefolder)")
    a("--subset", type=int, default=None, help="use a random subset of this many training images (default: all)")
    a("--out-dir", default=None, help="output folder (default: runs/profeat-DATASET)")
    a("--arch", default="resnet18", choices=["resnet18", "smallcnn"], help="backbone g: CIFAR-style ResNet-18 or a small CNN for CPU runs")
    a("--width", type=int, default=32, help="channels of the first smallcnn stage (doubles each stage)")
    a("--num-clusters", type=int, default=None, help="clusters K (default: number of classes)")
    a("--iterations", type=int, default=None, help="alternations of representation and clustering steps (paper: 10; stl10 100, 300 with --ensemble)")
    a("--ensemble", type=int, default=1, help="E (g_e, h_e) pairs: 1 = ProFeat_s, > 1 = ProFeat_e (paper: 5)")
    a("--t-s", type=float, default=None, help="ProFeat_s: min max-probability of a confident image (paper: 0.99, stl10 0.95)")
    a("--t-e", type=int, default=None, help="ProFeat_e: min agreement count c(x_i, x_j) of a connected pair (default and paper: E)")
    a("--t-c", type=int, default=None, help="ProFeat_e: min connections inside the batch of a kept image (paper: 20, cifar20 10, stl10 1; else 0.4 B/K)")
    a("--pretext-epochs", type=int, default=500, help="SimCLR epochs of the first iteration")
    a("--refine-epochs", type=int, default=50, help="representation fine-tuning epochs of each later iteration")
    a("--batch-size", type=int, default=512, help="representation batch size B (images; 2B views)")
    a("--lr", type=float, default=0.4, help="representation SGD learning rate at the start")
    a("--lr-min", type=float, default=0.0004, help="... decayed (cosine) to this over all iterations' representation epochs")
    a("--wd", type=float, default=1e-4, help="representation SGD weight decay")
    a("--temperature", type=float, default=0.1, help="tau of Eq. (1)")
    a("--num-neighbors", type=int, default=20, help="M nearest neighbours mined per image")
    a("--num-heads", type=int, default=10, help="clustering heads trained at once; the lowest-loss one is kept (SCAN)")
    a("--scan-epochs", type=int, default=None, help="SCAN epochs per clustering step (50 cifar10, 100 cifar20/stl10)")
    a("--scan-batch-size", type=int, default=None, help="SCAN batch size (128, 512 for cifar20)")
    a("--scan-lr", type=float, default=1e-4, help="SCAN Adam learning rate")
    a("--entropy-weight", type=float, default=5.0, help="lambda of Eq. (2)")
    a("--carry-h", action=argparse.BooleanOptionalAction, default=True, help="head 0 of each clustering step continues the previous iteration's h (the others start afresh); --no-carry-h: all heads afresh")
    a("--finetune", action=argparse.BooleanOptionalAction, default=None, help="self-label fine-tune in each clustering step (paper: on, off for stl10)")
    a("--finetune-epochs", type=int, default=200, help="self-label epochs per clustering step (SCAN's 200)")
    a("--finetune-batch-size", type=int, default=1000, help="self-label batch size")
    a("--finetune-lr", type=float, default=1e-4, help="self-label Adam learning rate")
    a("--t-f", type=float, default=0.99, help="self-label confidence threshold t_f")
    a("--weight-decay", type=float, default=1e-4, help="Adam weight decay of the clustering steps")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    a("--compile", action="store_true", help="torch.compile the models (opt-in)")
    a("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    a("--seed", type=int, default=0, help="random seed (same seed + device = same result)")
    a("--quick", action="store_true", help="small CNN, 500-image subset, 2 iterations of few epochs: a smoke run in seconds")
    a("--restart", action="store_true", help="recompute everything, ignoring what --out-dir holds")
    a("--log-every", type=float, default=5.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    tokens = argv if argv is not None else sys.argv[1:]
    given = {t.split("=")[0].lstrip("-").replace("-", "_") for t in tokens if t.startswith("--")}
    base = args.dataset.split(":")[0]
    for k, v in {**PAPER_DEFAULTS["cifar10"], **PAPER_DEFAULTS.get(base, {})}.items():
        if getattr(args, k, None) is None and (k != "t_c" or base in PAPER_DEFAULTS):
            setattr(args, k, v)
    if args.quick:  # quick values only where the user did not set the flag explicitly
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
    if base == "stl10" and args.ensemble > 1 and "iterations" not in given and not args.quick:
        args.iterations = 300                                                  # the paper's ProFeat_e on STL10
    args.t_e = args.ensemble if args.t_e is None else args.t_e                 # unanimity
    args.out_dir = args.out_dir or os.path.join("runs", "profeat-" + base)
    return args


class ProFeatError(Exception):
    """Bad input or configuration: printed as one paragraph, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# 2. Data + augmentation (copied from scan.py): float images in [0, 1], [B, C, H, W], random parameters per image.
# ----------------------------------------------------------------------------------------------------------------
def _v(t):  # per-image scalar [B] -> broadcastable [B, 1, 1, 1]
    return t.view(-1, 1, 1, 1)


def affine(x, theta, padding_mode="zeros"):
    """Warp each image by its own 2x3 matrix theta [B, 2, 3] (output coords -> input coords, both in [-1, 1], pixel
    centres as affine_grid(align_corners=False)). The grid is built by broadcasting and written in place: on a CPU
    2.7x cheaper than torch.stack of the two coordinates and 6x cheaper than affine_grid's bmm (512 images, 32x32)."""
    B, C, H, W = x.shape
    xs = ((torch.arange(W, device=x.device) * 2 + 1) / W - 1).view(1, 1, W)
    ys = ((torch.arange(H, device=x.device) * 2 + 1) / H - 1).view(1, H, 1)
    t = theta.view(B, 6, 1, 1)
    grid = torch.empty(B, H, W, 2, device=x.device)                            # input (x, y) of every output pixel
    torch.add(t[:, 0] * xs + t[:, 2], t[:, 1] * ys, out=grid[..., 0])
    torch.add(t[:, 3] * xs + t[:, 5], t[:, 4] * ys, out=grid[..., 1])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def random_resized_crop_flip(x, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5):
    """RandomResizedCrop + horizontal flip as one affine warp per image."""
    B, dev = x.shape[0], x.device
    area = torch.empty(B, device=dev).uniform_(*scale)                         # crop area / image area
    aspect = torch.exp(torch.empty(B, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w = torch.sqrt(area * aspect).clamp(max=1.0)                               # crop side / image side
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(B, device=dev) * 2 - 1) * (1 - w)                         # crop centre, crop stays inside
    cy = (torch.rand(B, device=dev) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(B, device=dev) < flip_p, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    return affine(x, theta, "border")


def grayscale(x):  # ITU-R 601 luma, [B, 1, H, W]
    return x if x.shape[1] == 1 else (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def blend(x, y, f):  # PIL's ImageEnhance: f = 0 gives y, f = 1 gives x
    return (_v(f) * x + (1 - _v(f)) * y).clamp(0, 1)


def adjust_brightness(x, f):
    return blend(x, torch.zeros_like(x), f)


def adjust_contrast(x, f):
    return blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):  # a colour op: identity on 1-channel images
    return x if x.shape[1] == 1 else blend(x, grayscale(x), f)


def hue_matrix(shift):
    """[B, 3, 3] RGB matrices rotating the chroma (I, Q) plane of YIQ by shift [B] turns; luma is kept. The linear hue
    rotation of NVIDIA DALI; it approximates torchvision's RGB -> HSV -> RGB hue shift without the round trip."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=shift.device)
    c, s = torch.cos(2 * math.pi * shift), torch.sin(2 * math.pi * shift)
    rot = torch.zeros(len(shift), 3, 3, device=shift.device)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, c, -s, s, c
    return torch.linalg.inv(yiq) @ rot @ yiq


def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8, grayscale_p=0.0):
    """ColorJitter as torchvision draws it (factors in [1-s, 1+s], hue in [-hue, hue], a random order of the four ops,
    all per image), applied with probability p. Each op is affine in RGB, so per image they compose into one matrix A
    [C, C] and offset t [C] (y = A x + t), applied in one pass: one clamp at the end instead of one per op, and the hue
    is a YIQ rotation (hue_matrix). RandomGrayscale(grayscale_p), which follows the jitter in SimCLR, is linear too and
    is folded into the same matrix. On 1-channel images saturation, hue and grayscale are the identity by construction."""
    B, C, dev = x.shape[0], x.shape[1], x.device
    u = torch.rand(B, 4, device=dev) * 2 - 1                                   # in [-1, 1]; 0 = identity
    u[torch.rand(B, device=dev) >= p] = 0.0
    b, c, s = 1 + brightness * u[:, 0], 1 + contrast * u[:, 1], 1 + saturation * u[:, 2]
    w = torch.tensor([0.299, 0.587, 0.114] if C == 3 else [1.0], device=dev)  # luma weights [C]
    eye = torch.eye(C, device=dev).expand(B, C, C)
    sat = _v(s)[:, :, :, 0] * eye + (1 - _v(s)[:, :, :, 0]) * w.view(1, 1, C)  # blend with grayscale: [B, C, C]
    hue_m = hue_matrix(hue * u[:, 3]) if C == 3 else eye
    A, t = eye.clone(), torch.zeros(B, C, device=dev)
    mean_rgb = x.mean((2, 3))                                                  # [B, C], for contrast's grey level
    order = torch.rand(B, 4, device=dev).argsort(1)                            # a random permutation per image
    for step in range(4):
        grey = ((A @ mean_rgb.unsqueeze(2)).squeeze(2) + t) @ w                # [B] mean luma of the current image
        candidates = [(b.view(B, 1, 1) * A, b.view(B, 1) * t),                                   # brightness
                      (c.view(B, 1, 1) * A, c.view(B, 1) * t + ((1 - c) * grey).view(B, 1)),    # contrast
                      (sat @ A, (sat @ t.unsqueeze(2)).squeeze(2)),                              # saturation
                      (hue_m @ A, (hue_m @ t.unsqueeze(2)).squeeze(2))]                          # hue
        op = order[:, step]
        A = torch.stack([m for m, _ in candidates])[op, torch.arange(B)]       # [B, C, C]
        t = torch.stack([v for _, v in candidates])[op, torch.arange(B)]       # [B, C]
    gray = (torch.rand(B, device=dev) < grayscale_p).view(B, 1, 1)             # every channel := luma
    to_gray = w.view(1, 1, C).expand(1, C, C)                                  # [1, C, C], rows = w
    A, t = torch.where(gray, to_gray @ A, A), torch.where(gray[:, :, 0], (to_gray @ t.unsqueeze(2)).squeeze(2), t)
    y = t.view(B, C, 1, 1).expand_as(x).clone()                                # y = A x + t, one column at a time
    for j in range(C):
        y.addcmul_(A[:, :, j].view(B, C, 1, 1), x[:, j:j + 1])
    return y.clamp_(0, 1)


def normalize(x, mean, std):
    return x.sub(torch.tensor(mean, device=x.device).view(1, -1, 1, 1)).div_(torch.tensor(std, device=x.device).view(1, -1, 1, 1))


def simclr_augment(images, mean, std, crop_min=0.2):
    """SimCLR's augmentation of a uint8 batch [B, C, H, W] -> normalised float. Colour ops skip 1-channel images."""
    x = random_resized_crop_flip(images.float().div_(255), scale=(crop_min, 1.0))
    x = color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.8, grayscale_p=0.2)            # + RandomGrayscale(0.2)
    return normalize(x, mean, std)


def autocontrast(x):  # stretch every channel of every image to [0, 1]
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-8), x)


def equalize(x):
    """PIL's ImageOps.equalize per channel on 256 levels, batched with scatter_add histograms."""
    B, C, H, W = x.shape
    q = (x * 255).round().long().clamp(0, 255).view(B * C, H * W)
    hist = torch.zeros(B * C, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float))
    last_bin = 255 - (hist > 0).flip(1).float().argmax(1, keepdim=True)        # highest used level
    step = torch.div(H * W - hist.gather(1, last_bin), 255, rounding_mode="floor")  # [B*C, 1]
    cdf_before = hist.cumsum(1) - hist
    lut = torch.div(cdf_before + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1), rounding_mode="floor").clamp(max=255)
    out = lut.gather(1, q) / 255
    return torch.where(step > 0, out, q.float() / 255).view(B, C, H, W)


def solarize(x, threshold):  # invert pixels >= threshold [B] (threshold 1 + 1/255 = identity)
    return x + (x >= _v(threshold)) * (1 - 2 * x)                             # arithmetic: 2x faster than where on CPU


def posterize(x, bits):  # keep the top bits [B] of the 8-bit value
    step = _v(2.0 ** (8 - bits))
    return torch.floor((x * 255).round() / step) * step / 255


def sharpness(x, f):
    """PIL's ImageEnhance.Sharpness: blend with the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 (borders
    untouched). The 3x3 sum is two shifted 3-sums (separable): on a CPU a conv2d is 3x slower, and slower still at
    each new batch size (oneDNN builds a kernel per shape, and the subset that draws this op changes size every call)."""
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]                         # [B, C, H-2, W] vertical 3-sums
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]                     # [B, C, H-2, W-2] 3x3 sums
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = (box + 4 * x[:, :, 1:-1, 1:-1]) / 13
    return blend(x, smooth, f)


def affine_matrix(op, u):
    """2x3 matrices [B, 2, 3] of the geometric strong ops: 0 rotate +-30 deg, 1/2 shear x/y +-0.1 (PIL's ShearX/Y on square
    images), 3/4 translate x/y +-10% of the side; magnitude u [B] in [0, 1], 0.5 = identity."""
    B = len(u)
    theta = torch.zeros(B, 2, 3, device=u.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    angle = (60 * u - 30) * math.pi / 180
    rot = op == 0
    theta[rot, 0, 0], theta[rot, 0, 1] = torch.cos(angle[rot]), -torch.sin(angle[rot])
    theta[rot, 1, 0], theta[rot, 1, 1] = torch.sin(angle[rot]), torch.cos(angle[rot])
    theta[op == 1, 0, 1] = (0.2 * u - 0.1)[op == 1]
    theta[op == 2, 1, 0] = (0.2 * u - 0.1)[op == 2]
    theta[op == 3, 0, 2] = 2 * (0.2 * u - 0.1)[op == 3]                        # [-1, 1] coordinates: side = 2
    theta[op == 4, 1, 2] = 2 * (0.2 * u - 0.1)[op == 4]
    return theta


# The 14 ops of SCAN's "strong" augmentation (SCAN's augment.py). Pixel ops map a magnitude u in [0, 1] to their range;
# the 5 geometric ops (rotate, shear x/y, translate x/y) share one warp, see affine_matrix.
PIXEL_OPS = [
    None,                                                                      # identity: nothing to compute
    lambda x, u: autocontrast(x),
    lambda x, u: equalize(x),
    lambda x, u: solarize(x, u * 256 / 255),                                   # threshold 0..256 of 255
    lambda x, u: adjust_saturation(x, 0.05 + 0.9 * u),                         # "color", factor 0.05..0.95
    lambda x, u: adjust_contrast(x, 0.05 + 0.9 * u),
    lambda x, u: adjust_brightness(x, 0.05 + 0.9 * u),
    lambda x, u: sharpness(x, 0.05 + 0.9 * u),
    lambda x, u: posterize(x, torch.floor(4 + 5 * u).clamp(max=8)),            # 4..8 bits
]
NUM_STRONG_OPS = len(PIXEL_OPS) + 5


def apply_chosen_op(x, choice, magnitude, ops):
    """Image i gets ops[choice[i]](x_i, magnitude[i]): each op runs once on the subset that drew it (no per-image loop)."""
    out = x.clone()
    for k, op in enumerate(ops):
        idx = (choice == k).nonzero().squeeze(1)
        if op is not None and idx.numel():                                     # None: the identity
            out[idx] = op(x[idx], magnitude[idx])
    return out


def cutout(x, max_frac=0.5):
    """One square hole per image, side uniform in 1..max_frac*H, centre anywhere (clipped), filled with 0."""
    B, C, H, W = x.shape
    dev = x.device
    side = torch.randint(1, int(max_frac * H) + 1, (B,), device=dev)
    cy, cx = torch.randint(0, H, (B,), device=dev), torch.randint(0, W, (B,), device=dev)
    y0, x0 = (cy - side // 2).view(B, 1, 1), (cx - side // 2).view(B, 1, 1)
    ys, xs = torch.arange(H, device=dev).view(1, H, 1), torch.arange(W, device=dev).view(1, 1, W)
    hole = (ys >= y0) & (ys < y0 + side.view(B, 1, 1)) & (xs >= x0) & (xs < x0 + side.view(B, 1, 1))  # [B, H, W]
    return x.masked_fill(hole.unsqueeze(1), 0.0)


def strong_augment(images, mean, std, num_ops=4):
    """SCAN's strong augmentation of a uint8 batch [B, C, H, W] -> normalised float: flip, num_ops ops drawn with
    replacement from the 14 with a uniform random magnitude each, normalise, Cutout."""
    B, dev = images.shape[0], images.device
    x = torch.where(_v(torch.rand(B, device=dev) < 0.5), images.flip(3), images).float() / 255  # flip on uint8: 4x less memory
    for _ in range(num_ops):
        op, u = torch.randint(0, NUM_STRONG_OPS, (B,), device=dev), torch.rand(B, device=dev)
        geometric = op >= len(PIXEL_OPS)
        x = apply_chosen_op(x, torch.where(geometric, len(PIXEL_OPS), op), u, PIXEL_OPS + [
            lambda y, v, g=op[geometric] - len(PIXEL_OPS): affine(y, affine_matrix(g, v))])
    return cutout(normalize(x, mean, std), 0.5)


def plain(images, mean, std):  # evaluation view: no augmentation
    return normalize(images.float() / 255, mean, std)


# ----------------------------------------------------------------------------------------------------------------
# 3. Model (copied from scan.py). g = backbone, p = ContrastiveModel.head, h = ClusteringModel.heads.
# ----------------------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(in_channels=3, maxpool=False):
    """ResNet-18 for small images: 3x3 stride-1 stem, no max-pool (stl10: a 2x2 max-pool). Output [B, 512]."""
    layers = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
    layers += [nn.MaxPool2d(2)] if maxpool else []
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.out_dim = 512
    return net


def small_cnn(in_channels=3, width=32):
    """Four conv-BN-ReLU stages (width, 2w, 4w, 8w), max-pool between them, global average pool. For CPU runs."""
    layers, cin = [], in_channels
    for i in range(4):
        cout = width * 2 ** i
        layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        layers += [nn.MaxPool2d(2)] if i < 3 else []
        cin = cout
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.out_dim = cin
    return net


def make_backbone(args, in_channels):
    if args.arch == "resnet18":
        return resnet18(in_channels, maxpool=args.dataset.startswith("stl10"))
    return small_cnn(in_channels, args.width)


class ContrastiveModel(nn.Module):
    """Backbone + SimCLR's MLP head (d -> d -> 128); forward returns L2-normalised projections [B, 128]."""
    def __init__(self, backbone, proj_dim=128):
        super().__init__()
        d = backbone.out_dim
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim))

    def forward(self, x):
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)


class ClusteringModel(nn.Module):
    """Backbone + num_heads linear heads; forward returns logits [num_heads, B, num_clusters]."""
    def __init__(self, backbone, num_clusters, num_heads):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList([nn.Linear(backbone.out_dim, num_clusters) for _ in range(num_heads)])

    def forward(self, x):
        feat = self.backbone(x)
        return torch.stack([h(feat) for h in self.heads]).float()


# ----------------------------------------------------------------------------------------------------------------
# 4. Pairs and losses: pure functions of tensors
# ----------------------------------------------------------------------------------------------------------------
def confident_groups(probs, t_s):
    """ProFeat_s pairs (Sec. 2.2). probs [B, K]: the previous clustering's predictions for the batch.
    Returns keep [B] (max prob >= t_s: the confident set C) and group [B, B]: True where i and j are both in C and share
    their confident cluster (the diagonal is True for images of C). CHOICE: the text discards y_i < t_s but then asks
    y_ik > t_s for pairs; we use >= for both, so that "confident" means one thing (for t_s > 0.5 the cluster is unique)."""
    conf, cluster = probs.max(1)                                               # [B], [B]
    keep = conf >= t_s
    group = (cluster[:, None] == cluster[None, :]) & keep[:, None] & keep[None, :]
    return keep, group


def ensemble_groups(clusters, t_e, t_c):
    """ProFeat_e pairs (Sec. 2.4). clusters [E, B]: argmax cluster k_{e,i} of every member for the batch.
    c(x_i, x_j) = sum_e [k_{e,i} == k_{e,j}] (Eq. 3); (i, j), i != j, is connected when c >= t_e. CHOICE: the text says
    c > t_e but sets t_e = E, which could never hold, so we read it as >= (unanimity at t_e = E). An image is kept when
    it has at least t_c connections in the batch (and at least one: C_x holds images with connections); the pruning
    is one pass, as written, not repeated until stable. Returns keep [B] and group [B, B] (connected or i == j, kept)."""
    agree = (clusters[:, :, None] == clusters[:, None, :]).sum(0)              # c(x_i, x_j) [B, B]
    eye = torch.eye(clusters.shape[1], dtype=torch.bool, device=clusters.device)
    connected = (agree >= t_e) & ~eye
    keep = connected.sum(1) >= max(t_c, 1)
    group = (connected | eye) & keep[:, None] & keep[None, :]
    return keep, group


def view_positives(group):
    """group [n, n] over the kept images (diagonal True) -> positives [2n, 2n] over their views (view a of image i is
    row i, view b row n + i): every pair of views of two images of one group, the two views of one image, never (v, v)."""
    n = group.shape[0]
    return group.repeat(2, 2) & ~torch.eye(2 * n, dtype=torch.bool, device=group.device)


def refinement_loss(z, positives, temperature=0.1):
    """Eq. (1) divided by |P|. z [V, D]: L2-normalised projections of all views of the kept images; positives [V, V]
    bool, the ordered pairs (i, j) of P. Q_i = every (i, k), k != i, among the views (positives and negatives), so
    log_prob[i, j] = sim_ij / tau - log sum_{k != i} exp(sim_ik / tau). With one image per group this is SimCLR's
    NT-Xent. CHOICE: the paper sums over P; we average, so the step size does not grow with the number of positives."""
    V = z.shape[0]
    sim = (z @ z.t()) / temperature                                            # [V, V]
    sim = sim.masked_fill(torch.eye(V, dtype=torch.bool, device=z.device), float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    return -log_prob[positives].mean()


def scan_loss(anchor_logits, neighbor_logits, entropy_weight=5.0):
    """SCAN Eq. (2): -mean_i log <p(x_i), p(x_j)>  - entropy_weight * H(mean_i p(x_i)).

    anchor_logits, neighbor_logits: [B, K]; row i of neighbor_logits is one neighbour of anchor i.
    Returns (total, consistency, entropy). log <p, q> is computed as logsumexp(log p + log q): exact and stable."""
    log_pa, log_pn = F.log_softmax(anchor_logits, 1), F.log_softmax(neighbor_logits, 1)   # [B, K]
    consistency = -torch.logsumexp(log_pa + log_pn, dim=1).mean()
    mean_p = log_pa.exp().mean(0)                                              # [K]
    entropy = -(mean_p * torch.log(mean_p.clamp(min=1e-8))).sum()
    return consistency - entropy_weight * entropy, consistency, entropy


def confidence_ce(weak_logits, strong_logits, threshold=0.99):
    """SCAN's self-labelling loss: cross-entropy on the strong view for samples whose un-augmented max prob > threshold,
    pseudo-label = argmax; class-balanced by the inverse frequency of each pseudo-label among the confident samples.
    weak_logits, strong_logits: [B, K]. Returns (loss, n_confident); loss is None when no sample is confident."""
    prob, target = F.softmax(weak_logits.detach(), 1).max(1)                   # [B], [B]
    mask = prob > threshold
    n = int(mask.sum())
    if n == 0:
        return None, 0
    target = target[mask]
    counts = torch.bincount(target, minlength=weak_logits.shape[1]).float()    # [K]
    weight = torch.where(counts > 0, n / counts.clamp(min=1), torch.zeros_like(counts))
    # F.cross_entropy with weights = sum_i w_{y_i} l_i / sum_i w_{y_i}: every present class has the same total weight
    return F.cross_entropy(strong_logits[mask], target, weight=weight.to(strong_logits.dtype)), n


# ----------------------------------------------------------------------------------------------------------------
# 5. Evaluation (predict, evaluate_clusters copied from scan.py)
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(fn, images, mean, std, batch_size=1000):
    """fn(normalised batch) -> tensor; run over all images without augmentation, concatenated on dim -2 (or 0)."""
    if isinstance(fn, nn.Module):
        fn.eval()                                                              # BN running statistics, not the batch's
    outs = [fn(plain(images[i:i + batch_size], mean, std)).float() for i in range(0, len(images), batch_size)]
    return torch.cat(outs, dim=-2)


def evaluate_clusters(probs, labels, classes, title):
    """ACC / NMI / ARI / top-5 (Hungarian, or many-to-one when K > classes) + confusion table; returns the metrics dict."""
    pred = probs.argmax(1).cpu()
    known = labels.cpu() >= 0
    if known.sum() == 0:
        return {"num_clusters": probs.shape[1], "K": len(pred.unique()), "n": len(pred)}
    res = metrics.evaluate(pred[known].numpy(), labels.cpu()[known].numpy(), probs.cpu()[known].numpy())
    res["num_clusters"] = probs.shape[1]                                       # K above = non-empty clusters
    res = {k: (float(v) if isinstance(v, (float, np.floating)) else int(v) if isinstance(v, (int, np.integer)) else v)
           for k, v in res.items()}
    print(f"== {title}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    conf = metrics.confusion(pred[known].numpy(), labels.cpu()[known].numpy())  # [K_pred, C]
    names = [c[:6] for c in classes][: conf.shape[1]]
    print("cluster " + " ".join(f"{n:>6}" for n in names))
    for i, row in enumerate(conf[:30]):
        print(f"{i:>7} " + " ".join(f"{v:>6d}" for v in row))
    return res


def keep_member(train_preds, scan_losses):
    """CHOICE (the paper keeps "only one model" without saying which): the medoid of the ensemble, the member whose
    train-set clustering has the highest mean NMI with the other members'; ties (always, for E = 2) go to the lowest
    SCAN loss of Eq. (2) on the train set. Label-free. train_preds: [E, N] cluster indices; scan_losses: [E]."""
    E = len(train_preds)
    agree = [round(float(np.mean([metrics.nmi(train_preds[e], train_preds[f]) for f in range(E) if f != e] or [0])), 6)
             for e in range(E)]
    return min(range(E), key=lambda e: (-agree[e], scan_losses[e]))


# ----------------------------------------------------------------------------------------------------------------
# 6. Training stages (helpers copied from scan.py; each stage resumes from its per-epoch checkpoint)
# ----------------------------------------------------------------------------------------------------------------
def write_outputs(args, probs, test, rows):
    """predictions.csv, prototypes.png and results.json from the final model's probabilities [N, C] on the test split."""
    from torchvision.utils import save_image
    conf, cluster = probs.max(1)
    lines = ["index,cluster,confidence,label"] + [f"{i},{c},{p:.6f},{int(y) if y >= 0 else ''}" for i, (c, p, y) in
                                                  enumerate(zip(cluster.tolist(), conf.tolist(), test.labels.tolist()))]
    atomic_save("\n".join(lines) + "\n", os.path.join(args.out_dir, "predictions.csv"))
    per_row = 8
    tiles = torch.zeros(args.num_clusters * per_row, *test.images.shape[1:])
    for c in range(args.num_clusters):                                         # most confident images of each cluster
        members = (cluster == c).nonzero().squeeze(1)
        top = members[conf[members].argsort(descending=True)[:per_row]]
        tiles[c * per_row: c * per_row + len(top)] = test.images[top].float().cpu() / 255
    tmp = os.path.join(args.out_dir, "prototypes.tmp.png")
    save_image(tiles, tmp, nrow=per_row, padding=1)
    os.replace(tmp, os.path.join(args.out_dir, "prototypes.png"))
    write_results(args, rows)


def atomic_save(obj, path):  # temporary file, then rename: a kill never leaves a half-written file
    tmp = path + ".tmp"
    torch.save(obj, tmp) if not isinstance(obj, str) else open(tmp, "w").write(obj)
    os.replace(tmp, path)


def log_jsonl(out_dir, row):
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def to_device(model, args):
    """(model on the device, the callable used for training): on CUDA channels_last inputs and bf16 autocast, compiled
    with --compile."""
    cuda = args.device == "cuda"
    model = model.to(args.device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    compiled = torch.compile(model) if args.compile else model

    def train_forward(x):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            return compiled(x.contiguous(memory_format=torch.channels_last) if cuda else x)
    return model, train_forward


def keep_freed_memory():
    """CPU speed, Linux only: glibc's malloc hands large freed blocks back to the OS, so every step's fresh multi-MB
    tensors page-fault in again. Keep freed memory in the process instead (as MALLOC_MMAP_THRESHOLD_=256M
    MALLOC_TRIM_THRESHOLD_=1G would). On our 2-core CPU: batched augmentation ~2x and small-CNN training 1.0-1.6x
    faster (README, scan.py section). A no-op without glibc (macOS, Windows, musl). Returns whether it took effect."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, 256 << 20)) and bool(mallopt(-1, 1 << 30))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def pick_device(name):
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return next(d for d in ["cuda", "mps", "cpu"] if available[d])
    if not available[name]:
        raise ProFeatError(f"--device {name} was requested but is not available here; use --device auto or cpu.")
    return name


class Progress:
    """Prints 'stage epoch step loss images/s ETA' every few seconds."""
    def __init__(self, stage, total_steps, every):
        self.stage, self.total, self.every = stage, total_steps, every
        self.t0 = self.last = time.time()
        self.done = self.images = 0

    def step(self, epoch, step, loss, n_images):
        self.done += 1
        self.images += n_images
        now = time.time()
        if now - self.last >= self.every:
            rate = self.images / (now - self.t0)
            eta = (now - self.t0) / self.done * (self.total - self.done)
            print(f"[{self.stage}] epoch {epoch} step {step} loss {loss:.4f} {rate:.0f} img/s ETA {eta / 60:.1f} min", flush=True)
            self.last = now


@torch.no_grad()
def head_losses(model, images, mean, std, neighbor_idx, args):
    """Eq. (2) (all K neighbours, no augmentation) per head on the train set: the label-free head selection."""
    model.eval()
    logits = predict(model, images, mean, std)                                 # [H, N, C]
    log_p = F.log_softmax(logits, 2)
    consistency = -torch.stack([torch.logsumexp(log_p + log_p[:, neighbor_idx[:, k]], 2).mean(1)
                                for k in range(neighbor_idx.shape[1])]).mean(0)  # [H]
    mean_p = log_p.exp().mean(1)                                               # [H, C]
    entropy = -(mean_p * torch.log(mean_p.clamp(min=1e-8))).sum(1)
    return consistency - args.entropy_weight * entropy


def single_head(model, head):  # keep only the selected head: the self-labelling model
    out = ClusteringModel(model.backbone, model.heads[head].out_features, 1).to(next(model.parameters()).device)
    out.heads[0].load_state_dict(model.heads[head].state_dict())
    return out


# Arguments that change what is computed; a checkpoint made with other values is refused (pass --restart).
CONFIG_KEYS = ["dataset", "train_split", "pretext_split", "image_size", "subset", "arch", "width", "num_clusters",
               "iterations", "ensemble", "t_s", "t_e", "t_c", "pretext_epochs", "refine_epochs", "batch_size", "lr",
               "lr_min", "wd", "temperature", "num_neighbors", "num_heads", "scan_epochs", "scan_batch_size", "scan_lr",
               "entropy_weight", "carry_h", "finetune", "finetune_epochs", "finetune_batch_size", "finetune_lr", "t_f",
               "weight_decay", "seed"]
ADDED_LATER = {"carry_h": False}  # settings added after checkpoints were made, with the value those checkpoints used


def load_checkpoint(args, path):
    """The checkpoint dict at path, or None. Refuses corrupted files and checkpoints of another configuration."""
    if not os.path.exists(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        assert isinstance(ckpt, dict) and "config" in ckpt and "model" in ckpt
    except Exception as e:
        raise ProFeatError(f"Cannot read the checkpoint {path} ({type(e).__name__}: {e}). It is corrupted or not a "
                           f"profeat.py checkpoint; delete it, pass --restart, or choose another --out-dir.")
    saved = {**ADDED_LATER, **ckpt["config"]}   # checkpoints from before a setting existed used its old behaviour
    diff = {k: (saved.get(k), getattr(args, k)) for k in CONFIG_KEYS if saved.get(k) != getattr(args, k)}
    if diff:
        raise ProFeatError(f"The checkpoint {path} was made with another configuration (saved vs now: {diff}). "
                           f"Pass --restart to recompute, or choose another --out-dir.")
    return ckpt


def run_stage(args, name, model, opt, epochs, steps, one_epoch, lr_at=None):
    """Train `epochs` epochs of one stage (one_epoch(epoch, prog, path) -> dict of stats), with an atomic checkpoint after
    every epoch in out_dir/name.pt; a complete checkpoint is loaded instead, a partial one resumed. Returns the last row."""
    path = os.path.join(args.out_dir, name + ".pt")
    ckpt, start, row = load_checkpoint(args, path), 0, {}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        start, row = ckpt["epoch"], ckpt["row"]
        if start < epochs:
            opt.load_state_dict(ckpt["optimizer"])
            print(f"[{name}] resuming after epoch {start}")
    prog = Progress(name, steps * (epochs - start), args.log_every)
    for epoch in range(start, epochs):
        if lr_at is not None:
            for gr in opt.param_groups:
                gr["lr"] = lr_at(epoch)
        # per-epoch reseeding: a resumed run draws the same numbers as an uninterrupted one
        torch.manual_seed(args.seed * 100003 + zlib.crc32(name.encode()) % 100003 + epoch)
        model.train()
        t0 = time.time()
        stats = one_epoch(epoch, prog, path)
        row = {"stage": name, "epoch": epoch + 1, **stats, "lr": opt.param_groups[0]["lr"], "seconds": time.time() - t0}
        print(f"[{name}] epoch {epoch + 1}/{epochs} " + " ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                                 if isinstance(v, (int, float)) and k != "epoch"), flush=True)
        log_jsonl(args.out_dir, row)
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "row": row,
                     "config": {k: getattr(args, k) for k in CONFIG_KEYS}, "args": vars(args)}, path)
    return row


def check_finite(loss, path, epoch, step):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"Non-finite loss at epoch {epoch} step {step}; the last good checkpoint is {path} (its "
                                 f"last completed epoch). Lower the learning rate and rerun: the run resumes from there.")


def representation_step(args, it, e, model, images, mean, std, groups_of):
    """Eq. (1) on g_e and p_e. groups_of(idx) -> (keep [B], group [B, B]) for a batch of image indices."""
    first = it == 1
    epochs = args.pretext_epochs if first else args.refine_epochs
    offset = 0 if first else args.pretext_epochs + (it - 2) * args.refine_epochs   # epochs before this step
    total = args.pretext_epochs + (args.iterations - 1) * args.refine_epochs
    # CHOICE: "0.4, gradually decreased to 0.0004 through iterations": one cosine schedule over every representation
    # epoch of the run. Each iteration gets a fresh SGD (momentum reset): a fine-tuning run of its own.
    lr_at = lambda ep: args.lr_min + (args.lr - args.lr_min) * (1 + math.cos(math.pi * (offset + ep) / total)) / 2
    model, fmodel = to_device(model, args)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    N, B = len(images), min(args.batch_size, len(images))
    steps = N // B

    def one_epoch(epoch, prog, path):
        total_loss, used, kept, pairs = 0.0, 0, 0, 0
        perm = torch.randperm(N, device=images.device)
        for step in range(steps):
            idx = perm[step * B:(step + 1) * B]
            keep, group = groups_of(idx)                                       # [B], [B, B]
            n = int(keep.sum())
            kept, pairs = kept + n, pairs + (int(group.sum()) - n) // 2        # image pairs of P (not the 2 views)
            if n < 2:                                                          # nothing to contrast: skip the batch
                continue
            imgs = images[idx[keep]]
            z = fmodel(torch.cat([simclr_augment(imgs, mean, std), simclr_augment(imgs, mean, std)]))  # [2n, 128]
            loss = refinement_loss(z.float(), view_positives(group[keep][:, keep]), args.temperature)
            check_finite(loss, path, epoch, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss, used = total_loss + loss.item(), used + 1
            prog.step(epoch, step, loss.item(), 2 * n)
        return {"loss": total_loss / max(used, 1), "kept_images": kept / steps, "positive_pairs": pairs / steps,
                "skipped_batches": steps - used}
    return run_stage(args, f"it{it:03d}_m{e}_representation", model, opt, epochs, steps, one_epoch, lr_at)


def clustering_step(args, it, e, g_model, train, previous=None):
    """Mine neighbours in p(g(x)); train h on g' = a copy of g with Eq. (2); optional self-labelling. g is untouched.
    previous: (clustering model, head) of this member's last iteration, continued unless --no-carry-h."""
    g_model.eval()
    train_z = predict(g_model, train.images, train.mean, train.std)           # [N, 128] projected space
    _, neighbor_idx = knn(train_z, k=args.num_neighbors, metric="cosine", exclude_self=True)  # [N, M]
    info = {}
    if (train.labels >= 0).all():
        info["neighbor_acc"] = float(metrics.neighbor_acc(neighbor_idx.cpu(), train.labels.cpu()))
    # g' starts as g (deep copy: g's weights are never touched). CHOICE: the text "iteratively learns both g and h" and
    # uses "the final g and h", so h carries over: head 0 continues the previous iteration's h, the other heads start
    # afresh and the lowest-loss head is kept as before (iteration 1 is exactly SCAN). Restarting every head
    # (--no-carry-h) gave 4.5-10 points lower ACC on Fashion-MNIST (README).
    torch.manual_seed(args.seed * 100003 + 1000 * it + e)                     # the heads' init, same when resumed
    model, fmodel = to_device(ClusteringModel(copy.deepcopy(g_model.backbone), args.num_clusters, args.num_heads), args)
    if args.carry_h and previous is not None:
        model.heads[0].load_state_dict(previous[0].heads[previous[1]].state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=args.scan_lr, weight_decay=args.weight_decay)
    N, B = len(train.images), min(args.scan_batch_size, len(train.images))
    steps = N // B

    def scan_epoch(epoch, prog, path):
        totals = torch.zeros(args.num_heads)
        perm = torch.randperm(N, device=train.images.device)
        for step in range(steps):
            anchor = perm[step * B:(step + 1) * B]                            # [B]
            neighbor = neighbor_idx[anchor, torch.randint(0, neighbor_idx.shape[1], (len(anchor),), device=anchor.device)]
            x = torch.cat([strong_augment(train.images[anchor], train.mean, train.std),
                           strong_augment(train.images[neighbor], train.mean, train.std)])
            logits = fmodel(x)                                                 # [H, 2B, K]
            losses = torch.stack([scan_loss(lg[:B], lg[B:], args.entropy_weight)[0] for lg in logits])
            check_finite(losses.sum(), path, epoch, step)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()                                            # every head trained at once
            opt.step()
            totals += losses.detach().cpu()
            prog.step(epoch, step, losses.mean().item(), 2 * B)
        return {"loss": (totals / steps).min().item()}
    run_stage(args, f"it{it:03d}_m{e}_scan", model, opt, args.scan_epochs, steps, scan_epoch)
    hl = head_losses(model, train.images, train.mean, train.std, neighbor_idx, args)
    head = int(hl.argmin())
    info.update(head=head, scan_eval_loss=hl[head].item())
    if not args.finetune or args.finetune_epochs == 0:
        return model, head, info
    # Self-labelling (SCAN's): CHOICE: g' and h are both fine-tuned, as SCAN's self-labelling does (the text says "h").
    model, fmodel = to_device(single_head(model, head), args)
    opt = torch.optim.Adam(model.parameters(), lr=args.finetune_lr, weight_decay=args.weight_decay)
    B = min(args.finetune_batch_size, N)
    steps = N // B

    def finetune_epoch(epoch, prog, path):
        total, n_conf, used = 0.0, 0, 0
        perm = torch.randperm(N, device=train.images.device)
        for step in range(steps):
            imgs = train.images[perm[step * B:(step + 1) * B]]
            with torch.no_grad():
                weak_logits = fmodel(plain(imgs, train.mean, train.std))[0]   # un-augmented view [B, K]
            strong_logits = fmodel(strong_augment(imgs, train.mean, train.std))[0]
            loss, n = confidence_ce(weak_logits, strong_logits, args.t_f)
            n_conf += n
            if loss is None:                                                   # no confident sample: skip the batch
                continue
            check_finite(loss, path, epoch, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, used = total + loss.item(), used + 1
            prog.step(epoch, step, loss.item(), 2 * B)
        return {"loss": total / max(used, 1), "confident": n_conf}
    run_stage(args, f"it{it:03d}_m{e}_finetune", model, opt, args.finetune_epochs, steps, finetune_epoch)
    return model, 0, info


def write_results(args, rows):
    res = {"dataset": args.dataset, "method": "ProFeat_s" if args.ensemble == 1 else f"ProFeat_e (E={args.ensemble})",
           "arch": args.arch, "rows": rows, "args": vars(args)}
    atomic_save(json.dumps(res, indent=1, default=str) + "\n", os.path.join(args.out_dir, "results.json"))


# ----------------------------------------------------------------------------------------------------------------
# 7. main
# ----------------------------------------------------------------------------------------------------------------
def load_data(args):
    """(pretext, train, test) on the device; pretext is train unless --pretext-split differs (stl10)."""
    train = data.load_dataset(args.dataset, root=args.data_root, split=args.train_split, image_size=args.image_size)
    test = data.load_dataset(args.dataset, root=args.data_root, split=args.test_split, image_size=args.image_size)
    if args.subset is not None and args.subset < len(train.images):
        if args.subset < 2:
            raise ProFeatError(f"--subset {args.subset} is too small; give at least 2 images.")
        keep = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(args.seed))[: args.subset]
        train = train._replace(images=train.images[keep], labels=train.labels[keep])
    pretext = train
    if args.pretext_split not in (None, args.train_split):
        pretext = data.load_dataset(args.dataset, root=args.data_root, split=args.pretext_split, image_size=args.image_size)
    return (d._replace(images=d.images.to(args.device), labels=d.labels.to(args.device)) for d in (pretext, train, test))


def check_args(args, N=None):
    """Raise ProFeatError on bad values: argument-only checks first (N=None), then those needing the data's size N."""
    E = args.ensemble
    problems = [(E < 1, f"--ensemble must be at least 1 (got {E})"),
                (not 1 <= args.t_e <= max(E, 1), f"--t-e must be in 1..E={E} (got {args.t_e})"),
                (args.t_c is not None and args.t_c < 1, f"--t-c must be at least 1 (got {args.t_c})"),
                (not 0 < args.t_s <= 1 or not 0 < args.t_f < 1, "--t-s must be in (0, 1] and --t-f in (0, 1)"),
                (args.temperature <= 0 or (args.threads is not None and args.threads < 1),
                 "--temperature and --threads must be positive")]
    for k in ["iterations", "num_heads", "pretext_epochs", "batch_size", "scan_epochs", "scan_batch_size", "finetune_batch_size"]:
        problems.append((getattr(args, k) < 1, f"--{k.replace('_', '-')} must be at least 1 (got {getattr(args, k)})"))
    for k in ["refine_epochs", "finetune_epochs"]:
        problems.append((getattr(args, k) < 0, f"--{k.replace('_', '-')} must be at least 0 (got {getattr(args, k)})"))
    if N is not None:
        problems += [(args.num_clusters < 2, f"--num-clusters must be at least 2 (got {args.num_clusters})"),
                     (args.num_clusters > N, f"--num-clusters {args.num_clusters} is more than the {N} training images"),
                     (not 1 <= args.num_neighbors < N, f"--num-neighbors must be in 1..{N - 1} for {N} training images "
                                                       f"(got {args.num_neighbors})")]
    for bad, message in problems:
        if bad:
            raise ProFeatError(message + ".")
    if N is not None and args.t_c is None:  # the paper: t_c is "around half the average number of images per class in
        args.t_c = max(1, round(0.4 * min(args.batch_size, N) / args.num_clusters))  # a minibatch"; 0.4 gives 20 and 10


def main(argv=None):
    args = parse_args(argv)
    try:
        keep_freed_memory()
        check_args(args)
        args.device = pick_device(args.device)
        torch.set_num_threads(args.threads or torch.get_num_threads())
        if args.device == "cuda":
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(args.seed)
        pretext, train, test = load_data(args)
        args.num_clusters = args.num_clusters or len(train.classes)
        check_args(args, len(train.images))
        os.makedirs(args.out_dir, exist_ok=True)
        stale = [f for f in os.listdir(args.out_dir) if f.endswith(".pt") or f in
                 ("results.json", "predictions.csv", "prototypes.png", "log.jsonl")]
        for f in stale if args.restart else []:
            os.remove(os.path.join(args.out_dir, f))
        for f in [] if args.restart else sorted(f for f in stale if f.endswith(".pt")):
            load_checkpoint(args, os.path.join(args.out_dir, f))                # validate before spending time
        E, in_ch = args.ensemble, train.images.shape[1]
        print(f"profeat.py: {'ProFeat_s' if E == 1 else f'ProFeat_e (E={E}, t_e={args.t_e}, t_c={args.t_c})'} on "
              f"{args.dataset} train {tuple(train.images.shape)} test {tuple(test.images.shape)} arch {args.arch} "
              f"device {args.device} K {args.num_clusters} iterations {args.iterations} out {args.out_dir}", flush=True)
        t_start = time.time()
        # Members differ by their random initialisation (drawn here, in order, from the seed).
        g_models = [to_device(ContrastiveModel(make_backbone(args, in_ch)), args)[0] for _ in range(E)]
        train_probs, rows = None, []                                            # [E, N, K] of the previous iteration
        for it in range(1, args.iterations + 1):
            if it == 1:  # all images in different clusters: each image is its own group (SimCLR)
                groups_of = lambda idx: (torch.ones_like(idx, dtype=torch.bool),
                                         torch.eye(len(idx), dtype=torch.bool, device=idx.device))
            elif E == 1:
                groups_of = lambda idx, p=train_probs[0]: confident_groups(p[idx], args.t_s)
            else:
                groups_of = lambda idx, k=train_probs.argmax(2): ensemble_groups(k[:, idx], args.t_e, args.t_c)
            images = pretext if it == 1 else train
            previous = list(zip(models, heads)) if it > 1 else [None] * E  # this member's h of the last iteration
            models, heads, reps, infos = [], [], [], []
            for e in range(E):
                reps.append(representation_step(args, it, e, g_models[e], images.images, images.mean, images.std, groups_of))
                model, head, info = clustering_step(args, it, e, g_models[e], train, previous[e])
                models.append(model), heads.append(head), infos.append(info)
            for m in models:
                m.eval()                                                       # BN statistics, not the batch's
            train_probs = torch.stack([predict(m, train.images, train.mean, train.std)[h].softmax(1) for m, h in zip(models, heads)])
            member_losses = [info["scan_eval_loss"] for info in infos]
            kept = keep_member(train_probs.argmax(2).cpu().numpy(), member_losses)
            test_probs = [predict(m, test.images, test.mean, test.std)[h].softmax(1) for m, h in zip(models, heads)]
            row = {"iteration": it, "kept_member": kept, **evaluate_clusters(test_probs[kept], test.labels, test.classes,
                                                                               f"iteration {it} (member {kept})")}
            row.update({k: reps[kept].get(k) for k in ["kept_images", "positive_pairs", "skipped_batches"]}, **infos[kept])
            confident = train_probs[kept].max(1).values >= args.t_s             # what the next ProFeat_s step uses
            row["train_confident"] = int(confident.sum())
            if confident.any() and (train.labels >= 0).all():                  # their accuracy (labels only reported)
                row["train_confident_acc"] = float(metrics.cluster_acc(train_probs[kept].argmax(1)[confident].cpu().numpy(),
                                                                       train.labels[confident].cpu().numpy()))
            if E > 1:  # label-free, logged so that other keep rules can be compared on finished runs
                row["member_scan_eval_loss"] = member_losses
            if E > 1 and (test.labels >= 0).any():
                row["member_acc"] = [float(metrics.cluster_acc(p.argmax(1).cpu().numpy(), test.labels.cpu().numpy()))
                                     for p in test_probs]
            row["wall_seconds_this_run"] = time.time() - t_start
            rows.append(row)
            log_jsonl(args.out_dir, {"stage": "iteration", **row})
            write_results(args, rows)
        write_outputs(args, test_probs[kept], test, rows)
        print(f"done in {time.time() - t_start:.1f} s; kept member {kept}; outputs in {args.out_dir}")
    except (data.DataError, ProFeatError) as e:
        print(f"profeat.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"profeat.py: stopped: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
