"""Benchmark: our exact k-NN (knn.py) against faiss IndexFlatIP / IndexFlatL2 and scikit-learn's brute force.

Exact top-k self-search (each point's k nearest other points) over N random points, all libraries on the same
number of threads, in one process, one after another, so the ratios compare like with like. Prints one table:
seconds per library, ratio to faiss (below 1.0 = faster than faiss), and the agreement of the neighbour sets.
Also the peak extra resident memory of our `knn` call (Linux: /proc/self/status after resetting the peak).

    python bench/knn.py                      # 50k x 128 and 50k x 512, k=20, 2 threads
    python bench/knn.py --n 10000 --dims 64  # a quick look
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from knn import knn


def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def same_sets(ours, theirs):
    """Share of rows whose neighbour sets agree (order and ties aside)."""
    return float(np.mean([set(a) == set(b) for a, b in zip(ours, theirs)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="number of points")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512], help="feature dimensions to test")
    parser.add_argument("--k", type=int, default=20, help="neighbours per point (self excluded)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every library")
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement; the fastest is kept")
    parser.add_argument("--skip-sklearn", action="store_true", help="leave out scikit-learn (the slowest)")
    args = parser.parse_args()

    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rows = []
    for dim in args.dims:
        gen = torch.Generator().manual_seed(0)
        feats = torch.nn.functional.normalize(torch.randn(args.n, dim, generator=gen), dim=1)
        feats_np = feats.numpy()

        # peak extra memory of one knn call: reset the high-water mark, run, read it back
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = rss_kib("VmRSS:")
            knn(feats, k=args.k, metric="cosine")
            extra_mib = (rss_kib("VmHWM:") - before) / 1024
        except OSError:
            extra_mib = float("nan")

        t_ours, (_, ours_idx) = timed(lambda: knn(feats, k=args.k, metric="cosine"), args.repeats)
        t_ours_l2, (_, ours_l2_idx) = timed(lambda: knn(feats, k=args.k, metric="l2"), args.repeats)
        index_ip = faiss.IndexFlatIP(dim)
        index_ip.add(feats_np)
        t_ip, (_, ip_idx) = timed(lambda: index_ip.search(feats_np, args.k + 1), args.repeats)
        index_l2 = faiss.IndexFlatL2(dim)
        index_l2.add(feats_np)
        t_l2, (_, l2_idx) = timed(lambda: index_l2.search(feats_np, args.k + 1), args.repeats)
        # faiss returns the point itself among the k+1; drop it by index, as knn does
        ip_sets = [row[row != i][: args.k] for i, row in enumerate(ip_idx)]
        agree = same_sets(ours_idx.numpy(), ip_sets)
        rows.append((f"{args.n}x{dim}", "ours knn cosine", t_ours, t_ours / t_ip, agree, extra_mib))
        rows.append((f"{args.n}x{dim}", "faiss IndexFlatIP", t_ip, 1.0, 1.0, float("nan")))
        l2_sets = [row[row != i][: args.k] for i, row in enumerate(l2_idx)]
        rows.append((f"{args.n}x{dim}", "ours knn l2", t_ours_l2, t_ours_l2 / t_l2,
                     same_sets(ours_l2_idx.numpy(), l2_sets), float("nan")))
        rows.append((f"{args.n}x{dim}", "faiss IndexFlatL2", t_l2, 1.0, 1.0, float("nan")))
        if not args.skip_sklearn:
            from sklearn.neighbors import NearestNeighbors
            from threadpoolctl import threadpool_limits
            with threadpool_limits(args.threads):
                search = NearestNeighbors(n_neighbors=args.k + 1, algorithm="brute", metric="cosine",
                                          n_jobs=args.threads).fit(feats_np)
                t_sk, sk_idx = timed(lambda: search.kneighbors(feats_np, return_distance=False), args.repeats)
            sk_sets = [row[row != i][: args.k] for i, row in enumerate(sk_idx)]
            rows.append((f"{args.n}x{dim}", "sklearn brute cosine", t_sk, t_sk / t_ip,
                         same_sets(ours_idx.numpy(), sk_sets), float("nan")))
        print(f"done {args.n}x{dim}", file=sys.stderr, flush=True)

    print(f"\nexact top-{args.k} self-search, {args.threads} threads, best of {args.repeats}; "
          f"ratio = time / faiss time of the same metric; agree = rows whose neighbour set equals the reference's")
    print("| data | method | seconds | ratio to faiss | agree | peak extra MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for data, method, secs, ratio, agree, mib in rows:
        mib_text = "" if np.isnan(mib) else f"{mib:.0f}"
        print(f"| {data} | {method} | {secs:.2f} | {ratio:.2f} | {agree:.4f} | {mib_text} |")


if __name__ == "__main__":
    main()
