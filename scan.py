"""scan.py: SCAN (Semantic Clustering by Adopting Nearest neighbours), end to end, in one file.

Van Gansbeke, Vandenhende, Georgoulis, Proesmans, Van Gool, "SCAN: Learning to Classify Images without Labels",
ECCV 2020 (summaries in ../shared/papers/000_*.txt and 002_*.txt). The three steps of the paper's Algorithm 1:

  1. pretext   SimCLR (Chen et al. 2020): backbone + MLP head trained with NT-Xent over two augmented views.
  2. mine      the K=20 nearest neighbours of every training image in the pretext embedding (+ the k-means baseline).
  3. scan      clustering heads trained with the SCAN loss, Eq. (2): neighbours should agree, clusters should be used.
  4. selflabel fine-tune on the confident predictions (max prob > 0.99) with strongly augmented inputs.

`--loss structured` swaps Eq. (2) for the structure-preserving loss of the reproduction paper
(../shared/papers/001_*.txt, Sec. 4.3, Eq. (3)-(8)). Each stage is saved to --out-dir and skipped when complete.

Usage: python scan.py --dataset cifar10 --device cuda          (paper settings)
       python scan.py --dataset synthetic --quick              (whole pipeline in seconds on a CPU)
"""
import argparse
import ctypes
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics
from knn import knn

# ---- 1. Arguments ----------------------------------------------------------------------------------------------
# The paper's settings per dataset (SCAN's configs); anything not listed uses the cifar10 value.
PAPER_DEFAULTS = {
    "cifar10": dict(scan_epochs=50, scan_batch_size=128, selflabel_epochs=200),
    "cifar20": dict(scan_epochs=100, scan_batch_size=512, selflabel_epochs=200),
    "stl10": dict(scan_epochs=100, scan_batch_size=128, selflabel_epochs=100, train_split="train+unlabeled"),
}
QUICK = dict(arch="smallcnn", width=16, subset=1000, pretext_epochs=5, scan_epochs=4, selflabel_epochs=2, num_heads=2,
             pretext_batch_size=128, scan_batch_size=128, selflabel_batch_size=250, pretext_lr=0.1, scan_lr=1e-3,
             selflabel_lr=1e-3, monitor_every=5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SCAN: SimCLR pretext -> mine neighbours -> SCAN clustering -> self-labelling.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="cifar10", help="cifar10 | cifar20 | cifar100 | stl10 | fashion-mnist | mnist | imagefolder:PATH | synthetic")
    a("--data-root", default="./data", help="where datasets are stored / downloaded")
    a("--train-split", default=None, help="split to train on (default: train; stl10: train+unlabeled for the pretext)")
    a("--test-split", default="test", help="split evaluated after each stage")
    a("--image-size", type=int, default=None, help="resize images to this size (imagefolder)")
    a("--subset", type=int, default=None, help="train on a random subset of this many images (default: all)")
    a("--out-dir", default=None, help="output folder (default: runs/scan-DATASET)")
    a("--arch", default="resnet18", choices=["resnet18", "smallcnn"], help="backbone: CIFAR-style ResNet-18 or a small CNN for CPU runs")
    a("--width", type=int, default=32, help="channels of the first smallcnn stage (doubles each stage)")
    a("--num-clusters", type=int, default=None, help="clusters (default: number of classes; more = overclustering)")
    a("--num-heads", type=int, default=10, help="clustering heads trained at once; the lowest-loss one is kept")
    a("--num-neighbors", type=int, default=20, help="K nearest neighbours mined per image")
    a("--pretext-epochs", type=int, default=500, help="SimCLR epochs")
    a("--pretext-batch-size", type=int, default=512, help="SimCLR batch size (2x views)")
    a("--pretext-lr", type=float, default=0.4, help="SimCLR SGD learning rate (cosine decay to lr * 0.1^3)")
    a("--pretext-wd", type=float, default=1e-4, help="SimCLR weight decay")
    a("--temperature", type=float, default=0.1, help="NT-Xent temperature")
    a("--crop-min", type=float, default=0.2, help="SimCLR RandomResizedCrop: smallest crop area fraction (SCAN's: 0.2)")
    a("--scan-epochs", type=int, default=None, help="SCAN epochs (paper: 50 cifar10, 100 cifar20/stl10)")
    a("--scan-batch-size", type=int, default=None, help="SCAN batch size (paper: 128, 512 for cifar20)")
    a("--scan-lr", type=float, default=1e-4, help="SCAN Adam learning rate")
    a("--entropy-weight", type=float, default=5.0, help="weight of the entropy term of Eq. (2)")
    a("--update-head-only", action="store_true", help="SCAN stage: freeze the backbone, train the heads only")
    a("--loss", default="scan", choices=["scan", "structured"], help="clustering loss: SCAN Eq. (2) or the structured loss (001, Eq. 3-8)")
    a("--tau-c", type=float, default=8.0, help="structured loss: temperature of the neighbour weights, Eq. (5)")
    a("--tau-cc", type=float, default=1.0, help="structured loss: temperature of the cluster-level contrast, Eq. (6)")
    a("--eta-cc", type=float, default=1.0, help="structured loss: weight of the cluster-level contrast, Eq. (3)")
    a("--lambda-b", type=float, default=5.0, help="structured loss: weight of the negative entropy, Eq. (3)")
    a("--selflabel-epochs", type=int, default=None, help="self-labelling epochs (paper: 200, 100 for stl10; 0 skips)")
    a("--selflabel-batch-size", type=int, default=1000, help="self-labelling batch size")
    a("--selflabel-lr", type=float, default=1e-4, help="self-labelling Adam learning rate")
    a("--confidence-threshold", type=float, default=0.99, help="self-labelling: min max-probability of a pseudo-label")
    a("--weight-decay", type=float, default=1e-4, help="Adam weight decay of the SCAN and self-labelling stages")
    a("--monitor-every", type=int, default=None, help="weighted k-NN monitor every N pretext epochs (default: ~10 times per run)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    a("--compile", action="store_true", help="torch.compile the model (opt-in)")
    a("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    a("--seed", type=int, default=0, help="random seed (same seed + device = same result)")
    a("--quick", action="store_true", help="small CNN (width 16), 1000-image subset, 5+4+2 epochs: a smoke run in well under a minute")
    a("--restart", action="store_true", help="recompute every stage, ignoring what --out-dir holds")
    a("--log-every", type=float, default=5.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    tokens = argv if argv is not None else sys.argv[1:]
    given = {t.split("=")[0].lstrip("-").replace("-", "_") for t in tokens if t.startswith("--")}  # flags set explicitly
    base = args.dataset.split(":")[0]
    for k, v in {**PAPER_DEFAULTS["cifar10"], **PAPER_DEFAULTS.get(base, {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick:  # quick values only where the user did not set the flag explicitly
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
    args.train_split = args.train_split or "train"
    args.out_dir = args.out_dir or os.path.join("runs", "scan-" + base)
    return args


class ScanError(Exception):
    """Bad input or configuration: printed as one paragraph, exit status 2."""


# ---- 2. Data + augmentation: float images in [0, 1], [B, C, H, W], every random parameter drawn per image. -----
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


# --- SCAN's strong augmentation: flip, 4 of 14 ops (with replacement, random magnitude), normalise, Cutout --------
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


# ---- 3. Model --------------------------------------------------------------------------------------------------
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


# ---- 4. Losses: pure functions of tensors ----------------------------------------------------------------------
def nt_xent(z1, z2, temperature=0.1):
    """SimCLR's NT-Xent (SimCLR Eq. 1), averaged over the 2B anchors. z1, z2: [B, D] L2-normalised views."""
    B = z1.shape[0]
    z = torch.cat([z1, z2])                                                    # [2B, D]
    sim = (z @ z.t()) / temperature                                            # [2B, 2B]
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))  # k != i
    positive = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)  # the other view of the same image
    return F.cross_entropy(sim, positive)


def scan_loss(anchor_logits, neighbor_logits, entropy_weight=5.0):
    """SCAN Eq. (2): -mean_i log <p(x_i), p(x_j)>  - entropy_weight * H(mean_i p(x_i)).

    anchor_logits, neighbor_logits: [B, K]; row i of neighbor_logits is one neighbour of anchor i.
    Returns (total, consistency, entropy). log <p, q> is computed as logsumexp(log p + log q): exact and stable."""
    log_pa, log_pn = F.log_softmax(anchor_logits, 1), F.log_softmax(neighbor_logits, 1)   # [B, K]
    consistency = -torch.logsumexp(log_pa + log_pn, dim=1).mean()
    mean_p = log_pa.exp().mean(0)                                              # [K]
    entropy = -(mean_p * torch.log(mean_p.clamp(min=1e-8))).sum()
    return consistency - entropy_weight * entropy, consistency, entropy


def structured_loss(anchor_logits, neighbor_logits, anchor_z, neighbor_z, tau_c=8.0, tau_cc=1.0, eta_cc=1.0, lambda_b=5.0):
    """Structure-preserving clustering loss of the reproduction paper (001, Sec. 4.3), Eq. (3)-(8).

    anchor_logits [B, c] (view a of x_i), neighbor_logits [B, c] (view b of one random neighbour j of x_i),
    anchor_z, neighbor_z [B, d]: L2-normalised pretext embeddings of x_i and x_j (fixed, from the mine stage).
    Readings where the paper is vague: the sums over i of Eq. (3)-(4) become means over the batch (as SCAN does);
    gamma_ij of Eq. (6) is 1 for every pair (plainest reading), and Eq. (6)'s denominator excludes j = l as written;
    the cluster vectors p_l are L2-normalised (cosine similarity, as in Contrastive Clustering, where this term comes
    from): with raw columns p_l . p_l scales with the batch size, swamps the entropy term and, in our runs, left
    clusters empty (Fashion-MNIST: 7 of 10 clusters used after 3 epochs).
    Returns (total, consistency, cluster_contrast, neg_entropy)."""
    log_qa, log_qb = F.log_softmax(anchor_logits, 1), F.log_softmax(neighbor_logits, 1)   # [B, c]
    # Eq. (4)-(5): neighbour consistency weighted by w_ij = exp(z_i . z_j / tau_c)
    w = torch.exp((anchor_z * neighbor_z).sum(1) / tau_c)                      # [B]
    consistency = -(w * torch.logsumexp(log_qa + log_qb, dim=1)).mean()
    # Eq. (6)-(7): columns p_l of P = Q^T are cluster representations; cluster l of view a vs cluster l of view b
    c = anchor_logits.shape[1]
    pa, pb = F.normalize(log_qa.exp().t(), dim=1), F.normalize(log_qb.exp().t(), dim=1)  # [c, B], unit rows
    off_diag = ~torch.eye(c, dtype=torch.bool, device=pa.device)

    def l_cc(p, q):                                                            # -sum_l log(e^{s_ll} / sum_{j!=l} e^{s_lj})
        s = p @ q.t() / tau_cc                                                 # [c, c]
        return -(s.diagonal() - torch.logsumexp(s.masked_fill(~off_diag, float("-inf")), dim=1)).sum()
    cluster_contrast = (l_cc(pa, pb) + l_cc(pb, pa)) / (2 * c)                 # Eq. (7) for one batch (m = 1)
    # Eq. (8): negative entropy of the mean assignment
    mean_q = log_qa.exp().mean(0)                                              # [c]
    neg_entropy = (mean_q * torch.log(mean_q.clamp(min=1e-8))).sum()
    total = consistency + eta_cc * cluster_contrast + lambda_b * neg_entropy   # Eq. (3)
    return total, consistency, cluster_contrast, neg_entropy


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


# ---- 5. Evaluation ---------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(fn, images, mean, std, batch_size=1000):
    """fn(normalised batch) -> tensor; run over all images without augmentation, concatenated on dim -2 (or 0)."""
    if isinstance(fn, nn.Module):
        fn.eval()                                                              # BN running statistics, not the batch's
    outs = [fn(plain(images[i:i + batch_size], mean, std)).float() for i in range(0, len(images), batch_size)]
    return torch.cat(outs, dim=-2)


def kmeans(x, k, iters=50, n_init=3, seed=0):
    """Lloyd's k-means with k-means++ seeding, best of n_init by inertia. x [N, D] -> (labels [N], centroids [k, D])."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = x.float()
    best = None
    for _ in range(n_init):
        centroids = x[torch.randint(len(x), (1,), generator=g)]
        for _ in range(k - 1):                                                 # k-means++: pick far points
            d2 = torch.cdist(x, centroids).pow(2).min(1).values
            centroids = torch.cat([centroids, x[torch.multinomial(d2.cpu() + 1e-12, 1, generator=g).to(x.device)]])
        for _ in range(iters):
            labels = torch.cdist(x, centroids).argmin(1)
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).float().unsqueeze(1)
            centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # empty cluster: keep old
        inertia = torch.cdist(x, centroids).pow(2).min(1).values.sum().item()
        if best is None or inertia < best[0]:
            best = (inertia, torch.cdist(x, centroids).argmin(1), centroids)
    return best[1], best[2]


def weighted_knn_acc(train_z, train_y, test_z, test_y, k=200, t=0.07):
    """Weighted k-NN classifier on L2-normalised features (the usual SimCLR monitor; labels only used to report)."""
    k = min(k, len(train_z) - 1)
    scores, idx = knn(test_z, train_z, k=k, metric="cosine", exclude_self=False)
    votes = torch.zeros(len(test_z), int(train_y.max()) + 1, device=test_z.device)
    votes.scatter_add_(1, train_y[idx], torch.exp(scores / t))
    return (votes.argmax(1) == test_y).float().mean().item()


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


# ---- 6. Training stages (each one: resume from its checkpoint, train epochs, save atomically, evaluate) --------
def atomic_save(obj, path):  # temporary file, then rename: a kill never leaves a half-written file
    tmp = path + ".tmp"
    torch.save(obj, tmp) if not isinstance(obj, str) else open(tmp, "w").write(obj)
    os.replace(tmp, path)


def log_jsonl(out_dir, row):
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


# Arguments that change what a stage computes: a checkpoint made with other values is refused (use --restart).
STAGE_KEYS = {
    "pretext": ["dataset", "train_split", "image_size", "subset", "arch", "width", "seed", "pretext_epochs",
                "pretext_batch_size", "pretext_lr", "pretext_wd", "temperature", "crop_min"],
    "mine": ["num_neighbors"],
    "scan": ["num_clusters", "num_heads", "scan_epochs", "scan_batch_size", "scan_lr", "entropy_weight", "update_head_only",
             "loss", "tau_c", "tau_cc", "eta_cc", "lambda_b", "weight_decay"],
    "selflabel": ["selflabel_epochs", "selflabel_batch_size", "selflabel_lr", "confidence_threshold"],
}
STAGES = list(STAGE_KEYS)
ADDED_LATER = {"crop_min": 0.2}  # settings added after checkpoints were made, with the value those checkpoints used


def stage_config(args, stage):  # this stage's settings and those of every stage before it
    keys = sum((STAGE_KEYS[s] for s in STAGES[: STAGES.index(stage) + 1]), [])
    return {k: getattr(args, k) for k in keys}


def load_stage(args, stage):
    """The stage's checkpoint dict, or None. Refuses corrupted files and checkpoints of another configuration."""
    path = os.path.join(args.out_dir, stage + ".pt")
    if not os.path.exists(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        assert isinstance(ckpt, dict) and "config" in ckpt
    except Exception as e:
        raise ScanError(f"Cannot read the checkpoint {path} ({type(e).__name__}: {e}). It is corrupted or not a scan.py "
                        f"checkpoint; delete it, pass --restart, or choose another --out-dir.")
    saved = {**ADDED_LATER, **ckpt["config"]}   # checkpoints from before a setting existed used its old behaviour
    diff = {k: (saved.get(k), v) for k, v in stage_config(args, stage).items() if saved.get(k) != v}
    if diff:
        raise ScanError(f"The checkpoint {path} was made with another configuration (saved vs now: {diff}). "
                        f"Pass --restart to recompute, or choose another --out-dir.")
    return ckpt


def check_finite(loss, stage, epoch, step, args):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"Non-finite {stage} loss at epoch {epoch} step {step}; the last good checkpoint is "
                                 f"{os.path.join(args.out_dir, stage + '.pt')} (its last completed epoch). Lower the "
                                 f"learning rate and rerun: the run resumes from there.")


def epoch_seed(args, stage, epoch):  # per-epoch reseeding: a resumed run draws the same numbers as an uninterrupted one
    torch.manual_seed(args.seed * 100003 + STAGES.index(stage) * 10007 + epoch)


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


def train_stage(args, stage, model, opt, epochs, batch_size, N, batch_loss, end_epoch, start_epoch=None):
    """The loop of pretext, scan and selflabel: resume from the stage's checkpoint (returned as is when complete); each
    epoch reseed, start_epoch(epoch), one step per shuffled batch on batch_loss(idx) (a loss, per-head losses [H] that
    are summed, or None: skip), end_epoch(epoch, row) evaluates, prints and returns extra checkpoint entries; log, save."""
    ckpt = load_stage(args, stage)
    start = 0 if ckpt is None else ckpt["epoch"]
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if ckpt["complete"]:
            return ckpt
        opt.load_state_dict(ckpt["optimizer"])
        print(f"[{stage}] resuming after epoch {start}")
    B = min(batch_size, N)
    steps = N // B
    total_steps, done = steps * (epochs - start), 0
    t_start = last_print = time.time()
    for epoch in range(start, epochs):
        epoch_seed(args, stage, epoch)
        model.train()
        if start_epoch is not None:
            start_epoch(epoch)
        t0, losses = time.time(), []
        perm = torch.randperm(N, device=args.device)
        for step in range(steps):
            loss = batch_loss(perm[step * B:(step + 1) * B])
            if loss is None:                                                   # nothing to learn from: skip the batch
                continue
            check_finite(loss.sum(), stage, epoch, step, args)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()                                              # [H] losses: every head trained at once
            opt.step()
            losses.append(loss.detach().float().cpu())
            done += 1
            if time.time() - last_print >= args.log_every:                    # progress line every few seconds
                last_print, elapsed = time.time(), time.time() - t_start
                print(f"[{stage}] epoch {epoch} step {step} loss {losses[-1].mean():.4f} {2 * B * done / elapsed:.0f} img/s "
                      f"ETA {elapsed / done * (total_steps - done) / 60:.1f} min", flush=True)  # 2B images: two views each
        seconds = time.time() - t0
        row = {"stage": stage, "epoch": epoch + 1, "loss": (torch.stack(losses).mean(0) if losses else torch.tensor(0.0)).tolist(),
               "seconds": seconds, "images_per_s": 2 * B * steps / seconds}
        extra = end_epoch(epoch, row)
        log_jsonl(args.out_dir, row)
        ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "complete": epoch + 1 == epochs,
                "config": stage_config(args, stage), "args": vars(args), **extra}
        atomic_save(ckpt, os.path.join(args.out_dir, stage + ".pt"))
    return ckpt


def run_pretext(args, train, test, in_ch):
    epoch_seed(args, "pretext", -1)                                            # initial weights: same on every run
    model, fmodel = to_device(ContrastiveModel(make_backbone(args, in_ch)), args)
    opt = torch.optim.SGD(model.parameters(), lr=args.pretext_lr, momentum=0.9, weight_decay=args.pretext_wd)
    monitor_every = args.monitor_every or max(1, args.pretext_epochs // 10)

    def set_lr(epoch):  # cosine decay from lr to lr * 0.1^3 (SCAN's SimCLR config)
        for gr in opt.param_groups:
            gr["lr"] = args.pretext_lr * (1e-3 + (1 - 1e-3) * (1 + math.cos(math.pi * epoch / args.pretext_epochs)) / 2)

    def batch_loss(idx):
        imgs = train.images[idx]
        v1, v2 = (simclr_augment(imgs, train.mean, train.std, args.crop_min) for _ in range(2))
        z = fmodel(torch.cat([v1, v2]))                                        # [2B, 128]
        return nt_xent(z[:len(idx)], z[len(idx):], args.temperature)

    def end_epoch(epoch, row):
        row["lr"] = opt.param_groups[0]["lr"]
        if (epoch + 1) % monitor_every == 0 or epoch + 1 == args.pretext_epochs:
            if (train.labels >= 0).all() and (test.labels >= 0).all():
                row["knn_acc"] = weighted_knn_acc(predict(model, train.images, train.mean, train.std), train.labels,
                                                  predict(model, test.images, test.mean, test.std), test.labels)
        print(f"[pretext] epoch {epoch + 1}/{args.pretext_epochs} " + " ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
        return {}
    return model, train_stage(args, "pretext", model, opt, args.pretext_epochs, args.pretext_batch_size, len(train.images),
                              batch_loss, end_epoch, start_epoch=set_lr)


def run_mine(args, model, train, test):
    """Neighbours of every train image in the pretext embedding; the pretext + k-means baseline on the test split."""
    ckpt = load_stage(args, "mine")
    if ckpt is not None:
        return ckpt
    model.eval()
    train_z = predict(model, train.images, train.mean, train.std)              # [N, 128], L2-normalised
    test_z = predict(model, test.images, test.mean, test.std)
    scores, neighbor_idx = knn(train_z, k=args.num_neighbors, metric="cosine", exclude_self=True)  # [N, K]
    row = {"stage": "pretext+kmeans"}
    if (train.labels >= 0).all():
        for k in (5, 20):
            row[f"neighbor_acc_top{k}"] = float(metrics.neighbor_acc(neighbor_idx[:, :k].cpu(), train.labels.cpu()))
        print(f"[mine] neighbour accuracy top-5 {row['neighbor_acc_top5']:.4f} top-20 {row['neighbor_acc_top20']:.4f}")
    _, centroids = kmeans(train_z, args.num_clusters, seed=args.seed)
    test_assign = torch.cdist(test_z, centroids).argmin(1)
    row.update(evaluate_clusters(F.one_hot(test_assign, args.num_clusters).float(), test.labels, test.classes, "pretext + k-means"))
    ckpt = {"neighbor_idx": neighbor_idx.cpu(), "scores": scores.cpu(), "train_z": train_z.cpu(), "row": row,
            "complete": True, "config": stage_config(args, "mine")}
    atomic_save(ckpt, os.path.join(args.out_dir, "mine.pt"))
    log_jsonl(args.out_dir, {"stage": "mine", **row})
    return ckpt


def run_scan(args, pretext_model, mine, train, test):
    epoch_seed(args, "scan", -1)                                               # heads: same whether or not pretext ran now
    model, fmodel = to_device(ClusteringModel(pretext_model.backbone, args.num_clusters, args.num_heads), args)
    if args.update_head_only:                                                  # no backbone gradients at all
        model.backbone.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.scan_lr, weight_decay=args.weight_decay)
    neighbor_idx, train_z = mine["neighbor_idx"].to(args.device), mine["train_z"].to(args.device)

    def freeze_bn(epoch):  # frozen backbone: BN statistics too
        if args.update_head_only:
            model.backbone.eval()

    def batch_loss(anchor):                                                    # [B]
        B = len(anchor)
        neighbor = neighbor_idx[anchor, torch.randint(0, neighbor_idx.shape[1], (B,), device=args.device)]
        x = strong_augment(train.images[torch.cat([anchor, neighbor])], train.mean, train.std)  # [2B, C, H, W]
        logits = fmodel(x)                                                     # [H, 2B, C]
        if args.loss == "scan":
            return torch.stack([scan_loss(lg[:B], lg[B:], args.entropy_weight)[0] for lg in logits])
        return torch.stack([structured_loss(lg[:B], lg[B:], train_z[anchor], train_z[neighbor], args.tau_c, args.tau_cc,
                                            args.eta_cc, args.lambda_b)[0] for lg in logits])

    def end_epoch(epoch, row):
        # label-free head selection: Eq. (2) per head on the train set, all K neighbours, no augmentation
        logits = predict(model, train.images, train.mean, train.std)           # [H, N, C]
        hl = torch.stack([torch.stack([scan_loss(lg, lg[neighbor_idx[:, k]], args.entropy_weight)[0]
                                       for k in range(neighbor_idx.shape[1])]).mean() for lg in logits])  # [H]
        best = int(hl.argmin())
        row.update(eval_loss=hl.tolist(), best_head=best)
        if (test.labels >= 0).any():
            pred = predict(model, test.images, test.mean, test.std)[best].argmax(1).cpu()
            row["test_acc"] = float(metrics.cluster_acc(pred.numpy(), test.labels.cpu().numpy()))
        print(f"[scan] epoch {epoch + 1}/{args.scan_epochs} loss {row['loss'][best]:.4f} eval_loss {hl[best]:.4f} "
              f"head {best} test_acc {row.get('test_acc', float('nan')):.4f} {row['images_per_s']:.0f} img/s", flush=True)
        return {"best_head": best}
    return model, train_stage(args, "scan", model, opt, args.scan_epochs, args.scan_batch_size, len(train.images),
                              batch_loss, end_epoch, start_epoch=freeze_bn)


def run_selflabel(args, scan_model, best_head, train, test):
    head = scan_model.heads[best_head]                                         # keep only the selected head
    model, fmodel = to_device(ClusteringModel(scan_model.backbone, head.out_features, 1), args)
    model.heads[0].load_state_dict(head.state_dict())
    model.requires_grad_(True)                                                 # self-labelling trains everything
    opt = torch.optim.Adam(model.parameters(), lr=args.selflabel_lr, weight_decay=args.weight_decay)
    confident = []                                                             # confident samples of each batch this epoch

    def batch_loss(idx):
        imgs = train.images[idx]
        model.eval()                                                           # pseudo-labels as evaluated
        with torch.no_grad():
            weak_logits = fmodel(plain(imgs, train.mean, train.std))[0]       # un-augmented view [B, C]
        model.train()
        strong_logits = fmodel(strong_augment(imgs, train.mean, train.std))[0]
        loss, n = confidence_ce(weak_logits, strong_logits, args.confidence_threshold)
        confident.append((n, len(idx)))
        return loss                                                            # None (batch skipped) if none confident

    def end_epoch(epoch, row):
        n_conf = sum(n for n, _ in confident)
        row.update(confident=n_conf, confident_frac=n_conf / sum(b for _, b in confident))
        confident.clear()
        if (test.labels >= 0).any():                                           # reported only, never used to choose
            pred = predict(model, test.images, test.mean, test.std)[0].argmax(1).cpu()
            row["test_acc"] = float(metrics.cluster_acc(pred.numpy(), test.labels.cpu().numpy()))
        print(f"[selflabel] epoch {epoch + 1}/{args.selflabel_epochs} loss {row['loss']:.4f} confident {n_conf} "
              f"({row['confident_frac']:.3f}) test_acc {row.get('test_acc', float('nan')):.4f} "
              f"{row['images_per_s']:.0f} img/s", flush=True)
        return {}
    return model, train_stage(args, "selflabel", model, opt, args.selflabel_epochs, args.selflabel_batch_size,
                              len(train.images), batch_loss, end_epoch)


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


def write_results(args, rows):
    res = {"dataset": args.dataset, "loss": args.loss, "arch": args.arch, "rows": rows, "args": vars(args)}
    atomic_save(json.dumps(res, indent=1, default=str) + "\n", os.path.join(args.out_dir, "results.json"))


# ---- 7. main ---------------------------------------------------------------------------------------------------
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
        raise ScanError(f"--device {name} was requested but is not available here; use --device auto or cpu.")
    return name


def load_data(args):
    train = data.load_dataset(args.dataset, root=args.data_root, split=args.train_split, image_size=args.image_size)
    test = data.load_dataset(args.dataset, root=args.data_root, split=args.test_split, image_size=args.image_size)
    if args.subset is not None and args.subset < len(train.images):
        if args.subset < 2:
            raise ScanError(f"--subset {args.subset} is too small; give at least 2 images.")
        keep = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(args.seed))[: args.subset]
        train = train._replace(images=train.images[keep], labels=train.labels[keep])
    return (d._replace(images=d.images.to(args.device), labels=d.labels.to(args.device)) for d in (train, test))


def check_args(args, train):
    N = len(train.images)
    for bad, message in [
            (args.num_clusters < 2, f"--num-clusters must be at least 2 (got {args.num_clusters})."),
            (args.num_clusters > N, f"--num-clusters {args.num_clusters} is more than the {N} training images."),
            (not 1 <= args.num_neighbors < N, f"--num-neighbors must be in 1..{N - 1} for {N} training images (got {args.num_neighbors})."),
            (min(args.num_heads, args.pretext_epochs, args.scan_epochs, args.pretext_batch_size, args.scan_batch_size,
                 args.selflabel_batch_size) < 1, "--num-heads, epochs and batch sizes must be at least 1."),
            (args.selflabel_epochs < 0 or not 0 < args.confidence_threshold < 1,
             "--selflabel-epochs must be >= 0 and --confidence-threshold in (0, 1)."),
            (not 0 < args.crop_min <= 1, f"--crop-min must be in (0, 1] (got {args.crop_min}).")]:
        if bad:
            raise ScanError(message)


def main(argv=None):
    args = parse_args(argv)
    try:
        keep_freed_memory()
        args.device = pick_device(args.device)
        torch.set_num_threads(args.threads or torch.get_num_threads())
        if args.device == "cuda":
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(args.seed)
        train, test = load_data(args)
        args.num_clusters = args.num_clusters or len(train.classes)
        check_args(args, train)
        os.makedirs(args.out_dir, exist_ok=True)
        if args.restart:
            for name in STAGES + ["results.json", "predictions.csv", "prototypes.png", "log.jsonl"]:
                path = os.path.join(args.out_dir, name if "." in name else name + ".pt")
                if os.path.exists(path):
                    os.remove(path)
        for s in STAGES:  # validate every existing checkpoint before spending time
            load_stage(args, s)
        print(f"scan.py: {args.dataset} train {tuple(train.images.shape)} test {tuple(test.images.shape)} "
              f"arch {args.arch} device {args.device} clusters {args.num_clusters} loss {args.loss} out {args.out_dir}", flush=True)
        t_start = time.time()
        pretext_model, _ = run_pretext(args, train, test, train.images.shape[1])
        mine = run_mine(args, pretext_model, train, test)
        rows = [mine["row"]]
        write_results(args, rows)
        scan_model, scan_ckpt = run_scan(args, pretext_model, mine, train, test)
        head = scan_ckpt["best_head"]
        probs = predict(scan_model, test.images, test.mean, test.std)[head].softmax(1)
        rows.append({"stage": "scan", "head": head, **evaluate_clusters(probs, test.labels, test.classes, f"SCAN (head {head})")})
        write_results(args, rows)
        if args.selflabel_epochs > 0:
            selflabel_model, _ = run_selflabel(args, scan_model, head, train, test)
            probs = predict(selflabel_model, test.images, test.mean, test.std)[0].softmax(1)
            rows.append({"stage": "selflabel", **evaluate_clusters(probs, test.labels, test.classes, "self-label")})
        log_jsonl(args.out_dir, {"stage": "done", "seconds_this_run": time.time() - t_start})
        write_outputs(args, probs, test, rows)                                 # probs of the final model
        print(f"done in {time.time() - t_start:.1f} s; outputs in {args.out_dir}")
    except (data.DataError, ScanError) as e:
        print(f"scan.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"scan.py: stopped: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
