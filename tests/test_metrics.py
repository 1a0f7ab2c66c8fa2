"""metrics.py against scikit-learn (to 1e-10) and against hand-computed cases."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import metrics


def random_labelings(seed=0, count=200):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n = int(rng.integers(1, 300))
        num_clusters, num_classes = int(rng.integers(1, 15)), int(rng.integers(1, 15))
        pred = rng.integers(0, num_clusters, n)
        target = rng.integers(0, num_classes, n)
        if rng.random() < 0.3:  # partly agreeing labelings, not only independent noise
            keep = rng.random(n) < 0.7
            pred[keep] = target[keep] % max(num_clusters, 1)
        if rng.random() < 0.2:  # gaps in the ids: empty classes / clusters
            target = target * 3 + 1
        yield pred, target


@pytest.mark.parametrize("seed", [0, 1])
def test_nmi_ari_equal_sklearn_on_random_labelings(seed):
    for pred, target in random_labelings(seed):
        assert abs(metrics.nmi(pred, target) - normalized_mutual_info_score(target, pred)) < 1e-10
        assert abs(metrics.ari(pred, target) - adjusted_rand_score(target, pred)) < 1e-10


@pytest.mark.parametrize("pred,target", [
    ([0, 0, 0, 0], [0, 1, 2, 3]),          # one cluster
    ([0, 1, 2, 3], [0, 0, 0, 0]),          # one class
    ([5, 5, 5], [2, 2, 2]),                # one cluster and one class
    ([0, 1, 2, 3], [3, 2, 1, 0]),          # all singletons, identical partitions
    ([0, 0, 1, 1], [1, 1, 0, 0]),          # identical up to renaming
    ([0, 1, 0, 1], [0, 0, 1, 1]),          # independent
    ([0], [0]),
])
def test_nmi_ari_edge_cases_equal_sklearn(pred, target):
    assert abs(metrics.nmi(pred, target) - normalized_mutual_info_score(target, pred)) < 1e-10
    assert abs(metrics.ari(pred, target) - adjusted_rand_score(target, pred)) < 1e-10


def test_ari_no_overflow_on_large_inputs():
    rng = np.random.default_rng(3)
    target = rng.integers(0, 10, 2_000_000)
    pred = np.where(rng.random(target.size) < 0.8, target, rng.integers(0, 10, target.size))
    assert abs(metrics.ari(pred, target) - adjusted_rand_score(target, pred)) < 1e-10


def test_cluster_acc_hand_computed():
    # clusters renamed: perfect
    assert metrics.cluster_acc([2, 2, 0, 0, 1, 1], [0, 0, 1, 1, 2, 2]) == 1.0
    # best one-to-one map: 0->0 (2 right), 1->1 (1 right); the 0 in cluster 1 cannot also map to class 0
    assert metrics.cluster_acc([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(3 / 4)
    # more clusters than classes: the extra cluster has no class, its samples are errors
    assert metrics.cluster_acc([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(3 / 4)
    # everything in one cluster: accuracy of the largest class
    assert metrics.cluster_acc([0] * 5, [0, 0, 0, 1, 2]) == pytest.approx(3 / 5)


def test_cluster_acc_equals_brute_force_over_permutations():
    from itertools import permutations
    rng = np.random.default_rng(1)
    for _ in range(30):
        pred, target = rng.integers(0, 4, 40), rng.integers(0, 4, 40)
        best = max(np.mean(np.array(perm)[pred] == target) for perm in permutations(range(4)))
        assert metrics.cluster_acc(pred, target) == pytest.approx(best, abs=1e-12)


def test_overcluster_acc_majority_vote():
    # cluster 0 -> class 0 (3 of 4), cluster 1 -> class 1 (2 of 2), cluster 2 -> class 1 (1 of 2, tie: either counts 1)
    pred = [0, 0, 0, 0, 1, 1, 2, 2]
    target = [0, 0, 0, 1, 1, 1, 0, 1]
    assert metrics.overcluster_acc(pred, target) == pytest.approx(6 / 8)
    # many clusters may map to the same class, unlike cluster_acc
    assert metrics.overcluster_acc([0, 1, 2, 3], [0, 0, 1, 1]) == 1.0
    assert metrics.cluster_acc([0, 1, 2, 3], [0, 0, 1, 1]) == 0.5


def test_topk_acc_hand_computed():
    # The Hungarian match is cluster 0 -> class 2, 1 -> 0, 2 -> 1 (5 agreements; any other map gets at most 3).
    probs = np.array([
        [0.7, 0.2, 0.1],   # cluster 0 -> class 2, right
        [0.7, 0.2, 0.1],   # right
        [0.1, 0.8, 0.1],   # cluster 1 -> class 0, right
        [0.1, 0.8, 0.1],   # right
        [0.2, 0.1, 0.7],   # cluster 2 -> class 1, right
        [0.6, 0.3, 0.1],   # top-1 says class 2, target 0 is its 2nd cluster
        [0.5, 0.1, 0.4],   # top-2 clusters 0, 2 -> classes 2, 1: target 0 only at top-3
    ])
    target = np.array([2, 2, 0, 0, 1, 0, 0])
    assert metrics.topk_acc(probs, target, k=1) == pytest.approx(5 / 7)
    assert metrics.topk_acc(probs, target, k=2) == pytest.approx(6 / 7)
    assert metrics.topk_acc(probs, target, k=3) == 1.0
    assert metrics.topk_acc(torch.tensor(probs), torch.tensor(target), k=1) == pytest.approx(5 / 7)


def test_topk_acc_top1_equals_cluster_acc():
    rng = np.random.default_rng(2)
    probs = rng.random((300, 7))
    target = rng.integers(0, 5, 300)
    assert metrics.topk_acc(probs, target, k=1) == pytest.approx(metrics.cluster_acc(probs.argmax(1), target))


def test_confusion_counts():
    conf = metrics.confusion([0, 0, 1, 2, 2, 2], [0, 1, 1, 0, 0, 1])
    np.testing.assert_array_equal(conf, [[1, 1], [0, 1], [2, 1]])
    assert metrics.confusion([0], [0], num_clusters=3, num_classes=2).shape == (3, 2)


def test_evaluate_reports_everything_and_ignores_unknown_labels():
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 1])
    target = torch.tensor([1, 1, 0, 0, 0, -1, -1])   # the last two are unknown
    probs = torch.nn.functional.one_hot(pred, 3).float()
    out = metrics.evaluate(pred, target, probs)
    assert out["K"] == 3 and out["n"] == 5
    assert out["acc"] == pytest.approx(metrics.cluster_acc(pred[:5], target[:5]))
    assert out["nmi"] == pytest.approx(normalized_mutual_info_score(target[:5], pred[:5]))
    assert out["ari"] == pytest.approx(adjusted_rand_score(target[:5], pred[:5]))
    assert out["acc_overcluster"] == 1.0 and "top5" in out
    degenerate = metrics.evaluate([0, 0, 0, 0], [0, 1, 0, 1])
    assert degenerate["K"] == 1 and degenerate["acc"] == 0.5 and degenerate["nmi"] == 0.0
    assert metrics.evaluate([0, 1], [-1, -1]) == {"K": 2, "n": 0}


def test_report_warns_of_empty_clusters_in_words():
    probs = torch.nn.functional.one_hot(torch.tensor([0, 0, 2, 2]), 4).float()  # clusters 1 and 3 hold nothing
    res, text = metrics.report(probs, torch.tensor([0, 0, 1, 1]), ["a", "b"], "t")
    assert res["K"] == 2 and "WARNING: 2 of the 4 clusters hold none of these 4 images" in text
    assert "WARNING" not in metrics.report(probs[:, [0, 2]], torch.tensor([0, 0, 1, 1]), ["a", "b"], "t")[1]


def test_neighbor_acc_and_ratio_edge_intra_class():
    labels = np.array([0, 0, 0, 1])
    indices = np.array([[1, 3], [0, 2], [3, 3], [0, 1]])
    # same-label neighbours per node: 1/2, 2/2, 0/2, 0/2
    assert metrics.neighbor_acc(indices, labels) == pytest.approx(3 / 8)
    # class 0: (1 + 2 + 0) / 6 = 0.5; class 1: 0 / 2 = 0 -> mean 0.25 (classes weigh equally)
    assert metrics.ratio_edge_intra_class(indices, labels) == pytest.approx(0.25)
    assert metrics.neighbor_acc(torch.tensor(indices), torch.tensor(labels)) == pytest.approx(3 / 8)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.cluster_acc([0, 1], [0])
    with pytest.raises(ValueError, match="1-D"):
        metrics.nmi(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="at least one sample"):
        metrics.cluster_acc([], [])


def test_pixel_check_against_brute_force_neighbours_and_accuracies():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (120, 48), generator=g).float()          # [N, C * h * w]
    labels, pretext_z = torch.randint(0, 3, (120,), generator=g), torch.randn(120, 8, generator=g)
    neighbor_idx = torch.stack([torch.randperm(120, generator=g)[:7] for _ in range(120)])   # any graph [N, 7]
    anchors = torch.randperm(120, generator=g)[:40]
    unit = lambda x: torch.nn.functional.normalize(x.double(), dim=1)        # brute force: float64 cosine, sorted
    nearest = lambda x: (unit(x)[anchors] @ unit(x).T).sort(dim=1, descending=True, stable=True).indices[:, :8]
    others = lambda x: torch.stack([row[row != a][:7] for row, a in zip(nearest(x), anchors)])   # [A, 7]
    acc = lambda idx, k: (labels[idx[:, :k]] == labels[anchors, None]).double().mean().item()
    mined, pixel_idx = neighbor_idx[anchors], others(pixels)
    agree = np.mean([len(set(a.tolist()) & set(b.tolist())) / 7 for a, b in zip(mined, pixel_idx)])
    for pretext in (None, pretext_z):
        info, lines = metrics.pixel_check(neighbor_idx, pixels, labels, anchors, pretext)
        assert info["pixel_agreement"] == pytest.approx(agree)
        for k in (5, 7):
            assert info[f"neighbor_acc_top{k}"] == pytest.approx(acc(mined, k))
            assert info[f"pixel_neighbor_acc_top{k}"] == pytest.approx(acc(pixel_idx, k))
        assert ("pretext_neighbor_acc_top7" in info) == (pretext is not None)
        name = "pretext" if pretext is None else "pretext + pixels"
        assert lines[2].startswith(f"top-7 neighbours with the anchor's label: {name} {acc(mined, 7):.3f}, ")
        assert lines[2].endswith(f"raw pixels {acc(pixel_idx, 7):.3f}")
    assert info["pretext_neighbor_acc_top7"] == pytest.approx(acc(others(pretext_z), 7))
    # the WARNING: the pretext's own neighbours (the mined ones, or pretext_z's) less pure than the pixels'
    own = torch.stack([torch.nonzero(labels == y).flatten()[:8] for y in labels])            # [N, 8], own label
    own = torch.stack([row[row != i][:7] for i, row in enumerate(own)])                     # without itself
    other = torch.stack([torch.nonzero(labels != y).flatten()[:7] for y in labels])          # [N, 7], other labels
    assert not metrics.pixel_check(own, pixels, labels, anchors)[1][-1].startswith("WARNING")       # purity 1
    assert metrics.pixel_check(other, pixels, labels, anchors)[1][-1].startswith("WARNING: the pretext's")   # purity 0
    warned = metrics.pixel_check(own, pixels, labels, anchors, pretext_z)[1][-1].startswith("WARNING")
    assert warned == (acc(others(pretext_z), 7) < acc(pixel_idx, 7))
    assert len(metrics.pixel_check(own, pixels, labels - 1, anchors)[1]) == 1                # no labels: agreement
