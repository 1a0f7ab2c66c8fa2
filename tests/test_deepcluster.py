"""Tests for deepcluster.py: PIC, k-means, PCA-whitening, Sobel, the uniform sampler, augmentation (each against a
naive transcription of the thesis / reference algorithm), fp32 features, and whole runs: smoke, kill + resume, the
resume rule, --predict, non-finite losses and bad input.

    python -m pytest tests/test_deepcluster.py -q
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.sparse
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import deepcluster as dc  # noqa: E402
from knn import knn  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


# ---------------------------------------------------------------------------------------------------- naive references
def reference_pic(neighbor_idx, neighbor_dist, sigma=0.2, alpha=0.001, iters=200):
    """Direct port of the reference algorithm: scipy CSR A + A^T, 200 power iterations in float64, then a Python
    loop over nodes for the pointers (strict '>' over sorted columns) and a node-by-node walk to the root."""
    n, k = neighbor_idx.shape
    a = scipy.sparse.csr_matrix((np.exp(-neighbor_dist.double().numpy().ravel() / sigma ** 2),
                                 neighbor_idx.numpy().ravel(), np.arange(n + 1) * k), shape=(n, n))
    W = (a + a.T).tocsr()
    W.sort_indices()
    v = np.ones(n) / n
    for _ in range(iters):
        v = alpha * W.T.dot(v) + (1 - alpha) / n
        v /= v.sum()
    pointers = list(range(n))
    for i in range(n):
        best = 0
        for l in range(W.indptr[i], W.indptr[i + 1]):
            j = W.indices[l]
            s = W.data[l] * (v[j] - v[i])
            if s > best:
                best, pointers[i] = s, j
    roots = []
    for i in range(n):
        cur = i
        while pointers[cur] != cur:
            cur = pointers[cur]
        roots.append(cur)
    return np.array(roots), v


def same_partition(a, b):
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def random_knn_graph(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) * 0.15
    dist, idx = knn(x, k=k, metric="l2")
    return idx, dist


# ---------------------------------------------------------------------------------------------------- PIC
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pic_equals_reference_algorithm_on_random_graphs(seed):
    idx, dist = random_knn_graph(400, 5, seed)
    roots_ref, v_ref = reference_pic(idx, dist)
    W = dc.pic_graph(idx, dist)
    v, iters = dc.pic_power_iteration(W, max_iters=200)
    assert iters < 200  # stopped early: v stopped changing
    np.testing.assert_allclose(v.numpy(), v_ref, rtol=1e-13, atol=0)
    roots = dc.follow_pointers(dc.pic_pointers(W, v))
    assert same_partition(roots.numpy(), roots_ref)
    labels, info = dc.pic(idx, dist, singletons=False)
    assert same_partition(labels.numpy(), roots_ref)
    assert info["power_iters"] == iters


@pytest.mark.parametrize("seed", [3, 4])
def test_pointer_jumping_equals_naive_walk(seed):
    g = torch.Generator().manual_seed(seed)
    n = 2000  # random forest: every node points to a node with a larger random value, or to itself
    value = torch.rand(n, generator=g)
    cand = torch.randint(0, n, (n,), generator=g)
    pointer = torch.where(value[cand] > value, cand, torch.arange(n))
    roots = dc.follow_pointers(pointer).tolist()
    p = pointer.tolist()
    for i in range(n):
        cur = i
        while p[cur] != cur:
            cur = p[cur]
        assert roots[i] == cur


def hub_graph(sizes, seed=0):
    """Components that are cliques of size k+1: node 0 of each is at distance 0.01 of every member, the others
    are 0.03 apart, so v peaks at node 0 and every member points to it."""
    idx, dist, comp, start = [], [], [], 0
    for c, s in enumerate(sizes):
        for i in range(s):
            others = [start + j for j in range(s) if j != i]
            d = [0.01 if (i == 0 or j == 0) else 0.03 for j in range(s) if j != i]
            order = np.argsort(d, kind="stable")
            idx.append([others[o] for o in order])
            dist.append([d[o] for o in order])
            comp.append(c)
        start += s
    return torch.tensor(idx), torch.tensor(dist), np.array(comp)


def test_pic_recovers_known_clusters():
    idx, dist, comp = hub_graph([6] * 7)
    labels, info = dc.pic(idx, dist)
    assert same_partition(labels.numpy(), comp)
    assert info["singletons_before_redistribution"] == 0


def test_pic_blobs_never_mix_and_no_singletons_survive():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    blob = torch.arange(4).repeat_interleave(60)
    x = centres[blob] + 0.3 * torch.randn(240, 2, generator=g)
    dist, idx = knn(x, k=5, metric="l2")
    labels, _ = dc.pic(idx, dist)
    for c in labels.unique():  # every cluster lies inside one blob
        assert blob[labels == c].unique().numel() == 1
    assert (torch.bincount(labels) > 1).all()
    assert labels.unique().numel() <= 40  # clusters, not fragments


def test_pic_single_component_and_ties():
    idx, dist, _ = hub_graph([9])  # one component with a hub: one cluster
    labels, _ = dc.pic(idx, dist)
    assert labels.unique().tolist() == [0]
    # a ring where every node has the same neighbourhood: v stays exactly uniform, every score is 0 (a tie, not a
    # positive gain), so every node is its own root; all neighbours are singletons too, so they stay singletons
    n = 12
    ring = torch.tensor([[(i - 1) % n, (i + 1) % n] for i in range(n)])
    labels, info = dc.pic(ring, torch.full((n, 2), 0.01))
    assert sorted(labels.tolist()) == list(range(n)) and info["singletons_before_redistribution"] == n
    # two neighbours with the same best score: the lower index wins (the reference scans sorted columns with '>')
    W = torch.sparse_coo_tensor(torch.tensor([[0, 0, 1, 2], [1, 2, 0, 0]]), torch.ones(4, dtype=torch.float64),
                                (3, 3), check_invariants=False).to_sparse_csr()
    pointer = dc.pic_pointers(W, torch.tensor([0.1, 0.45, 0.45], dtype=torch.float64))
    assert pointer.tolist() == [1, 1, 2]


def test_pic_isolated_nodes():
    # node 0 has no stored edge at all; node 1 points nowhere either: no positive gain
    W = torch.sparse_coo_tensor(torch.tensor([[2, 3], [3, 2]]), torch.ones(2, dtype=torch.float64), (4, 4),
                                check_invariants=False).to_sparse_csr()
    pointer = dc.pic_pointers(W, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    assert pointer.tolist() == [0, 1, 3, 3]
    # an outlier whose edges underflow to weight 0 is a singleton before redistribution, then joins its nearest
    # non-singleton neighbour's cluster
    idx, dist, comp = hub_graph([6, 6])
    idx = torch.cat([idx, torch.tensor([[7, 6, 1, 2, 3]])])
    dist = torch.cat([dist, torch.full((1, 5), 100.0)])  # exp(-100 / 0.04) == 0 in float64
    labels, info = dc.pic(idx, dist)
    assert info["singletons_before_redistribution"] == 1
    assert labels[12] == labels[7] and labels[7] != labels[0]


def test_singleton_redistribution_hand_case():
    labels = torch.tensor([0, 0, 0, 1, 2, 3, 4, 4])  # 3, 4, 5 are singletons (1, 2, 3)
    neighbor_idx = torch.tensor([[1, 2], [0, 2], [0, 1],
                                 [4, 1],  # node 3: nearest non-singleton is node 1 -> cluster 0
                                 [3, 5],  # node 4: only singleton neighbours -> stays alone
                                 [4, 6],  # node 5: node 6 -> cluster 4
                                 [7, 5], [6, 5]])
    out = dc.redistribute_singletons(labels, neighbor_idx)
    assert out.tolist() == [0, 0, 0, 0, 1, 2, 2, 2]


# ---------------------------------------------------------------------------------------------------- k-means
def naive_lloyd(x, centroids):
    """One Lloyd step by loops: nearest centroid per point, then cluster means."""
    x, c = x.double().numpy(), centroids.double().numpy()
    assign = np.array([np.argmin([((p - q) ** 2).sum() for q in c]) for p in x])
    new = np.array([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(len(c))])
    return assign, new


def test_kmeans_equals_naive_lloyd_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    init = x[torch.randperm(60, generator=torch.Generator().manual_seed(7))[:4]]
    a1, c1 = naive_lloyd(x, init)
    a2, c2 = naive_lloyd(x, torch.from_numpy(c1))
    labels, centroids, history, splits = dc.kmeans(x, 4, iters=2, seed=7)
    assert splits == 0
    np.testing.assert_allclose(centroids.numpy(), c2, rtol=1e-12, atol=1e-12)
    assert labels.tolist() == naive_lloyd(x, torch.from_numpy(c2))[0].tolist()
    inertia = lambda a, c: ((x.numpy() - c[a]) ** 2).sum()
    np.testing.assert_allclose(history, [inertia(a1, init.numpy()), inertia(a2, c1),
                                         inertia(labels.numpy(), c2)], rtol=1e-10)


def test_kmeans_bounds_skip_points_yet_equal_lloyd(monkeypatch):
    # Hamerly's bounds must change nothing but the work: 12 iterations on clustered float64 data equal 12 naive
    # Lloyd steps (a vectorised numpy transcription), while the later assignments measure only some points.
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(12, 8, generator=g, dtype=torch.float64) * 4).repeat(50, 1)
    x += torch.randn(600, 8, generator=g, dtype=torch.float64)
    k, iters = 10, 12
    c = x[torch.randperm(600, generator=torch.Generator().manual_seed(5))[:k]].numpy()
    xn = x.numpy()
    for _ in range(iters):
        assign = ((xn[:, None] - c[None]) ** 2).sum(2).argmin(1)
        c = np.stack([xn[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
    assign = ((xn[:, None] - c[None]) ** 2).sum(2).argmin(1)
    measured = []
    real = dc.nearest_two
    monkeypatch.setattr(dc, "nearest_two", lambda x, x_sq, cen, idx, rows: (
        measured.append(len(x) if idx is None else len(idx)), real(x, x_sq, cen, idx, rows))[1])
    labels, centroids, history, splits = dc.kmeans(x, k, iters=iters, seed=5)
    assert splits == 0
    assert labels.tolist() == assign.tolist()
    np.testing.assert_allclose(centroids.numpy(), c, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(history[-1], ((xn - c[assign]) ** 2).sum(), rtol=1e-9)
    assert measured[0] == 600 and len(measured) <= iters + 1
    assert sum(measured) < 0.5 * 600 * (iters + 1)  # most assignments were proven unchanged by the bounds


def test_kmeans_inertia_never_increases():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 16, generator=g) + 3 * torch.randn(8, 16, generator=g).repeat(375, 1)
    _, _, history, splits = dc.kmeans(x, 20, iters=20, seed=1, chunk_rows=700)  # chunked path too
    assert splits == 0
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:]))
    assert history[-1] < history[0]


def test_kmeans_no_empty_cluster_survives():
    # every point three times and k = 60 of 100 distinct points: the random init picks duplicates, whose centroids
    # coincide and lose all their points to the lower index; faiss' rule must split others until none is empty
    total = 0
    for seed in range(5):
        x = torch.randn(100, 4, generator=torch.Generator().manual_seed(seed)).repeat(3, 1)
        labels, _, _, splits = dc.kmeans(x, 60, iters=20, seed=seed)
        total += splits
        assert torch.bincount(labels, minlength=60).min() > 0
    assert total > 0  # the split rule was exercised


def test_kmeans_rejects_bad_k():
    with pytest.raises(dc.UsageError):
        dc.kmeans(torch.randn(5, 2), 6)


# ---------------------------------------------------------------------------------------------------- features, input
def test_pca_whitening_identity_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 32, generator=g, dtype=torch.float64)
    mean, proj = dc.pca_whitening(x, 10)
    y = (x - mean) @ proj  # [N, 10]
    np.testing.assert_allclose(torch.cov(y.T).numpy(), np.eye(10), atol=1e-8)
    # the kept directions are the top principal components: they capture the top-10 eigenvalues' variance
    evals = np.linalg.eigvalsh(np.cov(x.numpy().T))[::-1]
    basis = np.linalg.qr(proj.numpy())[0]
    captured = np.trace(basis.T @ np.cov(x.numpy().T) @ basis)
    np.testing.assert_allclose(captured, evals[:10].sum(), rtol=1e-8)
    desc = dc.whiten(x, mean, proj)
    np.testing.assert_allclose(desc.norm(dim=1).numpy(), 1.0, rtol=1e-12)


def test_sobel_kernels_are_textbook():
    assert dc.SOBEL_X == [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    assert dc.SOBEL_Y == [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 7, 6, generator=g, dtype=torch.float64)
    out = dc.sobel(x)
    gray = np.pad(x.mean(1).numpy(), ((0, 0), (1, 1), (1, 1)))  # zero padding
    kx, ky = np.array(dc.SOBEL_X), np.array(dc.SOBEL_Y)
    for b in range(2):
        for i in range(7):
            for j in range(6):
                patch = gray[b, i:i + 3, j:j + 3]
                assert abs(out[b, 0, i, j] - (patch * kx).sum()) < 1e-12
                assert abs(out[b, 1, i, j] - (patch * ky).sum()) < 1e-12
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8)  # brightness grows to the right
    assert torch.all(dc.sobel(ramp)[0, 0, 1:-1, 1:-1] == -8)  # (left - right) * (1 + 2 + 1)
    assert torch.all(dc.sobel(ramp)[0, 1, 1:-1, 1:-1] == 0)


def test_uniform_sampler_balanced_with_100x_sizes():
    sizes = [2000, 200, 20, 20]
    labels = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)] + [torch.full((50,), -1)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]  # shuffled order
    num = 2240
    picks = dc.uniform_cluster_sample(labels, num, torch.Generator().manual_seed(1))
    assert len(picks) == num and (labels[picks] >= 0).all()
    counts = torch.bincount(labels[picks], minlength=4)
    assert counts.max() - counts.min() <= 1, counts  # 560 each
    for c in (2, 3):  # a small cluster has all its images drawn (then repeats)
        assert set(picks[labels[picks] == c].tolist()) == set((labels == c).nonzero().flatten().tolist())
    big = picks[labels[picks] == 0]
    assert big.unique().numel() == big.numel()  # a big cluster is drawn without replacement

def test_augmentation_per_image_parameters():
    torch.manual_seed(0)
    img = torch.rand(1, 1, 16, 16).expand(64, 1, 16, 16).contiguous()
    out = dc.random_resized_crop_flip(img, (0.2, 1.0), padding_mode="reflection")
    assert out.shape == img.shape
    assert torch.cdist(out.flatten(1), out.flatten(1)).triu(1)[torch.triu_indices(64, 64, 1).unbind()].min() > 0
    # with full-area square crops only the flip is random: each output is the image or its mirror, both occur
    out = dc.random_resized_crop_flip(img, (1.0, 1.0), ratio=(1.0, 1.0), padding_mode="reflection")
    same = (out - img).abs().flatten(1).max(1).values < 1e-5
    mirror = (out - img.flip(3)).abs().flatten(1).max(1).values < 1e-5
    assert (same | mirror).all() and same.any() and mirror.any()


# ---------------------------------------------------------------------------------------------------- evaluation
MEAN, STD = (0.5,), (0.25,)


def small_model_and_images(n=60, seed=0):
    torch.manual_seed(seed)
    model = dc.DeepClusterNet("small", 1, True)
    return model, torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8)


def test_features_are_float32_even_under_autocast():
    """PCA-whitening amplifies the weakest directions: the features it gets must be fp32, never bf16 autocast's."""
    model, images = small_model_and_images()
    plain = dc.extract_features(model, images, MEAN, STD)
    conv = dc.extract_features(model, images, MEAN, STD, conv=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16  # autocast is really on
        under = dc.extract_features(model, images, MEAN, STD)
        under_conv = dc.extract_features(model, images, MEAN, STD, conv=True)
    assert under.dtype == under_conv.dtype == torch.float32
    assert torch.equal(under, plain) and torch.equal(under_conv, conv)
    with torch.no_grad():                                     # and they are the eval-mode network's plain output
        model.eval()
        x = (images.float() / 255 - 0.5) / 0.25
        assert torch.allclose(plain, model(x), atol=1e-6) and torch.allclose(conv, model.features(x), atol=1e-6)
    if torch.cuda.is_available():
        on_gpu = dc.extract_features(model.cuda(), images.cuda(), MEAN, STD)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.equal(dc.extract_features(model, images.cuda(), MEAN, STD), on_gpu)
        assert on_gpu.dtype == torch.float32


def test_final_evaluation_rows_and_top_layer_input(monkeypatch):
    """Three k = #classes evaluations: pre-ReLU descriptors, the same after the ReLU (the top layer's input) and the
    conv features; the predictions (and --predict's centroids) come from the second."""
    model, images = small_model_and_images()
    test = dc.data.Dataset(images, torch.arange(60) % 3, ["a", "b", "c"], MEAN, STD)
    seen, real = [], dc.kmeans_evaluation

    def spy(feats, *a, **kw):
        seen.append(feats.clone())
        return real(feats, *a, **kw)
    monkeypatch.setattr(dc, "kmeans_evaluation", spy)
    args = type("A", (), {"final_clusters": 3, "clustering": "kmeans", "test_split": "test", "epochs": 0})()
    rows, probs, centroids = dc.final_evaluation(args, model, test)
    assert [r["features"] for r in rows] == ["descriptors", "top_layer_input", "conv"]
    for r in rows:
        assert {"acc", "nmi", "ari", "top5", "K", "n", "ratio_edge_intra_class"} <= set(r) and r["n"] == 60
    desc = dc.extract_features(model, images, MEAN, STD)
    assert torch.equal(seen[0], desc) and (desc < 0).any()
    assert torch.equal(seen[1], desc.clamp(min=0))
    assert seen[2].shape == (60, 128 * 9)
    _, expected_probs, expected_centroids = real(desc.clamp(min=0), test.labels, test.classes, 3, "again")
    assert torch.equal(probs, expected_probs) and torch.equal(centroids, expected_centroids)
    x = torch.nn.functional.normalize(desc.clamp(min=0), dim=1)   # each image's cluster: the nearest centroid
    assert torch.equal(probs.argmax(1), torch.cdist(x, centroids).argmin(1))


def test_after_relu_clusters_the_top_layer_input():
    model, images = small_model_and_images(40)
    pre = dc.extract_features(model, images, MEAN, STD)
    assert (pre < 0).any() and torch.equal(torch.relu(pre), pre.clamp(min=0))
    assert "after_relu" in dc.CONFIG_KEYS  # a checkpoint clustered on the other side of the ReLU is not reused


# ---------------------------------------------------------------------------------------------------- end to end
def run_script(*args, wait=True, timeout=300):
    cmd = [sys.executable, os.path.join(ROOT, "deepcluster.py"), "--threads", "1", "--log-every", "0.2", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# --quick (3 epochs) on 600 images of 16 px and 300 test images: a whole run in seconds
QUICK = ["--dataset", "synthetic", "--quick", "--image-size", "16", "--subset", "600", "--test-subset", "300"]


def write_pngs(folder, n, seed=0, size=16):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for i in range(n):  # two kinds of image: stripes and flat colour, with noise
        y = np.arange(size)[:, None] * np.ones(size)
        img = (127 + 100 * np.sin(y * (1 + i % 2))) if i % 2 else np.full((size, size), 60.0 + 3 * (i % 40))
        img = np.clip(img[..., None] + g.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i:03d}.png")
    return folder


def read_log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def wait_for_checkpoint_then_kill(proc, path, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    assert os.path.exists(path), out
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def kmeans_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("km")
    r = run_script(*QUICK, "--out-dir", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


def test_smoke_kmeans(kmeans_run):
    out, r = kmeans_run
    results = json.load(open(out / "results.json"))
    assert results["script"] == "deepcluster.py" and results["dataset"] == "synthetic"
    assert [row["features"] for row in results["rows"]] == ["descriptors", "top_layer_input", "conv"]
    for row in results["rows"]:
        assert {"acc", "nmi", "ari", "top5", "K", "n", "ratio_edge_intra_class"} <= set(row)
        assert row["K"] == 10 and row["n"] == 300 and row["epochs"] == 3
    assert results["final"]["features"] == "top_layer_input" and results["args"]["epochs"] == 3  # --quick: 3
    log = read_log(out)
    assert [row["epoch"] for row in log] == [1, 2, 3]
    for row in log:
        assert {"num_clusters", "singletons", "nmi_labels", "ratio_edge_intra_class", "knn_acc", "loss"} <= set(row)
        assert row["num_clusters"] == 100
    assert "nmi_prev" in log[-1]
    lines = open(out / "predictions.csv").read().splitlines()
    assert lines[0] == "index,label,cluster,confidence" and len(lines) == 301
    ckpt = torch.load(out / "deepcluster.pt", weights_only=False)
    assert ckpt["complete"] and ckpt["epoch"] == 3 and ckpt["centroids"].shape == (10, 512)
    assert os.path.getsize(out / "prototypes.png") > 0 and not (out / ".lock").exists()


def test_explicit_flags_win_over_quick():
    quick = dc.parse_args(["--quick"])
    assert (quick.epochs, quick.arch, quick.subset) == (3, "small", 2000)
    mine = dc.parse_args(["--quick", "--epochs", "6", "--arch=alexnet", "--subset", "500"])
    assert (mine.epochs, mine.arch, mine.subset, mine.test_subset) == (6, "alexnet", 500, 1000)
    assert dc.parse_args(["--epochs", "6"]).arch == "alexnet"


def finite(ckpt):
    return all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_quick_preset_resume_rule_and_divergence(tmp_path):
    """--quick --epochs 2 runs 2 epochs (the preset's 3 do not override it). A run killed after epoch 1: --epochs
    may not change; a huge --lr diverges, stops naming epoch and step and saves nothing; a lower --lr resumes it,
    reported, and the log keeps each epoch once."""
    out = tmp_path / "run"
    proc = run_script(*QUICK, "--epochs", "2", "--out-dir", str(out), wait=False)
    ckpt = wait_for_checkpoint_then_kill(proc, out / "deepcluster.pt")
    assert ckpt["epoch"] == 1 and not ckpt["complete"] and ckpt["config"]["epochs"] == 2 and finite(ckpt)
    refused = run_script(*QUICK, "--epochs", "3", "--out-dir", str(out))            # epochs: not while unfinished
    assert refused.returncode == 2 and "--epochs 2 (now 3)" in refused.stderr, refused.stderr
    diverged = run_script(*QUICK, "--epochs", "2", "--lr", "1e12", "--out-dir", str(out))
    assert diverged.returncode == 2 and "Traceback" not in diverged.stderr, diverged.stdout + diverged.stderr
    assert re.search(r"loss became non-finite at epoch 2 step \d+;.* resumes after deepcluster epoch 1",
                     diverged.stderr), diverged.stderr
    ckpt = torch.load(out / "deepcluster.pt", weights_only=False)                 # the last good one, untouched
    assert ckpt["epoch"] == 1 and finite(ckpt) and [row["epoch"] for row in read_log(out)] == [1]
    r = run_script(*QUICK, "--epochs", "2", "--lr", "0.03", "--out-dir", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming with --lr 0.03 (the checkpoint used 0.05)" in r.stdout and "resuming after epoch 1" in r.stdout
    log = read_log(out)
    assert [row["epoch"] for row in log] == [1, 2] and [row["lr"] for row in log] == [0.05, 0.03]
    results = json.load(open(out / "results.json"))
    assert results["final"]["epochs"] == 2 and results["args"]["lr"] == 0.03


def test_killed_and_resumed_run_equals_the_uninterrupted_one(kmeans_run, tmp_path):
    full, _ = kmeans_run
    out = tmp_path / "run"
    proc = run_script(*QUICK, "--out-dir", str(out), wait=False)
    epoch = wait_for_checkpoint_then_kill(proc, out / "deepcluster.pt")["epoch"]
    assert epoch < 3
    # as if the kill had come between the in-flight epoch's log line and its checkpoint
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"stage": "deepcluster", "epoch": epoch + 1, "loss": 123.0}) + "\n")
    r = run_script(*QUICK, "--out-dir", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming after epoch {epoch}" in r.stdout and "epoch 1/3" not in r.stdout
    a, b = read_log(full), read_log(out)
    assert [row["epoch"] for row in b] == [1, 2, 3]                                 # each epoch once
    for x, y in zip(a, b):
        assert x["nmi_labels"] == pytest.approx(y["nmi_labels"], abs=1e-9) and x["loss"] == pytest.approx(y["loss"])
    assert json.load(open(out / "results.json"))["rows"] == json.load(open(full / "results.json"))["rows"]


def test_finished_run_refuses_other_epochs_and_keeps_its_results(kmeans_run):
    out, _ = kmeans_run
    before = (out / "results.json").read_bytes()
    for flags in (["--epochs", "4"], ["--epochs", "2"], ["--lr", "0.01"]):              # finished: nothing may change
        r = run_script(*QUICK, *flags, "--out-dir", str(out))
        assert r.returncode == 2 and flags[0] in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (out / "results.json").read_bytes() == before


def test_predict_a_folder_and_refuse_an_unfinished_run(kmeans_run, tmp_path):
    out, _ = kmeans_run
    folder = write_pngs(tmp_path / "new", 5)
    r = run_script("--predict", str(folder), "--out-dir", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = open(out / "predict-new.csv").read().splitlines()
    assert lines[0] == "file,cluster,confidence" and len(lines) == 6
    assert all(0 <= int(l.split(",")[1]) < 10 and 0 < float(l.split(",")[2]) <= 1 for l in lines[1:])
    assert os.path.getsize(out / "predict-new.png") > 0
    one = run_script("--predict", str(folder / "img000.png"), "--out-dir", str(out))   # a single image
    assert one.returncode == 0 and len(open(out / "predict-img000.csv").read().splitlines()) == 2
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    r = run_script("--predict", str(folder), "--out-dir", str(unfinished))
    assert r.returncode == 2 and "no finished" in r.stderr and "Traceback" not in r.stderr
    r = run_script("--predict", str(tmp_path / "missing"), "--out-dir", str(out))
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_pic_on_an_unlabelled_image_folder(tmp_path):
    """PIC needs no --num-clusters (its default must not refuse 80 images); no labels: no label metrics."""
    folder = write_pngs(tmp_path / "flat", 80)
    out = tmp_path / "pic"
    r = run_script("--dataset", f"imagefolder:{folder}", "--clustering", "pic", "--quick", "--epochs", "2",
                   "--image-size", "16", "--batch-size", "32", "--out-dir", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    log = read_log(out)
    assert [row["epoch"] for row in log] == [1, 2]
    assert all(row["power_iters"] <= 200 and row["num_clusters"] >= 1 and "nmi_labels" not in row for row in log)
    results = json.load(open(out / "results.json"))
    assert all(row["num_clusters"] == 10 and 2 <= row["K"] <= 10 and "acc" not in row for row in results["rows"])
    assert len(open(out / "predictions.csv").read().splitlines()) == 81


def test_bad_input_exits_2_in_a_real_process(tmp_path):
    r = run_script("--dataset", "nonexistent", "--out-dir", str(tmp_path))
    assert r.returncode == 2 and "nonexistent" in r.stderr and "Traceback" not in r.stderr


def test_one_class_dataset_is_refused(tmp_path):
    write_pngs(tmp_path / "data" / "cats", 20)
    r = run_script("--dataset", f"imagefolder:{tmp_path / 'data'}", "--image-size", "16", "--out-dir",
                   str(tmp_path / "out"))
    assert r.returncode == 2 and "single class" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args, words", [
    (["--dataset", "synthetic", "--num-clusters", "1"], "--num-clusters"),
    (["--dataset", "synthetic", "--quick", "--num-clusters", "5000"], "--num-clusters"),
    (["--dataset", "synthetic", "--epochs", "-1"], "--epochs"),
    (["--dataset", "synthetic", "--threads", "-1"], "--threads"),
    (["--dataset", "synthetic", "--lr", "-1"], "--lr"),
    (["--dataset", "synthetic", "--quick", "--lr", "0"], "--lr"),
    (["--dataset", "synthetic", "--quick", "--crop-min", "1.5"], "--crop-min"),
    (["--dataset", "synthetic", "--quick", "--batch-size", "3000"], "give --batch-size 2000 or less"),
    (["--dataset", "synthetic", "--arch", "vgg99"], "arch"),
    (["--dataset", "synthetic", "--device", "tpu"], "tpu"),
    (["--dataset", "imagefolder:/nonexistent/folder"], "/nonexistent/folder"),
])
def test_bad_input_exits_2(args, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dc.runtime.main(dc.SCRIPT, dc.run, args + ["--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "deepcluster.pt")


def test_bad_checkpoint_exits_2(kmeans_run, tmp_path, capsys):
    (tmp_path / "deepcluster.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        dc.runtime.main(dc.SCRIPT, dc.run, QUICK + ["--out-dir", str(tmp_path)])
    assert e.value.code == 2 and "corrupted" in capsys.readouterr().err
    assert (tmp_path / "deepcluster.pt").read_bytes() == b"not a checkpoint"  # nothing overwritten
    full, _ = kmeans_run  # a checkpoint from another configuration
    (tmp_path / "deepcluster.pt").write_bytes((full / "deepcluster.pt").read_bytes())
    with pytest.raises(SystemExit) as e:
        dc.runtime.main(dc.SCRIPT, dc.run, QUICK + ["--no-sobel", "--out-dir", str(tmp_path)])
    assert e.value.code == 2 and "--no-sobel False (now True)" in capsys.readouterr().err
