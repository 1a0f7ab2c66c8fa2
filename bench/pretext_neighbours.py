"""Which SimCLR pretext gives SCAN the purest neighbours: the NT-Xent temperature and the small CNN's final pooling.

scan.py's CPU network ("smallcnn") ends with a 2x2 adaptive average pool (32w-d features) and its preset sets the
NT-Xent temperature to 0.2; the previous design pooled globally (1x1, 8w-d) and used the paper's 0.1. This script
trains scan.py's pretext as scan.train_pretext does (scan.ContrastiveModel, augment.simclr_augment, scan.nt_xent; SGD,
momentum 0.9, weight decay 1e-4, lr 0.4 * batch / 512 with a cosine decay to lr * 1e-3, the same seeding) for each
configuration TEMPERATURE:POOL given, then measures on the un-augmented train images:
  - neighbour accuracy: the share of each image's top-5 / top-20 cosine neighbours (knn.knn) with its label, on the
    L2-normalised 128-d projection, on the L2-normalised backbone features and on these PCA-whitened
    (knn.whitening: scan.py mines on the last unless --no-whiten);
  - k-means ACC: scan.kmeans (k = classes, the run's seed) fit on the train features, test images assigned to the
    nearest centroid, scored by metrics.cluster_acc (scan.py's "pretext + k-means" rows);
and the same for the raw pixels (cosine; images above 32 px resized to 32, as scan.py's pixel check), the baseline,
with the neighbour accuracy of the whitened pixels beside it (whitening is no privilege of the pretext).
Labels are used only to score. An image folder without train/ and test/ sub-folders is its own test split.

    python bench/pretext_neighbours.py --dataset imagefolder:/tmp/digits --image-size 32 --epochs 100 \\
        --batch-size 512 --configs "0.1:1,0.2:1,0.2:2" --seed 0 1 2
    python bench/pretext_neighbours.py --dataset fashion-mnist --subset 10000 --epochs 10 --configs "0.1:1,0.2:2"

--width and --ceil-pool (the last max-pool rounding up: on 28 px images the last stage sees a 4x4 map, not 3x3)
change the network, for the screens toward a purer pretext (RESULTS.md); scan.py's network is the default.

Several seeds in one call: a row per seed and configuration, then mean +- std (sample std over seeds) per
configuration. A configuration's numbers do not depend on the others given in the same call (each is reseeded).
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data
import metrics
import runtime
import scan
from augment import simclr_augment
from knn import knn, whitening
from runtime import predict

COLUMNS = ["proj top-5", "proj top-20", "backbone top-5", "backbone top-20", "whitened top-5", "whitened top-20",
           "k-means ACC proj", "k-means ACC backbone"]


def parse_configs(text):
    """ "0.1:1,0.2:2" -> [(0.1, 1), (0.2, 2)]: (temperature, pool) pairs."""
    configs = []
    for item in text.split(","):
        t, _, pool = item.strip().partition(":")
        if not pool or int(pool) not in (1, 2) or float(t) <= 0:
            raise argparse.ArgumentTypeError(f"bad configuration {item!r}: TEMPERATURE:POOL, POOL 1 or 2")
        configs.append((float(t), int(pool)))
    return configs


def make_backbone(channels, width, pool, ceil_pool=False):
    """scan.make_backbone("smallcnn") with its final adaptive average pool set to pool x pool (out_dim accordingly);
    ceil_pool: its last max-pool rounds up (28 px images: the last stage at 4x4, keeping the 7x7 map's last row and
    column, which scan.py's pool drops; no change where the side is divisible by 8)."""
    net = scan.make_backbone("smallcnn", channels, width)
    [m for m in net if isinstance(m, nn.MaxPool2d)][-1].ceil_mode = ceil_pool
    assert isinstance(net[-2], nn.AdaptiveAvgPool2d) and net[-2].output_size == 2, "scan.make_backbone changed"
    net[-2] = nn.AdaptiveAvgPool2d(pool)
    net.out_dim = net.out_dim // 4 * pool * pool
    return net


def train_pretext(args, train, temperature, pool, seed):
    """scan.train_pretext's loop, without checkpoints. Returns (model, mean loss of the last epoch)."""
    runtime.reseed(seed, "pretext", -1)                                        # initial weights, as scan.py
    model = scan.ContrastiveModel(make_backbone(train.images.shape[1], args.width, pool, args.ceil_pool))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    model, forward = runtime.wrap(model, "cpu")
    E, loss_mean = args.epochs, float("nan")
    for epoch in range(E):
        generator = runtime.reseed(seed, "pretext", epoch)
        for group in opt.param_groups:                                         # cosine to lr * 1e-3
            group["lr"] = args.lr * (1e-3 + (1 - 1e-3) * (1 + math.cos(math.pi * epoch / E)) / 2)
        model.train()
        losses = []
        for idx in runtime.batches(len(train.images), args.batch_size, generator, "cpu"):
            x = train.images[idx]
            z = forward(torch.cat([simclr_augment(x, train.mean, train.std, args.crop_min) for _ in range(2)]))
            loss = scan.nt_xent(z[:len(idx)], z[len(idx):], temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        loss_mean = torch.stack(losses).mean().item()
        if not math.isfinite(loss_mean):
            sys.exit(f"T={temperature} pool={pool} seed {seed}: the loss became non-finite at epoch {epoch + 1}")
    return model, loss_mean


def measure(train_z, test_z, train, test, num_clusters, seed):
    """L2-normalised features -> (top-5, top-20 neighbour accuracy on train, k-means ACC: fit on train, test scored;
    None without test_z)."""
    _, idx = knn(train_z, k=20, metric="cosine", exclude_self=True)
    top5, top20 = (metrics.neighbor_acc(idx[:, :k], train.labels) for k in (5, 20))
    if test_z is None:
        return top5, top20, None
    _, centroids = scan.kmeans(train_z, num_clusters, seed=seed)
    return top5, top20, metrics.cluster_acc(torch.cdist(test_z, centroids).argmin(1), test.labels)


def pixels(d):  # the raw pixels as scan.py's pixel check sees them, L2-normalised [N, C*H*W]
    images = d.images if d.images.shape[-1] <= 32 else data.resize(d.images, 32)
    return F.normalize(images.flatten(1).float(), dim=1)


def mean_std(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", help="as scan.py: fashion-mnist, synthetic, "
                   "imagefolder:PATH, ...")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--image-size", type=int, default=None, help="resize to this square size (as scan.py)")
    p.add_argument("--subset", type=int, default=None, help="a random subset of the train split (as scan.py)")
    p.add_argument("--test-subset", type=int, default=None, help="the first N test images only (default: all)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default 0.4 * batch / 512)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--crop-min", type=float, default=0.2, help="SimCLR crops' smallest area fraction, as scan.py")
    p.add_argument("--temperature", type=float, default=0.2, help="with --pool: one configuration (if no --configs)")
    p.add_argument("--pool", type=int, default=2, choices=[1, 2], help="final adaptive pool: 2 (scan.py) or 1 "
                   "(global, the previous design)")
    p.add_argument("--configs", type=parse_configs, default=None, help='TEMPERATURE:POOL,... e.g. "0.1:1,0.2:1,0.2:2"')
    p.add_argument("--width", type=int, default=16, help="smallcnn width (16: scan.py --quick)")
    p.add_argument("--ceil-pool", action="store_true", help="the last max-pool rounds up (not scan.py's design)")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (subset, weights, k-means)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    configs = args.configs or [(args.temperature, args.pool)]
    args.lr = 0.4 * args.batch_size / 512 if args.lr is None else args.lr
    kept = runtime.keep_freed_memory()                                         # what runtime.setup() does
    torch.set_num_threads(args.threads)
    t_start = time.time()
    load = lambda split: data.load_dataset(args.dataset, args.data_root, split, image_size=args.image_size)
    full_train, test = load("train"), load("test")
    if args.test_subset is not None:
        test = test._replace(images=test.images[:args.test_subset], labels=test.labels[:args.test_subset])
    num_clusters = len(full_train.classes)
    print(f"{args.dataset}: train {tuple(full_train.images.shape)}{f' subset {args.subset}' if args.subset else ''}, "
          f"test {tuple(test.images.shape)}, {num_clusters} classes; smallcnn width {args.width}"
          f"{' (ceil pool)' if args.ceil_pool else ''}, {args.epochs} "
          f"epochs, batch {args.batch_size}, lr {args.lr:g}, threads {args.threads}, torch {torch.__version__}, "
          f"keep_freed_memory {'on' if kept else 'off'}", flush=True)
    results, pixel_results = {}, []                                            # (T, pool) -> [[6 values] per seed]
    for seed in args.seed:
        train = full_train
        if args.subset is not None and args.subset < len(train.images):        # scan.load_data's subset
            keep = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(seed))[:args.subset]
            train = train._replace(images=train.images[keep], labels=train.labels[keep])
        pixel_results.append(measure(pixels(train), pixels(test), train, test, num_clusters, seed))
        pixel_results[-1] += measure(whitening(pixels(train))(pixels(train)), None, train, test, 0, seed)[:2]
        print(f"\nseed {seed}: raw pixels ({pixels(test).shape[1]}-d, cosine): neighbour accuracy top-5 "
              f"{pixel_results[-1][0]:.3f}, top-20 {pixel_results[-1][1]:.3f}; k-means ACC {pixel_results[-1][2]:.3f}; "
              f"whitened: top-5 {pixel_results[-1][3]:.3f}, top-20 {pixel_results[-1][4]:.3f}")
        print("\n| seed | temperature | pool | backbone dim | " + " | ".join(COLUMNS) + " | last epoch's loss | "
              "pretext s | eval s |")
        print("|---:|---:|---:|---:|" + "---:|" * len(COLUMNS) + "---:|---:|---:|", flush=True)
        for temperature, pool in configs:
            t0 = time.time()
            model, loss = train_pretext(args, train, temperature, pool, seed)
            t1 = time.time()
            feats = {name: [F.normalize(predict(net, d.images, d.mean, d.std), dim=1) for d in (train, test)]
                     for name, net in [("proj", model), ("backbone", model.backbone)]}
            proj, backbone = (measure(*feats[name], train, test, num_clusters, seed) for name in ("proj", "backbone"))
            white = measure(whitening(feats["backbone"][0])(feats["backbone"][0]), None, train, test, 0, seed)
            row = [proj[0], proj[1], backbone[0], backbone[1], white[0], white[1], proj[2], backbone[2]]
            results.setdefault((temperature, pool), []).append(row)
            print(f"| {seed} | {temperature:g} | {pool}x{pool} | {model.backbone.out_dim} | "
                  + " | ".join(f"{v:.3f}" for v in row) + f" | {loss:.3f} | {t1 - t0:.0f} | {time.time() - t1:.0f} |",
                  flush=True)
    if len(args.seed) > 1:
        print(f"\nmean ± std over seeds {' '.join(map(str, args.seed))} (sample std):\n")
        print("| temperature | pool | " + " | ".join(COLUMNS) + " |")
        print("|---:|---:|" + "---:|" * len(COLUMNS))
        for (temperature, pool), rows in results.items():
            print(f"| {temperature:g} | {pool}x{pool} | " + " | ".join(mean_std(list(col)) for col in zip(*rows))
                  + " |")
        top5, top20, acc, white5, white20 = (mean_std(list(col)) for col in zip(*pixel_results))
        print(f"\nraw pixels: neighbour accuracy top-5 {top5}, top-20 {top20}; k-means ACC {acc}; whitened: top-5 "
              f"{white5}, top-20 {white20}")
    print(f"\nwall time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
