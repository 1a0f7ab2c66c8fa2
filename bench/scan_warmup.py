"""Does SCAN's clustering loss do better on fixed features from random heads or from k-means' partition?

scan.py's SCAN stage starts with a warm-up of the heads alone on the fixed backbone features of the un-augmented
train images (scan.warm_up_heads): 5 candidate heads are fitted by cross-entropy (Adam 1e-2, 300 steps, batch 256)
to 5 k-means partitions of the L2-normalised features (scan.kmeans, seeds 1000 * seed + r), trained with Eq. (2),
and the lowest-Eq. (2) one kept. This
script reads a finished scan.py run (its pretext.pt and mine.pt, and the settings in their "config"), rebuilds the
backbone and the train split as scan.py did, and trains one linear head with Eq. (2) (scan.scan_loss, entropy weight
5, Adam 1e-3 with the run's weight decay, 128 anchors per step, one random mined neighbour each) on those features:
  (a) from random heads (as scan.py initialises them), or
  (b) from the head scan.warm_up_heads fits (its own code with --warmup-steps 0: the candidates' fits, the one
      with the lowest Eq. (2) kept; the k-means column is k-means with the run's seed alone).
Both start from the same initial head and draw the same anchors and neighbours. Reported: test ACC
(metrics.cluster_acc of the head's argmax; k-means: the nearest centroid of the L2-normalised test features) of
k-means itself, of (b) right after the fit, and of (a) and (b) after each of --report-at steps, for each seed
(k-means, the initial head, the fit and the draws), then mean +- std (sample std) over seeds. Labels only score.

    python scan.py --dataset fashion-mnist --quick --threads 1 --out-dir /tmp/wq-fmnist
    python bench/scan_warmup.py /tmp/wq-fmnist --seeds 0 1 2
"""
import argparse
import copy
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data
import metrics
import runtime
import scan
from runtime import predict


def load_run(args):
    """(config, train, test, backbone, its features of train [N, d] and test, neighbor_idx [N, K]) of the run."""
    mine = torch.load(os.path.join(args.out_dir, "mine.pt"), map_location="cpu", weights_only=False)
    config, neighbor_idx = mine["config"], mine["neighbor_idx"]
    scan_pt = os.path.join(args.out_dir, "scan.pt")                           # its settings, if the stage ran
    if os.path.exists(scan_pt):
        config = {**torch.load(scan_pt, map_location="cpu", weights_only=False)["config"], **config}
    load = lambda split: data.load_dataset(config["dataset"], root=args.data_root, split=split,
                                           image_size=config["image_size"])
    train, test = load(config["train_split"]), load(args.test_split)
    if config["subset"] is not None and config["subset"] < len(train.images):  # scan.load_data's subset
        keep = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(config["seed"]))
        keep = keep[:config["subset"]]
        train = train._replace(images=train.images[keep], labels=train.labels[keep])
    if len(train.images) != len(neighbor_idx):
        sys.exit(f"mine.pt has {len(neighbor_idx)} images, the train split {len(train.images)}: another --data-root?")
    pretext = torch.load(os.path.join(args.out_dir, "pretext.pt"), map_location="cpu", weights_only=False)
    backbone = scan.make_backbone(config["arch"], train.images.shape[1], config["width"],
                                  config["dataset"].startswith("stl10"))
    model = scan.ContrastiveModel(backbone)
    model.load_state_dict(pretext["model"])
    feats = [predict(model.backbone, d.images, d.mean, d.std) for d in (train, test)]
    return config, train, test, model.backbone, feats, neighbor_idx


def acc(head, feats, labels):
    with torch.no_grad():
        return metrics.cluster_acc(head(feats).argmax(1), labels)


def train_eq2(head, feats, neighbor_idx, test_feats, test_labels, args, seed):
    """The second loop of scan.warm_up_heads (Eq. 2 on fixed features), test ACC at each of args.report_at steps."""
    generator, (N, K), B = torch.Generator().manual_seed(seed), neighbor_idx.shape, args.batch_size
    rand = lambda high, n: torch.randint(0, high, (n,), generator=generator)
    opt = torch.optim.Adam(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    out = {}
    for step in range(1, max(args.report_at) + 1):
        anchor = rand(N, B)
        neighbor = neighbor_idx[anchor, rand(K, B)]
        logits = head(feats[torch.cat([anchor, neighbor])])                    # [2B, C]
        loss = scan.scan_loss(logits[:B], logits[B:], args.entropy_weight)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in args.report_at:
            out[step] = acc(head, test_feats, test_labels)
    return out


def mean_std(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="a scan.py --out-dir holding pretext.pt and mine.pt")
    p.add_argument("--data-root", default="./data", help="as for scan.py")
    p.add_argument("--test-split", default="test")
    p.add_argument("--steps", type=int, default=3000, help="Eq. (2) steps of (a) and (b)")
    p.add_argument("--report-at", type=int, nargs="+", default=[500, 1000, 3000], help="steps at which test ACC is "
                   "reported (those above --steps are dropped; --steps is always reported)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=128, help="anchors per Eq. (2) step (scan.py: 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of Eq. (2) (scan.warm_up_heads: 1e-3)")
    p.add_argument("--entropy-weight", type=float, default=None, help="default: the run's (5)")
    p.add_argument("--clusters", type=int, default=None, help="default: the run's --num-clusters, else the classes")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.report_at = sorted({s for s in args.report_at if 0 < s <= args.steps} | {args.steps})
    runtime.keep_freed_memory()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    config, train, test, backbone, (feats, test_feats), neighbor_idx = load_run(args)
    C = args.clusters or config.get("num_clusters") or len(train.classes)
    args.entropy_weight = args.entropy_weight if args.entropy_weight is not None else config.get("entropy_weight", 5.0)
    args.weight_decay = config["weight_decay"]
    print(f"{args.out_dir}: {config['dataset']}, {len(train.images)} train images ({config['train_split']}), "
          f"{len(test.images)} test, {feats.shape[1]}-d {config['arch']} backbone features, "
          f"{neighbor_idx.shape[1]} neighbours mined on the {config.get('mine_features', 'projection')} features, "
          f"{C} clusters; Eq. (2): entropy weight {args.entropy_weight:g}, Adam {args.lr:g} (weight decay "
          f"{args.weight_decay:g}), batch {args.batch_size}, {args.steps} steps; threads {args.threads}", flush=True)
    steps = args.report_at
    cols = ["k-means", "(b) after the fit"] + [f"(a) {s}" for s in steps] + [f"(b) {s}" for s in steps]
    print("\ntest ACC per seed; (a) random heads + Eq. (2), (b) k-means fit + Eq. (2), after N steps:\n")
    print("| seed | " + " | ".join(cols) + " | s |")
    print("|---:|" + "---:|" * (len(cols) + 1), flush=True)
    rows = []
    for seed in args.seeds:
        t0 = time.time()
        _, centroids = scan.kmeans(F.normalize(feats, dim=1), C, seed=seed)    # what warm_up_heads computes
        km = metrics.cluster_acc(torch.cdist(F.normalize(test_feats, dim=1), centroids).argmin(1), test.labels)
        runtime.reseed(seed, "scan", -1)                                       # scan.py's initial heads
        model = scan.ClusteringModel(backbone, C, 1)
        random_head = copy.deepcopy(model.heads[0])
        warm = SimpleNamespace(seed=seed, scan_batch_size=args.batch_size, device="cpu", warmup_steps=0,
                               weight_decay=args.weight_decay, loss="scan", entropy_weight=args.entropy_weight)
        scan.warm_up_heads(warm, model, train, neighbor_idx, None, [F.normalize(feats, dim=1)])   # the k-means fit only
        fitted_head = model.heads[0]
        fit = acc(fitted_head, test_feats, test.labels)
        a = train_eq2(random_head, feats, neighbor_idx, test_feats, test.labels, args, seed)
        b = train_eq2(fitted_head, feats, neighbor_idx, test_feats, test.labels, args, seed)
        rows.append([km, fit] + [a[s] for s in steps] + [b[s] for s in steps])
        print(f"| {seed} | " + " | ".join(f"{v:.3f}" for v in rows[-1]) + f" | {time.time() - t0:.0f} |", flush=True)
    cols_ms = [mean_std(list(c)) for c in zip(*rows)]
    km, fit, a, b = cols_ms[0], cols_ms[1], cols_ms[2:2 + len(steps)], cols_ms[2 + len(steps):]
    print(f"\nmean ± std of test ACC over seeds {' '.join(map(str, args.seeds))}:\n")
    print("| heads | after the fit | " + " | ".join(f"{s} steps of Eq. (2)" for s in steps) + " |")
    print("|---|---:|" + "---:|" * len(steps))
    print(f"| k-means on the L2-normalised features | {km} |" + " |" * len(steps))
    print("| (a) random + Eq. (2) | – | " + " | ".join(a) + " |")
    print(f"| (b) k-means fit + Eq. (2) | {fit} | " + " | ".join(b) + " |")
    print(f"\nwall time {time.time() - t_start:.0f} s")



if __name__ == "__main__":
    main()
