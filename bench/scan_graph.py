"""How well does the neighbour graph that scan.py mined separate the classes by itself?

SCAN's clustering stage asks neighbours to agree (Eq. 2), so the mined K-NN graph bounds what it can find. This script
reads a run's mine.pt (and pretext.pt) and reports, on the train split it was mined from (the run's dataset, split,
image size and subset, read from the checkpoint's settings):
  - neighbour accuracy (share of neighbours with the anchor's label, top-5 / top-K), as scan.py prints it;
  - spectral clustering of the graph: the symmetrised K-NN adjacency A (0/1), the top `--clusters` eigenvectors of
    D^-1/2 A D^-1/2 (Ng, Jordan, Weiss 2001), rows L2-normalised, k-means (scan.py's) -> ACC / NMI / ARI;
  - k-means on the L2-normalised pretext features the graph was mined from (scan.py's "pretext + k-means" row of
    those features, here on the train split; recomputed with pretext.pt's network, as scan.py's mine stage does).
With --raw instead of a run, the same for the cosine K-NN graph of the raw pixels (the baseline a pretext must beat).
Labels are used only to score. The graph is what SCAN sees, so if its best 10-way partition is far from the classes,
a better clustering loss cannot close the gap; a better representation has to.

    python bench/scan_graph.py runs/fmnist-scan [--neighbors 20] [--clusters 10]
    python bench/scan_graph.py --raw --dataset fashion-mnist
"""
import argparse
import os
import sys
import time

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data
import metrics
import scan
from knn import knn
from runtime import predict


def spectral_clusters(neighbor_idx, num_clusters, seed=0):
    """neighbor_idx [N, K] -> cluster labels [N] from the normalised adjacency's top eigenvectors."""
    N, K = neighbor_idx.shape
    rows = np.repeat(np.arange(N), K)
    A = sp.csr_matrix((np.ones(N * K), (rows, neighbor_idx.ravel())), shape=(N, N))
    A = ((A + A.T) > 0).astype(np.float64)                                     # symmetric 0/1 graph
    d_inv_sqrt = sp.diags(1 / np.sqrt(np.asarray(A.sum(1)).ravel()))
    _, vecs = sla.eigsh(d_inv_sqrt @ A @ d_inv_sqrt, k=num_clusters, which="LA", tol=1e-6)  # [N, c]
    U = torch.from_numpy(vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).float()
    labels, _ = scan.kmeans(U, num_clusters, n_init=10, seed=seed)
    return labels.numpy()


def pretext_embedding(out_dir, config, train):
    """The L2-normalised features [N, d] of the train images that the run mined its neighbours from (the backbone's
    or the projection's, --mine-features; projection where the run predates the flag), by its pretext.pt."""
    ckpt = torch.load(os.path.join(out_dir, "pretext.pt"), map_location="cpu", weights_only=False)
    backbone = scan.make_backbone(config["arch"], train.images.shape[1], config["width"],
                                  config["dataset"].startswith("stl10"))
    model = scan.ContrastiveModel(backbone)
    model.load_state_dict(ckpt["model"])
    net = model.backbone if config.get("mine_features", "projection") == "backbone" else model
    return F.normalize(predict(net, train.images, train.mean, train.std), dim=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", help="a scan.py --out-dir holding mine.pt and pretext.pt")
    p.add_argument("--raw", action="store_true", help="no run: the raw pixels' graph (cosine), K = --neighbors or 20")
    p.add_argument("--dataset", default=None, help="--raw: the dataset (default fashion-mnist); a run: its own")
    p.add_argument("--data-root", default="./data", help="as for scan.py")
    p.add_argument("--neighbors", type=int, default=None, help="use the first K mined neighbours (default: all)")
    p.add_argument("--clusters", type=int, default=None, help="clusters (default: number of classes)")
    args = p.parse_args()
    if args.raw == (args.out_dir is not None):
        p.error("give a run's out_dir or --raw, not both")
    torch.set_num_threads(1)
    if args.raw:                                                               # the pixels, as the pretext sees them
        train = data.load_dataset(args.dataset or "fashion-mnist", root=args.data_root, split="train")
        pixels = F.normalize(train.images.flatten(1).float(), dim=1)           # [N, C*H*W]
        _, neighbor_idx = knn(pixels, k=args.neighbors or 20, metric="cosine", exclude_self=True)
        train_z, args.out_dir = pixels, "raw pixels"
    else:                                                                      # the train split as scan.py loads it
        mine = torch.load(os.path.join(args.out_dir, "mine.pt"), map_location="cpu", weights_only=False)
        config, neighbor_idx = mine["config"], mine["neighbor_idx"]
        if args.dataset not in (None, config["dataset"]):
            p.error(f"{args.out_dir} was trained on {config['dataset']}, not {args.dataset}")
        train = data.load_dataset(config["dataset"], root=args.data_root, split=config["train_split"],
                                  image_size=config["image_size"])
        if config["subset"] is not None and config["subset"] < len(train.images):
            keep = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(config["seed"]))
            train = train._replace(images=train.images[keep[:config["subset"]]],
                                   labels=train.labels[keep[:config["subset"]]])
        if len(train.images) != len(neighbor_idx):
            sys.exit(f"mine.pt has {len(neighbor_idx)} images, the train split {len(train.images)}: another "
                     f"--data-root or dataset version?")
        train_z = pretext_embedding(args.out_dir, config, train)
    labels = train.labels
    neighbor_idx = neighbor_idx[:, :args.neighbors] if args.neighbors else neighbor_idx
    y, c = labels.numpy(), args.clusters or len(train.classes)
    t0 = time.time()
    spectral = spectral_clusters(neighbor_idx.numpy(), c)
    seconds = time.time() - t0
    km, _ = scan.kmeans(train_z, c, seed=0)
    nb_acc = [float(metrics.neighbor_acc(neighbor_idx[:, :k], labels)) for k in (5, neighbor_idx.shape[1])]
    print(f"{args.out_dir}: {len(y)} train images, {neighbor_idx.shape[1]}-NN graph, {c} clusters")
    print(f"neighbour accuracy top-5 {nb_acc[0]:.3f}, top-{neighbor_idx.shape[1]} {nb_acc[1]:.3f}")
    for name, pred in [(f"spectral clustering of the graph ({seconds:.0f} s)", spectral),
                       ("k-means on the " + ("pixels" if args.raw else "pretext embedding"), km.numpy())]:
        print(f"{name}: ACC {metrics.cluster_acc(pred, y):.3f} NMI {metrics.nmi(pred, y):.3f} "
              f"ARI {metrics.ari(pred, y):.3f}")


if __name__ == "__main__":
    main()
