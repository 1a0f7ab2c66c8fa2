"""How well does the neighbour graph that scan.py mined separate the classes by itself?

SCAN's clustering stage asks neighbours to agree (Eq. 2), so the mined K-NN graph bounds what it can find. This script
reads a run's mine.pt and reports, on the train split it was mined from:
  - neighbour accuracy (share of neighbours with the anchor's label, top-5 / top-K), as scan.py prints it;
  - spectral clustering of the graph: the symmetrised K-NN adjacency A (0/1), the top `--clusters` eigenvectors of
    D^-1/2 A D^-1/2 (Ng, Jordan, Weiss 2001), rows L2-normalised, k-means (scan.py's) -> ACC / NMI / ARI;
  - k-means on the L2-normalised pretext embeddings (scan.py's "pretext + k-means" row, here on the train split).
With --raw instead of a run, the same for the cosine K-NN graph of the raw pixels (the baseline a pretext must beat).
Labels are used only to score. The graph is what SCAN sees, so if its best 10-way partition is far from the classes,
a better clustering loss cannot close the gap; a better representation has to.

    python bench/scan_graph.py runs/fmnist-scan --dataset fashion-mnist [--neighbors 20] [--clusters 10]
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
import data  # noqa: E402
import metrics  # noqa: E402
import scan  # noqa: E402
from knn import knn  # noqa: E402


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", help="a scan.py --out-dir holding mine.pt")
    p.add_argument("--raw", action="store_true", help="no run: the graph of the raw pixels (cosine), K = --neighbors or 20")
    p.add_argument("--dataset", default="fashion-mnist", help="the dataset the run was trained on (for its labels)")
    p.add_argument("--data-root", default="./data", help="as for scan.py")
    p.add_argument("--neighbors", type=int, default=None, help="use the first K mined neighbours (default: all)")
    p.add_argument("--clusters", type=int, default=None, help="clusters (default: number of classes)")
    p.add_argument("--subset-seed", type=int, default=None, help="the run's --seed if it used --subset")
    args = p.parse_args()
    if args.raw == (args.out_dir is not None):
        p.error("give a run's out_dir or --raw, not both")
    torch.set_num_threads(1)
    train = data.load_dataset(args.dataset, root=args.data_root, split="train")
    if args.raw:                                                               # the pixels, as the pretext's input sees them
        pixels = F.normalize(train.images.flatten(1).float(), dim=1)           # [N, C*H*W]
        _, neighbor_idx = knn(pixels, k=args.neighbors or 20, metric="cosine", exclude_self=True)
        mine, args.out_dir = {"neighbor_idx": neighbor_idx, "train_z": pixels}, "raw pixels"
    else:
        mine = torch.load(os.path.join(args.out_dir, "mine.pt"), map_location="cpu", weights_only=False)
    labels = train.labels
    neighbor_idx = mine["neighbor_idx"][:, :args.neighbors] if args.neighbors else mine["neighbor_idx"]
    if len(labels) != len(neighbor_idx):
        if args.subset_seed is None:
            sys.exit(f"mine.pt has {len(neighbor_idx)} images, the train split {len(labels)}: pass --subset-seed.")
        labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.subset_seed))[:len(neighbor_idx)]]
    y, c = labels.numpy(), args.clusters or len(train.classes)
    t0 = time.time()
    spectral = spectral_clusters(neighbor_idx.numpy(), c)
    seconds = time.time() - t0
    km, _ = scan.kmeans(mine["train_z"], c, seed=0)
    nb_acc = [float(metrics.neighbor_acc(neighbor_idx[:, :k], labels)) for k in (5, neighbor_idx.shape[1])]
    print(f"{args.out_dir}: {len(y)} train images, {neighbor_idx.shape[1]}-NN graph, {c} clusters")
    print(f"neighbour accuracy top-5 {nb_acc[0]:.3f}, top-{neighbor_idx.shape[1]} {nb_acc[1]:.3f}")
    for name, pred in [(f"spectral clustering of the graph ({seconds:.0f} s)", spectral),
                       ("k-means on the " + ("pixels" if args.raw else "pretext embedding"), km.numpy())]:
        print(f"{name}: ACC {metrics.cluster_acc(pred, y):.3f} NMI {metrics.nmi(pred, y):.3f} "
              f"ARI {metrics.ari(pred, y):.3f}")


if __name__ == "__main__":
    main()
