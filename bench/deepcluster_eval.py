"""How noisy is deepcluster.py's final k = #classes evaluation, and how sparse is the network's output?

For each checkpoint (or `random:SEED` for the randomly initialised CNN, as `--epochs 0` builds it) on the test split:
the share of zero units of the output after the last ReLU, the ACC of single k-means runs (min-max over the restarts
of the first seed set) and the ACC of the lowest-inertia run out of R restarts for three seed sets, on the pre-ReLU
descriptors and on the post-ReLU output (`top_layer_input`). Labels are used only for the ACC printed.

    python bench/deepcluster_eval.py runs/deepcluster-fashion-mnist-kmeans/checkpoint.pt random:0 --restarts 10 50
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import deepcluster as dc  # noqa: E402
from data import load_dataset  # noqa: E402
from metrics import cluster_acc  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="checkpoint.pt paths or random:SEED")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--arch", default="small")
    p.add_argument("--restarts", type=int, nargs="+", default=[10, 50])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train = load_dataset(args.dataset, args.data_root, "train", None)
    test = load_dataset(args.dataset, args.data_root, "test", None)
    mean, std = torch.tensor(train.mean).view(1, -1, 1, 1), torch.tensor(train.std).view(1, -1, 1, 1)
    k, target = len(test.classes), test.labels.numpy()
    for name in args.models:
        if name.startswith("random:"):
            torch.manual_seed(int(name.split(":")[1]))  # what deepcluster.py --epochs 0 --seed S evaluates
            model = dc.DeepClusterNet(args.arch, test.images.shape[1], True)
        else:
            ckpt = torch.load(name, map_location="cpu", weights_only=False)
            model = dc.DeepClusterNet(args.arch, test.images.shape[1], not ckpt["args"].get("no_sobel", False))
            model.load_state_dict(ckpt["model"])
        desc = dc.extract_features(model, test.images, mean, std)  # [N, hidden], pre-ReLU
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
