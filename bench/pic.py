"""Benchmark: PIC (deepcluster.pic) from 10k to 1M nodes on given 5-NN graphs, split into graph construction,
power iteration and cluster extraction, plus a check against a direct numpy/scipy port of the reference code.

    python bench/pic.py                          # 10k, 30k, 100k, 300k, 1M nodes; reference check up to 100k

The graphs are random local 5-NN graphs (each node's neighbours are nearby node ids, squared distances drawn in
[0.2, 0.8] and sorted), generated in O(N): running an exact k-NN over 1M points is not what is measured here.
The power iteration stops once v no longer changes bit for bit (the iteration count is printed); the reference
port always runs 200 iterations, and the check asserts that both give the same clusters.
"""
import argparse
import os
import sys
import time

import numpy as np
import scipy.sparse
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import deepcluster as dc


def local_knn_graph(n, k=5, seed=0, reach=32):
    g = torch.Generator().manual_seed(seed)
    offset = torch.randint(1, reach + 1, (n, k), generator=g) * (torch.randint(0, 2, (n, k), generator=g) * 2 - 1)
    idx = (torch.arange(n).view(n, 1) + offset) % n  # [N, k] (duplicates allowed, like near-duplicate images)
    dist = (0.2 + 0.6 * torch.rand(n, k, generator=g)).sort(1).values
    return idx, dist


def reference_port(idx, dist, sigma=0.2, alpha=0.001, iters=200):
    """The reference algorithm with scipy sparse and Python loops over nodes (before singleton redistribution)."""
    n, k = idx.shape
    t0 = time.perf_counter()
    a = scipy.sparse.csr_matrix((np.exp(-dist.double().numpy().ravel() / sigma ** 2), idx.numpy().ravel(),
                                 np.arange(n + 1) * k), shape=(n, n))
    W = (a + a.T).tocsr()
    W.sort_indices()
    v = np.ones(n) / n
    for _ in range(iters):
        v = alpha * W.T.dot(v) + (1 - alpha) / n
        v /= v.sum()
    t1 = time.perf_counter()
    pointers = list(range(n))
    indptr, indices, data = W.indptr, W.indices, W.data
    for i in range(n):
        best = 0
        for l in range(indptr[i], indptr[i + 1]):
            s = data[l] * (v[indices[l]] - v[i])
            if s > best:
                best, pointers[i] = s, indices[l]
    roots = np.empty(n, dtype=np.int64)
    for i in range(n):
        cur = i
        while pointers[cur] != cur:
            cur = pointers[cur]
        roots[i] = cur
    return roots, t1 - t0, time.perf_counter() - t1


def same_partition(a, b):
    pairs = np.unique(np.stack([a, b]), axis=1).shape[1]
    return pairs == np.unique(a).size == np.unique(b).size


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,30000,100000,300000,1000000")
    p.add_argument("--check-up-to", type=int, default=100_000, help="compare with the reference port up to this size")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"PIC on random local 5-NN graphs, {args.threads} threads, torch {torch.__version__}", flush=True)
    dc.pic(*local_knn_graph(1000))  # warm-up
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        idx, dist = local_knn_graph(n)
        t0 = time.perf_counter()
        W = dc.pic_graph(idx, dist)
        t1 = time.perf_counter()
        v, iters = dc.pic_power_iteration(W)
        t2 = time.perf_counter()
        roots = dc.follow_pointers(dc.pic_pointers(W, v))
        labels = dc.compact(roots, n)
        single = int((torch.bincount(labels) == 1).sum())
        labels = dc.redistribute_singletons(labels, idx)
        t3 = time.perf_counter()
        row = dict(n=n, graph=t1 - t0, power=t2 - t1, iters=iters, extract=t3 - t2, total=t3 - t0,
                   clusters=int(labels.max()) + 1, singletons=single)
        if n <= args.check_up_to:
            ref_roots, ref_power, ref_extract = reference_port(idx, dist)
            assert same_partition(roots.numpy(), ref_roots), "PIC differs from the reference port"
            row.update(ref_power=ref_power, ref_extract=ref_extract)
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)

    print("\n| nodes | graph W (s) | power iteration (s) | iterations | extraction (s) | total (s) | clusters "
          "| singletons before redistribution | reference port: power / extraction (s) | same clusters |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = f"{r['ref_power']:.2f} / {r['ref_extract']:.2f}" if "ref_power" in r else "-"
        print(f"| {r['n']:,} | {r['graph']:.2f} | {r['power']:.2f} | {r['iters']} | {r['extract']:.2f} | "
              f"{r['total']:.2f} | {r['clusters']:,} | {r['singletons']:,} | {ref} | "
              f"{'yes' if 'ref_power' in r else '-'} |")


if __name__ == "__main__":
    main()
