"""Tests of scan.py: losses against loop transcriptions of the equations, the stages' pieces, and whole runs in
subprocesses (kill and resume, Ctrl-C, bad input, foreign checkpoints, a diverged run, --predict).

    python -m pytest tests/test_scan.py -q
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import metrics
import runtime
import scan
import synthetic
from knn import whitening

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)
# A tiny run: 300 synthetic 16x16 images, a few epochs of each stage (seconds).
TINY = ["--dataset", "synthetic", "--quick", "--image-size", "16", "--subset", "300", "--pretext-epochs", "3",
        "--scan-epochs", "2", "--selflabel-epochs", "2", "--warmup-steps", "30", "--pixel-check", "100",
        "--device", "cpu", "--threads", "1", "--log-every", "1000"]


def run(*args, wait=True, timeout=300):
    cmd = [sys.executable, os.path.join(ROOT, "scan.py"), *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def rows(out):
    return json.load(open(os.path.join(out, "results.json")))["rows"]


def log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


# ---------------------------------------------------------------- losses vs naive transcriptions (values + gradients)
def grads(fn, *tensors):
    tensors = [t.clone().double().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    out.backward()
    return out.detach(), [t.grad for t in tensors]


def naive_nt_xent(z1, z2, tau):
    z, B, total = torch.cat([z1, z2]), len(z1), 0.0
    for i in range(2 * B):
        pos = (i + B) % (2 * B)
        denom = sum(torch.exp(z[i] @ z[k] / tau) for k in range(2 * B) if k != i)
        total = total - torch.log(torch.exp(z[i] @ z[pos] / tau) / denom)
    return total / (2 * B)


def test_nt_xent_matches_loop():
    torch.manual_seed(0)
    z1, z2 = F.normalize(torch.randn(5, 4), dim=1), F.normalize(torch.randn(5, 4), dim=1)
    v, g = grads(lambda a, b: scan.nt_xent(a, b, 0.1), z1, z2)
    v_ref, g_ref = grads(lambda a, b: naive_nt_xent(a, b, 0.1), z1, z2)
    assert torch.allclose(v, v_ref, atol=1e-10) and all(torch.allclose(x, y, atol=1e-10) for x, y in zip(g, g_ref))


def naive_scan(anchor_logits, neighbor_logits, w):
    B, K = anchor_logits.shape
    pa, pn = anchor_logits.softmax(1), neighbor_logits.softmax(1)
    consistency = -sum(torch.log(sum(pa[i, c] * pn[i, c] for c in range(K))) for i in range(B)) / B
    mean = [sum(pa[i, c] for i in range(B)) / B for c in range(K)]
    entropy = -sum(m * torch.log(m) for m in mean)
    return consistency - w * entropy                                           # Eq. (2): + w * sum p' log p'


def test_scan_loss_matches_loop_and_entropy_sign():
    torch.manual_seed(1)
    a, n = torch.randn(6, 4) * 2, torch.randn(6, 4) * 2
    v, g = grads(lambda x, y: scan.scan_loss(x, y, 5.0)[0], a, n)
    v_ref, g_ref = grads(lambda x, y: naive_scan(x, y, 5.0), a, n)
    assert torch.allclose(v, v_ref, atol=1e-10) and all(torch.allclose(x, y, atol=1e-10) for x, y in zip(g, g_ref))
    total, consistency, entropy = scan.scan_loss(a, n, 5.0)
    assert torch.allclose(total, consistency - 5.0 * entropy)
    uniform = torch.eye(4).repeat(2, 1) * 20                                   # 8 confident samples, 2 per cluster
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 20
    _, c_u, e_u = scan.scan_loss(uniform, uniform, 5.0)
    _, c_c, e_c = scan.scan_loss(collapsed, collapsed, 5.0)
    assert abs(e_u.item() - math.log(4)) < 1e-6 and e_c.item() < 1e-6
    assert c_u.item() < 1e-6 and c_c.item() < 1e-6                            # both perfectly consistent
    assert scan.scan_loss(uniform, uniform, 5.0)[0] < scan.scan_loss(collapsed, collapsed, 5.0)[0]


def naive_structured(qa_logits, qb_logits, za, zb, tau_c, tau_cc, eta_cc, lambda_b):
    B, c = qa_logits.shape
    qa, qb = qa_logits.softmax(1), qb_logits.softmax(1)
    l_cl = sum(-torch.exp(za[i] @ zb[i] / tau_c) * torch.log(qa[i] @ qb[i]) for i in range(B)) / B   # Eq. (4)-(5)
    pa = torch.stack([p / torch.sqrt(sum(v * v for v in p)) for p in qa.t()])  # unit cluster vectors (cosine)
    pb = torch.stack([p / torch.sqrt(sum(v * v for v in p)) for p in qb.t()])

    def l_cc(p, q):  # Eq. (6), gamma = 1
        total = 0.0
        for l in range(c):
            den = sum(torch.exp(p[l] @ q[j] / tau_cc) for j in range(c) if j != l)
            total = total - torch.log(torch.exp(p[l] @ q[l] / tau_cc) / den)
        return total
    L_cc = (l_cc(pa, pb) + l_cc(pb, pa)) / (2 * c)                            # Eq. (7), one batch
    qbar = [sum(qa[i, l] for i in range(B)) / B for l in range(c)]
    L_b = sum(q * torch.log(q) for q in qbar)                                  # Eq. (8)
    return l_cl + eta_cc * L_cc + lambda_b * L_b, l_cl, L_cc, L_b


def test_structured_loss_matches_loop():
    torch.manual_seed(2)
    a, b = torch.randn(7, 5), torch.randn(7, 5)
    za, zb = F.normalize(torch.randn(7, 3), dim=1).double(), F.normalize(torch.randn(7, 3), dim=1).double()
    args = (8.0, 1.0, 1.0, 5.0)
    v, g = grads(lambda x, y: scan.structured_loss(x, y, za, zb, *args)[0], a, b)
    v_ref, g_ref = grads(lambda x, y: naive_structured(x, y, za, zb, *args)[0], a, b)
    assert torch.allclose(v, v_ref, atol=1e-10) and all(torch.allclose(x, y, atol=1e-10) for x, y in zip(g, g_ref))
    terms = scan.structured_loss(a.double(), b.double(), za, zb, 0.5, 0.3, 2.0, 3.0)   # each term, other weights
    for t, r in zip(terms, naive_structured(a.double(), b.double(), za, zb, 0.5, 0.3, 2.0, 3.0)):
        assert torch.allclose(t, r, atol=1e-10)
    same = scan.structured_loss(a, b, za.float(), za.float(), 8.0, 1.0, 0.0, 0.0)[1]    # w_ij = exp(z_i.z_j / tau_c)
    opposite = scan.structured_loss(a, b, za.float(), -za.float(), 8.0, 1.0, 0.0, 0.0)[1]
    assert torch.allclose(same / opposite, torch.tensor(math.exp(2 / 8.0)), rtol=1e-5)


@pytest.mark.parametrize("loss", ["scan", "structured"])
def test_losses_of_several_heads_at_once_equal_one_head_at_a_time(loss):
    torch.manual_seed(3)
    a, n = torch.randn(3, 6, 4), torch.randn(3, 6, 4)                         # [H, B, C]
    za, zn = F.normalize(torch.randn(6, 5), dim=1), F.normalize(torch.randn(6, 5), dim=1)
    fn = (lambda x, y: scan.scan_loss(x, y, 5.0)[0]) if loss == "scan" else \
        (lambda x, y: scan.structured_loss(x, y, za, zn)[0])
    assert torch.allclose(fn(a, n), torch.stack([fn(a[h], n[h]) for h in range(3)]), atol=1e-6)


def naive_confidence_ce(weak, strong, thr):  # thr: one threshold, or a list of one per class
    p = weak.softmax(1)
    conf = [i for i in range(len(p)) if p[i].max() > (thr[int(p[i].argmax())] if isinstance(thr, list) else thr)]
    labels = {i: int(p[i].argmax()) for i in conf}
    per_class = []  # class-balanced: every pseudo-class contributes its mean loss equally
    for c in sorted(set(labels.values())):
        members = [i for i in conf if labels[i] == c]
        per_class.append(sum(-F.log_softmax(strong[i], 0)[c] for i in members) / len(members))
    return sum(per_class) / len(per_class)


def test_confidence_ce_matches_loop_and_balances():
    torch.manual_seed(3)
    weak = torch.randn(40, 4) * 4
    weak[:12, 0] += 30                                                         # 12 confident in class 0
    weak[12:15, 2] += 30                                                       # 3 confident in class 2
    strong = torch.randn(40, 4)
    v, g = grads(lambda s: scan.confidence_ce(weak.double(), s, 0.99)[0], strong)
    v_ref, g_ref = grads(lambda s: naive_confidence_ce(weak.double(), s, 0.99), strong)
    assert torch.allclose(v, v_ref, atol=1e-10) and torch.allclose(g[0], g_ref[0], atol=1e-10)
    counts = scan.confidence_ce(weak, strong, 0.99)[1]                        # confident samples per pseudo-label
    prob, label = weak.softmax(1).max(1)
    assert counts.tolist() == [int(((prob > 0.99) & (label == c)).sum()) for c in range(4)] and counts.sum() >= 15
    unconfident = prob <= 0.99
    assert unconfident.sum() > 10 and g[0][unconfident].abs().sum() == 0       # unconfident samples: no gradient
    loss, counts = scan.confidence_ce(torch.zeros(8, 5), torch.randn(8, 5), 0.99)
    assert loss is None and counts.tolist() == [0] * 5
    per_class = [0.99, 0.5, 0.0, 0.9]                                         # per-cluster thresholds, per sample
    sample_threshold = torch.tensor(per_class, dtype=torch.double)[weak.argmax(1)]
    v, g = grads(lambda s: scan.confidence_ce(weak.double(), s, sample_threshold)[0], strong)
    v_ref, g_ref = grads(lambda s: naive_confidence_ce(weak.double(), s, per_class), strong)
    assert torch.allclose(v, v_ref, atol=1e-10) and torch.allclose(g[0], g_ref[0], atol=1e-10)
    counts = scan.confidence_ce(weak, strong, sample_threshold.float())[1]
    assert counts.tolist() == [int(((prob > t) & (label == c)).sum()) for c, t in enumerate(per_class)]
    assert counts[1] + counts[3] > 0 and g[0][unconfident].abs().sum() > 0    # lower thresholds admit more


def naive_cluster_thresholds(probs, thr):
    """FlexMatch's flexible thresholds (no warm-up), written out: sigma, beta, then thr * beta / (2 - beta)."""
    sigma = [0] * probs.shape[1]
    for p in probs.tolist():
        if max(p) > thr:
            sigma[p.index(max(p))] += 1
    if max(sigma) == 0:
        return [thr] * len(sigma)                                              # no confident image: the one threshold
    return [thr * (s / max(sigma)) / (2 - s / max(sigma)) for s in sigma]


def test_cluster_thresholds_match_flexmatch_written_out():
    torch.manual_seed(4)
    logits = torch.randn(500, 5)
    logits[:200, 0] += 12                                                      # confident: 200 in cluster 0,
    logits[200:260, 1] += 12                                                   # 60 in cluster 1, 10 in cluster 3,
    logits[260:270, 3] += 12                                                   # none in clusters 2 and 4
    probs = logits.softmax(1).double()
    ours = scan.cluster_thresholds(probs, 0.99)
    assert torch.allclose(ours, torch.tensor(naive_cluster_thresholds(probs, 0.99), dtype=torch.double))
    assert ours[0] == 0.99 and 0 < ours[3] < ours[1] < 0.5 and ours[2] == 0 and ours[4] == 0
    assert scan.cluster_thresholds(torch.full((10, 5), 0.2), 0.99).tolist() == pytest.approx([0.99] * 5)


# ---------------------------------------------------------------- stage pieces, in process
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    args = scan.parse_args(TINY + ["--out-dir", str(tmp_path_factory.mktemp("unit"))])
    args.device = "cpu"
    _, train, test = scan.load_data(args)
    args.num_clusters = len(train.classes)
    return args, train, test


def test_mine_searches_the_whitened_backbone_and_with_mine_pixels_the_pixels_too(tiny, tmp_path):
    args, train, test = tiny
    torch.manual_seed(0)
    model = scan.ContrastiveModel(scan.make_backbone("smallcnn", 3, 8)).eval()
    feats = F.normalize(runtime.predict(model.backbone, train.images, train.mean, train.std), dim=1)
    pixels = F.normalize(train.images.flatten(1).double(), dim=1)              # 16 px: not resized
    found = {}
    for whiten, mine_pixels in [(True, False), (False, False), (True, True), (False, True)]:
        run = type(args)(**{**vars(args), "whiten": whiten, "mine_pixels": mine_pixels, "pixel_check": 0,
                            "out_dir": str(tmp_path / f"{whiten}{mine_pixels}")})
        os.makedirs(run.out_dir)
        found[whiten, mine_pixels], rows, train_z, start_feats = scan.mine(run, model, train, test)
        projection = runtime.predict(model, train.images, train.mean, train.std)   # the warm-up's k-means spaces:
        assert torch.equal(start_feats[0], feats) and torch.allclose(start_feats[1], F.normalize(projection, dim=1))
        expected = whitening(feats)(feats) if whiten else feats
        assert torch.allclose(train_z @ train_z.T, expected @ expected.T, atol=1e-5)   # cosines (eigenvectors of
        # a repeated eigenvalue are arbitrary): the space of the structured loss' z
        assert [r["features"] for r in rows] == ["projection", "backbone"]   # the baselines: L2-normalised only
        if not mine_pixels:
            assert torch.equal(found[whiten, mine_pixels], scan.knn(train_z, k=args.num_neighbors)[1])
            continue
        # the mean of two cosines, each space whitened as asked, written out in float64
        p = whitening(pixels.float())(pixels.float()).double() if whiten else pixels
        sim = (expected.double() @ expected.double().T + p @ p.T) / 2
        sim.fill_diagonal_(-2)                                                 # not itself
        naive = sim.topk(args.num_neighbors, dim=1).indices
        same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(found[whiten, mine_pixels], naive)]
        assert sum(same) >= 0.98 * len(same)                                   # float32 vs float64: rare near-ties
    assert not torch.equal(found[True, False], found[False, False])          # whitening changed the graph
    assert not torch.equal(found[True, True], found[True, False])            # and so did the pixels


@pytest.mark.parametrize("arch, stage", [("smallcnn", 6), ("resnet18", "layer2")])
def test_middle_features_are_the_second_stage_averaged_on_a_7x7_grid_square_rooted_and_mine_searches_them(
        arch, stage, tiny, tmp_path):
    args, train, test = tiny
    torch.manual_seed(0)
    model = scan.ContrastiveModel(scan.make_backbone(arch, 3, 8)).eval()
    images = train.images[:2]                                                  # uint8 [2, 3, 16, 16]
    maps = []                                                                  # the stage's output, as the net runs
    layer = model.backbone[stage] if arch == "smallcnn" else getattr(model.backbone, stage)
    layer.register_forward_hook(lambda mod, inp, out: maps.append(out.clone()))
    with torch.no_grad():
        model.backbone(scan.normalize(images.float() / 255, train.mean, train.std))
        got = scan.middle_features(model.backbone, images, train.mean, train.std)
    m = maps[0]                                                                # [2, c, h, w], h = w = 16 or 8
    assert m.shape[1] == (16 if arch == "smallcnn" else 128)                   # smallcnn: 2w channels
    edges = [(i * m.shape[-1] // 7, -(-(i + 1) * m.shape[-1] // 7)) for i in range(7)]   # adaptive pooling's cells
    naive = torch.stack([torch.stack([m[:, :, a:b, c:d].mean((2, 3)) for c, d in edges], -1) for a, b in edges], -2)
    assert (got >= 0).all() and torch.allclose(got ** 2, naive.flatten(1), atol=1e-5)   # the root (power norm.)
    if arch == "resnet18":
        return
    run = type(args)(**{**vars(args), "mine_features": "middle", "mine_pixels": False, "pixel_check": 0,
                        "out_dir": str(tmp_path)})
    neighbor_idx, rows, train_z, _ = scan.mine(run, model, train, test)
    z = F.normalize(scan.middle_features(model.backbone, train.images, train.mean, train.std), dim=1)
    expected = whitening(z)(z)
    assert torch.allclose(train_z @ train_z.T, expected @ expected.T, atol=1e-5)
    assert torch.equal(neighbor_idx, scan.knn(train_z, k=args.num_neighbors)[1])
    assert [r["features"] for r in rows] == ["projection", "backbone"]       # the baselines stay


def test_the_pixel_check_searches_the_pixels_as_the_features_are_searched(tiny, tmp_path):
    args, train, test = tiny
    torch.manual_seed(0)
    model = scan.ContrastiveModel(scan.make_backbone("smallcnn", 3, 8)).eval()
    pixels = F.normalize(train.images.flatten(1).double(), dim=1)              # 16 px: not resized
    labels, N, K = train.labels, len(train.images), args.num_neighbors
    accs = {}
    for whiten, mine_pixels in [(True, False), (False, False), (True, True)]:
        run = type(args)(**{**vars(args), "whiten": whiten, "mine_pixels": mine_pixels, "pixel_check": N,
                            "out_dir": str(tmp_path / f"{whiten}{mine_pixels}")})
        os.makedirs(run.out_dir)
        info = scan.mine(run, model, train, test)[1][0]
        p = whitening(pixels.float())(pixels.float()).double() if whiten else pixels   # the pixels' own space
        sim = (p @ p.T).fill_diagonal_(-2)                                     # not itself
        naive = sim.topk(K, dim=1).indices                                     # [N, K]
        accs[whiten, mine_pixels] = (labels[naive] == labels[:, None]).double().mean().item()
        assert info["pixel_neighbor_acc_top20"] == pytest.approx(accs[whiten, mine_pixels], abs=0.01)
    assert accs[True, False] != accs[False, False]                            # whitening changes the pixels' graph


def test_warm_up_starts_from_k_means_trains_the_heads_only_and_lowers_eq2(tiny):
    args, train, _ = tiny
    args = type(args)(**vars(args))
    torch.manual_seed(0)
    model = scan.ClusteringModel(scan.make_backbone("smallcnn", 3, 8), 10, 2)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    feats = runtime.predict(model.backbone, train.images, train.mean, train.std)
    _, neighbor_idx = scan.knn(F.normalize(feats, dim=1), k=5)                # a real k-NN graph of these features
    fits = {}
    for steps in (0, 200):                                                     # the k-means fit alone, then Eq. (2)
        torch.manual_seed(1)
        model.heads = torch.nn.ModuleList([torch.nn.Linear(model.backbone.out_dim, 10) for _ in range(2)])
        args.warmup_steps = steps
        scan.warm_up_heads(args, model, train, neighbor_idx, None, [F.normalize(feats, dim=1)])
        losses = scan.head_losses(model, train, neighbor_idx, args.entropy_weight)   # as the warm-up ranks them
        fits[steps] = (losses, model.heads_forward(feats).argmax(2))
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.items())   # BN statistics too
    partitions = [scan.kmeans(F.normalize(feats, dim=1), 10, seed=args.seed * 1000 + r)[0] for r in range(5)]
    for head in fits[0][1]:                                                    # the fit reproduces a k-means partition
        assert max(metrics.cluster_acc(head, k_means) for k_means in partitions) > 0.9
    assert (fits[200][0] < fits[0][0]).all()                                   # and Eq. (2) then goes down
    torch.manual_seed(1)                                                       # the same 5 candidates as above
    model.heads = torch.nn.ModuleList([torch.nn.Linear(model.backbone.out_dim, 10) for _ in range(5)])
    scan.warm_up_heads(args, model, train, neighbor_idx, None, [F.normalize(feats, dim=1)])   # all 5, best first
    losses = scan.head_losses(model, train, neighbor_idx, args.entropy_weight)
    assert torch.equal(losses, losses.sort().values) and torch.allclose(losses[:2], fits[200][0], atol=1e-6)


def test_warm_up_keeps_a_carried_head_as_one_more_candidate(tiny):
    """profeat.py's --carry-h passes carried = 1 (head 0 is the last iteration's): the warm-up fits it to its own
    partition, beside the k-means ones, and Eq. (2) chooses. On a graph that links only images of that partition it
    is the one kept; not carried, the head is refitted to k-means like the others and that partition is lost."""
    args, train, _ = tiny
    args = type(args)(**vars(args))
    args.warmup_steps = 0
    torch.manual_seed(0)
    model = scan.ClusteringModel(scan.make_backbone("smallcnn", 3, 8), 10, 1)
    feats = runtime.predict(model.backbone, train.images, train.mean, train.std)
    directions = torch.randn(feats.shape[1], 10) / feats.std()                 # a random linear partition, centred
    with torch.no_grad():                                                      # so that every cluster is used
        model.heads[0].weight.copy_(directions.T)
        model.heads[0].bias.copy_(-feats.mean(0) @ directions)
    carried = {k: v.clone() for k, v in model.heads[0].state_dict().items()}
    own = model.heads_forward(feats)[0].argmax(1)                              # the carried head's partition
    assert torch.bincount(own, minlength=10).min() > 5
    members = [torch.nonzero(own == c).flatten() for c in range(10)]
    neighbor_idx = torch.stack([members[c][torch.randint(len(members[c]), (5,))] for c in own.tolist()])   # [N, 5]
    for flag in (0, 1):
        model.heads[0].load_state_dict(carried)
        kept = scan.warm_up_heads(args, model, train, neighbor_idx, None, [F.normalize(feats, dim=1)], carried=flag)
        assert (metrics.cluster_acc(model.heads_forward(feats)[0].argmax(1), own) > 0.9) == flag
        assert kept == "candidate 0 of 6" if flag else kept.endswith(" of 5")  # the report: candidate 0 is carried


def test_warm_up_draws_every_second_candidate_from_the_second_space(tiny, monkeypatch):
    """start_feats = [backbone, projection] (scan.py's mine): candidates 0, 2, 4 are fitted to k-means partitions of
    the first space, 1 and 3 to the second's, each with its own seed (RESULTS.md: from the backbone's alone, SCAN
    ended 5.5 points below the projection's k-means on a 3-class folder)."""
    args, train, _ = tiny
    args = type(args)(**vars(args))
    args.warmup_steps, args.seed = 0, 3
    torch.manual_seed(0)
    model = scan.ClusteringModel(scan.make_backbone("smallcnn", 3, 8), 10, 2)
    feats = runtime.predict(model.backbone, train.images, train.mean, train.std)   # [N, d]
    start_feats = [F.normalize(feats, dim=1), F.normalize(torch.randn(len(feats), 8), dim=1)]
    neighbor_idx = torch.randint(len(feats), (len(feats), 5))
    calls, kmeans = [], scan.kmeans
    def spy(x, k, **kw):                                                       # which space, which seed
        calls.append(([s for s, space in enumerate(start_feats) if x is space], kw["seed"]))
        return kmeans(x, k, **kw)
    monkeypatch.setattr(scan, "kmeans", spy)
    scan.warm_up_heads(args, model, train, neighbor_idx, None, start_feats)
    assert calls == [([r % 2], 3000 + r) for r in range(5)]
    calls.clear()
    scan.warm_up_heads(args, model, train, neighbor_idx, None, start_feats[:1])   # one space: all from it
    assert calls == [([0], 3000 + r) for r in range(5)]


def test_selflabel_counts_confident_images_per_cluster_and_warns_when_one_has_few(tiny, tmp_path, capsys):
    args, train, test = tiny
    args = type(args)(**vars(args))
    args.out_dir, args.selflabel_epochs, args.selflabel_batch_size = str(tmp_path), 1, 100
    torch.manual_seed(0)
    model = scan.ClusteringModel(scan.make_backbone("smallcnn", 3, 8), 10, 1)
    with torch.no_grad():                                                      # sure of cluster 0 for every image,
        model.heads[0].weight.zero_()                                          # cluster 2 second
        model.heads[0].bias.copy_(torch.tensor([50.0, -50, 45] + [-50] * 7))
    scan.train_selflabel(args, "selflabel", model, 0, train, test)
    row = [r for r in log(str(tmp_path)) if r["stage"] == "selflabel"][-1]
    assert row["confident_per_cluster"] == [300] + [0] * 9 and row["confident"] == 300   # 3 batches of 100
    out = capsys.readouterr().out
    assert "WARNING: few confident images in clusters [1, 2, 3, 4, 5, 6, 7, 8, 9]" in out
    assert args.threshold_rule == "per-cluster" and "--threshold-rule per-cluster" not in out   # no advice to use it
    args.out_dir = str(tmp_path / "balanced")
    os.makedirs(args.out_dir)
    with torch.no_grad():                                                      # no cluster confident: no warning
        model.heads[0].bias.zero_()
    scan.train_selflabel(args, "selflabel", model, 0, train, test)
    assert "WARNING" not in capsys.readouterr().out


def test_selflabel_lowers_the_threshold_of_a_cluster_without_confident_images(tiny, tmp_path):
    """Cluster 0 is sure (> 0.99) of the images with a bright first channel; the others go to cluster 1 at about 0.95.
    SCAN's one threshold gives cluster 1 no pseudo-label; the per-cluster rule lowers its threshold to 0, so all its
    images count. The learning rate is 0 and the backbone has no BatchNorm: the predictions stay as computed here."""
    args, train, test = tiny
    args = type(args)(**vars(args))
    args.selflabel_epochs, args.selflabel_batch_size, args.selflabel_lr = 1, 100, 0.0
    backbone = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())   # [B, 3]: channel means
    backbone.out_dim = train.images.shape[1]
    feats = runtime.predict(backbone, train.images, train.mean, train.std)
    middle, spread = feats[:, 0].median(), feats[:, 0].std()
    for rule in ["fixed", "per-cluster"]:
        args.out_dir, args.threshold_rule = str(tmp_path / rule), rule
        os.makedirs(args.out_dir)
        model = scan.ClusteringModel(backbone, 10, 1)
        with torch.no_grad():                                                  # logit 0 = 50 (f0 - median) / std,
            model.heads[0].weight.zero_()                                      # logits 1, 2 = 3, 0: p_1 <= 0.95
            model.heads[0].weight[0, 0] = 50 / spread
            model.heads[0].bias.copy_(torch.tensor([-50 * middle / spread, 3.0, 0.0] + [-50.0] * 7))
        probs = runtime.predict(model, train.images, train.mean, train.std)[0].softmax(1)
        confidence, label = probs.max(1)
        scan.train_selflabel(args, "selflabel", model, 0, train, test)
        row = [r for r in log(args.out_dir) if r["stage"] == "selflabel"][-1]
        sure = int(((label == 0) & (confidence > 0.99)).sum())
        assert 50 < sure < 250 and 50 < int((label == 1).sum()) and ((label == 1) <= (confidence < 0.99)).all()
        if rule == "fixed":
            assert row["thresholds"] == [0.99] * 10 and row["confident_per_cluster"] == [sure] + [0] * 9
        else:
            assert row["thresholds"] == pytest.approx(scan.cluster_thresholds(probs, 0.99).tolist())
            assert row["thresholds"][:2] == [0.99, 0.0]
            assert row["confident_per_cluster"] == [sure, int((label == 1).sum())] + [0] * 8


def test_keep_if_best_keeps_the_lowest_loss():
    model = scan.ClusteringModel(scan.make_backbone("smallcnn", 3, 8), 10, 2)
    best = scan.keep_if_best(model, torch.tensor([-1.0, -2.0]), None, 1)
    assert (best["head"], best["eval_loss"], best["epoch"]) == (1, -2.0, 1)
    assert scan.keep_if_best(model, torch.tensor([-1.5, -1.9]), best, 3) is best
    assert scan.keep_if_best(model, torch.tensor([-2.5, -1.0]), best, 4)["epoch"] == 4


def test_kmeans_ends_at_a_lloyd_fixed_point_as_good_as_scikit_learn():
    from sklearn.cluster import KMeans
    torch.manual_seed(0)
    centers = torch.randn(8, 16) * 2
    x = F.normalize(centers[torch.randint(8, (3000,))] + torch.randn(3000, 16), dim=1)   # overlapping blobs
    labels, centroids = scan.kmeans(x, 8, iters=300, seed=3)
    dist = torch.cdist(x.double(), centroids.double()).pow(2)                 # brute force, in double
    assert torch.equal(labels, dist.argmin(1))                                 # each point at its nearest centroid
    for c in range(8):                                                         # each centroid the mean of its points
        assert torch.allclose(centroids[c], x[labels == c].mean(0), atol=1e-5)
    inertia = dist.min(1).values.sum().item()
    reference = KMeans(8, n_init=5, random_state=0).fit(x.numpy()).inertia_
    assert inertia <= reference * 1.01
    few_iters = torch.cdist(x, scan.kmeans(x, 8, iters=1, n_init=1, seed=3)[1]).pow(2).min(1).values.sum().item()
    assert few_iters > inertia                                                 # iters bounds the Lloyd steps


def test_explicit_flags_win_over_quick_and_dataset_presets():
    args = scan.parse_args(["--dataset", "cifar20", "--quick", "--scan-epochs", "7"])
    assert args.scan_epochs == 7 and args.scan_batch_size == 48 and args.arch == "smallcnn"   # the small CNN's batch
    assert scan.parse_args(["--dataset", "cifar20"]).scan_batch_size == 512                       # the paper's
    assert scan.parse_args(["--dataset", "cifar20", "--quick", "--scan-batch-size", "64"]).scan_batch_size == 64
    assert scan.parse_args(["--quick"]).threshold_rule == "per-cluster"                    # the CPU network's
    assert scan.parse_args([]).threshold_rule == "fixed"                                   # SCAN's, with ResNet-18
    assert scan.parse_args(["--quick", "--threshold-rule", "fixed"]).threshold_rule == "fixed"
    assert scan.parse_args(["--quick"]).entropy_weight == 0.5 and scan.parse_args([]).entropy_weight == 5.0
    assert scan.parse_args(["--quick"]).pretext_batch_size is None and scan.parse_args([]).pretext_batch_size == 512
    assert scan.parse_args(["--quick", "--pretext-batch-size", "100"]).pretext_batch_size == 100
    assert scan.parse_args(["--arch", "smallcnn"]).entropy_weight == 5.0                # full SCAN epochs: the paper's
    assert scan.parse_args(["--quick", "--entropy-weight", "5"]).entropy_weight == 5.0
    assert scan.parse_args(["--quick"]).mine_pixels and not scan.parse_args([]).mine_pixels
    assert not scan.parse_args(["--quick", "--no-mine-pixels"]).mine_pixels
    args = scan.parse_args(["--dataset", "stl10"])
    assert (args.pretext_split, args.train_split, args.selflabel_epochs) == ("train+unlabeled", "train", 100)


@pytest.mark.parametrize("large,split_at,kept_at", [(50, 5.0, 2.0), (100, 2.0, 0.5)])
def test_a_lower_entropy_weight_keeps_a_larger_class_whole(large, split_at, kept_at):
    """Why --quick's lambda is 0.5: two groups of `large` and 10 images, each image's neighbours in its own group.
    The true partition, confident, against soft predictions for the large group that balance the clusters on
    average (Eq. (2)'s entropy term at its maximum, ln 2) at the cost of consistency. At 5:1, lambda 5 ranks the
    split lower and 2 the true one; at 10:1 (the imbalanced check folders' ratio) 2 splits too, and 0.5 keeps it."""
    group = torch.tensor([0] * large + [1] * 10)
    ring = lambda start, n: [[start + (i + d) % n for d in (-2, -1, 1, 2)] for i in range(n)]
    neighbor_idx = torch.tensor(ring(0, large) + ring(large, 10))             # [N, 4], inside each group
    true = torch.nn.functional.one_hot(group, 2).float() * 30                   # logits [N, 2]
    soft = true.clone()
    share = (large + 10) / 2 / large                                            # cluster 0's share of the large group
    soft[:large] = torch.tensor([share, 1 - share]).log()
    logits = torch.stack([true, soft])                                          # [2 candidates, N, 2]
    mean_p = logits.softmax(2).mean(1)                                          # [2, 2]
    assert torch.allclose(mean_p[1], torch.tensor([0.5, 0.5]), atol=1e-3)     # the soft one: balanced clusters
    for weight, better in [(split_at, 1), (kept_at, 0)]:
        assert int(scan.head_losses(None, None, neighbor_idx, weight, logits=logits).argmin()) == better


@pytest.mark.parametrize("extra,message", [
    (["--dataset", "no-such-set"], "no-such-set"),
    (["--num-clusters", "1"], "--num-clusters"),
    (["--num-clusters", "0"], "--num-clusters"),
    (["--num-neighbors", "300"], "--num-neighbors"),
    (["--num-clusters", "301"], "more than the 300"),
    (["--crop-min", "0"], "--crop-min"),
    (["--threads", "-1"], "--threads"),
    (["--pretext-lr", "-1"], "--pretext-lr"),
    (["--image-size", "2"], "image size"),
    (["--image-size", "-4"], "image size"),
    (["--out-dir", "/proc/no/such"], "Cannot create"),
    (["--dataset", "imagefolder:/no/such/folder"], "/no/such/folder"),
])
def test_bad_input_exits_2_with_one_paragraph(extra, message, tmp_path, capsys):
    argv = TINY + ["--out-dir", str(tmp_path / "bad")] + extra
    with pytest.raises(SystemExit) as exit_info:
        runtime.main("scan.py", scan.run, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.startswith("scan.py: error:"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_folder_without_two_classes_needs_num_clusters(tmp_path):
    """The cluster count comes from the class sub-folders: none, or only one, is refused (as deepcluster.py refuses
    a single class) unless --num-clusters says it."""
    for name, folder, words in [("flat", tmp_path / "flat", "has no classes"),
                                ("one", tmp_path / "one" / "cats", "has a single class ('cats')")]:
        folder.mkdir(parents=True)
        for i in range(30):
            Image.new("L", (12, 12), i * 8).save(folder / f"{i}.png")
        res = run("--dataset", f"imagefolder:{tmp_path / name}", "--quick", "--out-dir", str(tmp_path / f"r-{name}"))
        assert res.returncode == 2 and words in res.stderr and "give --num-clusters" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and not (tmp_path / f"r-{name}").exists()


def test_an_out_dir_that_is_a_file_and_an_image_file_as_folder(tmp_path):
    image = tmp_path / "one.png"
    Image.new("RGB", (8, 8)).save(image)
    res = run("--dataset", f"imagefolder:{image}", "--quick", "--out-dir", str(tmp_path / "r"))
    assert res.returncode == 2 and "is a file" in res.stderr and "--predict" in res.stderr
    res = run(*TINY, "--out-dir", str(image))
    assert res.returncode == 2 and "is a file, not a folder" in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------- whole runs in subprocesses
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished") / "run")
    res = run(*TINY, "--out-dir", out)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return out, res


def test_a_finished_run_writes_every_output(finished):
    out, res = finished
    results = json.load(open(os.path.join(out, "results.json")))
    assert [(r["stage"], r.get("features")) for r in results["rows"]] == [
        ("pretext+kmeans", "projection"), ("pretext+kmeans", "backbone"), ("scan", None), ("selflabel", None)]
    for r in results["rows"]:
        assert 0 <= r["acc"] <= 1 and r["num_clusters"] == 10 and r["n"] == 1000 and 1 <= r["K"] <= 10
        assert r["acc"] > 0.15                                                 # 10 classes: chance is 0.1
    assert {"pixel_agreement", "neighbor_acc_top20", "pixel_neighbor_acc_top20"} <= set(results["rows"][0])
    assert results["script"] == "scan.py" and results["final"]["stage"] == "selflabel"
    assert results["args"]["pretext_batch_size"] == 32                    # --quick on 300 images: 32, the least
    assert results["args"]["selflabel_batch_size"] == 300                 # --quick's 500: more than the images
    assert re.search(r"\[selflabel\] epoch 2/2 loss \S+ confident \d+ of 300 ", res.stdout)
    lines = open(os.path.join(out, "predictions.csv")).read().splitlines()
    assert lines[0] == "index,label,cluster,confidence" and len(lines) == 1001
    assert all(0 <= float(line.split(",")[3]) <= 1 for line in lines[1:])
    assert os.path.getsize(os.path.join(out, "prototypes.png")) > 1000
    assert not [f for f in os.listdir(out) if f.endswith(".tmp") or f == ".lock"]
    last = [r for r in log(out) if r["stage"] == "selflabel"][-1]              # per-epoch test ACC of the final model
    assert last["test_acc"] == pytest.approx(results["rows"][-1]["acc"], abs=1e-6)
    assert "== self-label" in res.stdout and "Traceback" not in res.stderr


def test_the_knn_monitor_runs_at_most_every_5th_epoch_and_after_the_last(tmp_path):
    out = str(tmp_path / "run")                              # each monitor is a pass over train and test: costly
    res = run(*TINY, "--out-dir", out, "--pretext-epochs", "12", "--scan-epochs", "0", "--selflabel-epochs", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    pretext = [r for r in log(out) if r["stage"] == "pretext"]
    assert [r["epoch"] for r in pretext if "knn_acc" in r] == [5, 10, 12] and len(pretext) == 12
    assert all(0.1 < r["knn_acc"] <= 1 for r in pretext if "knn_acc" in r)   # 10 classes: chance is 0.1


def test_pretext_warmup_raises_the_rate_linearly_over_its_epochs_then_follows_the_cosine(tiny, tmp_path, monkeypatch,
                                                                                         capsys):
    args, train, test = tiny
    args = type(args)(**vars(args))
    args.out_dir, args.pretext_epochs, args.pretext_batch_size, args.pretext_warmup = str(tmp_path), 3, 100, 2
    rates, step = [], torch.optim.SGD.step                                     # 300 images: 3 steps an epoch
    monkeypatch.setattr(torch.optim.SGD, "step", lambda opt: rates.append(opt.param_groups[0]["lr"]) or step(opt))
    scan.train_pretext(args, train, test)
    cosine = [args.pretext_lr * (1e-3 + (1 - 1e-3) * (1 + math.cos(math.pi * e / 3)) / 2) for e in range(3)]
    assert rates == pytest.approx([cosine[e] * min(1, (e + s / 3) / 2) for e in range(3) for s in (1, 2, 3)])
    assert scan.parse_args(["--quick"]).pretext_warmup == 2 and scan.parse_args([]).pretext_warmup == 0
    assert "collapsed" not in capsys.readouterr().out
    args.out_dir = str(tmp_path / "collapsed")                                 # the last epoch's loss is checked
    os.makedirs(args.out_dir)
    monkeypatch.setattr(scan, "nt_xent", lambda z1, z2, t: (z1 * z2).sum() * 0 + math.log(2 * len(z1) - 1))
    scan.train_pretext(args, train, test)
    assert "WARNING: the pretext collapsed" in capsys.readouterr().out


def test_a_collapsed_pretext_is_named_by_its_loss_alone(capsys):
    one_point = F.normalize(torch.ones(64, 128), dim=1)                       # every image mapped to one point
    loss = scan.nt_xent(one_point, one_point, 0.2).item()
    assert loss == pytest.approx(math.log(2 * 64 - 1)) and runtime.warn_if_collapsed("pretext", loss, 64)
    assert "WARNING: the pretext collapsed" in capsys.readouterr().out
    distinct = torch.eye(128)[:64]                                             # each pair its own direction
    healthy = scan.nt_xent(distinct, distinct, 0.2).item()
    assert not runtime.warn_if_collapsed("pretext", healthy, 64) and capsys.readouterr().out == ""
    assert runtime.warn_if_collapsed("pretext", 0.98 * math.log(127), 64)
    assert not runtime.warn_if_collapsed("pretext", 0.96 * math.log(127), 64)


def test_killed_and_resumed_gives_the_same_run(finished, tmp_path):
    out = str(tmp_path / "run")
    proc = run(*TINY, "--out-dir", out, "--pretext-epochs", "3", wait=False)
    ckpt, deadline = os.path.join(out, "pretext.pt"), time.time() + 200
    while not os.path.exists(ckpt) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(ckpt, weights_only=False)["epoch"] < 3                    # killed mid-stage
    res = run(*TINY, "--out-dir", out)
    assert res.returncode == 0 and "[pretext] resuming after epoch" in res.stdout, res.stderr
    assert rows(out) == rows(finished[0])                                      # same seed, same device: same run
    epochs = [(r["stage"], r.get("epoch")) for r in log(out)]
    assert len(epochs) == len(set(epochs))                                     # each epoch logged once
    again = run(*TINY, "--out-dir", out)                                       # complete stages are skipped
    assert again.returncode == 0 and "[pretext] epoch" not in again.stdout and "[scan] epoch" not in again.stdout
    assert rows(out) == rows(finished[0])


def test_other_settings_or_a_foreign_checkpoint_are_refused_and_nothing_is_lost(finished, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(finished[0], out)
    results = open(os.path.join(out, "results.json")).read()
    res = run(*TINY, "--out-dir", out, "--temperature", "0.5")
    assert res.returncode == 2 and "--temperature 0.2 (now 0.5)" in res.stderr and "Traceback" not in res.stderr
    shutil.copy(os.path.join(out, "selflabel.pt"), os.path.join(out, "scan.pt"))   # another stage's checkpoint
    res = run(*TINY, "--out-dir", out)
    assert res.returncode == 2 and "'selflabel', not by scan.py for 'scan'" in res.stderr
    open(os.path.join(out, "mine.pt"), "wb").write(b"garbage")
    res = run(*TINY, "--out-dir", out)
    assert res.returncode == 2 and "mine.pt" in res.stderr and "corrupted" in res.stderr
    assert open(os.path.join(out, "results.json")).read() == results           # the finished results are intact
    assert open(os.path.join(out, "mine.pt"), "rb").read() == b"garbage"      # and the bad file is left alone


def test_restart_keeps_files_that_are_not_the_scripts(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    (out / "my_backup.pt").write_bytes(b"mine")
    res = run(*TINY, "--out-dir", str(out), "--restart", "--pretext-epochs", "1", "--selflabel-epochs", "0")
    assert res.returncode == 0, res.stderr
    assert (out / "my_backup.pt").read_bytes() == b"mine" and not (out / "selflabel.pt").exists()


def test_a_second_run_into_the_same_folder_exits_2_naming_the_first(tmp_path):
    out = str(tmp_path / "run")
    first = run(*TINY, "--out-dir", out, "--pretext-epochs", "50", wait=False)
    deadline = time.time() + 200
    while not os.path.exists(os.path.join(out, ".lock")) and time.time() < deadline:
        time.sleep(0.05)
    second = run(*TINY, "--out-dir", out)
    first.send_signal(signal.SIGINT)                                           # Ctrl-C: one line, exit 130
    _, err = first.communicate(timeout=120)
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr and "scan.py" in second.stderr
    assert first.returncode == 130 and err.strip().count("\n") == 0 and "interrupted" in err, err
    assert not os.path.exists(os.path.join(out, ".lock"))                     # released on the way out


def test_a_diverged_run_stops_with_exit_2_and_never_saves_non_finite_weights(tmp_path):
    out = str(tmp_path / "run")
    # batch 256: one step an epoch over the 300 images; epoch 1 survives, epoch 2 does not
    res = run(*TINY, "--out-dir", out, "--pretext-lr", "1e10", "--pretext-batch-size", "256")
    assert res.returncode == 2 and "pretext: the weights became non-finite at epoch 2" in res.stderr
    assert "lower learning rate" in res.stderr and "resumes after pretext epoch 1" in res.stderr
    assert "Traceback" not in res.stderr
    saved = torch.load(os.path.join(out, "pretext.pt"), map_location="cpu", weights_only=False)
    assert saved["epoch"] == 1 and all(t.isfinite().all() for t in saved["model"].values())
    res = run(*TINY, "--out-dir", out, "--pretext-lr", "1e10", "--pretext-batch-size", "32", "--restart")
    assert res.returncode == 2 and "non-finite at epoch" in res.stderr and "starts from the beginning" in res.stderr


def test_an_unfinished_stage_resumes_with_another_learning_rate(tmp_path):
    out = str(tmp_path / "run")
    proc = run(*TINY, "--out-dir", out, "--pretext-epochs", "6", wait=False)
    ckpt, deadline = os.path.join(out, "pretext.pt"), time.time() + 200
    while not os.path.exists(ckpt) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = run(*TINY, "--out-dir", out, "--pretext-epochs", "6", "--pretext-lr", "0.05")
    assert res.returncode == 0, res.stderr
    assert "[pretext] resuming with --pretext-lr 0.05 (the checkpoint used 0.2)" in res.stdout
    res = run(*TINY, "--out-dir", out, "--pretext-epochs", "6", "--pretext-lr", "0.1")   # now finished: refused
    assert res.returncode == 2 and "--pretext-lr 0.05 (now 0.1)" in res.stderr


def test_predict_applies_a_finished_run_to_new_images(finished, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(finished[0], out)
    folder = tmp_path / "new" / "nested"
    folder.mkdir(parents=True)
    images = synthetic.make_synthetic("test", num_images=12, image_size=16).images
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
    res = run("--predict", str(tmp_path / "new"), "--out-dir", out, "--threads", "1")
    assert res.returncode == 0, res.stderr
    lines = open(os.path.join(out, "predict-new.csv")).read().splitlines()
    assert lines[0] == "file,cluster,confidence" and len(lines) == 13 and lines[1].split(",")[0].endswith("00.png")
    # the same clusters as the model gives these images in process
    model_rows = [line.split(",") for line in lines[1:]]
    assert all(0 <= int(c) < 10 and 0 <= float(p) <= 1 for _, c, p in model_rows)
    assert os.path.exists(os.path.join(out, "predict-new.png"))
    res = run("--predict", str(folder / "00.png"), "--out-dir", out, "--threads", "1")     # a single image
    assert res.returncode == 0 and open(os.path.join(out, "predict-00.csv")).read().count("\n") == 2
    assert "1 image clustered into" in res.stdout + res.stderr
    res = run("--predict", str(tmp_path / "nothing"), "--out-dir", out)
    assert res.returncode == 2 and "nothing" in res.stderr and "Traceback" not in res.stderr
    res = run("--predict", str(folder), "--out-dir", str(tmp_path / "unfinished"))
    assert res.returncode == 2 and "no finished scan.py run" in res.stderr
