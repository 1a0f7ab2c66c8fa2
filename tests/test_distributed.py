"""Multi-process tests (gloo on CPU): the losses that see the whole batch give, over 2 ranks with DDP, the same loss
and gradients as one process on the same global batch; torchrun runs every script; a run killed under torchrun
resumes, also with another number of processes.

    python -m pytest tests/test_distributed.py -q
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import profeat
import runtime
import scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, D, C = 8, 6, 4                                                              # global batch, input dim, clusters


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses():
    """name -> loss(model output for the anchors [b, C], ... for the neighbours / second views [b, C], global batch
    indices of this rank's rows [b]) computed on the gathered global batch, as the scripts do."""
    g = torch.Generator().manual_seed(7)
    za, zn = (F.normalize(torch.randn(B, 3, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    clusters = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    group = clusters[:, None] == clusters[None, :]
    weak = torch.randn(B, C, generator=g, dtype=torch.float64) * 5
    weak[:5, 1] += 20                                                          # 5 confident, unevenly over ranks
    gather = lambda x: runtime.gather(x, grad=True)
    return {
        "nt_xent": lambda a, n, idx: scan.nt_xent(F.normalize(gather(a), dim=1), F.normalize(gather(n), dim=1), 0.1),
        "scan": lambda a, n, idx: scan.scan_loss(gather(a), gather(n), 5.0)[0],
        "structured": lambda a, n, idx: scan.structured_loss(gather(a), gather(n), za, zn, 8.0, 1.0, 1.0, 5.0)[0],
        "profeat_eq1": lambda a, n, idx: profeat.refinement_loss(
            F.normalize(torch.cat([gather(a), gather(n)]), dim=1), profeat.view_positives(group), 0.1),
        "confidence_ce": lambda a, n, idx: scan.confidence_ce(weak, gather(a), 0.99)[0],
    }


def model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Linear(D, C).double()
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(2))
    return model, x1, x2


def single_process():
    out = {}
    for name, fn in losses().items():
        model, x1, x2 = model_and_data()
        loss = fn(model(x1), model(x2), torch.arange(B))
        loss.backward()
        out[name] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    return out


def worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    runtime.STATE.update(rank=rank, world=world)
    torch.set_num_threads(1)
    out = {}
    for name, fn in losses().items():
        model, x1, x2 = model_and_data()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        lo, hi = rank * B // world, (rank + 1) * B // world                    # this rank's share of the batch
        loss = fn(ddp(x1[lo:hi]), ddp(x2[lo:hi]), torch.arange(lo, hi))
        loss.backward()                                                        # DDP averages the gradients
        out[name] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    results[rank] = out
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2])
def test_losses_and_gradients_over_ranks_equal_one_process(world):
    results = mp.Manager().dict()
    mp.spawn(worker, args=(world, free_port(), results), nprocs=world, join=True)
    reference = single_process()
    for rank in range(world):
        for name, (loss, grads) in results[rank].items():
            ref_loss, ref_grads = reference[name]
            assert abs(loss - ref_loss) < 1e-6, (name, rank, loss, ref_loss)
            for g, r in zip(grads, ref_grads):
                assert torch.allclose(g, r, atol=1e-6), (name, rank, (g - r).abs().max())


# ---------------------------------------------------------------- torchrun, end to end
SCAN_TINY = ["--dataset", "synthetic", "--quick", "--image-size", "16", "--subset", "320", "--pretext-epochs", "3",
             "--scan-epochs", "1", "--selflabel-epochs", "1", "--warmup-steps", "30", "--pixel-check", "100",
             "--pretext-batch-size", "64", "--scan-batch-size", "64", "--selflabel-batch-size", "160",
             "--device", "cpu", "--log-every", "1000"]
PROFEAT_TINY = ["--dataset", "synthetic", "--quick", "--image-size", "16", "--subset", "320", "--pretext-epochs", "2",
                "--refine-epochs", "1", "--scan-epochs", "1", "--warmup-steps", "30",
                "--pretext-batch-size", "64", "--scan-batch-size", "64", "--selflabel-batch-size", "160",
                "--device", "cpu", "--log-every", "1000"]
DEEPCLUSTER_TINY = ["--dataset", "synthetic", "--quick", "--image-size", "16", "--epochs", "2", "--device", "cpu",
                    "--batch-size", "64", "--log-every", "1000"]


def launch(script, args, nproc, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, script), *args] if nproc > 1 else [sys.executable, os.path.join(ROOT, script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def kill_every_process_with(text):
    """SIGKILL every process whose command line contains text (torchrun starts its workers in sessions of their own),
    then wait until each has exited (a zombie has: runtime.alive)."""
    killed = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text in open(f"/proc/{pid}/cmdline").read().replace("\0", " "):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
        except (OSError, ProcessLookupError):
            pass
    deadline = time.time() + 60
    while any(runtime.alive(pid) for pid in killed) and time.time() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("script,args", [("scan.py", SCAN_TINY), ("profeat.py", PROFEAT_TINY),
                                         ("deepcluster.py", DEEPCLUSTER_TINY)])
def test_torchrun_two_processes_runs_each_script(script, args, tmp_path):
    results = {}
    for nproc in (1, 2):
        out = str(tmp_path / f"n{nproc}")
        res = launch(script, [*args, "--out-dir", out], nproc)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        results[nproc] = json.load(open(os.path.join(out, "results.json")))["rows"]
    one, two = results[1], results[2]
    assert len(one) == len(two)
    for r1, r2 in zip(one, two):     # the same pipeline on the same global batches: close, not equal (BatchNorm
        if "acc" in r1:              # statistics are per rank, and the augmentations draw other numbers)
            assert r2["acc"] > 0.15 and abs(r1["acc"] - r2["acc"]) < 0.2, (r1, r2)


def test_killed_under_torchrun_and_resumed_with_another_number_of_processes(tmp_path):
    out = str(tmp_path / "run")
    args = [*SCAN_TINY, "--pretext-epochs", "6", "--out-dir", out]
    proc = launch("scan.py", args, 2, wait=False)
    ckpt, deadline = os.path.join(out, "pretext.pt"), time.time() + 300
    while not os.path.exists(ckpt) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    kill_every_process_with(out)                                               # torchrun and both workers
    proc.wait()
    done = torch.load(ckpt, weights_only=False)["epoch"]
    assert 1 <= done < 6
    res = launch("scan.py", args, 1)            # one process now; the dead run's lock is stale and taken over
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"[pretext] resuming after epoch {done}" in res.stdout
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert sorted(r["epoch"] for r in log if r["stage"] == "pretext") == [1, 2, 3, 4, 5, 6]
