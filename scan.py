"""scan.py: SCAN, learning to classify images without labels, end to end in one file.

  W. Van Gansbeke, S. Vandenhende, S. Georgoulis, M. Proesmans, L. Van Gool, "SCAN: Learning to Classify Images
  without Labels", ECCV 2020. https://arxiv.org/abs/2005.12320 (official code: wvangansbeke/Unsupervised-Classification)
  T. Chen, S. Kornblith, M. Norouzi, G. Hinton, "A Simple Framework for Contrastive Learning of Visual
  Representations" (SimCLR), ICML 2020. https://arxiv.org/abs/2002.05709
  B. Zhang, Y. Wang, W. Hou, H. Wu, J. Wang, M. Okumura, T. Shinozaki, "FlexMatch: Boosting Semi-Supervised Learning
  with Curriculum Pseudo Labeling", NeurIPS 2021. https://arxiv.org/abs/2110.08263 (per-cluster thresholds)

The paper's Algorithm 1, one stage per function below, each saved to --out-dir and skipped when complete:

  1. pretext    SimCLR: a backbone + MLP head learns to match two augmented views of an image (NT-Xent).
  2. mine       the K = 20 nearest neighbours of every image in that embedding (here: the backbone's features,
                PCA-whitened; --quick: and the raw pixels); the "pretext + k-means" baseline.
  3. scan       clustering heads trained with Eq. (2): an image and its neighbours should get the same cluster,
                and all clusters should be used.
  4. selflabel  fine-tune on the confident predictions (max prob > 0.99; on the small CNN lowered for clusters
                with few such, as FlexMatch does), seen through strong augmentation.

`--loss structured` swaps Eq. (2) for the structure-preserving loss of a SCAN reproduction (Eq. 3-8 there).

    python scan.py --dataset synthetic --quick              # the whole pipeline in about a minute on a CPU
    python scan.py --dataset cifar10 --device cuda          # the paper's settings
    torchrun --standalone --nproc_per_node 4 scan.py --dataset cifar10    # 4 GPUs, the same global batch
    python scan.py --predict photos/ --out-dir runs/scan-cifar10           # cluster new images with a finished run
"""
import signal
import sys

signal.signal(signal.SIGINT, lambda *_: sys.exit(130))  # Ctrl-C while torch loads (seconds): quietly, status 130

import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics
import runtime
from augment import normalize, simclr_augment, strong_augment
from knn import knn, search_space
from runtime import UsageError, at_least, batches, gather, predict, say

SCRIPT = "scan.py"

# ---- 1. Arguments ----------------------------------------------------------------------------------------------
# Overrides of the argparse defaults (the paper's cifar10 settings), applied in this order; an explicit flag wins.
PRESETS = {
    "cifar20": dict(scan_batch_size=512, scan_epochs=100),
    "stl10": dict(scan_epochs=100, selflabel_epochs=100, pretext_split="train+unlabeled"),
    # --quick: the SCAN stage is its warm-up alone (heads on fixed features): the network's epochs need more steps
    # than a quick run has to pay off. CHOICE: entropy weight 0.5, as SCAN's authors advise for imbalanced data: 5
    # and 2 split the large classes of imbalanced folders (SCAN below k-means); 0.5 costs a little on balanced ones
    # (RESULTS.md). Pretext batch None: runtime.batch_for, ~16 steps an epoch (256 left small folders untrained).
    # CHOICE: mine on the pixels too: six epochs' neighbours are less pure than the whitened pixels' (RESULTS.md).
    "quick": dict(arch="smallcnn", width=16, subset=4000, pretext_epochs=6, pretext_batch_size=None, pretext_lr=0.2,
                  scan_epochs=0, warmup_steps=2000, entropy_weight=0.5, selflabel_epochs=1, selflabel_batch_size=500,
                  mine_pixels=True, pretext_warmup=2),
    "quick-imagefolder": dict(image_size=32),
    # The CPU network's short schedules: NT-Xent at 0.2 gave purer neighbours than 0.1 on every data set measured
    # (RESULTS.md); 0.1 is the paper's for ResNet-18 and 500 epochs. SCAN batch 48 as SCAN's own MNIST config: at a
    # few epochs the steps count, and 48 beat 128 by far at equal time (RESULTS.md). Per-cluster thresholds: after a
    # short SCAN stage a cluster may hold no confident image, and self-labelling then loses it (RESULTS.md).
    "smallcnn": dict(temperature=0.2, scan_batch_size=48, threshold_rule="per-cluster"),
}


def parse_args(argv=None):
    p = runtime.parser(SCRIPT, "SCAN: SimCLR pretext -> mine neighbours -> SCAN clustering -> self-labelling.")
    a, pos, rate = p.add_argument, at_least(1), at_least(0.0, float)
    a("--dataset", default="cifar10", help="cifar10 | cifar20 | cifar100 | stl10 | fashion-mnist | mnist | "
      "imagefolder:PATH | synthetic")
    a("--data-root", default="./data", help="where datasets are found or downloaded to")
    a("--train-split", default="train", help="split clustered (mine, scan, selflabel)")
    a("--pretext-split", default=None, help="split of the pretext (default: --train-split; stl10: train+unlabeled)")
    a("--test-split", default="test", help="split evaluated after each stage")
    a("--image-size", type=int, default=None, help="resize images to this square size (image folders: 64)")
    a("--subset", type=at_least(2), default=None, help="train on a random subset of this many images")
    a("--out-dir", default=None, help="output folder (default: runs/scan-DATASET)")
    a("--arch", default="resnet18", choices=["resnet18", "smallcnn"], help="ResNet-18 (CIFAR stem) or a small CNN")
    a("--width", type=pos, default=32, help="smallcnn: channels of the first stage (doubled at each stage)")
    a("--num-clusters", type=at_least(2), default=None, help="clusters (default: the classes; more: overclustering)")
    a("--num-heads", type=pos, default=1, help="heads trained at once, the lowest-loss one kept (SCAN's configs: 1)")
    a("--num-neighbors", type=pos, default=20, help="K neighbours mined per image")
    a("--mine-features", default="backbone", choices=["backbone", "projection", "middle"],
      help="search space (SCAN: projection; middle: the 2nd stage on a 7x7 grid, square-rooted)")
    a("--no-whiten", dest="whiten", action="store_false", help="mine as SCAN does: no PCA whitening of those features")
    a("--mine-pixels", action=argparse.BooleanOptionalAction, default=False, help="also mine on the pixels (--quick)")
    a("--pretext-epochs", type=pos, default=500, help="SimCLR epochs")
    a("--pretext-batch-size", type=pos, default=512, help="SimCLR batch (--quick: ~16 steps an epoch)")
    a("--pretext-lr", type=rate, default=0.4, help="SimCLR SGD learning rate, cosine decay to lr * 0.1^3")
    a("--pretext-warmup", type=at_least(0), default=0, help="epochs of linear warm-up (SCAN's configs: 0; --quick: 2)")
    a("--temperature", type=at_least(1e-3, float), default=0.1,
      help="NT-Xent temperature (default: 0.1; --arch smallcnn: 0.2)")
    a("--crop-min", type=at_least(0.01, float), default=0.2, help="SimCLR crops: smallest area fraction (<= 1)")
    a("--scan-epochs", type=at_least(0), default=50, help="SCAN epochs (after the warm-up)")
    a("--scan-batch-size", type=pos, default=128, help="SCAN batch: anchors, as many neighbours (--arch smallcnn: 48)")
    a("--scan-lr", type=rate, default=1e-4, help="SCAN Adam learning rate")
    a("--warmup-steps", type=at_least(0), default=2000, help="SCAN: steps training the heads alone first (Adam 1e-3)")
    a("--entropy-weight", type=rate, default=5.0, help="Eq. (2)'s lambda, lower for imbalanced classes (--quick: 0.5)")
    a("--update-head-only", action="store_true", help="SCAN: freeze the backbone, train the heads only")
    a("--loss", default="scan", choices=["scan", "structured"], help="SCAN's Eq. (2) or the structured loss")
    a("--tau-c", type=at_least(1e-3, float), default=8.0, help="structured: neighbour weights' temperature, Eq. (5)")
    a("--tau-cc", type=at_least(1e-3, float), default=1.0, help="structured: cluster contrast temperature, Eq. (6)")
    a("--eta-cc", type=rate, default=1.0, help="structured: weight of the cluster-level contrast, Eq. (3)")
    a("--lambda-b", type=rate, default=5.0, help="structured: weight of the negative entropy, Eq. (3)")
    a("--selflabel-epochs", type=at_least(0), default=200, help="self-labelling epochs (0 skips the stage)")
    a("--selflabel-batch-size", type=pos, default=1000, help="self-labelling batch")
    a("--selflabel-lr", type=rate, default=1e-4, help="self-labelling Adam learning rate")
    a("--confidence-threshold", type=rate, default=0.99, help="self-labelling: min max-probability of a label (< 1)")
    a("--threshold-rule", default="fixed", choices=["fixed", "per-cluster"], help="self-labelling: SCAN's one "
      "threshold, or lower ones for clusters with few confident images (FlexMatch; --arch smallcnn's default)")
    a("--weight-decay", type=rate, default=1e-4, help="weight decay of every stage (SGD, then Adam)")
    a("--pixel-check", type=at_least(0), default=5000, help="this many images' neighbours vs the pixels' own (0: skip)")
    a("--predict", default=None, metavar="PATH", help="apply the finished run in --out-dir to an image or a folder "
      "of images: writes predict-NAME.csv and .png there, no training")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    a("--compile", action="store_true", help="torch.compile the network")
    a("--deterministic", action="store_true", help="CUDA: deterministic kernels, no cuDNN benchmark (slower)")
    a("--threads", type=pos, default=None, help="CPU threads (default: torch's choice)")
    a("--seed", type=int, default=0, help="random seed: same seed, same device, same results")
    a("--quick", action="store_true", help="small CNN, 4000 images, 6 pretext epochs, the heads' warm-up, 1 "
      "self-labelling epoch: the pipeline in a minute or two")
    a("--restart", action="store_true", help="delete this script's files in --out-dir and start over")
    a("--log-every", type=rate, default=5.0, help="seconds between progress lines")
    base = lambda args: args.dataset.split(":")[0]
    def presets(args):  # a generator: each preset sees the ones applied before it (--quick sets the arch)
        yield PRESETS.get(base(args), {})
        yield PRESETS["quick"] if args.quick else {}
        yield PRESETS["quick-imagefolder"] if args.quick and base(args) == "imagefolder" else {}
        yield PRESETS["smallcnn"] if args.arch == "smallcnn" else {}
    args = runtime.parse_args(p, argv, presets)
    args.pretext_split = args.pretext_split or args.train_split
    args.out_dir = args.out_dir or os.path.join("runs", "scan-" + base(args))
    return args


def check_args(args, n_train):
    """The checks that need the data: cluster and neighbour counts, batches split evenly over the processes."""
    world = runtime.STATE["world"]
    for bad, message in [
            (args.num_clusters > n_train, f"--num-clusters {args.num_clusters} is more than the {n_train} images"),
            (args.num_neighbors >= n_train, f"--num-neighbors must be below the {n_train} images"),
            (args.crop_min > 1 or args.confidence_threshold >= 1, "--crop-min and --confidence-threshold must be < 1"),
            (args.scan_epochs + args.warmup_steps == 0, "--scan-epochs and --warmup-steps cannot both be 0"),
            *[(getattr(args, k) % world, f"--{k.replace('_', '-')} must be divisible by the {world} processes")
              for k in ["pretext_batch_size", "scan_batch_size", "selflabel_batch_size"]]]:
        if bad:
            raise UsageError(message + ".")


# ---- 2. Data + augmentation: uint8 batches [B, C, H, W] in, normalised float out; random parameters per image ----
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


# ---- 3. Model --------------------------------------------------------------------------------------------------
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


# ---- 4. Losses: plain functions of tensors. Under torchrun they get the gathered global batch. ---------------------
def nt_xent(z1, z2, temperature=0.1):
    """SimCLR's NT-Xent (SimCLR Eq. 1), the mean over all 2B anchors. z1, z2: [B, D] L2-normalised views; for anchor
    z_i the other view of the same image is the positive, the other 2B - 2 views are the negatives."""
    B = z1.shape[0]
    z = torch.cat([z1, z2])                                                    # [2B, D]
    sim = (z @ z.t() / temperature).fill_diagonal_(float("-inf"))              # [2B, 2B], k != i
    positive = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)
    return F.cross_entropy(sim, positive)


def scan_loss(anchor_logits, neighbor_logits, entropy_weight=5.0):
    """SCAN Eq. (2): -mean_i log <p(x_i), p(x_j)> - entropy_weight * H(mean_i p(x_i)), where row i of
    neighbor_logits is one neighbour x_j of anchor x_i. Logits [..., B, K]: leading dims (heads) give a loss each.
    Returns (total, consistency, entropy), each [...]. log <p, q> = logsumexp(log p + log q): exact and stable."""
    log_pa, log_pn = F.log_softmax(anchor_logits, -1), F.log_softmax(neighbor_logits, -1)   # [..., B, K]
    consistency = -torch.logsumexp(log_pa + log_pn, dim=-1).mean(-1)
    mean_p = log_pa.exp().mean(-2)                                             # [..., K]
    entropy = -(mean_p * torch.log(mean_p.clamp(min=1e-8))).sum(-1)
    return consistency - entropy_weight * entropy, consistency, entropy


def structured_loss(anchor_logits, neighbor_logits, anchor_z, neighbor_z, tau_c=8.0, tau_cc=1.0, eta_cc=1.0,
                    lambda_b=5.0):
    """The reproduction's structure-preserving loss, Eq. (3)-(8): Eq. (2)'s consistency weighted by the pretext
    similarity of the pair, a cluster-level contrastive term and the negative entropy.
    anchor_logits, neighbor_logits [..., B, c] (leading dims: heads); anchor_z, neighbor_z [B, d]: L2-normalised
    pretext embeddings (fixed). Readings where the paper is vague: sums over i are means over the batch (as SCAN);
    gamma_ij of Eq. (6) is 1; Eq. (6)'s denominator excludes j = l as written; the cluster vectors p_l are
    L2-normalised (cosine similarity, as in Contrastive Clustering, where the term comes from): raw columns scale
    with the batch size and swamp the entropy term. Returns (total, consistency, cluster_contrast, neg_entropy)."""
    log_qa, log_qb = F.log_softmax(anchor_logits, -1), F.log_softmax(neighbor_logits, -1)   # [..., B, c]
    w = torch.exp((anchor_z * neighbor_z).sum(1) / tau_c)                      # Eq. (5): w_ij [B]
    consistency = -(w * torch.logsumexp(log_qa + log_qb, dim=-1)).mean(-1)     # Eq. (4)
    c = anchor_logits.shape[-1]
    pa, pb = (F.normalize(q.exp().transpose(-1, -2), dim=-1) for q in (log_qa, log_qb))   # clusters [..., c, B]
    eye = torch.eye(c, dtype=torch.bool, device=pa.device)

    def l_cc(p, q):                                                            # Eq. (6): cluster l of a vs l of b
        s = p @ q.transpose(-1, -2) / tau_cc                                   # [..., c, c]
        return -(s.diagonal(dim1=-2, dim2=-1) - torch.logsumexp(s.masked_fill(eye, float("-inf")), -1)).sum(-1)
    cluster_contrast = (l_cc(pa, pb) + l_cc(pb, pa)) / (2 * c)                 # Eq. (7), one batch
    mean_q = log_qa.exp().mean(-2)                                             # [..., c]
    neg_entropy = (mean_q * torch.log(mean_q.clamp(min=1e-8))).sum(-1)         # Eq. (8)
    return consistency + eta_cc * cluster_contrast + lambda_b * neg_entropy, consistency, cluster_contrast, neg_entropy


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


def weighted_knn_acc(train_z, train_y, test_z, test_y, k=200, t=0.07):
    """The usual SimCLR monitor: a weighted k-NN classifier on L2-normalised features (labels only to report)."""
    scores, idx = knn(test_z, train_z, k=min(k, len(train_z) - 1), exclude_self=False)
    votes = torch.zeros(len(test_z), int(train_y.max()) + 1, device=test_z.device)
    return (votes.scatter_add_(1, train_y[idx], torch.exp(scores / t)).argmax(1) == test_y).float().mean().item()


def evaluate(probs, labels, classes, title):
    """ACC / NMI / ARI / top-5 (+ overclustering ACC when K > classes) of probs [N, K], the confusion table printed."""
    res, text = metrics.report(probs, labels, classes, title)
    say(text)
    return res


# ---- 6. Training stages: each one resumes from its checkpoint, trains its epochs, saves after every epoch ---------
# The settings each stage depends on; a checkpoint made with other values is refused (learning rates may change
# while a stage is unfinished: the way to continue after a divergence).
STAGE_KEYS = {
    "pretext": ["dataset", "pretext_split", "image_size", "arch", "width", "seed", "pretext_epochs",
                "pretext_batch_size", "pretext_lr", "pretext_warmup", "weight_decay", "temperature", "crop_min"],
    "mine": ["train_split", "subset", "num_neighbors", "mine_features", "whiten", "mine_pixels"],
    "scan": ["num_clusters", "num_heads", "scan_epochs", "scan_batch_size", "scan_lr", "warmup_steps",
             "entropy_weight", "update_head_only", "loss", "tau_c", "tau_cc", "eta_cc", "lambda_b"],
    "selflabel": ["selflabel_epochs", "selflabel_batch_size", "selflabel_lr", "confidence_threshold",
                  "threshold_rule"],
}
STAGES = list(STAGE_KEYS)
OWN_FILES = r"(pretext|mine|scan|selflabel)\.pt(\.tmp)?|(results\.json|log\.jsonl|predictions\.csv|prototypes\.png" \
            r"|predict-.+\.(csv|png))(\.tmp)?"


def stage_config(args, stage):  # this stage's settings and those of every stage before it
    return {k: getattr(args, k) for s in STAGES[:STAGES.index(stage) + 1] for k in STAGE_KEYS[s]}


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


def train_pretext(args, pretext, test):
    """Step 1, SimCLR: SGD with momentum, cosine learning rate, NT-Xent over the two views of the global batch."""
    runtime.reseed(args.seed, "pretext", -1)                                   # initial weights: always the same
    maxpool = args.dataset.startswith("stl10")
    model = ContrastiveModel(make_backbone(args.arch, pretext.images.shape[1], args.width, maxpool)).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=args.pretext_lr, momentum=0.9, weight_decay=args.weight_decay)
    ckpt = load(args, "pretext", model, opt)
    start, E = (ckpt["epoch"] if ckpt else 0), args.pretext_epochs
    model, forward = runtime.wrap(model, args.device, args.compile)
    B, monitor_every = args.pretext_batch_size, max(5, E // 10)   # k-NN monitor: a pass over train + test, <= 10 x
    progress = runtime.Progress("pretext", (E - start) * (len(pretext.images) // B), args.log_every)
    for epoch in range(start, E):
        generator, t0, losses = runtime.reseed(args.seed, "pretext", epoch), time.time(), []
        lr = args.pretext_lr * (1e-3 + (1 - 1e-3) * (1 + math.cos(math.pi * epoch / E)) / 2)  # to lr * 0.1^3
        model.train()
        epoch_batches = batches(len(pretext.images), B, generator, args.device)
        for step, idx in enumerate(epoch_batches):
            # CHOICE: SimCLR's linear warm-up (10 epochs in its paper, none in SCAN's configs, --quick 2 of 6): a few
            # steps at the full rate can collapse a small network, one epoch left a seed stalled (RESULTS.md)
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (epoch + (step + 1) / len(epoch_batches)) / max(args.pretext_warmup, 1e-9))
            x = pretext.images[idx]                                            # this rank's images [b, C, H, W]
            z = forward(torch.cat([simclr_augment(x, pretext.mean, pretext.std, args.crop_min) for _ in range(2)]))
            loss = nt_xent(gather(z[:len(idx)], grad=True), gather(z[len(idx):], grad=True), args.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            progress.step(epoch, step, loss, 2 * B)
        row = {"stage": "pretext", "epoch": epoch + 1, "loss": torch.stack(losses).mean().item(), "lr": lr,
               "seconds": time.time() - t0, "images_per_s": 2 * B * len(losses) / (time.time() - t0)}
        monitor = lambda: {"knn_acc": weighted_knn_acc(predict(model, pretext.images, pretext.mean, pretext.std),
                                                       pretext.labels, predict(model, test.images, test.mean, test.std),
                                                       test.labels)}
        due = ((epoch + 1) % monitor_every == 0 or epoch + 1 == E) and (pretext.labels >= 0).all() and \
            (test.labels >= 0).all()
        save(args, "pretext", model, opt, losses, row, E, monitor if due else None)   # stops if anything diverged
        say(f"[pretext] epoch {epoch + 1}/{E} loss {row['loss']:.4f} lr {lr:.4g} {row['images_per_s']:.0f} img/s"
            + (f" knn_acc {row['knn_acc']:.4f}" if "knn_acc" in row else ""))
        if epoch + 1 == E:                                                     # label-free: NT-Xent at its maximum
            runtime.warn_if_collapsed("pretext", row["loss"], B)
    return model


def mine(args, model, train, test):
    """Step 2: the K nearest neighbours of every train image (no augmentation), the comparison with the raw pixels' own
    neighbours, and the "pretext + k-means" rows of SCAN's Table 1 on the projection and on the backbone features (both
    L2-normalised, fit on train, scored on test). CHOICE: SCAN mines in the projection space; --mine-features backbone
    (the default) mines in the backbone's, where the heads work and where the neighbours measured purer at our budgets,
    and PCA-whitens them first (knn.search_space; --no-whiten: SCAN's plain cosine), which made the neighbours purer on
    every data set measured (RESULTS.md). --mine-features middle: middle_features, a finer map than the last stage's
    2x2. --mine-pixels searches the features and the raw pixels, whitened alike, together (the mean of the two cosines):
    --quick's 6-epoch pretext neighbours measured less pure than the pixels' on grayscale folders, the mix level with
    the pixels or below; on textures, where the pixels know little, a little less pure than the pretext's (RESULTS.md).
    The k-means rows stay on the L2-normalised features. Returns (neighbor_idx [N, K], rows, the mined space's train
    features [N, d], the L2-normalised train features of the backbone and the projection: the warm-up's k-means)."""
    feats = {name: [F.normalize(predict(net, d.images, d.mean, d.std), dim=1) for d in (train, test)]   # [N, d]
             for name, net in [("projection", model), ("backbone", model.backbone)]}   # train, test; L2-normalised
    z = feats[args.mine_features][0] if args.mine_features in feats else \
        F.normalize(middle_features(model.backbone, train.images, train.mean, train.std), dim=1)
    pixels = data.pixel_vectors(train.images) if args.mine_pixels or args.pixel_check else None   # [N, C * h * w]
    search_z = search_space(z, pixels if args.mine_pixels else None, args.whiten)  # CHOICE (not in SCAN): docstring
    train_z = search_z[:, :z.shape[1]] * (2 ** 0.5 if args.mine_pixels else 1)    # the features' part, unit rows
    start_feats = [feats["backbone"][0], feats["projection"][0]]              # [N, d] each
    ckpt = load(args, "mine")
    if ckpt is not None:
        return ckpt["neighbor_idx"].to(args.device), ckpt["rows"], train_z, start_feats
    _, neighbor_idx = knn(search_z, k=args.num_neighbors, distributed=True)   # [N, K]
    anchors = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(args.seed))[:args.pixel_check]
    info, lines = {}, []
    if args.pixel_check > 0:  # the pixels searched as the features are (whitened alike), not by their plain cosine
        pixel_z = search_z[:, z.shape[1]:] * 2 ** 0.5 if args.mine_pixels else search_space(pixels, None, args.whiten)
        info, lines = metrics.pixel_check(neighbor_idx, pixel_z, train.labels, anchors,
                                          train_z if args.mine_pixels else None)
    for line in lines:
        say(f"[mine] {line}")
    rows = []
    for name, (fit_z, test_z) in feats.items():                                # L2-normalised, not whitened
        _, centroids = kmeans(fit_z, args.num_clusters, seed=args.seed)
        probs = F.one_hot(torch.cdist(test_z, centroids).argmin(1), args.num_clusters).float()
        rows.append({"stage": "pretext+kmeans", "features": name, **info,
                     **evaluate(probs, test.labels, test.classes, f"pretext + k-means ({name})")})
    runtime.log_row(args.out_dir, {"stage": "mine", **info})
    runtime.save_checkpoint(os.path.join(args.out_dir, "mine.pt"), SCRIPT, "mine", stage_config(args, "mine"),
                            neighbor_idx=neighbor_idx.cpu(), rows=rows, complete=True)
    return neighbor_idx, rows, train_z, start_feats


def clustering_loss(args, anchor_logits, neighbor_logits, anchor_z=None, neighbor_z=None):
    """Eq. (2) (--loss scan) or the structured loss, per head: logits [H, B, C] -> [H]."""
    if args.loss == "scan":
        return scan_loss(anchor_logits, neighbor_logits, args.entropy_weight)[0]
    return structured_loss(anchor_logits, neighbor_logits, anchor_z, neighbor_z, args.tau_c, args.tau_cc,
                           args.eta_cc, args.lambda_b)[0]


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


# ---- 7. Outputs, --predict and main ------------------------------------------------------------------------------
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
    for stage in STAGES:                                                       # refuse a foreign checkpoint early
        load(args, stage)
    say(f"scan.py: {args.dataset} train {tuple(train.images.shape)} test {tuple(test.images.shape)} arch {args.arch} "
        f"device {args.device} x {runtime.STATE['world']} clusters {args.num_clusters} out {args.out_dir}")
    t_start = time.time()
    pretext_model = train_pretext(args, pretext, test)
    neighbor_idx, rows, train_z, start_feats = mine(args, pretext_model, train, test)   # train_z: structured's z
    runtime.reseed(args.seed, "scan", -1)                                      # the heads' initial weights
    model = ClusteringModel(pretext_model.backbone, args.num_clusters, args.num_heads)
    model, head = train_scan(args, "scan", model, neighbor_idx, train_z if args.loss == "structured" else None,
                             start_feats, train, test)
    probs = predict(model, test.images, test.mean, test.std)[head].softmax(1)
    rows.append({"stage": "scan", "head": head, **evaluate(probs, test.labels, test.classes, f"SCAN (head {head})")})
    final = {"stage": "scan", "head": head, "heads": args.num_heads}
    if args.selflabel_epochs > 0:
        model = train_selflabel(args, "selflabel", model, head, train, test)
        probs = predict(model, test.images, test.mean, test.std)[0].softmax(1)
        rows.append({"stage": "selflabel", **evaluate(probs, test.labels, test.classes, "self-label")})
        final = {"stage": "selflabel", "head": 0, "heads": 1}
    final.update(channels=train.images.shape[1], size=train.images.shape[-1], mean=train.mean, std=train.std)
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
