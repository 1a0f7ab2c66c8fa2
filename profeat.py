"""profeat.py: ProFeat, unsupervised image clustering by progressive feature refinement, in one file.

  J. Kim, S. Im, J. Cho, "ProFeat: Unsupervised Image Clustering via Progressive Feature Refinement". Built on SCAN
  (https://arxiv.org/abs/2005.12320). No code was released: where the paper leaves a choice open it says "CHOICE:".

For t = 1..--iterations and each of the E ensemble members e (E = 1: ProFeat_s, E > 1: ProFeat_e):

  1. representation  t = 1: SimCLR, Eq. (1) where only the two views of an image are positives. t > 1: fine-tune
                     g_e and p_e with Eq. (1) on the confident images of each batch: positives = the views of one image
                     and every pair of images of one confident cluster (ProFeat_s, threshold t_s, Sec. 2.2) or
                     connected by the ensemble's agreement count (ProFeat_e, Eq. (3), thresholds t_e, t_c, Sec. 2.4);
                     negatives = every other pair among the kept images.
  2. clustering      mine M neighbours (the paper: in p(g_e(x)); here in g_e(x), whitened, as scan.py); train h_e
                     on a copy g'_e of g_e with SCAN's Eq. (2) (g_e is not updated); optionally self-label (t_f).

Tested after every iteration (Fig. 1), one member kept at the end. Model, SCAN, self-labelling: scan.py's verbatim.

    python profeat.py --dataset synthetic --quick                           # about a minute on a CPU
    python profeat.py --dataset cifar10 --device cuda                       # ProFeat_s, the paper's settings
    python profeat.py --dataset cifar10 --ensemble 5 --device cuda          # ProFeat_e
"""
import signal
import sys

signal.signal(signal.SIGINT, lambda *_: sys.exit(130))  # Ctrl-C while torch loads (seconds): quietly, status 130

import argparse
import copy
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics
import runtime
from augment import normalize, simclr_augment, strong_augment
from knn import knn, search_space
from runtime import UsageError, at_least, batches, gather, predict, say

SCRIPT = "profeat.py"

# ---- 1. Arguments ----------------------------------------------------------------------------------------------
# Overrides of the argparse defaults (the paper's cifar10 settings, Sec. 3), applied in this order; an explicit flag
# wins. Other datasets take the cifar10 values, except t_c (see check_args). --quick: scan.py's, lambda 5 (RESULTS.md).
PRESETS = {
    "cifar10": dict(t_c=20),
    "cifar20": dict(t_c=10, scan_epochs=100, scan_batch_size=512),
    "stl10": dict(t_s=0.95, t_c=1, iterations=100, scan_epochs=100, selflabel_epochs=0,
                  pretext_split="train+unlabeled"),
    "stl10-ensemble": dict(iterations=300),
    "quick": dict(arch="smallcnn", width=16, subset=3000, iterations=2, pretext_epochs=6, refine_epochs=2,
                  pretext_batch_size=None, pretext_lr=0.2, pretext_lr_min=0.002, scan_epochs=0, warmup_steps=2000,
                  selflabel_epochs=1, selflabel_batch_size=500, mine_pixels=True, pretext_warmup=2),
    "quick-imagefolder": dict(image_size=32),
    "smallcnn": dict(temperature=0.2, scan_batch_size=48),  # scan.py's, but one threshold: measured (RESULTS.md)
}


def parse_args(argv=None):
    p = runtime.parser(SCRIPT, "ProFeat: alternate confident-pair representation refinement and SCAN clustering.")
    a, pos, rate = p.add_argument, at_least(1), at_least(0.0, float)
    a("--dataset", default="cifar10", help="cifar10 | cifar20 | stl10 | fashion-mnist | imagefolder:PATH | ...")
    a("--data-root", default="./data", help="where datasets are found or downloaded to")
    a("--train-split", default="train", help="split clustered and refined on")
    a("--pretext-split", default=None, help="split of iteration 1's SimCLR (default: --train-split)")
    a("--test-split", default="test", help="split evaluated after each iteration")
    a("--image-size", type=int, default=None, help="resize images to this square size (image folders: 64)")
    a("--subset", type=at_least(2), default=None, help="train on a random subset of this many images")
    a("--out-dir", default=None, help="output folder (default: runs/profeat-DATASET)")
    a("--arch", default="resnet18", choices=["resnet18", "smallcnn"], help="backbone g: ResNet-18 or a small CNN")
    a("--width", type=pos, default=32, help="smallcnn: channels of the first stage (doubled at each stage)")
    a("--num-clusters", type=at_least(2), default=None, help="clusters K (default: the number of classes)")
    a("--iterations", type=pos, default=10, help="representation + clustering rounds (stl10: 100, 300 for ProFeat_e)")
    a("--ensemble", type=pos, default=1, help="E members (g_e, h_e): 1 = ProFeat_s, more = ProFeat_e (paper: 5)")
    a("--t-s", type=at_least(0.01, float), default=0.99, help="ProFeat_s: min max-probability of a confident image")
    a("--t-e", type=pos, default=None, help="ProFeat_e: min agreement count of a connected pair (default: E)")
    a("--t-c", type=pos, default=None, help="ProFeat_e: min connections in the batch of a kept image (0.4 B / K)")
    a("--pretext-epochs", type=pos, default=500, help="SimCLR epochs of iteration 1")
    a("--refine-epochs", type=at_least(0), default=50, help="representation fine-tuning epochs of each later iteration")
    a("--pretext-batch-size", type=pos, default=512, help="representation batch B (--quick: ~16 steps an epoch)")
    a("--pretext-lr", type=rate, default=0.4, help="representation SGD learning rate at the start ...")
    a("--pretext-lr-min", type=rate, default=0.0004, help="... decayed (cosine) to this over all iterations")
    a("--pretext-warmup", type=at_least(0), default=0, help="epochs of linear warm-up first (as scan.py; --quick: 2)")
    a("--temperature", type=at_least(1e-3, float), default=0.1, help="tau of Eq. (1) (--arch smallcnn: 0.2)")
    a("--crop-min", type=at_least(0.01, float), default=0.2, help="SimCLR crops: smallest area fraction (<= 1)")
    a("--num-neighbors", type=pos, default=20, help="M neighbours mined per image")
    a("--mine-features", default="backbone", choices=["backbone", "projection", "middle"],
      help="search space (SCAN: projection; middle: the 2nd stage on a 7x7 grid, square-rooted)")
    a("--no-whiten", dest="whiten", action="store_false", help="mine as SCAN does: no PCA whitening of those features")
    a("--mine-pixels", action=argparse.BooleanOptionalAction, default=False, help="also mine on the pixels (--quick)")
    a("--num-heads", type=pos, default=1, help="heads trained at once, the lowest-loss one kept (SCAN's configs: 1)")
    a("--scan-epochs", type=at_least(0), default=50, help="SCAN epochs of each clustering step (after the warm-up)")
    a("--scan-batch-size", type=pos, default=128, help="SCAN batch: anchors, as many neighbours (--arch smallcnn: 48)")
    a("--scan-lr", type=rate, default=1e-4, help="SCAN Adam learning rate")
    a("--warmup-steps", type=at_least(0), default=2000, help="SCAN: steps training the heads alone first (Adam 1e-3)")
    a("--entropy-weight", type=rate, default=5.0, help="lambda of Eq. (2), lower for imbalanced classes")
    a("--update-head-only", action="store_true", help="SCAN: keep g' fixed, train the heads only")
    a("--carry-h", action=argparse.BooleanOptionalAction, default=True, help="head 0 starts as the last h")
    a("--selflabel-epochs", type=at_least(0), default=200, help="self-labelling epochs per clustering step (0: none)")
    a("--selflabel-batch-size", type=pos, default=1000, help="self-labelling batch")
    a("--selflabel-lr", type=rate, default=1e-4, help="self-labelling Adam learning rate")
    a("--confidence-threshold", type=rate, default=0.99, help="t_f, self-labelling's min max-probability (< 1)")
    a("--threshold-rule", default="fixed", choices=["fixed", "per-cluster"], help="self-labelling: SCAN or FlexMatch")
    a("--weight-decay", type=rate, default=1e-4, help="weight decay of every stage (SGD, then Adam)")
    a("--pixel-check", type=at_least(0), default=5000, help="this many images' neighbours vs the pixels' own (0: skip)")
    a("--predict", default=None, metavar="PATH", help="cluster the images at PATH with the finished run in --out-dir")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    a("--compile", action="store_true", help="torch.compile the networks")
    a("--deterministic", action="store_true", help="CUDA: deterministic kernels, no cuDNN benchmark (slower)")
    a("--threads", type=pos, default=None, help="CPU threads (default: torch's choice)")
    a("--seed", type=int, default=0, help="random seed: same seed, same device, same results")
    a("--quick", action="store_true", help="small CNN, 3000 images, 2 iterations of few epochs: a few minutes")
    a("--restart", action="store_true", help="delete this script's files in --out-dir and start over")
    a("--log-every", type=rate, default=5.0, help="seconds between progress lines")
    base = lambda args: args.dataset.split(":")[0]
    def presets(args):  # a generator: each preset sees the ones applied before it (--quick sets the arch)
        yield PRESETS.get(base(args), {})
        yield PRESETS["stl10-ensemble"] if base(args) == "stl10" and args.ensemble > 1 else {}
        yield PRESETS["quick"] if args.quick else {}
        yield PRESETS["quick-imagefolder"] if args.quick and base(args) == "imagefolder" else {}
        yield PRESETS["smallcnn"] if args.arch == "smallcnn" else {}
    args = runtime.parse_args(p, argv, presets)
    args.pretext_split = args.pretext_split or args.train_split
    args.t_e = args.t_e or args.ensemble                                       # unanimity
    args.out_dir = args.out_dir or os.path.join("runs", "profeat-" + base(args))
    return args


def check_args(args, n_train):
    """The checks that need the data; t_c's default for datasets the paper does not cover."""
    world = runtime.STATE["world"]
    for bad, message in [
            (args.num_clusters > n_train, f"--num-clusters {args.num_clusters} is more than the {n_train} images"),
            (args.num_neighbors >= n_train, f"--num-neighbors must be below the {n_train} images"),
            (args.t_e > args.ensemble, f"--t-e must be at most --ensemble {args.ensemble}"),
            (max(args.crop_min, args.t_s) > 1 or args.confidence_threshold >= 1,
             "--crop-min and --t-s must be at most 1, --confidence-threshold below 1"),
            (args.scan_epochs + args.warmup_steps == 0, "--scan-epochs and --warmup-steps cannot both be 0"),
            *[(getattr(args, k) % world, f"--{k.replace('_', '-')} must be divisible by the {world} processes")
              for k in ["pretext_batch_size", "scan_batch_size", "selflabel_batch_size"]]]:
        if bad:
            raise UsageError(message + ".")
    if args.t_c is None:  # "around half the average number of images per class in a minibatch"; 0.4: 20 and 10
        args.t_c = max(1, round(0.4 * min(args.pretext_batch_size, n_train) / args.num_clusters))


# ---- 2. Data (augmentation: augment.py) ---------------------------------------------------------------------------
def load_data(args):
    """(pretext, train, test) splits as uint8 tensors on the device; pretext is train unless --pretext-split differs."""
    load = lambda split: data.load_dataset(args.dataset, args.data_root, split, image_size=args.image_size)
    train, test = load(args.train_split), load(args.test_split)
    if args.subset is not None and args.subset < len(train.images):
        keep = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(args.seed))[:args.subset]
        train = train._replace(images=train.images[keep], labels=train.labels[keep])
    pretext = train if args.pretext_split == args.train_split else load(args.pretext_split)
    return [d._replace(images=d.images.to(args.device), labels=d.labels.to(args.device))
            for d in (pretext, train, test)]


def plain(images, mean, std):  # the evaluation view: no augmentation
    return normalize(images.float() / 255, mean, std)


# ---- 3. Model (scan.py's) --------------------------------------------------------------------------------------
def make_backbone(arch, in_channels, width=32, maxpool=False):
    """[B, C, H, W] -> [B, out_dim]. resnet18: torchvision's ResNet-18 with SCAN's stem for small images (a 3x3
    stride-1 conv and no max-pool; 96 px STL-10 images get a 2x2 max-pool), 512-d. smallcnn: four conv-BN-ReLU
    stages of width, 2w, 4w, 8w channels with max-pools between them, then a 2x2 average pool (32w-d), for CPU runs;
    its neighbours measured purer than with global pooling (RESULTS.md)."""
    if arch == "resnet18":
        import torchvision  # here: importing it takes seconds
        net = torchvision.models.resnet18()
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool, net.fc, net.out_dim = nn.MaxPool2d(2) if maxpool else nn.Identity(), nn.Identity(), 512
        return net
    layers, cin = [], in_channels
    for i in range(4):
        cout = width * 2 ** i
        layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        layers += [nn.MaxPool2d(2)] if i < 3 else []
        cin = cout
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())     # 2x2, not 1x1: keeps the layout
    net.out_dim = 4 * cin
    return net


def middle_features(backbone, images, mean, std, grid=7):
    """--mine-features middle: uint8 [N, C, H, W] -> [N, c * grid^2], the second of four stages (smallcnn: 2w channels,
    ResNet-18: layer2) average-pooled to grid x grid, square-rooted (power normalisation: F. Perronnin et al., ECCV
    2010, https://doi.org/10.1007/978-3-642-15561-1_11). CHOICE (not SCAN's): each made the neighbours purer
    (RESULTS.md)."""
    b = backbone
    stem = b[:7] if isinstance(b, nn.Sequential) else nn.Sequential(*list(b.children())[:6])  # conv1 ... layer2
    return predict(nn.Sequential(stem, nn.AdaptiveAvgPool2d(grid), nn.Flatten()), images, mean, std).sqrt()  # >= 0


class ContrastiveModel(nn.Module):
    """Backbone + SimCLR's MLP head (d -> d -> 128); forward gives L2-normalised projections [B, 128]."""
    def __init__(self, backbone, proj_dim=128):
        super().__init__()
        self.backbone, d = backbone, backbone.out_dim
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim))

    def forward(self, x):
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)


class ClusteringModel(nn.Module):
    """Backbone + num_heads linear heads; forward gives logits [num_heads, B, num_clusters]."""
    def __init__(self, backbone, num_clusters, num_heads):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList([nn.Linear(backbone.out_dim, num_clusters) for _ in range(num_heads)])

    def forward(self, x):
        return self.heads_forward(self.backbone(x))

    def heads_forward(self, feat):  # [B, d] -> [H, B, C]
        return torch.stack([h(feat) for h in self.heads]).float()


# ---- 4. Pairs and losses: plain functions of tensors ----------------------------------------------------------
def confident_groups(probs, t_s):
    """ProFeat_s pairs (Sec. 2.2). probs [B, K]: the previous clustering's predictions for the batch.
    Returns keep [B] (max prob >= t_s: the confident set C) and group [B, B]: True where i and j are both in C and
    share their confident cluster (the diagonal is True for images of C). CHOICE: the text discards y_i < t_s but
    then asks y_ik > t_s for pairs; we use >= for both, so "confident" means one thing (t_s > 0.5: one cluster)."""
    conf, cluster = probs.max(1)                                               # [B], [B]
    keep = conf >= t_s
    return keep, (cluster[:, None] == cluster[None, :]) & keep[:, None] & keep[None, :]


def ensemble_groups(clusters, t_e, t_c):
    """ProFeat_e pairs (Sec. 2.4). clusters [E, B]: the argmax cluster k_{e,i} of every member for the batch.
    c(x_i, x_j) = sum_e [k_{e,i} == k_{e,j}] (Eq. 3); i != j are connected when c >= t_e. CHOICE: the text says
    c > t_e but sets t_e = E, which could never hold, so we read >= (unanimity at t_e = E). An image is kept with
    at least t_c connections in the batch (and at least one); the pruning is one pass, as written, not repeated
    until stable. Returns keep [B] and group [B, B] (connected or i == j, both kept)."""
    agree = (clusters[:, :, None] == clusters[:, None, :]).sum(0)              # c(x_i, x_j) [B, B]
    eye = torch.eye(clusters.shape[1], dtype=torch.bool, device=clusters.device)
    connected = (agree >= t_e) & ~eye
    keep = connected.sum(1) >= max(t_c, 1)
    return keep, (connected | eye) & keep[:, None] & keep[None, :]


def view_positives(group):
    """group [n, n] over the kept images (diagonal True) -> positives [2n, 2n] over their views (view a of image i is
    row i, view b row n + i): every pair of views of two images of one group, the two views of one image, not (v, v)."""
    n = group.shape[0]
    return group.repeat(2, 2) & ~torch.eye(2 * n, dtype=torch.bool, device=group.device)


def refinement_loss(z, positives, temperature=0.1):
    """Eq. (1) divided by |P|. z [V, D]: L2-normalised projections of all views of the kept images; positives
    [V, V] bool, the ordered pairs (i, j) of P. Q_i = every (i, k), k != i, among the views, so log_prob[i, j] =
    sim_ij / tau - log sum_{k != i} exp(sim_ik / tau). With one image per group this is SimCLR's NT-Xent. CHOICE:
    the paper sums over P; we average, so the step size does not grow with the number of positives."""
    sim = (z @ z.t() / temperature).fill_diagonal_(float("-inf"))              # [V, V]
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    return -log_prob[positives].mean()


def scan_loss(anchor_logits, neighbor_logits, entropy_weight=5.0):
    """SCAN Eq. (2): -mean_i log <p(x_i), p(x_j)> - entropy_weight * H(mean_i p(x_i)), where row i of
    neighbor_logits is one neighbour x_j of anchor x_i. Logits [..., B, K]: leading dims (heads) give a loss each.
    Returns (total, consistency, entropy), each [...]. log <p, q> = logsumexp(log p + log q): exact and stable."""
    log_pa, log_pn = F.log_softmax(anchor_logits, -1), F.log_softmax(neighbor_logits, -1)   # [..., B, K]
    consistency = -torch.logsumexp(log_pa + log_pn, dim=-1).mean(-1)
    mean_p = log_pa.exp().mean(-2)                                             # [..., K]
    entropy = -(mean_p * torch.log(mean_p.clamp(min=1e-8))).sum(-1)
    return consistency - entropy_weight * entropy, consistency, entropy


def confidence_ce(weak_logits, strong_logits, threshold=0.99):
    """SCAN's self-labelling loss: cross-entropy on the strong view of the samples whose weak-view max probability
    exceeds threshold, pseudo-label = argmax, weighted by the inverse frequency of each pseudo-label among them
    (every present class weighs the same). Logits [B, K]. Returns (loss, confident samples per pseudo-label [K]);
    loss None when there are none."""
    prob, target = F.softmax(weak_logits.detach(), 1).max(1)                   # [B], [B]
    mask = prob > threshold
    counts = torch.bincount(target[mask], minlength=weak_logits.shape[1])      # [K]
    n = int(counts.sum())                                                      # a host sync: a batch may be skipped
    if n == 0:
        return None, counts
    weight = torch.where(counts > 0, n / counts.clamp(min=1), 0).to(strong_logits.dtype)
    return F.cross_entropy(strong_logits[mask], target[mask], weight=weight), counts


def cluster_thresholds(probs, threshold=0.99):
    """Per-cluster thresholds: the curriculum of B. Zhang et al., "FlexMatch: Boosting Semi-Supervised Learning with
    Curriculum Pseudo Labeling", NeurIPS 2021 (https://arxiv.org/abs/2110.08263), without its warm-up. probs [N, K]:
    the un-augmented train images' predictions. sigma_c = #{n: argmax = c, max > threshold}, beta_c = sigma_c / max
    sigma, threshold_c = threshold * beta_c / (2 - beta_c). A cluster with no confident image takes all it predicts,
    where SCAN's one threshold leaves it no pseudo-label and the others absorb it (RESULTS.md). Returns [K]."""
    confidence, label = probs.max(1)                                           # [N], [N]
    sigma = torch.bincount(label[confidence > threshold], minlength=probs.shape[1]).to(probs.dtype)   # [K]
    beta = sigma / sigma.max() if sigma.max() > 0 else torch.ones_like(sigma)  # none confident: SCAN's one threshold
    return threshold * beta / (2 - beta)


def clustering_loss(args, anchor_logits, neighbor_logits, anchor_z=None, neighbor_z=None):
    """Eq. (2) per head: logits [H, B, C] -> [H]. (scan.py's version also offers the structured loss.)"""
    return scan_loss(anchor_logits, neighbor_logits, args.entropy_weight)[0]


# ---- 5. Evaluation ---------------------------------------------------------------------------------------------
def kmeans(x, k, iters=50, n_init=5, seed=0):
    """Lloyd's k-means with k-means++ seeding, best of n_init by inertia, each run until no label changes (at most
    iters). x [N, D] -> (labels [N], centroids [k, D]). Distances and centroid sums are one matmul each (fast)."""
    g, x_sq, best = torch.Generator().manual_seed(seed), x.pow(2).sum(1, keepdim=True), None   # x_sq [N, 1]
    sq_dist = lambda c: (x_sq + torch.addmm(c.pow(2).sum(1), x, c.T, alpha=-2)).clamp(min=0)   # [N, len(c)]
    for _ in range(n_init):
        centroids = x[torch.randint(len(x), (1,), generator=g)]
        d2 = sq_dist(centroids)[:, 0]                                          # [N] to the nearest centroid so far
        for _ in range(k - 1):                                                 # k-means++: far points likelier
            new = x[torch.multinomial(d2.cpu() + 1e-12, 1, generator=g).to(x.device)]
            centroids, d2 = torch.cat([centroids, new]), torch.minimum(d2, sq_dist(new)[:, 0])
        labels = None
        for _ in range(iters):
            labels, previous = sq_dist(centroids).argmin(1), labels
            if previous is not None and torch.equal(labels, previous):
                break                                                          # converged: centroids unchanged
            one_hot = F.one_hot(labels, k).to(x.dtype)                          # [N, k]: sums by one matmul
            counts = one_hot.sum(0).unsqueeze(1)                               # [k, 1]
            centroids = torch.where(counts > 0, one_hot.T @ x / counts.clamp(min=1), centroids)  # an empty one stays
        d2, labels = sq_dist(centroids).min(1)
        if best is None or d2.sum().item() < best[0]:
            best = (d2.sum().item(), labels, centroids)
    return best[1], best[2]


def keep_member(train_preds, scan_losses):
    """CHOICE (the paper keeps "only one model" without saying which): the medoid of the ensemble, the member whose
    train-set clustering has the highest mean NMI with the other members'; ties (always, for E = 2) go to the lowest
    SCAN loss of Eq. (2) on the train set. Label-free. train_preds: [E, N] cluster indices; scan_losses: [E]."""
    E = len(train_preds)
    agree = [round(float(np.mean([metrics.nmi(train_preds[e], train_preds[f]) for f in range(E) if f != e] or [0])), 6)
             for e in range(E)]
    return min(range(E), key=lambda e: (-agree[e], scan_losses[e]))


# ---- 6. Training stages: per iteration and member; each resumes from its checkpoint -----------------------------
# Every stage depends on all settings (the iterations feed each other); an unfinished one may change its learning rate.
CONFIG_KEYS = ["dataset", "train_split", "pretext_split", "image_size", "subset", "arch", "width", "num_clusters",
               "iterations", "ensemble", "t_s", "t_e", "t_c", "pretext_epochs", "refine_epochs", "pretext_batch_size",
               "pretext_lr", "pretext_lr_min", "pretext_warmup", "temperature", "crop_min", "num_neighbors",
               "mine_features", "num_heads", "scan_epochs", "scan_batch_size", "scan_lr", "warmup_steps",
               "entropy_weight", "update_head_only", "carry_h", "selflabel_epochs", "selflabel_batch_size",
               "selflabel_lr", "confidence_threshold", "weight_decay", "seed", "whiten", "mine_pixels",
               "threshold_rule"]
OWN_FILES = r"it\d{3}_m\d+_(pretext|scan|selflabel)\.pt(\.tmp)?|(results\.json|log\.jsonl|predictions\.csv" \
            r"|prototypes\.png|predict-.+\.(csv|png))(\.tmp)?"


def stage_config(args, stage):
    return {k: getattr(args, k) for k in CONFIG_KEYS}


def load(args, stage, model=None, opt=None):
    """The stage's checkpoint (or None), its weights and (while unfinished) optimizer state loaded into model, opt."""
    lr_flag = stage.split("_")[-1] + "_lr"                   # it002_m0_scan: scan_lr; may change in an unfinished stage
    return runtime.load_checkpoint(os.path.join(args.out_dir, stage + ".pt"), SCRIPT, stage, stage_config(args, stage),
                                   may_change=[lr_flag], model=model, opt=opt, lr=getattr(args, lr_flag, None))


def save(args, stage, model, opt, losses, row, epochs, monitor=None, **extra):
    """End of an epoch: stop if a loss or weight is non-finite, add monitor()'s numbers to the row, log the row, then
    save the checkpoint (rank 0 writes): a kill between the two leaves the epoch to be redone, never half-logged."""
    runtime.check_losses(torch.stack(losses), stage, row["epoch"])
    runtime.check_weights(model.state_dict(), stage, row["epoch"])
    row.update(monitor() if monitor is not None else {})
    runtime.log_row(args.out_dir, row)
    runtime.save_checkpoint(os.path.join(args.out_dir, stage + ".pt"), SCRIPT, stage, stage_config(args, stage),
                            model=model.state_dict(), optimizer=opt.state_dict(), epoch=row["epoch"], row=row,
                            complete=row["epoch"] == epochs, **extra)


def stage_name(it, e, kind):  # e.g. it003_m1_scan: iteration 3, member 1, the SCAN stage
    return f"it{it:03d}_m{e}_{kind}"


def representation_step(args, it, e, model, pretext, groups_of):
    """Eq. (1) on g_e and p_e, in place. groups_of(idx) -> (keep [B], group [B, B]) for a global batch idx [B]."""
    stage, E = stage_name(it, e, "pretext"), args.pretext_epochs if it == 1 else args.refine_epochs
    before, total, warmup = (0 if it == 1 else args.pretext_epochs + (it - 2) * args.refine_epochs,  # epochs so far,
                             args.pretext_epochs + (args.iterations - 1) * args.refine_epochs,   # all, of warm-up
                             max(args.pretext_warmup, 1e-9))
    # CHOICE: "0.4, gradually decreased to 0.0004 through iterations": one cosine schedule over every representation
    # epoch of the run. Each iteration gets a fresh SGD (momentum reset): a fine-tuning run of its own.
    opt = torch.optim.SGD(model.parameters(), lr=args.pretext_lr, momentum=0.9, weight_decay=args.weight_decay)
    ckpt = load(args, stage, model, opt)
    start, B, world = (ckpt["epoch"] if ckpt else 0), args.pretext_batch_size, runtime.STATE["world"]
    row = ckpt["row"] if ckpt else {}
    model, forward = runtime.wrap(model, args.device, args.compile)
    lo, hi = runtime.shard(B)
    progress = runtime.Progress(stage, (E - start) * (len(pretext.images) // B), args.log_every)
    for epoch in range(start, E):
        generator, t0, losses, kept, pairs = runtime.reseed(args.seed, stage, epoch), time.time(), [], 0, 0
        lr = args.pretext_lr_min + (args.pretext_lr - args.pretext_lr_min) * (
            1 + math.cos(math.pi * (before + epoch) / total)) / 2
        model.train()
        epoch_batches = batches(len(pretext.images), B, generator, args.device)
        for step, idx in enumerate(epoch_batches):   # the warm-up: see scan.py's train_pretext; one parameter group
            opt.param_groups[0]["lr"] = lr * min(1.0, (before + epoch + (step + 1) / len(epoch_batches)) / warmup)
            keep, group = groups_of(gather(idx))                               # over the global batch [B], [B, B]
            # each rank forwards a multiple of 8 kept images: cuDNN's benchmark and torch.compile see few shapes
            share = keep.view(world, -1)
            keep = (share & (share.cumsum(1) <= share.sum(1, keepdim=True) // 8 * 8)).view(-1)
            n = int(keep.sum())                                                # one sync: the batch may be skipped
            kept, pairs = kept + n, pairs + (int((group & keep[:, None] & keep[None, :]).sum()) - n) // 2
            if n < 2:                                                          # nothing to contrast
                continue
            x = pretext.images[idx[keep[lo:hi]]]                               # this rank's kept images
            z = forward(torch.cat([simclr_augment(x, pretext.mean, pretext.std, args.crop_min) for _ in range(2)]))
            z = torch.cat([gather(z[:len(x)], grad=True), gather(z[len(x):], grad=True)])   # [2n, 128], all ranks
            loss = refinement_loss(z, view_positives(group[keep][:, keep]), args.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            progress.step(epoch, step, loss, 2 * n)
        steps = max(1, len(epoch_batches))
        row = {"stage": stage, "epoch": epoch + 1, "lr": lr, "seconds": time.time() - t0, "kept_images": kept / steps,
               "positive_pairs": pairs / steps, "skipped_batches": steps - len(losses),
               "loss": torch.stack(losses).mean().item() if losses else None}
        say(f"[{stage}] epoch {epoch + 1}/{E} loss {row['loss'] or 0:.4f} lr {lr:.4g} kept {row['kept_images']:.0f} "
            f"of {B} pairs {row['positive_pairs']:.0f} ({row['seconds']:.0f} s)")
        save(args, stage, model, opt, losses or [torch.zeros(())], row, E)
        if it == 1 and epoch + 1 == E:                                         # Eq. (1) is NT-Xent in iteration 1
            runtime.warn_if_collapsed(stage, row["loss"], B)
    return row


@torch.no_grad()
def head_losses(model, train, neighbor_idx, entropy_weight, logits=None):
    """Label-free model selection: Eq. (2) of every head on the un-augmented train set, over all K neighbours. [H]
    logits [H, N, C]: the heads' output if already known (default: the model's on train.images)."""
    logits = predict(model, train.images, train.mean, train.std) if logits is None else logits
    log_p = F.log_softmax(logits, 2)                                           # [H, N, C]
    consistency = -torch.stack([torch.logsumexp(log_p + log_p[:, neighbor_idx[:, k]], 2).mean(1)
                                for k in range(neighbor_idx.shape[1])]).mean(0)
    mean_p = log_p.exp().mean(1)                                               # [H, C]
    return consistency + entropy_weight * (mean_p * torch.log(mean_p.clamp(min=1e-8))).sum(1)


def warm_up_heads(args, model, train, neighbor_idx, train_z, start_feats, carried=0, candidates=5):
    """CHOICE (not in the paper): before the SCAN stage proper, the heads alone on the fixed backbone features of the
    un-augmented images. max(H, candidates) heads are fitted by cross-entropy to as many k-means partitions, candidate
    r's of start_feats[r % len(start_feats)] (the L2-normalised train features [N, d] of the two "pretext + k-means"
    rows; seeds differ), and with carried = 1 head 0 (profeat.py's last h) to its own; then --warmup-steps steps of the
    clustering loss (Adam 1e-3, 128 anchors). The H lowest in Eq. (2) on the train set are kept, as SCAN's code keeps
    its lowest-loss head (random heads, or one space alone, did worse: RESULTS.md). Returns head 0's origin, a line."""
    feats = predict(model.backbone, train.images, train.mean, train.std)       # [N, d]
    (N, K), B, C = neighbor_idx.shape, 128, model.heads[0].out_features       # B: SCAN's CIFAR batch
    heads = nn.ModuleList([*model.heads, *(nn.Linear(feats.shape[1], C) for _ in range(
        candidates + carried - len(model.heads)))]).to(feats.device)          # model.heads first, then new ones
    forward = lambda x: torch.stack([h(x) for h in heads]).float()             # [R, n, C]
    labels = torch.stack([runtime.broadcast(heads[0](feats).argmax(1))] * carried + [runtime.broadcast(kmeans(
        start_feats[r % len(start_feats)], C, seed=args.seed * 1000 + r)[0]) for r in range(len(heads) - carried)])
    generator = torch.Generator().manual_seed(args.seed)
    rand = lambda high, n: torch.randint(0, high, (n,), generator=generator).to(args.device)   # n draws < high
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for step in range(300):                                                    # head r := partition r
        idx = rand(N, 2 * B)
        loss = F.cross_entropy(forward(feats[idx]).flatten(0, 1), labels[:, idx].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt = torch.optim.Adam(heads.parameters(), lr=1e-3, weight_decay=args.weight_decay)
    for step in range(args.warmup_steps):                                      # then the clustering loss
        anchor = rand(N, B)
        neighbor = neighbor_idx[anchor, rand(K, B)]
        logits = forward(feats[torch.cat([anchor, neighbor])])                 # [R, 2B, C]
        z = (train_z[anchor], train_z[neighbor]) if train_z is not None else ()
        loss = clustering_loss(args, logits[:, :B], logits[:, B:], *z).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        eval_loss = head_losses(None, None, neighbor_idx, args.entropy_weight, logits=forward(feats))   # [R]
    order = eval_loss.argsort()[:len(model.heads)].tolist()                    # the H lowest
    keep = [{k: v.clone() for k, v in heads[r].state_dict().items()} for r in order]   # copies: model.heads are
    for head, state in zip(model.heads, keep):                                 # among the candidates
        head.load_state_dict(state)
    return f"candidate {order[0]} of {len(heads)}"


def train_scan(args, stage, model, neighbor_idx, train_z, start_feats, train, test, carried=0):
    """Step 3: the heads of model (a ClusteringModel on the pretext backbone) trained with Eq. (2) (or the structured
    loss) on strongly augmented anchors and one random neighbour each, after a warm-up of the heads alone. After every
    epoch Eq. (2) of each head is measured on the un-augmented train set; as in SCAN's code, the lowest over heads and
    epochs picks the model kept (label-free). CHOICE: the warm-up competes only when no epoch follows it: training the
    backbone first raises Eq. (2) on un-augmented images while ACC rises (RESULTS.md). start_feats, carried: see
    warm_up_heads. Returns (model, head)."""
    model.to(args.device)
    model.backbone.requires_grad_(not args.update_head_only)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.scan_lr,
                           weight_decay=args.weight_decay)
    ckpt = load(args, stage, model, opt)
    start, E, best = (ckpt["epoch"], args.scan_epochs, ckpt["best"]) if ckpt else (0, args.scan_epochs, None)
    if ckpt is None and args.warmup_steps > 0:
        say(f"[{stage}] warm-up of the heads on fixed features: k-means partitions, then {args.warmup_steps} steps")
        kept = warm_up_heads(args, model, train, neighbor_idx, train_z, start_feats, carried)
        warm = keep_if_best(model, head_losses(model, train, neighbor_idx, args.entropy_weight), None, 0)
        best = warm if E == 0 else None
        say(f"[{stage}] warm-up of the heads: eval_loss {warm['eval_loss']:.4f} head {warm['head']} ({kept})")
    model, forward = runtime.wrap(model, args.device, args.compile)
    B, K = args.scan_batch_size, neighbor_idx.shape[1]
    progress = runtime.Progress(stage, (E - start) * (len(train.images) // B), args.log_every)
    for epoch in range(start, E):
        generator, t0, losses = runtime.reseed(args.seed, stage, epoch), time.time(), []
        model.train()
        if args.update_head_only:
            model.backbone.eval()                                              # frozen: its BN statistics too
        for step, anchor in enumerate(batches(len(train.images), B, generator, args.device)):
            neighbor = neighbor_idx[anchor, torch.randint(0, K, (len(anchor),), device=args.device)]
            logits = forward(strong_augment(train.images[torch.cat([anchor, neighbor])], train.mean, train.std))
            b = len(anchor)                                                    # [H, 2b, C] -> the global batch:
            a, n = gather(logits[:, :b].transpose(0, 1), grad=True), gather(logits[:, b:].transpose(0, 1), grad=True)
            z = (train_z[gather(anchor)], train_z[gather(neighbor)]) if train_z is not None else ()
            loss = clustering_loss(args, a.transpose(0, 1), n.transpose(0, 1), *z)   # [H]
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()                                              # every head trained at once
            opt.step()
            losses.append(loss.detach())
            progress.step(epoch, step, loss, 2 * B)
        eval_loss = head_losses(model, train, neighbor_idx, args.entropy_weight)   # [H]
        best = keep_if_best(model, eval_loss, best, epoch + 1)
        row = {"stage": stage, "epoch": epoch + 1, "loss": torch.stack(losses).mean(0).tolist(),
               "eval_loss": eval_loss.tolist(), "seconds": time.time() - t0}
        head = int(eval_loss.argmin())
        if (test.labels >= 0).any():                                           # reported only, never used to choose
            row["test_acc"] = metrics.cluster_acc(predict(model, test.images, test.mean, test.std)[head].argmax(1),
                                                  test.labels)
        say(f"[{stage}] epoch {epoch + 1}/{E} loss {row['loss'][head]:.4f} eval_loss {eval_loss[head]:.4f} head {head}"
            + (f" test_acc {row['test_acc']:.4f}" if "test_acc" in row else "") + f" ({row['seconds']:.0f} s)")
        save(args, stage, model, opt, losses, row, E, best=best)
    model.load_state_dict(best["model"])
    say(f"[{stage}] keeping the warm-up's heads (no epoch followed), head {best['head']}" if best["epoch"] == 0 else
        f"[{stage}] keeping epoch {best['epoch']}, head {best['head']}: the lowest Eq. (2) on the train set")
    return model, best["head"]


def keep_if_best(model, eval_loss, best, epoch):
    """The best (lowest eval_loss over heads) model so far: {epoch, head, eval_loss, model state}."""
    head = int(eval_loss.argmin())
    if best is not None and eval_loss[head] >= best["eval_loss"]:
        return best
    return {"epoch": epoch, "head": head, "eval_loss": eval_loss[head].item(),
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def train_selflabel(args, stage, model, head, train, test):
    """Step 4: keep the chosen head; pseudo-labels from the predictions on the un-augmented images above their
    cluster's threshold, class-balanced cross-entropy on their strong augmentation; a batch without one is skipped."""
    model.heads = nn.ModuleList([model.heads[head]])
    model.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=args.selflabel_lr, weight_decay=args.weight_decay)
    ckpt = load(args, stage, model, opt)
    start, E, B = (ckpt["epoch"] if ckpt else 0), args.selflabel_epochs, args.selflabel_batch_size
    model, forward = runtime.wrap(model, args.device, args.compile)
    progress = runtime.Progress(stage, (E - start) * (len(train.images) // B), args.log_every)
    for epoch in range(start, E):
        generator, t0, losses = runtime.reseed(args.seed, stage, epoch), time.time(), []
        per_cluster = torch.zeros(args.num_clusters, dtype=torch.long, device=args.device)   # confident per label
        threshold = (cluster_thresholds(predict(model, train.images, train.mean, train.std)[0].softmax(1),
                                        args.confidence_threshold) if args.threshold_rule == "per-cluster"
                     else torch.full((args.num_clusters,), args.confidence_threshold, device=args.device))   # [K]
        for step, idx in enumerate(batches(len(train.images), B, generator, args.device)):
            # CHOICE: pseudo-labels as the model is evaluated (eval mode: BatchNorm's running statistics), not with the
            # batch's statistics as SCAN's code: measured slightly better (RESULTS.md); a skipped batch changes nothing.
            model.eval()
            with torch.no_grad():
                weak = gather(forward(plain(train.images[idx], train.mean, train.std))[0])    # [B, C]
            weak_threshold = threshold[weak.argmax(1)]                         # [B]: that of each pseudo-label
            if not (weak.softmax(1).max(1).values > weak_threshold).any():
                continue                                                       # skipped: not even a forward pass
            model.train()
            strong = gather(forward(strong_augment(train.images[idx], train.mean, train.std))[0], grad=True)
            loss, counts = confidence_ce(weak, strong, weak_threshold)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            per_cluster += counts                                              # stays on the device
            progress.step(epoch, step, loss, 2 * B)
        confident = per_cluster.tolist()
        row = {"stage": stage, "epoch": epoch + 1, "confident": sum(confident), "confident_per_cluster": confident,
               "seconds": time.time() - t0, "loss": torch.stack(losses).mean().item() if losses else None,
               "thresholds": [round(t, 4) for t in threshold.tolist()]}
        if (test.labels >= 0).any():                                           # reported only
            row["test_acc"] = metrics.cluster_acc(predict(model, test.images, test.mean, test.std)[0].argmax(1),
                                                  test.labels)
        say(f"[{stage}] epoch {epoch + 1}/{E} loss {row['loss'] or 0:.4f} confident {row['confident']} of "
            f"{len(train.images) // B * B}" + (f" test_acc {row['test_acc']:.4f}" if "test_acc" in row else ""))
        if sparse := [c for c, n in enumerate(confident) if n < 0.2 * sum(confident) / len(confident)]:  # RESULTS.md
            say(f"[{stage}] WARNING: few confident images in clusters {sparse} (under a fifth of an even share): "
                "self-labelling may lose accuracy; more SCAN epochs first would help"
                + (", or --threshold-rule per-cluster." if args.threshold_rule == "fixed" else "."))
        save(args, stage, model, opt, losses or [torch.zeros(())], row, E)
    return model


def clustering_step(args, it, e, g_model, train, test, previous):
    """Mine neighbours (the paper: in p(g(x)); here in g(x)); train h on g' = a copy of g with Eq. (2) (scan.py's SCAN
    stage), then self-label if asked. g is untouched. previous: the last (model, head)."""
    nets = {"backbone": g_model.backbone, "projection": g_model}               # CHOICE: see scan.py's mine()
    feats = {k: F.normalize(predict(net, train.images, train.mean, train.std), dim=1) for k, net in nets.items()}
    z = feats[args.mine_features] if args.mine_features in nets else \
        middle_features(g_model.backbone, train.images, train.mean, train.std)   # [N, d]
    pixels = data.pixel_vectors(train.images) if args.mine_pixels or args.pixel_check else None   # [N, C * h * w]
    search_z = search_space(z, pixels if args.mine_pixels else None, args.whiten)   # CHOICE: see scan.py's mine()
    _, neighbor_idx = knn(search_z, k=args.num_neighbors, distributed=True)   # [N, M]
    info = {"neighbor_acc": metrics.neighbor_acc(neighbor_idx, train.labels)} if (train.labels >= 0).all() else {}
    if args.pixel_check > 0:  # scan.py's check; each part of the searched space alone, whitened as it is there
        anchors = torch.randperm(len(z), generator=torch.Generator().manual_seed(args.seed))[:args.pixel_check]
        check, lines = metrics.pixel_check(neighbor_idx, search_space(pixels, None, args.whiten), train.labels, anchors,
                                           search_space(z, None, args.whiten) if args.mine_pixels else None)
        info.update(check)
        say("\n".join(f"[{stage_name(it, e, 'mine')}] {line}" for line in lines))
    # g' := a deep copy of g. CHOICE: "iteratively learns both g and h": head 0 starts as the last iteration's h.
    runtime.reseed(args.seed, stage_name(it, e, "heads"), -1)                 # the heads' initial weights
    model = ClusteringModel(copy.deepcopy(g_model.backbone), args.num_clusters, args.num_heads)
    carried = int(args.carry_h and previous is not None)                      # a warm-up candidate, beside k-means'
    if carried:
        model.heads[0].load_state_dict(previous[0].heads[previous[1]].state_dict())
    model, head = train_scan(args, stage_name(it, e, "scan"), model, neighbor_idx, None, list(feats.values()), train,
                             test, carried)                                    # the warm-up's k-means: both rows
    info.update(head=head, scan_eval_loss=head_losses(model, train, neighbor_idx, args.entropy_weight)[head].item())
    if args.selflabel_epochs > 0:  # CHOICE: g' and h are both fine-tuned, as SCAN's self-labelling does
        model, head = train_selflabel(args, stage_name(it, e, "selflabel"), model, head, train, test), 0
    return model, head, info


# ---- 7. --predict and main -------------------------------------------------------------------------------------
def predict_files(args):
    """--predict PATH: the final model of the finished run in --out-dir applied to an image or a folder of images."""
    saved, final = runtime.finished_run(args.out_dir, SCRIPT)
    ckpt = runtime.load_checkpoint(os.path.join(args.out_dir, final["stage"] + ".pt"), SCRIPT, final["stage"], {})
    backbone = make_backbone(saved["arch"], final["channels"], saved["width"], saved["dataset"].startswith("stl10"))
    model = ClusteringModel(backbone, saved["num_clusters"], len(ckpt["model"]) and final["heads"])
    model.load_state_dict(ckpt["model"])
    images, files = data.load_image_files(args.predict, final["size"], final["channels"])
    probs = predict(model.to(args.device), images.to(args.device), final["mean"], final["std"])[final["head"]]
    runtime.write_predictions(args, probs.softmax(1), images, files)


def run(argv=None):
    args = parse_args(argv)
    args.device = runtime.setup(args)
    if args.predict:
        runtime.take_out_dir(args.out_dir, SCRIPT, OWN_FILES, restart=False)
        return predict_files(args)
    pretext, train, test = load_data(args)
    args.num_clusters = runtime.num_clusters(args, train.classes)
    runtime.fit_batches(args, len(pretext.images), len(train.images))          # --quick: batch_for
    check_args(args, len(train.images))
    runtime.take_out_dir(args.out_dir, SCRIPT, OWN_FILES, args.restart)
    E = args.ensemble
    for name in [n for n in sorted(os.listdir(args.out_dir)) if n.endswith(".pt") and re.fullmatch(OWN_FILES, n)]:
        load(args, name[:-3])                                                  # refuse a foreign checkpoint early
    say(f"profeat.py: {'ProFeat_s' if E == 1 else f'ProFeat_e (E={E}, t_e={args.t_e}, t_c={args.t_c})'} on "
        f"{args.dataset} train {tuple(train.images.shape)} test {tuple(test.images.shape)} arch {args.arch} device "
        f"{args.device} x {runtime.STATE['world']} K {args.num_clusters} iterations {args.iterations} out "
        f"{args.out_dir}")
    t_start = time.time()
    runtime.reseed(args.seed, "members", -1)                                   # members differ by their init
    g_models = [ContrastiveModel(make_backbone(args.arch, train.images.shape[1], args.width,
                                               args.dataset.startswith("stl10"))).to(args.device) for _ in range(E)]
    rows, previous, train_probs = [], [None] * E, None
    for it in range(1, args.iterations + 1):
        if it == 1:                                                            # every image its own group: SimCLR
            groups_of = lambda idx: (torch.ones_like(idx, dtype=torch.bool),
                                     torch.eye(len(idx), dtype=torch.bool, device=idx.device))
        elif E == 1:
            groups_of = lambda idx, p=train_probs[0]: confident_groups(p[idx], args.t_s)
        else:
            groups_of = lambda idx, k=train_probs.argmax(2): ensemble_groups(k[:, idx], args.t_e, args.t_c)
        reps, infos = [], []
        for e in range(E):
            reps.append(representation_step(args, it, e, g_models[e], pretext if it == 1 else train, groups_of))
            model, head, info = clustering_step(args, it, e, g_models[e], train, test, previous[e])
            previous[e] = (model, head)
            infos.append(info)
        train_probs = torch.stack([predict(m, train.images, train.mean, train.std)[h].softmax(1) for m, h in previous])
        member_losses = [info["scan_eval_loss"] for info in infos]
        kept = keep_member(train_probs.argmax(2).cpu().numpy(), member_losses)
        test_probs = [predict(m, test.images, test.mean, test.std)[h].softmax(1) for m, h in previous]
        scores, text = metrics.report(test_probs[kept], test.labels, test.classes, f"iteration {it} (member {kept})")
        say(text)                                                              # ACC, NMI, ARI, the confusion table
        row = {"stage": "iteration", "epoch": it, "kept_member": kept, **scores}
        row.update({k: reps[kept].get(k) for k in ["kept_images", "positive_pairs", "skipped_batches"]}, **infos[kept])
        confident = train_probs[kept].max(1).values >= args.t_s                 # what the next ProFeat_s step uses
        row["train_confident"] = int(confident.sum())
        if confident.any() and (train.labels >= 0).all():                      # their accuracy (labels: report only)
            row["train_confident_acc"] = metrics.cluster_acc(train_probs[kept].argmax(1)[confident].cpu(),
                                                             train.labels[confident].cpu())
        if E > 1:
            row["member_scan_eval_loss"] = member_losses                       # label-free: to compare keep rules
            if (test.labels >= 0).any():
                row["member_acc"] = [metrics.cluster_acc(p.argmax(1).cpu(), test.labels.cpu()) for p in test_probs]
        rows.append(row)
        runtime.log_row(args.out_dir, row)
    final = {"stage": stage_name(args.iterations, kept, "selflabel" if args.selflabel_epochs else "scan"),
             "head": previous[kept][1], "heads": len(previous[kept][0].heads), "channels": train.images.shape[1],
             "size": train.images.shape[-1], "mean": train.mean, "std": train.std}
    if runtime.STATE["rank"] == 0:
        labels = [int(y) if y >= 0 else "" for y in test.labels.tolist()]
        runtime.write_outputs(args.out_dir, test_probs[kept], test.images,
                              {"index": list(range(len(labels))), "label": labels}, "predictions.csv", "prototypes.png")
        results = {"script": SCRIPT, "dataset": args.dataset, "rows": rows, "final": final, "args": vars(args),
                   "method": "ProFeat_s" if E == 1 else f"ProFeat_e (E={E})", "seconds_this_run": time.time() - t_start}
        runtime.atomic_write(os.path.join(args.out_dir, "results.json"), json.dumps(results, indent=1) + "\n")
    say(f"done in {time.time() - t_start:.1f} s; kept member {kept}; outputs in {args.out_dir}")


if __name__ == "__main__":
    runtime.main(SCRIPT, run)
