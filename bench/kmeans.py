"""Benchmark: deepcluster.kmeans (torch) vs faiss and scikit-learn: time and inertia, measured in one run.

    python bench/kmeans.py                     # 100k x 256, k=100, 20 Lloyd iterations, 3 seeds, 2 threads

All methods start from k random data points and run 20 Lloyd iterations; inertia is recomputed the same way for
all (squared distances of every point to its nearest final centroid). faiss is run as DeepCluster's reference
code runs it (max_points_per_centroid = 10^7: every point is used) and, for reference, with its default, which
trains on a random subsample of 256 points per centroid (25,600 of 100,000 here) and is therefore not the same
computation. Needs `pip install faiss-cpu scikit-learn`.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import deepcluster


def inertia_of(x, centroids):
    """Sum over points of the squared distance to the nearest centroid (float64 accumulation)."""
    c = torch.as_tensor(centroids, dtype=torch.float32)
    total = 0.0
    for s in range(0, len(x), 16384):
        total += torch.cdist(x[s:s + 16384], c).pow(2).min(1).values.double().sum().item()
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3, help="repeat every method with this many seeds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-sklearn", action="store_true", help="skip scikit-learn (the slowest)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import faiss
    faiss.omp_set_num_threads(args.threads)

    # data: a mixture of 2k Gaussian clusters of unequal spread plus a uniform background, like deep features
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2 * args.k, args.dim, generator=g)
    which = torch.randint(0, 2 * args.k, (args.n,), generator=g)
    spread = 0.5 + torch.rand(2 * args.k, 1, generator=g)
    x = centres[which] + spread[which] * torch.randn(args.n, args.dim, generator=g)
    x_np = x.numpy()
    print(f"k-means: {args.n} x {args.dim}, k={args.k}, {args.iters} iterations, {args.threads} threads, "
          f"{args.seeds} seeds, torch {torch.__version__}, faiss {faiss.__version__}", flush=True)

    def ours(seed):
        _, c, _, _ = deepcluster.kmeans(x, args.k, args.iters, seed=seed)
        return c

    def faiss_run(seed, max_points):
        clus = faiss.Clustering(args.dim, args.k)
        clus.niter, clus.seed, clus.max_points_per_centroid = args.iters, seed, max_points
        index = faiss.IndexFlatL2(args.dim)
        clus.train(x_np, index)
        return faiss.vector_to_array(clus.centroids).reshape(args.k, args.dim)

    def sklearn_run(seed):
        from sklearn.cluster import KMeans
        km = KMeans(args.k, init="random", n_init=1, max_iter=args.iters, tol=0, algorithm="lloyd", random_state=seed)
        return km.fit(x_np).cluster_centers_

    methods = [("deepcluster.kmeans (torch)", ours),
               ("faiss, all points (as DeepCluster)", lambda s: faiss_run(s, 10_000_000)),
               ("faiss default (256 pts/centroid)", lambda s: faiss_run(s, 256))]
    if not args.no_sklearn:
        methods.append(("scikit-learn KMeans lloyd", sklearn_run))
    ours(0)  # warm-up (thread pools, allocator)
    rows = []
    for name, fn in methods:
        times, inertias = [], []
        for seed in range(args.seeds):
            t = time.perf_counter()
            c = fn(seed + 1)
            times.append(time.perf_counter() - t)
            inertias.append(inertia_of(x, c))
        rows.append((name, float(np.median(times)), float(np.mean(inertias))))
        print(f"  {name}: {rows[-1][1]:.2f} s, inertia {rows[-1][2]:.6g}", flush=True)

    ref_t, ref_i = rows[1][1], rows[1][2]
    print(f"\n| method | time (s, median of {args.seeds}) | time / faiss | inertia (mean) | inertia vs faiss |")
    print("|---|---|---|---|---|")
    for name, t, i in rows:
        print(f"| {name} | {t:.2f} | {t / ref_t:.2f} | {i:.6g} | {100 * (i / ref_i - 1):+.2f}% |")


if __name__ == "__main__":
    main()
