"""deepcluster.py: DeepCluster, a CNN trained on the clusters of its own features (k-means or PIC), in one file.

  M. Caron, P. Bojanowski, A. Joulin, M. Douze, "Deep Clustering for Unsupervised Learning of Visual Features",
  ECCV 2018. https://arxiv.org/abs/1807.05520 (official code: facebookresearch/deepcluster)
  M. Caron, "Unsupervised Representation Learning with Clustering in Deep Convolutional Networks", master thesis,
  KTH Royal Institute of Technology, 2018 ("the thesis" below: Algorithms 1-2, Sec. 2.4, 3.2-3.3, 4.1-4.7).

Each epoch, the thesis' Algorithm 1 (the paper's Sec. 3.2):

    features  = CNN(images)                           # no augmentation, eval mode, fp32, before the head's last ReLU
    desc      = L2(PCA-whiten(features, 256))         # thesis Sec. 4.2
    labels    = kmeans(desc) | PIC(5-NN graph(desc))  # paper Eq. (2); thesis Sec. 2.4, 4.6
    top layer = new Linear, its own SGD               # thesis Sec. 3.3: "we re-set the last fully connected layer"
    one epoch of cross-entropy (thesis Eq. 3.1) on (augment(image), label), sampled uniformly over the clusters

Then the final evaluation: k-means with k = the number of classes on the test split, on three feature sets of the
final network. Under torchrun each rank extracts the features of its share of the images, the k-NN graph is shared,
the clustering runs on rank 0 and its labels are broadcast; each rank trains on its share of each global batch.

    python deepcluster.py --dataset synthetic --quick                            # a few minutes on a laptop CPU
    python deepcluster.py --dataset cifar10 --clustering pic --device cuda
    torchrun --standalone --nproc_per_node 4 deepcluster.py --dataset cifar10   # 4 GPUs, the same global batch
    python deepcluster.py --predict photos/ --out-dir runs/deepcluster-cifar10-kmeans   # cluster new images
"""
import signal
import sys

signal.signal(signal.SIGINT, lambda *_: sys.exit(130))  # Ctrl-C while torch loads (seconds): quietly, status 130

import json
import math
import os
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics
import runtime
from augment import normalize, random_resized_crop_flip
from knn import knn
from runtime import UsageError, at_least, predict, say

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
SCRIPT, STAGE = "deepcluster.py", "deepcluster"

# ---- 1. Arguments ----------------------------------------------------------------------------------------------
# Overrides of the argparse defaults (the thesis' settings); an explicit flag wins.
PRESETS = {"quick": dict(arch="small", epochs=3, subset=2000, test_subset=1000)}


def parse_args(argv=None):
    p = runtime.parser(SCRIPT, "DeepCluster: CNN features -> PCA-whitening -> k-means or PIC -> train on the "
                               "pseudo-labels, repeat.")
    a, pos, rate = p.add_argument, at_least(1), at_least(0.0, float)
    a("--dataset", default="cifar10", help="cifar10 | cifar20 | cifar100 | stl10 | fashion-mnist | mnist | "
      "imagefolder:PATH | synthetic")
    a("--data-root", default="./data", help="where datasets are found or downloaded to")
    a("--train-split", default="train", help="split clustered and trained on (stl10: e.g. train+unlabeled)")
    a("--test-split", default="test", help="split of the final evaluation and predictions.csv")
    a("--image-size", type=int, default=None, help="resize images to this square size (image folders: 64)")
    a("--subset", type=at_least(2), default=None, help="train on a fixed random subset of this many images")
    a("--test-subset", type=at_least(2), default=None, help="evaluate on a fixed random subset of the test split")
    a("--out-dir", default=None, help="output folder (default: runs/deepcluster-DATASET-CLUSTERING)")
    a("--clustering", default="kmeans", choices=["kmeans", "pic"], help="k-means (paper Eq. 2) or Power Iteration "
      "Clustering (thesis Sec. 2.4, 4.6)")
    a("--num-clusters", type=at_least(2), default=None, help="k of k-means (default: 10 x --final-clusters); PIC "
      "finds its own number of clusters and ignores it")
    a("--final-clusters", type=at_least(2), default=None, help="k of the final k-means evaluation and of --predict "
      "(default: the number of classes; 10 for images without classes)")
    a("--kmeans-iters", type=pos, default=20, help="Lloyd iterations per clustering")
    a("--pca-dim", type=pos, default=256, help="PCA-whitening output dimension (thesis Sec. 4.2)")
    a("--pic-neighbors", type=pos, default=5, help="k of PIC's k-NN graph (thesis Eq. 4.1)")
    a("--pic-sigma", type=rate, default=0.2, help="PIC kernel bandwidth: w = exp(-d / sigma^2)")
    a("--pic-alpha", type=rate, default=0.001, help="PIC power iteration damping alpha, in (0, 1)")
    a("--pic-iters", type=pos, default=200, help="PIC power iterations at most (stops once v is fixed)")
    a("--after-relu", action="store_true", help="cluster the descriptors after the last ReLU instead of before "
      "(thesis Table 4.1: better for PIC, worse for k-means with k = 100)")
    a("--arch", default="alexnet", choices=["alexnet", "small", "resnet18"], help="alexnet: AlexNet-style CNN with "
      "BatchNorm for 32-96 px; small: a narrow version for CPU runs; resnet18: ResNet-18 with a CIFAR stem")
    a("--no-sobel", action="store_true", help="feed RGB instead of the Sobel gradients (thesis Sec. 3.3)")
    a("--epochs", type=at_least(0), default=200, help="cluster-and-train rounds (0: evaluate the random CNN)")
    a("--epoch-images", type=at_least(2), default=None, help="cluster and train on a random subset of this many "
      "images each epoch (thesis Algorithm 2; default: all)")
    a("--batch-size", type=pos, default=256, help="global mini-batch size")
    a("--lr", type=rate, default=0.05, help="SGD learning rate of the network and the top layer (may change when an "
      "unfinished run resumes)")
    a("--momentum", type=rate, default=0.9, help="SGD momentum of the network (the top layer has none)")
    a("--weight-decay", type=rate, default=1e-5, help="L2 penalty")
    a("--crop-min", type=at_least(0.01, float), default=0.08, help="RandomResizedCrop: smallest area fraction (<= 1)")
    a("--monitor-k", type=pos, default=200, help="k of the weighted k-NN accuracy monitor")
    a("--predict", default=None, metavar="PATH", help="apply the finished run in --out-dir to an image or a folder "
      "of images: writes predict-NAME.csv and .png there, no training")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    a("--compile", action="store_true", help="torch.compile the network")
    a("--deterministic", action="store_true", help="CUDA: deterministic kernels, no cuDNN benchmark (slower)")
    a("--threads", type=pos, default=None, help="CPU threads (default: torch's choice)")
    a("--seed", type=int, default=0, help="random seed: same seed, same device, same results")
    a("--quick", action="store_true", help="small CNN, 2000 images, 3 epochs: the pipeline in a few minutes")
    a("--restart", action="store_true", help="delete this script's files in --out-dir and start over")
    a("--log-every", type=rate, default=5.0, help="seconds between progress lines")
    args = runtime.parse_args(p, argv, lambda args: [PRESETS["quick"] if args.quick else {}])
    args.out_dir = args.out_dir or os.path.join("runs", f"deepcluster-{args.dataset.split(':')[0]}-{args.clustering}")
    return args


def check_args(args, train, test):
    """The checks that need the data; sets the defaults of --final-clusters and (k-means) --num-clusters."""
    if len(train.classes) == 1:
        raise UsageError(f"{args.dataset} has a single class ({train.classes[0]!r}): there is nothing to cluster it "
                         f"against. Give each class its own sub-folder (at least two), or put all images directly in "
                         f"the folder to cluster them without labels.")
    args.final_clusters = args.final_clusters or len(train.classes) or 10
    if args.clustering == "kmeans":
        args.num_clusters = args.num_clusters or 10 * args.final_clusters
    elif args.num_clusters is not None:
        say("note: PIC finds its own number of clusters; --num-clusters is not used.")
    n, world = min(args.epoch_images or len(train.images), len(train.images)), runtime.STATE["world"]
    for bad, message in [
            (args.clustering == "kmeans" and args.num_clusters > n,
             f"--num-clusters {args.num_clusters} is more than the {n} images clustered per epoch"),
            (n <= max(10, args.pic_neighbors), f"{n} images per epoch are too few: the k-NN graphs need more than "
                                               f"{max(10, args.pic_neighbors)}"),
            (len(test.images) <= max(10, args.final_clusters), f"--final-clusters {args.final_clusters} needs more "
             f"than {max(10, args.final_clusters)} images in --test-split {args.test_split} ({len(test.images)})"),
            (args.batch_size > n, f"--batch-size {args.batch_size} is more than the {n} images per epoch; give "
                                  f"--batch-size {n - n % world} or less"),
            (args.batch_size % world, f"--batch-size must be divisible by the {world} processes"),
            (args.crop_min > 1, "--crop-min must be at most 1"),
            (args.lr == 0 or args.pic_sigma == 0, "--lr and --pic-sigma must be positive"),
            (not 0 < args.pic_alpha < 1, "--pic-alpha must lie in (0, 1)")]:
        if bad:
            raise UsageError(message + ".")


# ---- 2. Data + augmentation: uint8 batches [B, C, H, W] in, normalised float out; random parameters per image ----
def load_data(args):
    """(train, test) splits as uint8 tensors on the device (every rank holds all images), fixed subsets if asked."""
    def load(split, size, seed):
        ds = data.load_dataset(args.dataset, args.data_root, split, image_size=args.image_size)
        if size is not None and size < len(ds.images):
            keep = torch.randperm(len(ds.images), generator=torch.Generator().manual_seed(seed))[:size].sort().values
            ds = ds._replace(images=ds.images[keep], labels=ds.labels[keep])
        return ds._replace(images=ds.images.to(args.device), labels=ds.labels.to(args.device))
    return load(args.train_split, args.subset, args.seed), load(args.test_split, args.test_subset, args.seed + 1)


def augment(images, mean, std, crop_min):
    """The training view (thesis Sec. 3.3, 4.3): RandomResizedCrop + horizontal flip, reflection at the borders."""
    return normalize(random_resized_crop_flip(images.float() / 255, (crop_min, 1.0), padding_mode="reflection"),
                     mean, std)


# ---- 3. Model --------------------------------------------------------------------------------------------------
SOBEL_X = [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]  # textbook Sobel kernels (cross-correlation)
SOBEL_Y = [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]


def sobel(x):
    """Grayscale, then the two fixed 3x3 Sobel filters (thesis Sec. 3.3). x: [B, C, H, W] -> [B, 2, H, W]."""
    gray = x.mean(1, keepdim=True)
    kernels = torch.tensor([SOBEL_X, SOBEL_Y], dtype=x.dtype, device=x.device).unsqueeze(1)  # [2, 1, 3, 3]
    return F.conv2d(gray, kernels, padding=1)


class Sobel(nn.Module):  # no weights: a module so that the input filter belongs to model.features
    def forward(self, x):
        return sobel(x)


def conv_bn(cin, cout, k=3):
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DeepClusterNet(nn.Module):
    """features (Sobel + conv body) and an MLP head FC-ReLU-FC. forward() gives the descriptors *before* the last ReLU
    (thesis Sec. 4.2: "before activation" works better); training applies the ReLU and the top layer, which lives
    outside the network (a new one every epoch)."""
    def __init__(self, arch, in_channels, use_sobel):
        super().__init__()
        cin = 2 if use_sobel else in_channels
        if arch == "resnet18":                                      # CIFAR stem: 3x3 stride-1 conv, no max-pool
            import torchvision  # here: importing it takes seconds
            body = torchvision.models.resnet18()
            body.conv1, body.maxpool, body.fc = nn.Conv2d(cin, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
            flat, hidden = 512, 512
        elif arch == "alexnet":                                     # AlexNet's 96-256-384-384-256 convs with BN
            body = nn.Sequential(*conv_bn(cin, 96, 5), nn.MaxPool2d(2), *conv_bn(96, 256), nn.MaxPool2d(2),
                                 *conv_bn(256, 384), *conv_bn(384, 384), *conv_bn(384, 256),
                                 nn.AdaptiveMaxPool2d(3), nn.Flatten())
            flat, hidden = 256 * 9, 4096
        else:                                                       # small: 32-64-128, ~10x cheaper, for CPU runs
            body = nn.Sequential(*conv_bn(cin, 32, 5), nn.MaxPool2d(2), *conv_bn(32, 64), nn.MaxPool2d(2),
                                 *conv_bn(64, 128), nn.AdaptiveMaxPool2d(3), nn.Flatten())
            flat, hidden = 128 * 9, 512
        self.features = nn.Sequential(Sobel() if use_sobel else nn.Identity(), body)
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                  nn.Linear(hidden, hidden))
        self.feature_dim = hidden

    def forward(self, x):                                           # [B, C, H, W] normalised -> [B, hidden]
        return self.head(self.features(x))


def new_top_layer(feature_dim, num_clusters, generator):
    """A fresh classifier over this epoch's clusters: weights N(0, 0.01), bias 0 (the reference's initialisation),
    drawn from the shuffle generator, so that every rank starts from the same one."""
    top = nn.Linear(feature_dim, num_clusters)
    nn.init.normal_(top.weight, 0, 0.01, generator=generator)
    nn.init.zeros_(top.bias)
    return top


# ---- 4. Losses: the pseudo-label cross-entropy and the clustering that makes the labels ------------------------
def pseudo_label_loss(logits, targets):
    """Multi-class logistic loss on the pseudo-labels, thesis Eq. (3.1) (the paper's Eq. 1): the mean over the batch.
    logits [B, K], targets [B] -> scalar. Under torchrun each rank averages its equal share of the global batch and
    DDP averages the ranks' gradients: the single-process gradient of the global batch."""
    return F.cross_entropy(logits, targets)


def pca_whitening(x, dim=256, eps=1e-6):
    """PCA-whitening fitted on x [N, D] (thesis Sec. 4.2): returns (mean [1, D], proj [D, d]) with d = min(dim, D) such
    that (x - mean) @ proj has identity covariance: the top-d eigenvectors of the covariance, each divided by the
    square root of its eigenvalue. Eigenvalues below eps * the largest are clamped so that dead units do not blow up."""
    mean = x.mean(0, keepdim=True)
    xc = (x - mean).double()
    cov = xc.T @ xc / max(x.shape[0] - 1, 1)                        # [D, D] in float64 for a stable eigh
    evals, evecs = torch.linalg.eigh(cov)                           # ascending
    evals, evecs = evals.flip(0)[:dim], evecs.flip(1)[:, :dim]
    return mean, (evecs / evals.clamp_min(eps * evals[0]).sqrt()).to(x.dtype)


def whiten(x, mean, proj):
    """Descriptors for clustering: PCA-whitened, then L2-normalised rows. x [N, D] -> [N, d]."""
    return F.normalize((x - mean) @ proj, dim=1)


def nearest_two(x, x_sq, centroids, idx, rows):
    """For the points x[idx] (idx None: all): nearest centroid [M], distance to it [M] and to the second nearest [M]
    (not squared). ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, one matmul per chunk of `rows` points; ties go to the
    lower index."""
    c_sq = centroids.pow(2).sum(1)                                  # [k]
    labels, first, second = [], [], []
    for s in range(0, len(x) if idx is None else len(idx), rows):
        i = slice(s, s + rows) if idx is None else idx[s:s + rows]  # a slice copies nothing
        d2 = torch.addmm(c_sq, x[i], centroids.T, alpha=-2)        # [rows, k] = ||c||^2 - 2 x.c
        nearest, label = d2.min(1)
        d2.scatter_(1, label[:, None], float("inf"))
        labels.append(label)
        first.append(nearest + x_sq[i])
        second.append(d2.min(1).values + x_sq[i])
    return torch.cat(labels), torch.cat(first).clamp_min(0).sqrt(), torch.cat(second).clamp_min(0).sqrt()


def kmeans(x, k, iters=20, seed=0, chunk_rows=None):
    """Lloyd's k-means, the paper's Eq. (2). x: [N, D] float -> (assignment [N] int64, centroids [k, D], inertia after
    each assignment step, number of empty-cluster splits). The last inertia is that of the returned assignment.

    Init: x[torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:k]]. Then `iters` times: assign each
    point to its nearest centroid, move each centroid to the mean of its points; then a final assignment with the
    final centroids. Empty clusters (faiss' rule; thesis Sec. 3.2 "Joint optimization"): pick a non-empty cluster with
    probability proportional to (size - 1), copy its centroid and perturb both copies, coordinates times 1 +- 1/1024.

    The assignments are Lloyd's, but most points are not measured again (G. Hamerly, "Making k-means even faster",
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
    x_sq = x.pow(2).sum(1)                                          # [N]
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
        for ci in (counts == 0).nonzero().flatten().tolist():       # split clusters (faiss' rule)
            cj = int(torch.multinomial((counts - 1).clamp_min(0).double(), 1, generator=gen))
            centroids[ci] = centroids[cj] * (1 + sign / 1024)
            centroids[cj] = centroids[cj] * (1 - sign / 1024)
            counts[ci] = counts[cj] // 2  # assume an even split, as faiss does, for later draws
            counts[cj] -= counts[ci]
            splits += 1
        # Hamerly's bounds after the move; then measure only the points whose nearest centroid may have changed.
        drift = (centroids - previous).norm(dim=1)                  # [k]
        upper += drift[labels]
        if k > 1:
            top_drift, top_cluster = drift.topk(2)
            lower -= torch.where(labels == top_cluster[0], top_drift[1], top_drift[0])
        gaps = torch.cdist(centroids, centroids).fill_diagonal_(float("inf"))
        half_gap = gaps.min(1).values / 2  # [k]: a point nearer than this to its centroid is nearest to it
        todo = (upper >= torch.maximum(lower, half_gap[labels])).nonzero().squeeze(1)
        if len(todo) == n:                                          # (no structure in the data: every point again)
            labels, upper, lower = nearest_two(x, x_sq, centroids, None, rows)
        elif len(todo):
            labels[todo], upper[todo], lower[todo] = nearest_two(x, x_sq, centroids, todo, rows)
    history.append(inertia(*cluster_sums(labels), centroids))
    return labels, centroids, history, splits


def pic_graph(neighbor_idx, neighbor_dist, sigma=0.2):
    """Sparse affinity W = A + A^T with A_ij = exp(-d_ij / sigma^2) for j among the k-NN of i (thesis Eq. 4.1, with
    the reference code's Gaussian weights). neighbor_idx, neighbor_dist: [N, k] (self excluded, squared L2). Returns W
    as a float64 sparse CSR tensor [N, N] (an edge found in both directions carries a_ij + a_ji)."""
    n, k = neighbor_idx.shape
    dev = neighbor_idx.device
    rows = torch.arange(n, device=dev).repeat_interleave(k)         # [N*k]
    cols = neighbor_idx.reshape(-1)
    w = torch.exp(-neighbor_dist.double().reshape(-1) / sigma ** 2)
    key = torch.cat([rows * n + cols, cols * n + rows])             # [2Nk] edge (i, j) as i * N + j, both directions
    edges, inverse = torch.unique(key, return_inverse=True)         # sorted by row, then column
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
    score = W.values() * (v[cols] - v[rows])                        # [E]
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
    single = torch.bincount(labels)[labels] == 1                    # [N]
    s = single.nonzero().flatten()
    nbrs = neighbor_idx[s]                                          # [S, k]
    ok = ~single[nbrs]                                              # [S, k] neighbour belongs to a real cluster
    first = ok.int().argmax(1)                                      # first True (argmax returns the first maximum)
    has = ok.any(1)
    labels = labels.clone()
    labels[s[has]] = labels[nbrs[has, first[has]]]
    return compact(labels, len(labels))


def pic(neighbor_idx, neighbor_dist, sigma=0.2, alpha=0.001, max_iters=200, singletons=True):
    """Power Iteration Clustering on a k-NN graph (thesis Sec. 2.4, 4.6). neighbor_idx / neighbor_dist: [N, k],
    self excluded, sorted by squared L2 distance. Returns (labels [N] int64 in 0..K-1, info dict)."""
    device = neighbor_idx.device
    if device.type == "mps":                                        # no float64 / sparse kernels there
        neighbor_idx, neighbor_dist = neighbor_idx.cpu(), neighbor_dist.cpu()
    W = pic_graph(neighbor_idx, neighbor_dist, sigma)
    v, iters = pic_power_iteration(W, alpha, max_iters)
    roots = follow_pointers(pic_pointers(W, v))
    labels = compact(roots, len(roots))                             # clusters numbered in the order of their root
    num_singletons = int((torch.bincount(labels) == 1).sum())
    if singletons:
        labels = redistribute_singletons(labels, neighbor_idx)
    return labels.to(device), dict(power_iters=iters, singletons_before_redistribution=num_singletons)


def uniform_cluster_sample(labels, num_samples, gen=None):
    """Image indices for one epoch, uniform over non-empty clusters (thesis Sec. 3.3): every cluster gets
    ceil(num_samples / K) draws (its images in random order, then with replacement for small clusters), the draws
    are shuffled and cut to num_samples. Indices are into `labels` (original image order); labels < 0 are skipped."""
    valid = (labels >= 0).nonzero().flatten()
    lab = labels[valid].cpu()
    perm = torch.randperm(len(lab), generator=gen)
    order = perm[torch.sort(lab[perm], stable=True)[1]]             # grouped by cluster, random order inside one
    clusters, sizes = torch.unique(lab, return_counts=True)         # [K]
    per = math.ceil(num_samples / len(clusters))
    offsets = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(per).expand(len(clusters), per)             # [K, per]
    resample = (torch.rand(len(clusters), per, generator=gen) * sizes[:, None]).long()
    pos = torch.where(slot < sizes[:, None], slot, resample)
    picks = order[(offsets[:, None] + pos).flatten()]
    picks = picks[torch.randperm(len(picks), generator=gen)][:num_samples]
    return valid[picks.to(valid.device)]


# ---- 5. Evaluation ---------------------------------------------------------------------------------------------
TEMPERATURE = 0.1  # confidence of a k-means assignment: softmax over -squared distances / 0.1 (unit vectors)


@torch.no_grad()
def extract_features(model, images, mean, std, conv=False):
    """Features of all images (no augmentation, eval mode) in float32 even under bf16 autocast: PCA-whitening divides
    by the square roots of the smallest kept eigenvalues, which would amplify bf16's rounding (3 significant digits).
    uint8 [N, C, H, W] -> [N, hidden] before the last ReLU, or with conv=True the flattened conv features (what
    transfer evaluations probe). Under torchrun each rank computes a share and every rank gets all rows."""
    with torch.autocast("cuda" if images.is_cuda else "cpu", enabled=False):
        return predict(model.features if conv else model, images, mean, std)


def weighted_knn_acc(train_desc, train_labels, test_desc, test_labels, k=200, temperature=0.07):
    """Weighted k-NN classifier (votes exp(cos / T)), the usual monitor of feature quality; labels only to report.
    Every rank passes all points and computes a share of the search."""
    sim, idx = knn(test_desc, train_desc, k=min(k, len(train_desc)), metric="cosine", distributed=True)  # [M, k]
    votes = torch.zeros(len(test_desc), int(train_labels.max()) + 1, device=sim.device)
    votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
    return float((votes.argmax(1) == test_labels).float().mean())


def kmeans_evaluation(feats, target, classes, k, title, restarts=50, iters=20):
    """k-means with k clusters on the L2-normalised features, the lowest inertia of `restarts` runs (no labels used),
    scored against the labels (printed with the confusion table). 50 restarts, not 10: on Fashion-MNIST single runs
    on trained features range over 0.45-0.67 ACC, and the best of 10 still moved by up to 0.09 ACC with the seeds.
    Returns (row, probs [N, k], centroids [k, D])."""
    x = F.normalize(feats, dim=1)
    _, centroids, _, _ = min((kmeans(x, k, iters, seed=10_000 + r) for r in range(restarts)), key=lambda r: r[2][-1])
    probs = F.softmax(-torch.cdist(x, centroids).pow(2) / TEMPERATURE, dim=1)   # [N, k]; argmax: the nearest
    row, text = metrics.report(probs, target, classes, title)
    say(text)
    if (target >= 0).any():
        row["ratio_edge_intra_class"] = metrics.ratio_edge_intra_class(knn(x, k=10, metric="l2")[1], target)
    return row, probs, centroids


def final_evaluation(args, model, test):
    """k-means with k = --final-clusters (the number of classes) on the test split, on three feature sets of the final
    network: (1) the descriptors DeepCluster clusters (before the last ReLU; L2-normalised but not whitened:
    whitening to 256 dims gives noise directions the weight of the few class directions, which suits training's
    10x-overclustering but hurts a k = #classes clustering), (2) the same after the ReLU, i.e. the top layer's input,
    the only features the pseudo-label classifier reads (thesis Table 4.1 compares the two sides of this ReLU), and
    (3) the conv features. Every rank computes it alike (rank 0 writes). Returns (rows, probs [N, k] and centroids
    [k, hidden] of (2): the predictions and --predict's clusters)."""
    desc = extract_features(model, test.images, test.mean, test.std)
    conv = extract_features(model, test.images, test.mean, test.std, conv=True)
    rows, kept = [], None
    for name, feats in [("descriptors", desc), ("top_layer_input", F.relu(desc)), ("conv", conv)]:
        row, probs, centroids = kmeans_evaluation(feats, test.labels, test.classes, args.final_clusters,
                                                  f"final k-means on the {name} ({args.test_split})")
        rows.append({"stage": STAGE, "features": name, "clustering": args.clustering, "split": args.test_split,
                     "epochs": args.epochs, **row})
        kept = (probs, centroids) if name == "top_layer_input" else kept
    return rows, *kept


# ---- 6. Training: one stage, resumed from its checkpoint, saved after every epoch --------------------------------
# The settings the checkpoint depends on; one made with other values is refused, except --lr while the run is
# unfinished (the way to continue after a divergence). Each clustering adds its own settings.
CONFIG_KEYS = ["dataset", "train_split", "image_size", "subset", "arch", "no_sobel", "after_relu", "pca_dim",
               "clustering", "epochs", "epoch_images", "batch_size", "lr", "momentum", "weight_decay", "crop_min",
               "seed"]
METHOD_KEYS = {"kmeans": ["num_clusters", "kmeans_iters"],
               "pic": ["pic_neighbors", "pic_sigma", "pic_alpha", "pic_iters"]}
CHECKPOINT = STAGE + ".pt"
OWN_FILES = r"(deepcluster\.pt|results\.json|log\.jsonl|predictions\.csv|prototypes\.png|predict-.+\.(csv|png))" \
            r"(\.tmp|\.tmp\.png)?"


def config(args):
    return {k: getattr(args, k) for k in CONFIG_KEYS + METHOD_KEYS[args.clustering]}


def load(args, model=None, opt=None):
    """The checkpoint (or None), its weights and, while unfinished, its optimizer state loaded into model and opt."""
    return runtime.load_checkpoint(os.path.join(args.out_dir, CHECKPOINT), SCRIPT, STAGE, config(args),
                                   may_change=["lr"], model=model, opt=opt, lr=args.lr)


def save(args, row, **state):
    """End of an epoch (the losses were checked): log the row, save the checkpoint (rank 0 writes)."""
    runtime.log_row(args.out_dir, row)
    runtime.save_checkpoint(os.path.join(args.out_dir, CHECKPOINT), SCRIPT, STAGE, config(args), row=row,
                            epoch=row["epoch"], complete=row["epoch"] == args.epochs, **state)


def cluster(args, desc, epoch, graph):
    """This epoch's pseudo-labels: k-means (paper Eq. 2) or PIC on the whitened descriptors desc [n, d]. The k-NN graph
    (PIC's 5-NN and the 10-NN of the ratio edge intra-class; graph=False: neither is needed) is searched by all ranks
    together; the clustering runs on rank 0 and its labels are broadcast, since CUDA's atomic additions (index_add_)
    may round differently on each rank and every rank must train on the same labels.
    Returns (labels [n] in 0..K-1 on every rank, info (rank 0), 10-NN indices [n, 10] or None)."""
    dist, idx = knn(desc, k=max(10, args.pic_neighbors), metric="l2", distributed=True) if graph else (None, None)
    labels, info, t = torch.empty(len(desc), dtype=torch.long, device=desc.device), {}, time.time()
    if runtime.STATE["rank"] == 0 and args.clustering == "kmeans":
        labels, _, inertia, splits = kmeans(desc, args.num_clusters, args.kmeans_iters, args.seed * 100_003 + epoch)
        labels = compact(labels, args.num_clusters)
        info = dict(clustering_loss=inertia[-1] / len(desc), empty_cluster_splits=splits)
    elif runtime.STATE["rank"] == 0:
        k = args.pic_neighbors
        labels, info = pic(idx[:, :k], dist[:, :k], args.pic_sigma, args.pic_alpha, args.pic_iters)
    info["cluster_seconds"] = time.time() - t
    return runtime.broadcast(labels.contiguous()), info, None if idx is None else idx[:, :10]


def average_gradients(module):
    """The top layer lives outside DDP (a new one every epoch): average its gradients over the ranks as DDP does."""
    if runtime.STATE["world"] > 1:
        for p in module.parameters():
            torch.distributed.all_reduce(p.grad)
            p.grad /= runtime.STATE["world"]


def train_network(args, model, train, test):
    """The thesis' Algorithm 1 (Algorithm 2 with --epoch-images), from the checkpoint on. Returns the final state."""
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    ckpt = load(args, model, opt)
    start, E, previous = (ckpt["epoch"], args.epochs, ckpt["labels"]) if ckpt else (0, args.epochs, None)
    model, forward = runtime.wrap(model, args.device, args.compile)
    N, B = len(train.images), args.batch_size
    n = min(args.epoch_images or N, N)                              # images clustered and drawn per epoch
    lo, hi = runtime.shard(B)                                       # this rank's share of every global batch
    known, test_known = bool((train.labels >= 0).all()), bool((test.labels >= 0).all())  # labels: only to report
    progress = runtime.Progress(STAGE, (E - start) * (n // B), args.log_every)
    for epoch in range(start, E):
        generator, t0 = runtime.reseed(args.seed, STAGE, epoch), time.time()  # shuffle: the same on every rank
        # 1. descriptors: CNN features (fp32), PCA-whitened and L2-normalised (thesis Sec. 4.2)
        subset = torch.randperm(N, generator=generator)[:n].sort().values.to(args.device)
        feats = extract_features(model, train.images[subset], train.mean, train.std)
        feats = F.relu(feats) if args.after_relu else feats
        if not torch.isfinite(feats).all():
            raise UsageError(f"{STAGE}: the features became non-finite at epoch {epoch + 1}; "
                             + runtime.diverged_hint())
        pca = pca_whitening(feats, args.pca_dim)
        desc = whiten(feats, *pca)                                  # [n, pca_dim]
        # 2. cluster them; the pseudo-labels by original index (-1: an image outside this epoch's subset)
        labels, info, nn10 = cluster(args, desc, epoch + 1, graph=args.clustering == "pic" or known)
        full = torch.full((N,), -1, dtype=torch.long, device=args.device).index_copy_(0, subset, labels)
        sizes = torch.bincount(labels)
        row = {"stage": STAGE, "epoch": epoch + 1, "num_clusters": int((sizes > 0).sum()),
               "singletons": int((sizes == 1).sum()), "largest_cluster": int(sizes.max()), **info}
        if previous is not None:                                    # stability (paper Fig. 2), on images in both
            both = (full >= 0) & (previous.to(args.device) >= 0)
            row["nmi_prev"] = metrics.nmi(full[both], previous.to(args.device)[both])
        if known:                                                   # the quality of this epoch's features
            row["nmi_labels"] = metrics.nmi(labels, train.labels[subset])
            row["ratio_edge_intra_class"] = metrics.ratio_edge_intra_class(nn10, train.labels[subset])
            if test_known:
                test_feats = extract_features(model, test.images, test.mean, test.std)
                test_desc = whiten(F.relu(test_feats) if args.after_relu else test_feats, *pca)
                row["knn_acc"] = weighted_knn_acc(desc, train.labels[subset], test_desc, test.labels, args.monitor_k)
        # 3. train one epoch on the pseudo-labels with a new top layer (thesis Sec. 3.3), batches drawn uniformly
        #    over the clusters from the shared generator; rank r takes images [lo, hi) of each global batch (its
        #    BatchNorm normalises that share: no SyncBatchNorm)
        top = new_top_layer(model.feature_dim, len(sizes), generator).to(args.device)
        top_opt = torch.optim.SGD(top.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        order = uniform_cluster_sample(full, n, generator).to(args.device)
        model.train()
        losses, t_train = [], time.time()
        for step in range(n // B):
            idx = order[step * B + lo:step * B + hi]
            logits = top(F.relu(forward(augment(train.images[idx], train.mean, train.std, args.crop_min))))  # [b, K]
            loss = pseudo_label_loss(logits, full[idx])
            opt.zero_grad(set_to_none=True)
            top_opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(top)
            opt.step()
            top_opt.step()
            losses.append(loss.detach())                            # checked once per epoch: no per-step host sync
            progress.step(epoch, step, loss, B)
        losses = runtime.gather(torch.stack(losses)[None]).T       # [steps, ranks]: every rank stops alike
        runtime.check_losses(losses, STAGE, epoch + 1)
        for b in model.buffers():                                   # BatchNorm statistics: rank 0's on every rank
            runtime.broadcast(b)
        row.update(loss=losses.mean().item(), lr=args.lr, train_seconds=time.time() - t_train,
                   seconds=time.time() - t0)
        say(f"[{STAGE}] epoch {epoch + 1}/{E} " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in row.items() if k not in ("stage", "epoch")))
        previous = full.cpu()
        save(args, row, model=model.state_dict(), optimizer=opt.state_dict(), labels=previous)
    if ckpt is not None and start == E:
        return {k: ckpt[k] for k in ("model", "optimizer", "epoch", "labels", "row")}
    return dict(model=model.state_dict(), optimizer=opt.state_dict(), epoch=E, labels=previous,
                row=row if E > start else None)


# ---- 7. Outputs, --predict and main ------------------------------------------------------------------------------
def predict_files(args):
    """--predict PATH: the final network of the finished run in --out-dir applied to an image or a folder of images;
    each image goes to the nearest final k-means centroid of the top layer's input (L2-normalised)."""
    saved, final = runtime.finished_run(args.out_dir, SCRIPT)
    ckpt = runtime.load_checkpoint(os.path.join(args.out_dir, CHECKPOINT), SCRIPT, STAGE, {})
    if ckpt is None or "centroids" not in ckpt:
        raise UsageError(f"{args.out_dir} holds no finished {CHECKPOINT} with its k-means centroids; finish the run "
                         f"first, or point --out-dir at the folder of one.")
    model = DeepClusterNet(saved["arch"], final["channels"], not saved["no_sobel"])
    model.load_state_dict(ckpt["model"])
    images, files = data.load_image_files(args.predict, final["size"], final["channels"])
    x = F.normalize(F.relu(extract_features(model.to(args.device), images.to(args.device), final["mean"],
                                            final["std"])), dim=1)
    probs = F.softmax(-torch.cdist(x, ckpt["centroids"].to(args.device)).pow(2) / TEMPERATURE, dim=1)
    runtime.write_predictions(args, probs, images, files)


def run(argv=None):
    args = parse_args(argv)
    args.device = runtime.setup(args)
    if args.predict:
        runtime.take_out_dir(args.out_dir, SCRIPT, OWN_FILES, restart=False)
        return predict_files(args)
    train, test = load_data(args)
    check_args(args, train, test)
    runtime.take_out_dir(args.out_dir, SCRIPT, OWN_FILES, args.restart)
    load(args)                                                      # refuse a foreign checkpoint before any work
    say(f"deepcluster.py: {args.dataset} train {tuple(train.images.shape)} {args.test_split} "
        f"{tuple(test.images.shape)} {args.clustering} arch {args.arch} sobel {not args.no_sobel} device "
        f"{args.device} x {runtime.STATE['world']} epochs {args.epochs} out {args.out_dir}")
    t_start = time.time()
    runtime.reseed(args.seed, STAGE, -1)                            # the initial weights: always the same
    model = DeepClusterNet(args.arch, train.images.shape[1], not args.no_sobel).to(args.device)
    state = train_network(args, model, train, test)
    rows, probs, centroids = final_evaluation(args, model, test)
    runtime.save_checkpoint(os.path.join(args.out_dir, CHECKPOINT), SCRIPT, STAGE, config(args), **state,
                            complete=True, centroids=centroids.cpu())  # --predict's centroids
    final = {"stage": STAGE, "epochs": args.epochs, "features": "top_layer_input", "clusters": args.final_clusters,
             "channels": train.images.shape[1], "size": train.images.shape[-1], "mean": train.mean, "std": train.std}
    if runtime.STATE["rank"] == 0:
        labels = [int(y) if y >= 0 else "" for y in test.labels.tolist()]
        runtime.write_outputs(args.out_dir, probs, test.images, {"index": list(range(len(labels))), "label": labels},
                              "predictions.csv", "prototypes.png")
        results = {"script": SCRIPT, "dataset": args.dataset, "rows": rows, "final": final, "args": vars(args),
                   "seconds_this_run": time.time() - t_start}
        runtime.atomic_write(os.path.join(args.out_dir, "results.json"), json.dumps(results, indent=1) + "\n")
    say(f"done in {time.time() - t_start:.1f} s; outputs in {args.out_dir}")


if __name__ == "__main__":
    runtime.main(SCRIPT, run)
