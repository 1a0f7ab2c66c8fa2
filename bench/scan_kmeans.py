"""Benchmark: scan.kmeans (the k-means of scan.py and profeat.py) against scikit-learn and faiss, in one run.

scan.py and profeat.py run k-means for the "pretext + k-means" rows and for the 5 partitions of the SCAN warm-up:
k = number of classes on L2-normalised features, k-means++ seeding, best of 5 restarts. This script times that call
on features of that shape (a mixture of 2k Gaussian clusters of unequal spread, L2-normalised; default 60,000 x 512,
the small CNN's on Fashion-MNIST) against scikit-learn's KMeans (k-means++, Lloyd, the same restarts and iteration
cap) and faiss' Kmeans (random seeding, the same restarts and iterations), and reports each one's inertia.

    python bench/scan_kmeans.py                 # 60k x 512, k = 10, 1 thread, 3 seeds

Needs `pip install scikit-learn faiss-cpu` (requirements-dev.txt).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scan


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=60_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--n-init", type=int, default=5, help="restarts, the best inertia kept (scan.py: 5)")
    p.add_argument("--iters", type=int, default=50, help="Lloyd iterations at most (scan.py: 50)")
    p.add_argument("--seeds", type=int, default=3, help="repeat every method with this many seeds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-faiss", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2 * args.k, args.dim, generator=g)
    which = torch.randint(0, 2 * args.k, (args.n,), generator=g)
    spread = 2 + 4 * torch.rand(2 * args.k, 1, generator=g)
    x = F.normalize(centres[which] + spread[which] * torch.randn(args.n, args.dim, generator=g), dim=1)
    x_np = x.numpy()
    print(f"k-means: {args.n} x {args.dim} (L2-normalised), k={args.k}, best of {args.n_init}, at most {args.iters} "
          f"iterations, {args.threads} thread(s), {args.seeds} seeds, torch {torch.__version__}", flush=True)

    def sklearn_run(seed):
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits
        km = KMeans(args.k, n_init=args.n_init, max_iter=args.iters, algorithm="lloyd", random_state=seed)
        with threadpool_limits(args.threads):
            return km.fit(x_np).cluster_centers_

    def faiss_run(seed):
        import faiss
        faiss.omp_set_num_threads(args.threads)
        km = faiss.Kmeans(args.dim, args.k, niter=args.iters, nredo=args.n_init, seed=seed,
                          max_points_per_centroid=10**7)                       # every point, as the others
        km.train(x_np)
        return km.centroids

    methods = [("scikit-learn KMeans (k-means++, lloyd)", sklearn_run),
               ("scan.kmeans (torch, k-means++)", lambda s: scan.kmeans(x, args.k, args.iters, args.n_init, s)[1])]
    if not args.skip_faiss:
        methods.append(("faiss Kmeans (random seeding)", faiss_run))
    scan.kmeans(x[:2000], args.k, 2, 1)                                        # warm-up: thread pools, allocator
    rows = []
    for name, fn in methods:
        times, inertias = [], []
        for seed in range(args.seeds):
            t = time.perf_counter()
            centroids = torch.as_tensor(np.asarray(fn(seed + 1)), dtype=torch.float32)
            times.append(time.perf_counter() - t)
            inertias.append(torch.cdist(x.double(), centroids.double()).pow(2).min(1).values.sum().item())
        rows.append((name, float(np.median(times)), float(np.mean(inertias))))
        print(f"  {name}: {rows[-1][1]:.2f} s, inertia {rows[-1][2]:.6g}", flush=True)

    ref_t, ref_i = rows[0][1], rows[0][2]
    print(f"\n| method | time (s, median of {args.seeds}) | time / scikit-learn | inertia (mean) | vs scikit-learn |")
    print("|---|---|---|---|---|")
    for name, t, i in rows:
        print(f"| {name} | {t:.2f} | {t / ref_t:.2f} | {i:.6g} | {100 * (i / ref_i - 1):+.3f}% |")


if __name__ == "__main__":
    main()
