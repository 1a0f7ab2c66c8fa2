"""DeepCluster: train a CNN on the clusters of its own features, with k-means or Power Iteration Clustering (PIC).

Reference: M. Caron, "Unsupervised learning of visual features by clustering" (master thesis; the method that became
DeepCluster, Caron et al., ECCV 2018): Algorithm 1 (and 2), Sec. 3.2-3.3, 4.1-4.7. Each epoch:

    features  = CNN(all images)                     # no augmentation, eval mode, before the head's last ReLU
                                                    # (after it with --after-relu: Table 4.1, better for PIC)
    desc      = L2(PCA-whiten(features, 256))       # Sec. 4.2
    labels    = kmeans(desc) | PIC(5-NN graph(desc)) # Sec. 3.2, 2.4 / 4.6
    top layer = new Linear, own SGD                  # Sec. 3.3: "after each epoch we re-set the last FC layer"
    train one epoch of cross-entropy on (augment(image), label), sampling uniformly over non-empty clusters

This file holds everything the method needs: Sobel input, batched augmentation, the network, PCA-whitening, k-means
(torch, faiss' empty-cluster rule), PIC (sparse torch power iteration + vectorised pointer jumping), the uniform
cluster sampler, the training loop and the evaluation (k-means with k = #classes on the test split's pre-ReLU
descriptors, on the network's output after the ReLU, i.e. the top layer's input, and on the conv features).
Shared, algorithm-free helpers: data.py, knn.py, metrics.py.

    python deepcluster.py --dataset synthetic --quick                      # a few minutes on a laptop CPU
    python deepcluster.py --dataset cifar10 --clustering pic --device cuda
"""
import argparse
import ctypes
import csv
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from data import DataError, load_dataset
from knn import knn
from metrics import evaluate, nmi, ratio_edge_intra_class

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class UsageError(Exception):
    """A bad argument or checkpoint; the message is meant for the user. main() prints it and exits with status 2."""


# ---------------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DeepCluster (Caron's thesis): CNN features -> PCA-whitening -> k-means "
                                "or PIC -> train on the pseudo-labels, repeat.")
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar20, cifar100, stl10, fashion-mnist, mnist, "
                   "imagefolder:PATH or synthetic")
    p.add_argument("--data-root", default="./data", help="where datasets are looked for / downloaded")
    p.add_argument("--train-split", default="train", help="split to train and cluster on (stl10: e.g. train+unlabeled)")
    p.add_argument("--eval-split", default="test", help="split for the final evaluation and predictions.csv")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this square size (default: native)")
    p.add_argument("--out-dir", default=None, help="outputs and checkpoints (default: runs/deepcluster-DATASET-CLUSTERING)")
    p.add_argument("--clustering", default="kmeans", choices=["kmeans", "pic"], help="k-means (Sec. 3.2) or PIC (Sec. 4.6)")
    p.add_argument("--num-clusters", type=int, default=None, help="k for k-means (default: 10x the number of classes); "
                   "PIC finds its own number of clusters")
    p.add_argument("--kmeans-iters", type=int, default=20, help="Lloyd iterations per clustering")
    p.add_argument("--pca-dim", type=int, default=256, help="PCA-whitening output dimension (Sec. 4.2)")
    p.add_argument("--pic-neighbors", type=int, default=5, help="k of PIC's k-NN graph (Eq. 4.1)")
    p.add_argument("--pic-sigma", type=float, default=0.2, help="PIC kernel bandwidth: w = exp(-d / sigma^2)")
    p.add_argument("--pic-alpha", type=float, default=0.001, help="PIC power iteration damping alpha")
    p.add_argument("--pic-iters", type=int, default=200, help="PIC power iterations at most (stops when v is fixed)")
    p.add_argument("--after-relu", action="store_true", help="cluster the descriptors after the last ReLU instead of "
                   "before (thesis Table 4.1: better for PIC, 33.2 vs 21.9; worse for k-means with k = 100)")
    p.add_argument("--arch", default="alexnet", choices=["alexnet", "small", "resnet18"],
                   help="alexnet: AlexNet-style CNN with BatchNorm for 32-96 px; small: a narrow version for CPU; resnet18")
    p.add_argument("--no-sobel", action="store_true", help="feed RGB instead of the Sobel gradients (Sec. 3.3)")
    p.add_argument("--epochs", type=int, default=200, help="cluster/train rounds (0: evaluate the random CNN)")
    p.add_argument("--epoch-images", type=int, default=None, help="cluster and train on a random subset of this many "
                   "images each epoch (Algorithm 2; default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="mini-batch size")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (network and top layer)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum of the network (the top layer has none)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="L2 penalty")
    p.add_argument("--min-crop", type=float, default=0.08, help="RandomResizedCrop minimal area fraction")
    p.add_argument("--monitor-k", type=int, default=200, help="k of the weighted k-NN accuracy monitor")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--quick", action="store_true", help="small network, 2000 images, 3 epochs: a smoke run in minutes")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints and start over")
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.epochs = "small", min(args.epochs, 3)
    args.out_dir = args.out_dir or os.path.join("runs", f"deepcluster-{args.dataset.replace(':', '_').replace('/', '_')}"
                                                f"-{args.clustering}")
    if args.epochs < 0:
        raise UsageError(f"--epochs must be at least 0 (0 evaluates the randomly initialised CNN), got {args.epochs}.")
    for name in ("batch_size", "kmeans_iters", "pca_dim", "pic_neighbors", "pic_iters", "monitor_k"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)}).")
    if not (0 < args.min_crop <= 1 and args.pic_sigma > 0 and 0 < args.pic_alpha < 1 and args.lr > 0):
        raise UsageError("--min-crop must be in (0, 1], --pic-sigma and --lr positive, --pic-alpha in (0, 1).")
    return args


# ---------------------------------------------------------------------------------------------------- data + augmentation
def to_input(images_u8, mean, std):
    """uint8 [B, C, H, W] -> normalised float."""
    x = images_u8.float().div_(255)
    return (x - mean) / std


def random_resized_crop_flip(x, min_scale=0.08, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop + horizontal flip with independent parameters per image, as one affine grid_sample.
    x: [B, C, H, W] float. The crop covers an area fraction in [min_scale, 1] and an aspect ratio in `ratio`
    (log-uniform); sides are clipped to the image instead of torchvision's rejection loop."""
    B, dev = x.shape[0], x.device
    area = torch.empty(B, device=dev).uniform_(min_scale, 1)
    logr = torch.empty(B, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = (area * logr.exp()).sqrt().clamp(max=1)  # [B] crop width / image width
    h = (area / logr.exp()).sqrt().clamp(max=1)
    cx = (torch.rand(B, device=dev) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates, crop stays inside
    cy = (torch.rand(B, device=dev) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(B, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ---------------------------------------------------------------------------------------------------- model
SOBEL_X = [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]  # textbook Sobel kernels (cross-correlation)
SOBEL_Y = [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]


def sobel(x):
    """Grayscale, then the two fixed 3x3 Sobel filters (Sec. 3.3). x: [B, C, H, W] -> [B, 2, H, W]."""
    gray = x.mean(1, keepdim=True)
    kernels = torch.tensor([SOBEL_X, SOBEL_Y], dtype=x.dtype, device=x.device).unsqueeze(1)  # [2, 1, 3, 3]
    return F.conv2d(gray, kernels, padding=1)


def conv_bn(cin, cout, k=3):
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DeepClusterNet(nn.Module):
    """Conv features + MLP head FC-ReLU-FC. forward() returns the descriptors *before* the last ReLU (Sec. 4.2:
    "before activation" works better); training applies ReLU and the top layer, which lives outside (reset each epoch)."""

    def __init__(self, arch, in_channels, use_sobel):
        super().__init__()
        self.use_sobel = use_sobel
        cin = 2 if use_sobel else in_channels
        if arch == "resnet18":  # CIFAR-style stem: 3x3 stride-1 conv, no max-pool
            net = torchvision.models.resnet18()
            net.conv1, net.maxpool, net.fc = nn.Conv2d(cin, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
            self.body, flat, hidden = net, 512, 512
        elif arch == "alexnet":  # AlexNet's 5 conv layers (96-256-384-384-256) with BatchNorm, for 32-96 px images
            self.body = nn.Sequential(*conv_bn(cin, 96, 5), nn.MaxPool2d(2), *conv_bn(96, 256), nn.MaxPool2d(2),
                                      *conv_bn(256, 384), *conv_bn(384, 384), *conv_bn(384, 256),
                                      nn.AdaptiveMaxPool2d(3), nn.Flatten())
            flat, hidden = 256 * 9, 4096
        else:  # small: 3 conv layers (32-64-128), ~10x cheaper, for CPU runs and --quick
            self.body = nn.Sequential(*conv_bn(cin, 32, 5), nn.MaxPool2d(2), *conv_bn(32, 64), nn.MaxPool2d(2),
                                      *conv_bn(64, 128), nn.AdaptiveMaxPool2d(3), nn.Flatten())
            flat, hidden = 128 * 9, 512
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                  nn.Linear(hidden, hidden))
        self.feature_dim = hidden

    def forward(self, x):  # [B, C, H, W] normalised -> [B, hidden]
        if self.use_sobel:
            x = sobel(x)
        return self.head(self.body(x))


def new_top_layer(feature_dim, num_clusters, device):
    """Fresh classifier over this epoch's clusters: weights N(0, 0.01), bias 0 (reference initialisation)."""
    top = nn.Linear(feature_dim, num_clusters).to(device)
    nn.init.normal_(top.weight, 0, 0.01)
    nn.init.zeros_(top.bias)
    return top


# ---------------------------------------------------------------------------------------------------- clustering
def pca_whitening(x, dim=256, eps=1e-6):
    """PCA-whitening fitted on x [N, D] (Sec. 4.2): returns (mean [1, D], proj [D, d]) with d = min(dim, D) such that
    (x - mean) @ proj has identity covariance: the top-d eigenvectors of the covariance, each divided by the square
    root of its eigenvalue. Eigenvalues below eps * the largest are clamped so that dead units do not blow up."""
    mean = x.mean(0, keepdim=True)
    xc = (x - mean).double()
    cov = xc.T @ xc / max(x.shape[0] - 1, 1)  # [D, D] in float64 for a stable eigh
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0)[:dim], evecs.flip(1)[:, :dim]
    return mean, (evecs / evals.clamp_min(eps * evals[0]).sqrt()).to(x.dtype)


def whiten(x, mean, proj):
    """Descriptors for clustering: PCA-whitened, then L2-normalised rows. x [N, D] -> [N, d]."""
    return F.normalize((x - mean) @ proj, dim=1)


def nearest_two(x, x_sq, centroids, idx, rows):
    """For the points x[idx] (idx None: all): nearest centroid [M], distance to it [M] and to the second nearest [M]
    (not squared). ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, one matmul per chunk of `rows` points; ties go to the
    lower index."""
    c_sq = centroids.pow(2).sum(1)  # [k]
    labels, first, second = [], [], []
    for s in range(0, len(x) if idx is None else len(idx), rows):
        i = slice(s, s + rows) if idx is None else idx[s:s + rows]  # a slice copies nothing
        d2 = torch.addmm(c_sq, x[i], centroids.T, alpha=-2)  # [rows, k] = ||c||^2 - 2 x.c
        nearest, label = d2.min(1)
        d2.scatter_(1, label[:, None], float("inf"))
        labels.append(label)
        first.append(nearest + x_sq[i])
        second.append(d2.min(1).values + x_sq[i])
    return torch.cat(labels), torch.cat(first).clamp_min(0).sqrt(), torch.cat(second).clamp_min(0).sqrt()


def kmeans(x, k, iters=20, seed=0, chunk_rows=None):
    """Lloyd's k-means. x: [N, D] float -> (assignment [N] int64, centroids [k, D], inertia after each assignment
    step, number of empty-cluster splits). The last inertia is that of the returned assignment.

    Init: x[torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:k]]. Then `iters` times: assign each
    point to its nearest centroid, move each centroid to the mean of its points; then a final assignment with the
    final centroids. Empty clusters (faiss' rule): pick a non-empty cluster with probability proportional to
    (size - 1), copy its centroid and perturb both copies symmetrically, coordinates times 1 +- 1/1024.

    The assignments are Lloyd's, but most points are not measured again (Hamerly, "Making k-means even faster",
    SDM 2010): each point keeps an upper bound u on the distance to its centroid and a lower bound l on the
    distance to every other one. When the centroids move by drift[j], u grows by its centroid's drift and l shrinks
    by the largest drift of another centroid (triangle inequality). While u < max(l, half the distance from its
    centroid to the nearest other centroid), no centroid can be nearer, so only the other points are multiplied
    with the centroids (late iterations measured 7-18% of the points in bench/kmeans.py). The inertia comes from
    the per-cluster sums that the update computes anyway: sum ||x||^2 - 2 sum_j c_j . S_j + sum_j n_j ||c_j||^2."""
    n, d = x.shape
    if not 1 <= k <= n:
        raise UsageError(f"k-means: need 1 <= k <= number of points (k={k}, {n} points).")
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()  # [k, D]
    rows = chunk_rows or max(1, 2 ** 18 // k)  # [rows, k] blocks of 1 MB stay in cache for min(): ~1.3x faster
    x_sq = x.pow(2).sum(1)  # [N]
    total_sq = float(x_sq.double().sum())
    sign = torch.ones(d, device=x.device, dtype=x.dtype)
    sign[1::2] = -1  # faiss perturbs even coordinates by (1 + eps) and odd ones by (1 - eps) (and vice versa)
    history, splits = [], 0

    def cluster_sums(labels):  # -> points per cluster [k], sum of each cluster's points [k, D]
        counts = torch.bincount(labels, minlength=k)
        if x.device.type == "cpu":  # a one-hot sparse matmul is ~5x faster than index_add_ on CPU
            one_hot = torch.sparse_coo_tensor(torch.stack([labels, torch.arange(n)]), torch.ones(n, dtype=x.dtype),
                                              (k, n), check_invariants=False)
            return counts, torch.sparse.mm(one_hot, x)
        return counts, torch.zeros_like(centroids).index_add_(0, labels, x)

    def inertia(counts, sums, c):  # sum of squared distances of the points to their centroid c[label]
        c, sums = c.double(), sums.double()
        return total_sq - 2 * float((c * sums).sum()) + float((counts.double() * c.pow(2).sum(1)).sum())

    labels, upper, lower = nearest_two(x, x_sq, centroids, None, rows)
    for _ in range(iters):
        counts, sums = cluster_sums(labels)
        history.append(inertia(counts, sums, centroids))
        previous = centroids.clone()
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None].to(x.dtype)
        counts = counts.cpu()
        for ci in (counts == 0).nonzero().flatten().tolist():  # split clusters (faiss' rule)
            cj = int(torch.multinomial((counts - 1).clamp_min(0).double(), 1, generator=gen))
            centroids[ci] = centroids[cj] * (1 + sign / 1024)
            centroids[cj] = centroids[cj] * (1 - sign / 1024)
            counts[ci] = counts[cj] // 2  # assume an even split, as faiss does, for later draws
            counts[cj] -= counts[ci]
            splits += 1
        # Hamerly's bounds after the move; then measure only the points whose nearest centroid may have changed.
        drift = (centroids - previous).norm(dim=1)  # [k]
        upper += drift[labels]
        if k > 1:
            top_drift, top_cluster = drift.topk(2)
            lower -= torch.where(labels == top_cluster[0], top_drift[1], top_drift[0])
        gaps = torch.cdist(centroids, centroids).fill_diagonal_(float("inf"))
        half_gap = gaps.min(1).values / 2  # [k]: a point nearer than this to its centroid is nearest to it
        todo = (upper >= torch.maximum(lower, half_gap[labels])).nonzero().squeeze(1)
        if len(todo) == n:  # (no structure in the data: every point again)
            labels, upper, lower = nearest_two(x, x_sq, centroids, None, rows)
        elif len(todo):
            labels[todo], upper[todo], lower[todo] = nearest_two(x, x_sq, centroids, todo, rows)
    history.append(inertia(*cluster_sums(labels), centroids))
    return labels, centroids, history, splits


def pic_graph(neighbor_idx, neighbor_dist, sigma=0.2):
    """Sparse affinity W = A + A^T with A_ij = exp(-d_ij / sigma^2) for j among the k-NN of i (Eq. 4.1).
    neighbor_idx, neighbor_dist: [N, k] (self excluded, squared L2). Returns W as a float64 sparse CSR tensor [N, N]
    (an edge found in both directions carries a_ij + a_ji)."""
    n, k = neighbor_idx.shape
    dev = neighbor_idx.device
    rows = torch.arange(n, device=dev).repeat_interleave(k)  # [N*k]
    cols = neighbor_idx.reshape(-1)
    w = torch.exp(-neighbor_dist.double().reshape(-1) / sigma ** 2)
    key = torch.cat([rows * n + cols, cols * n + rows])  # [2Nk] edge (i, j) as i * N + j, both directions
    edges, inverse = torch.unique(key, return_inverse=True)  # sorted by row, then column
    values = torch.zeros(len(edges), dtype=torch.float64, device=dev).index_add_(0, inverse, torch.cat([w, w]))
    crow = torch.zeros(n + 1, dtype=torch.long, device=dev)
    crow[1:] = torch.cumsum(torch.bincount(edges // n, minlength=n), 0)
    return torch.sparse_csr_tensor(crow, edges % n, values, (n, n), check_invariants=False)


def pic_power_iteration(W, alpha=0.001, max_iters=200):
    """v <- alpha W^T v + (1 - alpha) / N, renormalised to sum 1, in float64 from the uniform vector (W is
    symmetric, so W^T v = W v). Stops as soon as an iteration leaves v bit-for-bit unchanged (every later
    iteration would too, so the result equals running all max_iters). Returns (v [N], iterations run)."""
    n = W.shape[0]
    v = torch.full((n,), 1.0 / n, dtype=torch.float64, device=W.device)
    for it in range(1, max_iters + 1):
        v_next = alpha * (W @ v) + (1 - alpha) / n
        v_next = v_next / v_next.sum()
        if torch.equal(v_next, v):
            return v, it
        v = v_next
    return v, max_iters


def pic_pointers(W, v):
    """Each node points to the neighbour j maximising W_ij (v_j - v_i) if that is positive, else to itself
    (ties: lowest j, as the reference's scan over sorted columns). W: CSR [N, N], v: [N]. Returns pointer [N]."""
    n = W.shape[0]
    crow, cols = W.crow_indices(), W.col_indices()
    rows = torch.arange(n, device=v.device).repeat_interleave(crow.diff())  # [E] row of each stored edge
    score = W.values() * (v[cols] - v[rows])  # [E]
    best = torch.segment_reduce(score, "max", offsets=crow, unsafe=True)  # [N] per-row maximum (-inf if no edge)
    win = (score > 0) & (score == best[rows])
    choice = torch.full((n,), n, dtype=torch.long, device=v.device).scatter_reduce(0, rows[win], cols[win], "amin")
    return torch.where(choice < n, choice, torch.arange(n, device=v.device))


def follow_pointers(pointer):
    """Root reached from every node by pointer jumping: p <- p[p] until nothing moves (log2(depth) rounds).
    Pointers go to strictly larger v, so there are no cycles and every chain ends at a self-pointing local maximum."""
    while True:
        nxt = pointer[pointer]
        if torch.equal(nxt, pointer):
            return pointer
        pointer = nxt


def compact(labels, n):
    """Renumber labels in [0, n) to 0..K-1 keeping their order (a linear-time torch.unique(return_inverse))."""
    used = torch.zeros(n, dtype=torch.long, device=labels.device)
    used[labels] = 1
    return (torch.cumsum(used, 0) - 1)[labels]


def redistribute_singletons(labels, neighbor_idx):
    """Thesis Sec. 4.6: a singleton joins the cluster of its nearest non-singleton among its k-NN (neighbor_idx is
    sorted by distance); if all its neighbours are singletons it stays one. Returns relabelled [N] (0..K-1)."""
    single = torch.bincount(labels)[labels] == 1  # [N]
    s = single.nonzero().flatten()
    nbrs = neighbor_idx[s]  # [S, k]
    ok = ~single[nbrs]  # [S, k] neighbour belongs to a real cluster
    first = ok.int().argmax(1)  # first True (argmax returns the first maximum)
    has = ok.any(1)
    labels = labels.clone()
    labels[s[has]] = labels[nbrs[has, first[has]]]
    return compact(labels, len(labels))


def pic(neighbor_idx, neighbor_dist, sigma=0.2, alpha=0.001, max_iters=200, singletons=True):
    """Power Iteration Clustering on a k-NN graph (thesis Sec. 2.4, 4.6). neighbor_idx / neighbor_dist: [N, k],
    self excluded, sorted by squared L2 distance. Returns (labels [N] int64 in 0..K-1, info dict)."""
    device = neighbor_idx.device
    if device.type == "mps":  # no float64 / sparse kernels there
        neighbor_idx, neighbor_dist = neighbor_idx.cpu(), neighbor_dist.cpu()
    W = pic_graph(neighbor_idx, neighbor_dist, sigma)
    v, iters = pic_power_iteration(W, alpha, max_iters)
    roots = follow_pointers(pic_pointers(W, v))
    labels = compact(roots, len(roots))  # clusters numbered in the order of their root's index
    num_singletons = int((torch.bincount(labels) == 1).sum())
    if singletons:
        labels = redistribute_singletons(labels, neighbor_idx)
    info = dict(power_iters=iters, singletons_before_redistribution=num_singletons)
    return labels.to(device), info


def uniform_cluster_sample(labels, num_samples, gen=None):
    """Image indices for one epoch, uniform over non-empty clusters (Sec. 3.3): every cluster gets
    ceil(num_samples / K) draws (its images in random order, then with replacement for small clusters), the draws
    are shuffled and cut to num_samples. Indices are into `labels` (original image order); labels < 0 are skipped."""
    valid = (labels >= 0).nonzero().flatten()
    lab = labels[valid].cpu()
    perm = torch.randperm(len(lab), generator=gen)
    order = perm[torch.sort(lab[perm], stable=True)[1]]  # grouped by cluster, random order inside a cluster
    clusters, sizes = torch.unique(lab, return_counts=True)  # [K]
    per = math.ceil(num_samples / len(clusters))
    offsets = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(per).expand(len(clusters), per)  # [K, per]
    resample = (torch.rand(len(clusters), per, generator=gen) * sizes[:, None]).long()
    pos = torch.where(slot < sizes[:, None], slot, resample)
    picks = order[(offsets[:, None] + pos).flatten()]
    picks = picks[torch.randperm(len(picks), generator=gen)][:num_samples]
    return valid[picks.to(valid.device)]


# ---------------------------------------------------------------------------------------------------- losses
def pseudo_label_loss(logits, targets):
    """Multi-class logistic loss on the pseudo-labels, Eq. (3.1). logits [B, K], targets [B] -> scalar."""
    return F.cross_entropy(logits, targets)


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def extract_features(model, images, mean, std, batch=512, conv=False, after_relu=False):
    """Descriptors of all images (no augmentation, eval mode): images uint8 [N, C, H, W] -> float [N, hidden] (with
    after_relu=True passed through the last ReLU), or with conv=True the flattened output of the convolutional body
    (what transfer evaluations probe)."""
    model.eval()
    out = []
    for s in range(0, len(images), batch):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
            x = to_input(images[s:s + batch], mean, std).contiguous(memory_format=torch.channels_last)
            if conv:
                out.append(model.body(sobel(x) if model.use_sobel else x).flatten(1).float())
            else:
                out.append(model(x).float())
    out = torch.cat(out)
    return F.relu(out) if after_relu and not conv else out


def weighted_knn_acc(train_desc, train_labels, test_desc, test_labels, k=200, temperature=0.07):
    """Weighted k-NN classifier (votes exp(cos / T)), the usual monitor of feature quality; labels only to report."""
    k = min(k, len(train_desc) - 1)
    sim, idx = knn(test_desc, train_desc, k=k, metric="cosine")  # [M, k]
    C = int(train_labels.max()) + 1
    votes = torch.zeros(len(test_desc), C, device=sim.device).scatter_add_(1, train_labels[idx], (sim / temperature).exp())
    return float((votes.argmax(1) == test_labels).float().mean())


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- training stages
def cluster_epoch(args, desc, seed):
    """Cluster the descriptors with the chosen method. desc [n, d] -> (labels [n] 0..K-1, info dict, 10-NN indices)."""
    dist, idx = knn(desc, k=max(10, args.pic_neighbors), metric="l2")  # sorted ascending; the first 5 are the 5-NN
    t = time.time()
    if args.clustering == "kmeans":
        labels, _, inertia, splits = kmeans(desc, args.num_clusters, args.kmeans_iters, seed)
        labels = compact(labels, args.num_clusters)
        info = dict(clustering_loss=inertia[-1] / len(desc), empty_cluster_splits=splits)
    else:
        labels, info = pic(idx[:, :args.pic_neighbors], dist[:, :args.pic_neighbors], args.pic_sigma, args.pic_alpha,
                           args.pic_iters)
    info["cluster_seconds"] = round(time.time() - t, 2)
    return labels, info, idx[:, :10]


def train_epoch(args, model, optimizer, images, labels, mean, std, epoch, log_every=5.0):
    """One epoch (N / B updates) of cross-entropy on pseudo-labels with a fresh top layer and its own SGD."""
    device = images.device
    num_clusters = int(labels.max()) + 1
    top = new_top_layer(model.feature_dim, num_clusters, device)
    top_opt = torch.optim.SGD(top.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    order = uniform_cluster_sample(labels, int((labels >= 0).sum())).to(device)  # as many draws as clustered images
    steps = max(1, len(order) // args.batch_size)
    model.train()
    t0 = last = time.time()
    total = 0.0
    for step in range(steps):
        idx = order[step * args.batch_size:(step + 1) * args.batch_size]
        x = random_resized_crop_flip(to_input(images[idx], mean, std), args.min_crop)
        x = x.contiguous(memory_format=torch.channels_last)  # faster convolutions on CUDA and on CPU (oneDNN)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = top(F.relu(model(x))).float()  # [B, K]
        loss = pseudo_label_loss(logits, labels[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at epoch {epoch}, step {step}; the last good checkpoint is "
                                     f"{os.path.join(args.out_dir, 'checkpoint.pt')} (epoch {epoch - 1}).")
        optimizer.zero_grad(set_to_none=True)
        top_opt.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        top_opt.step()
        total += loss.item()
        if time.time() - last > log_every:
            last = time.time()
            rate = (step + 1) * args.batch_size / (last - t0)
            print(f"  train epoch {epoch} step {step + 1}/{steps} loss {total / (step + 1):.4f} "
                  f"{rate:.0f} img/s eta {(steps - step - 1) * args.batch_size / rate:.0f}s", flush=True)
    return total / steps, time.time() - t0


CONFIG_KEYS = ("dataset", "train_split", "image_size", "clustering", "num_clusters", "arch", "no_sobel", "pca_dim",
               "quick", "seed", "batch_size", "epoch_images", "after_relu")
ADDED_LATER = {"after_relu": False}  # what checkpoints written before a setting existed used


def load_checkpoint(path, args):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        saved = ckpt["args"]
        ckpt["model"], ckpt["optimizer"], ckpt["epoch"]
    except Exception as e:
        raise UsageError(f"The checkpoint {path} cannot be read ({type(e).__name__}: {e}). It is corrupted or not "
                         f"from deepcluster.py; delete it or pass --restart to start over.") from None
    diff = [f"--{k.replace('_', '-')} {saved.get(k, ADDED_LATER.get(k))!r} vs {getattr(args, k)!r}" for k in CONFIG_KEYS
            if saved.get(k, ADDED_LATER.get(k)) != getattr(args, k)]
    if diff:
        raise UsageError(f"The checkpoint {path} was written with another configuration ({'; '.join(diff)}). Use "
                         f"another --out-dir, the same settings, or --restart to overwrite it.")
    return ckpt


def kmeans_evaluation(desc, target, num_classes, restarts=50, iters=20):
    """k-means with k = number of classes on L2-normalised features, the lowest inertia of `restarts` runs (no
    labels used). Returns (labels [N], confidence probs [N, C], metrics dict). 50 restarts, not 10: on Fashion-MNIST
    single runs on trained features range over 0.45-0.67 ACC, and the best of 10 still moved by up to 0.09 ACC
    with the seeds of the restarts."""
    desc = F.normalize(desc, dim=1)
    best = min((kmeans(desc, num_classes, iters, seed=10_000 + r) for r in range(restarts)), key=lambda r: r[2][-1])
    labels, centroids = best[0], best[1]
    d2 = torch.cdist(desc, centroids).pow(2)  # [N, C]; unit vectors, so d2 lies in [0, ~4]
    probs = F.softmax(-d2 / 0.1, dim=1)  # confidence: softmax over negative squared distances (temperature 0.1)
    result = evaluate(labels.cpu(), target, probs.cpu()) if (target >= 0).any() else {}
    result["nonempty"] = int(labels.unique().numel())
    if (target >= 0).any():
        _, nn_idx = knn(desc, k=10, metric="l2")
        result["ratio_edge_intra_class"] = ratio_edge_intra_class(nn_idx.cpu(), target)
    return labels, probs, result


def final_evaluation(args, model, ds, images, mean, std, num_classes):
    """Cluster the evaluation split into k = number of classes with k-means on three feature sets of the final
    network: (1) the descriptors DeepCluster clusters (before the last ReLU; L2-normalised but not whitened:
    whitening to 256 dims gives noise directions the weight of the few class directions, which suits the
    10x-overclustering of training but hurts a k = #classes clustering), (2) the same after the ReLU, i.e. the input
    of the top layer, the only features the pseudo-label classifier reads (the thesis compares the two sides of this
    ReLU in Table 4.1) and (3) the conv features (what transfer evaluations probe).
    Rows for results.json; predictions.csv and prototypes.png come from (2)."""
    desc = extract_features(model, images, mean, std)
    _, _, head = kmeans_evaluation(desc, ds.labels, num_classes)
    labels, probs, top_input = kmeans_evaluation(F.relu(desc), ds.labels, num_classes)
    _, _, conv = kmeans_evaluation(extract_features(model, images, mean, std, conv=True), ds.labels, num_classes)
    conf = probs.max(1).values.cpu()
    rows = ["index,cluster,confidence,label"] + [f"{i},{int(c)},{float(p):.4f},{int(y) if y >= 0 else ''}"
                                                 for i, (c, p, y) in enumerate(zip(labels.cpu(), conf, ds.labels))]
    atomic_write(os.path.join(args.out_dir, "predictions.csv"), "\n".join(rows) + "\n")
    protos = []  # the 8 most confident images of each cluster, one row per cluster
    for c in range(num_classes):
        members = (labels.cpu() == c).nonzero().flatten()
        top = members[conf[members].argsort(descending=True)[:8]]
        row = images[top.to(images.device)].float().cpu() / 255
        protos.append(torch.cat([row, torch.ones(8 - len(row), *row.shape[1:])]) if len(row) < 8 else row)
    tmp = os.path.join(args.out_dir, "prototypes.tmp.png")
    torchvision.utils.save_image(torch.cat(protos), tmp, nrow=8, padding=1)
    os.replace(tmp, os.path.join(args.out_dir, "prototypes.png"))
    return [dict(features="descriptors", **head), dict(features="top_layer_input", **top_input),
            dict(features="conv", **conv)]


# ---------------------------------------------------------------------------------------------------- main
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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    if name not in ("cpu", "cuda", "mps") or (name == "cuda" and not torch.cuda.is_available()) or (
            name == "mps" and not torch.backends.mps.is_available()):
        raise UsageError(f"Device '{name}' is not available here; use --device auto, cpu, cuda or mps.")
    return torch.device(name)


def run(args):
    keep_freed_memory()
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    train = load_dataset(args.dataset, args.data_root, args.train_split, args.image_size)
    test = load_dataset(args.dataset, args.data_root, args.eval_split, args.image_size)
    num_classes = len(train.classes)
    if args.quick:  # fixed random subsets so that the whole pipeline runs in a few minutes
        g = torch.Generator().manual_seed(args.seed)
        train = train._replace(**dict(zip(("images", "labels"), _subset(train, 2000, g))))
        test = test._replace(**dict(zip(("images", "labels"), _subset(test, 1000, g))))
    n = len(train.images)
    if args.num_clusters is None:
        args.num_clusters = 10 * num_classes if num_classes else 100
    epoch_n = min(args.epoch_images or n, n)
    if args.num_clusters < 2 or args.num_clusters > epoch_n:
        raise UsageError(f"--num-clusters must be between 2 and the number of images clustered per epoch ({epoch_n}); "
                         f"got {args.num_clusters}.")
    if epoch_n <= max(10, args.pic_neighbors) or len(test.images) <= 10:
        raise UsageError(f"Too few images: {epoch_n} clustered per epoch and {len(test.images)} in the evaluation "
                         f"split; the k-NN graphs need more than {max(10, args.pic_neighbors)}.")
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out_dir, "checkpoint.pt"), os.path.join(args.out_dir, "log.jsonl")

    images, test_images = train.images.to(device), test.images.to(device)
    mean = torch.tensor(train.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(train.std, device=device).view(1, -1, 1, 1)
    model = DeepClusterNet(args.arch, images.shape[1], not args.no_sobel).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    start, prev_labels = 1, None
    if os.path.exists(ckpt_path) and not args.restart:
        ckpt = load_checkpoint(ckpt_path, args)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, prev_labels = ckpt["epoch"] + 1, ckpt["labels"]
        print(f"resumed from {ckpt_path} after epoch {ckpt['epoch']}", flush=True)
    elif args.restart and os.path.exists(log_path):
        os.remove(log_path)
    forward = torch.compile(model) if args.compile else model
    train_labels, test_labels = train.labels.to(device), test.labels.to(device)
    has_labels = bool((train.labels >= 0).all()) and num_classes > 0
    print(f"deepcluster: {args.dataset} ({n} train images, {len(test.images)} {args.eval_split}), {args.clustering}, "
          f"arch {args.arch}, sobel {not args.no_sobel}, device {device}, epochs {start}..{args.epochs}", flush=True)

    for epoch in range(start, args.epochs + 1):
        t0 = time.time()
        torch.manual_seed(args.seed * 100_003 + epoch)  # per-epoch seed: a resumed run repeats the same epochs
        subset = torch.randperm(n, device=device)[:epoch_n].sort().values if epoch_n < n else torch.arange(n, device=device)
        feats = extract_features(forward, images[subset], mean, std, after_relu=args.after_relu)
        pca = pca_whitening(feats, args.pca_dim)
        desc = whiten(feats, *pca)  # [n, 256] unit vectors
        labels, info, nn10 = cluster_epoch(args, desc, seed=args.seed * 100_003 + epoch)
        full = torch.full((n,), -1, dtype=torch.long, device=device)
        full[subset] = labels  # pseudo-labels by original index, -1 for images outside this epoch's subset
        sizes = torch.bincount(labels)
        rec = dict(epoch=epoch, num_clusters=int((sizes > 0).sum()), singletons=int((sizes == 1).sum()),
                   largest_cluster=int(sizes.max()), **info)
        if prev_labels is not None:  # stability (paper Fig. 2); with --epoch-images over images clustered both times
            both = (full >= 0) & (prev_labels.to(device) >= 0)
            rec["nmi_prev"] = nmi(full[both].cpu(), prev_labels[both.cpu()])
        if has_labels:
            rec["nmi_labels"] = nmi(labels.cpu(), train.labels[subset.cpu()])
            rec["ratio_edge_intra_class"] = ratio_edge_intra_class(nn10.cpu(), train.labels[subset.cpu()])
        if has_labels and (test.labels >= 0).all():  # quality of the features clustered in this epoch
            test_desc = whiten(extract_features(forward, test_images, mean, std, after_relu=args.after_relu), *pca)
            rec["knn_acc"] = weighted_knn_acc(desc, train_labels[subset], test_desc, test_labels, args.monitor_k)
        loss, secs = train_epoch(args, forward, optimizer, images, full, mean, std, epoch)
        rec.update(loss=loss, train_seconds=round(secs, 1))
        rec["seconds"] = round(time.time() - t0, 1)
        atomic_save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch, labels=full.cpu(),
                         args={k: getattr(args, k) for k in CONFIG_KEYS}), ckpt_path)
        with open(log_path, "a") as f:  # one line per finished epoch, written after its checkpoint
            f.write(json.dumps(rec) + "\n")
        print(f"epoch {epoch}/{args.epochs} " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in rec.items() if k != "epoch"), flush=True)
        prev_labels = full.cpu()

    results = final_evaluation(args, forward, test, test_images, mean, std, max(num_classes, 2))
    for r in results:
        r.update(stage="deepcluster", clustering=args.clustering, split=args.eval_split, epochs=args.epochs)
        print("final " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    atomic_write(os.path.join(args.out_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    return results


def _subset(ds, size, gen):
    idx = torch.randperm(len(ds.images), generator=gen)[:size].sort().values
    return ds.images[idx], ds.labels[idx]


def main(argv=None):
    try:
        run(parse_args(argv))
    except (DataError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
