"""How noisy is deepcluster.py's final k = #classes evaluation, and how sparse is the network's output?

For each checkpoint (deepcluster.pt; or `random:SEED` for the randomly initialised CNN, as `--epochs 0 --seed SEED`
builds it) on the test split:
the share of zero units of the output after the last ReLU, the ACC of single k-means runs (min-max over the restarts
of the first seed set) and the ACC of the lowest-inertia run out of R restarts for three seed sets, on the pre-ReLU
descriptors and on the post-ReLU output (`top_layer_input`). Labels are used only for the ACC printed. A checkpoint's
architecture, Sobel input and image size are its own (its settings); --arch is that of `random:SEED`.

    python bench/deepcluster_eval.py runs/deepcluster-fashion-mnist-kmeans/deepcluster.pt random:0 --restarts 10 50
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import deepcluster as dc
import runtime
from data import load_dataset
from metrics import cluster_acc


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="deepcluster.pt paths or random:SEED")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--arch", default="small", help="architecture of random:SEED")
    p.add_argument("--image-size", type=int, default=None, help="image size of random:SEED (as deepcluster.py's)")
    p.add_argument("--test-split", default="test", help="the split evaluated")
    p.add_argument("--restarts", type=int, nargs="+", default=[10, 50])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tests = {}                                                      # image size -> the test split at that size
    for name in args.models:
        ckpt = None if name.startswith("random:") else torch.load(name, map_location="cpu", weights_only=False)
        if ckpt is not None and ckpt.get("script") != dc.SCRIPT:
            p.error(f"{name} is not a checkpoint of {dc.SCRIPT}")
        config = ckpt["config"] if ckpt is not None else \
            {"arch": args.arch, "no_sobel": False, "image_size": args.image_size, "dataset": args.dataset}
        if config["dataset"] != args.dataset:
            p.error(f"{name} was trained on {config['dataset']}, not --dataset {args.dataset}")
        if config["image_size"] not in tests:
            tests[config["image_size"]] = load_dataset(args.dataset, args.data_root, args.test_split,
                                                       config["image_size"])
        test = tests[config["image_size"]]
        if ckpt is None:
            runtime.reseed(int(name.split(":")[1]), dc.STAGE, -1)  # what deepcluster.py --epochs 0 --seed S evaluates
        model = dc.DeepClusterNet(config["arch"], test.images.shape[1], not config["no_sobel"])
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
        k, target = len(test.classes), test.labels.numpy()
        desc = dc.extract_features(model, test.images, test.mean, test.std)  # [N, hidden], pre-ReLU
        print(f"{name}: {float((F.relu(desc) == 0).float().mean()):.1%} of the output units are zero after the ReLU")
        for feats, label in ((desc, "descriptors"), (F.relu(desc), "top_layer_input")):
            x = F.normalize(feats, dim=1)
            for R in args.restarts:
                best = []
                for base in (10_000, 20_000, 30_000):  # 10_000 is the seed set deepcluster.py uses
                    runs = [dc.kmeans(x, k, 20, seed=base + r) for r in range(R)]
                    accs = [cluster_acc(r[0].numpy(), target) for r in runs]
                    if base == 10_000:
                        single = (min(accs), max(accs))
                    best.append(accs[min(range(R), key=lambda i: runs[i][2][-1])])
                print(f"  {label:16s} best of {R:3d} (seed sets 1/2/3): " + " / ".join(f"{a:.3f}" for a in best)
                      + f"; single runs {single[0]:.3f}-{single[1]:.3f}", flush=True)


if __name__ == "__main__":
    main()
