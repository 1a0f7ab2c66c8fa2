"""Benchmark: knn(..., distributed=True) on P processes of one thread each against one process of one thread.

Exact top-k search (k=20, cosine) of random clustered points (a mixture of Gaussian clusters of unequal spread, as
in bench/kmeans.py; --data gaussian for bench/knn.py's plain Gaussian points): the self-search of N points, and Q
queries against the N points as keys. The processes are started here (torch.multiprocessing, gloo on the CPU, one
thread each); every rank times its call between two barriers and the slowest rank counts, the final all_gather
included. Prints one table: seconds, the ratio to one process (P processes share the work: ideally 1/P), whether
the answers are identical to one process's (indices and scores bit for bit), the CPU time over the wall time of
every process (its smallest value: below ~0.95 a process waited, for another rank or for a CPU that another job
held), and the ratio in CPU seconds of the busiest rank, which such waits do not inflate (shared caches aside).

    python bench/knn_ddp.py                          # 50k x 128, 10k queries, 2 processes
    python bench/knn_ddp.py --n 10000 --nproc 3      # a quick look
"""

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from knn import knn  # noqa: E402


def make_data(args):
    gen = torch.Generator().manual_seed(0)
    n = args.n + args.queries
    if args.data == "gaussian":
        x = torch.randn(n, args.dim, generator=gen)
    else:
        centres = torch.randn(args.clusters, args.dim, generator=gen)
        which = torch.randint(0, args.clusters, (n,), generator=gen)
        spread = 0.5 + torch.rand(args.clusters, 1, generator=gen)
        x = centres[which] + spread[which] * torch.randn(n, args.dim, generator=gen)
    x = torch.nn.functional.normalize(x, dim=1)
    return x[:args.n], x[args.n:]                                           # keys [N, D], queries [Q, D]


def cases(keys, queries):
    return [(f"self-search {len(keys)} x {keys.shape[1]}", keys, None),
            (f"{len(queries)} queries vs {len(keys)} keys", queries, keys)]


def worker(rank, world, port, args, refs, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    keys, queries = make_data(args)
    knn(keys[:2000], k=args.k, distributed=True)                            # warm-up: connections, allocator
    lines = []
    for (name, q, x), (ref_scores, ref_indices) in zip(cases(keys, queries), refs):
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        scores, indices = knn(q, x, k=args.k, metric="cosine", distributed=True)
        seconds = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
        cpu = torch.tensor(time.process_time() - cpu, dtype=torch.float64)
        busy = cpu / seconds
        for x, op in ((seconds, dist.ReduceOp.MAX), (cpu, dist.ReduceOp.MAX), (busy, dist.ReduceOp.MIN)):
            dist.all_reduce(x, op=op)
        same = torch.tensor(int(torch.equal(scores, ref_scores) and torch.equal(indices, ref_indices)))
        dist.all_reduce(same, op=dist.ReduceOp.MIN)                         # every rank's answer counts
        lines.append(f"{seconds.item()!r} {same.item()} {busy.item()!r} {cpu.item()!r}")
    if rank == 0:
        with open(out_path, "w") as f:
            f.write("\n".join(lines))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="points (the keys)")
    parser.add_argument("--queries", type=int, default=10_000, help="queries for the separate-keys case")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=2, help="processes of the distributed run")
    parser.add_argument("--data", choices=["clustered", "gaussian"], default="clustered")
    parser.add_argument("--clusters", type=int, default=100, help="clusters of the clustered data")
    args = parser.parse_args()

    torch.set_num_threads(1)
    keys, queries = make_data(args)
    load_before = os.getloadavg()[0]
    knn(keys[:2000], k=args.k)                                              # warm-up
    singles, refs = [], []
    for name, q, x in cases(keys, queries):
        start, cpu = time.perf_counter(), time.process_time()
        refs.append(knn(q, x, k=args.k, metric="cosine"))
        singles.append((time.perf_counter() - start, time.process_time() - cpu))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = f"/tmp/knn_ddp_{os.getpid()}.txt"
    mp.spawn(worker, args=(args.nproc, port, args, refs, out_path), nprocs=args.nproc)
    with open(out_path) as f:
        results = [line.split() for line in f.read().splitlines()]
    os.remove(out_path)

    print(f"\nexact top-{args.k} cosine, {args.data} data, torch {torch.__version__}; 1-min load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)")
    print(f"| case | 1 process, 1 thread (s) | {args.nproc} processes x 1 thread (s) | ratio | identical "
          f"| CPU / wall (1 process; {args.nproc}) | ratio of CPU seconds |")
    print("|---|---:|---:|---:|---|---|---:|")
    for (name, _, _), (single, single_cpu), result in zip(cases(keys, queries), singles, results):
        seconds, busy, cpu = (float(result[i]) for i in (0, 2, 3))
        same = "yes" if result[1] == "1" else "NO"
        print(f"| {name} | {single:.2f} | {seconds:.2f} | {seconds / single:.2f} | {same} | "
              f"{single_cpu / single:.2f}; {busy:.2f} | {cpu / single_cpu:.2f} |")


if __name__ == "__main__":
    main()
