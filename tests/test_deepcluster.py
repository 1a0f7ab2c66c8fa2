"""Tests for deepcluster.py: PIC, k-means, PCA-whitening, Sobel, the uniform sampler, augmentation, smoke runs,
resume and bad input. Each compares against a naive transcription of the thesis / reference algorithm."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import deepcluster as dc  # noqa: E402
from knn import knn  # noqa: E402

torch.set_num_threads(2)
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
    k = sizes[0] - 1
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
    out = dc.random_resized_crop_flip(img, 0.2)
    assert out.shape == img.shape
    assert torch.cdist(out.flatten(1), out.flatten(1)).triu(1)[torch.triu_indices(64, 64, 1).unbind()].min() > 0
    # with full-area square crops only the flip is random: each output is the image or its mirror, both occur
    out = dc.random_resized_crop_flip(img, 1.0, ratio=(1.0, 1.0))
    same = (out - img).abs().flatten(1).max(1).values < 1e-5
    mirror = (out - img.flip(3)).abs().flatten(1).max(1).values < 1e-5
    assert (same | mirror).all() and same.any() and mirror.any()


# ---------------------------------------------------------------------------------------------------- end to end
def run_script(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "deepcluster.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


QUICK = ["--dataset", "synthetic", "--quick", "--epochs", "2", "--image-size", "16"]  # 16 px: a fast smoke run


@pytest.fixture(scope="module")
def kmeans_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("km")
    r = run_script(*QUICK, "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    return out, r


def check_outputs(out, epochs):
    results = json.load(open(out / "results.json"))
    assert [r["features"] for r in results] == ["descriptors", "top_layer_input", "conv"]
    result = results[0]
    assert {"acc", "nmi", "ari", "top5", "K", "nonempty", "ratio_edge_intra_class"} <= set(result)
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["epoch"] for r in log] == list(range(1, epochs + 1))
    for r in log:
        assert {"num_clusters", "singletons", "nmi_labels", "ratio_edge_intra_class", "knn_acc", "loss"} <= set(r)
    assert "nmi_prev" in log[-1]
    rows = open(out / "predictions.csv").read().splitlines()
    assert rows[0] == "index,cluster,confidence,label" and len(rows) == 1001
    assert os.path.getsize(out / "prototypes.png") > 0 and os.path.exists(out / "checkpoint.pt")
    return result, log


def test_smoke_kmeans(kmeans_run):
    out, r = kmeans_run
    result, log = check_outputs(out, 2)
    assert result["K"] == 10 and log[0]["num_clusters"] == 100
    assert "final" in r.stdout


def test_final_evaluation_rows_and_top_layer_input(monkeypatch, tmp_path):
    """Three k = #classes evaluations: pre-ReLU descriptors, the same after the ReLU (the top layer's input) and the
    conv features; predictions.csv holds the clusters of the second."""
    torch.manual_seed(0)
    model = dc.DeepClusterNet("small", 1, True)
    images = torch.randint(0, 256, (60, 1, 16, 16), dtype=torch.uint8)
    ds = type("DS", (), {"labels": torch.arange(60) % 3})()
    seen, real = [], dc.kmeans_evaluation

    def spy(feats, target, k):
        seen.append(feats.clone())
        return real(feats, target, k)
    monkeypatch.setattr(dc, "kmeans_evaluation", spy)
    args = type("A", (), {"out_dir": str(tmp_path)})()
    rows = dc.final_evaluation(args, model, ds, images, torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), 3)
    assert [r["features"] for r in rows] == ["descriptors", "top_layer_input", "conv"]
    desc = dc.extract_features(model, images, torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    assert torch.equal(seen[0], desc) and (desc < 0).any()
    assert torch.equal(seen[1], desc.clamp(min=0))
    assert seen[2].shape == (60, 128 * 9)
    clusters = [int(line.split(",")[1]) for line in open(tmp_path / "predictions.csv").read().splitlines()[1:]]
    expected, _, _ = real(desc.clamp(min=0), ds.labels, 3)
    assert clusters == expected.tolist()


def test_smoke_pic(tmp_path):
    r = run_script(*QUICK, "--clustering", "pic", "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    _, log = check_outputs(tmp_path, 2)
    assert all("power_iters" in rec and rec["power_iters"] <= 200 for rec in log)


def test_resume_gives_the_same_run(kmeans_run, tmp_path):
    full, _ = kmeans_run
    r = run_script(*QUICK[:4], "1", *QUICK[5:], "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    r = run_script(*QUICK, "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout and "epoch 1/" not in r.stdout
    a = [json.loads(line) for line in open(full / "log.jsonl")]
    b = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    for x, y in zip(a, b):
        assert x["nmi_labels"] == pytest.approx(y["nmi_labels"], abs=1e-6)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    ra, rb = (json.load(open(p / "results.json"))[0] for p in (full, tmp_path))
    assert ra["acc"] == pytest.approx(rb["acc"], abs=1e-6)


def test_bad_input_exits_2_in_a_real_process(tmp_path):
    r = run_script("--dataset", "nonexistent", "--out-dir", str(tmp_path))
    assert r.returncode == 2 and "nonexistent" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, words", [
    (["--dataset", "synthetic", "--num-clusters", "1"], "--num-clusters"),
    (["--dataset", "synthetic", "--quick", "--num-clusters", "5000"], "--num-clusters"),
    (["--dataset", "synthetic", "--epochs", "-1"], "--epochs"),
    (["--dataset", "synthetic", "--arch", "vgg99"], "arch"),
    (["--dataset", "synthetic", "--device", "tpu"], "tpu"),
    (["--dataset", "imagefolder:/nonexistent/folder"], "/nonexistent/folder"),
])
def test_bad_input_exits_2(args, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dc.main(args + ["--out-dir", str(tmp_path)])
    assert e.value.code == 2 and words in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "checkpoint.pt")


def test_bad_checkpoint_exits_2(kmeans_run, tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        dc.main(QUICK + ["--out-dir", str(tmp_path)])
    assert e.value.code == 2 and "corrupted" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"not a checkpoint"  # nothing overwritten
    full, _ = kmeans_run  # a checkpoint from another configuration
    (tmp_path / "checkpoint.pt").write_bytes((full / "checkpoint.pt").read_bytes())
    with pytest.raises(SystemExit) as e:
        dc.main(QUICK + ["--no-sobel", "--out-dir", str(tmp_path)])
    assert e.value.code == 2 and "another configuration" in capsys.readouterr().err


def test_after_relu_clusters_the_top_layer_input_and_old_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    model = dc.DeepClusterNet("small", 1, True)
    images = torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8)
    mean, std = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    pre = dc.extract_features(model, images, mean, std)
    post = dc.extract_features(model, images, mean, std, after_relu=True)
    assert (pre < 0).any() and torch.equal(post, pre.clamp(min=0))
    conv = dc.extract_features(model, images, mean, std, conv=True, after_relu=True)
    assert torch.equal(conv, dc.extract_features(model, images, mean, std, conv=True))  # conv rows unaffected
    # a checkpoint written before --after-relu existed is the default (before the ReLU), not another configuration
    args = dc.parse_args(QUICK + ["--out-dir", str(tmp_path)])
    saved = {k: getattr(args, k) for k in dc.CONFIG_KEYS if k != "after_relu"}
    torch.save(dict(model={}, optimizer={}, epoch=1, labels=None, args=saved), tmp_path / "checkpoint.pt")
    assert dc.load_checkpoint(str(tmp_path / "checkpoint.pt"), args)["epoch"] == 1
    args.after_relu = True
    with pytest.raises(dc.UsageError, match="after-relu"):
        dc.load_checkpoint(str(tmp_path / "checkpoint.pt"), args)
