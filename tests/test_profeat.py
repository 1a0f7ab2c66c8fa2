"""Tests of profeat.py: pair construction (ProFeat_s and ProFeat_e), Eq. (1) against a loop transcription, the
clustering step's separation of g and g', smoke runs of both variants, resume between iterations, bad input, and the
functions copied from scan.py staying identical.

    python -m pytest tests/test_profeat.py -q
"""
import copy
import inspect
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import profeat
import runtime
import scan
from knn import whitening

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny run: --quick on 16x16 synthetic images, 300 of them (seconds).
TINY = ["--dataset", "synthetic", "--quick", "--image-size", "16", "--subset", "300", "--warmup-steps", "30",
        "--scan-epochs", "1", "--device", "cpu", "--threads", "1", "--log-every", "1000"]
COPIED_FROM_SCAN = ["load_data", "plain", "make_backbone", "middle_features", "ContrastiveModel", "ClusteringModel",
                    "scan_loss", "confidence_ce", "cluster_thresholds", "kmeans", "load", "save", "head_losses",
                    "warm_up_heads", "train_scan", "keep_if_best", "train_selflabel", "predict_files"]


def run(args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "profeat.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def results(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)["rows"]


@pytest.mark.parametrize("name", COPIED_FROM_SCAN)
def test_functions_copied_from_scan_are_identical(name):
    """ProFeat runs SCAN's stages: profeat.py keeps verbatim copies (one file per algorithm), kept identical."""
    assert inspect.getsource(getattr(profeat, name)) == inspect.getsource(getattr(scan, name))


# ---------------------------------------------------------------------------------------------------------------
# Pair construction on hand-made batches
# ---------------------------------------------------------------------------------------------------------------
def test_self_labelling_keeps_scans_one_threshold_unless_asked():
    """scan.py's small CNN lowers the thresholds per cluster; profeat.py keeps SCAN's one (measured, RESULTS.md)."""
    assert profeat.parse_args(["--quick"]).threshold_rule == "fixed" == profeat.parse_args([]).threshold_rule
    assert profeat.parse_args(["--quick", "--threshold-rule", "per-cluster"]).threshold_rule == "per-cluster"
    assert scan.parse_args(["--quick"]).threshold_rule == "per-cluster"


def test_quick_mines_on_the_pixels_too_as_scan_does_unless_asked_not_to():
    assert profeat.parse_args(["--quick"]).mine_pixels and scan.parse_args(["--quick"]).mine_pixels
    assert not profeat.parse_args([]).mine_pixels
    assert not profeat.parse_args(["--quick", "--no-mine-pixels"]).mine_pixels


def test_confident_groups_filter_by_t_s_and_group_by_cluster():
    probs = torch.tensor([[0.95, 0.03, 0.02],   # 0: confident, cluster 0
                          [0.99, 0.01, 0.00],   # 1: confident, cluster 0
                          [0.30, 0.50, 0.20],   # 2: not confident (cluster 1)
                          [0.04, 0.90, 0.06],   # 3: exactly t_s -> confident, cluster 1
                          [0.01, 0.04, 0.95],   # 4: confident, cluster 2
                          [0.02, 0.97, 0.01]])  # 5: confident, cluster 1
    keep, group = profeat.confident_groups(probs, t_s=0.9)
    assert keep.tolist() == [True, True, False, True, True, True]
    expected = {(0, 0), (1, 1), (3, 3), (4, 4), (5, 5), (0, 1), (1, 0), (3, 5), (5, 3)}
    assert {(i, j) for i in range(6) for j in range(6) if group[i, j]} == expected
    keep, group = profeat.confident_groups(probs, t_s=0.99)     # only image 1 survives
    assert keep.tolist() == [False, True, False, False, False, False] and group.sum() == 1


def test_view_positives_and_negatives_of_profeat_s():
    # kept images a, b (same cluster) and c (alone): views are rows 0..2 (view 1) and 3..5 (view 2)
    group = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    pos = profeat.view_positives(group)
    image = [0, 1, 2, 0, 1, 2]
    for u in range(6):
        for v in range(6):
            same_group = image[u] == image[v] or {image[u], image[v]} == {0, 1}
            assert bool(pos[u, v]) == (u != v and same_group), (u, v)
    # negatives: every other ordered pair of distinct views (a-c, b-c in both directions, 4 views each way)
    negatives = ~pos & ~torch.eye(6, dtype=torch.bool)
    assert negatives.sum() == 2 * 2 * 4 and pos.sum() == 6 * 6 - 6 - 16


def agreement_by_loop(clusters):
    E, B = clusters.shape
    return [[sum(int(clusters[e, i] == clusters[e, j]) for e in range(E)) for j in range(B)] for i in range(B)]


def test_ensemble_groups_agreement_t_e_and_t_c():
    # E = 3 members, B = 6 images; cluster indices differ between members (only agreement matters)
    clusters = torch.tensor([[0, 0, 0, 0, 1, 2],
                             [5, 5, 5, 7, 7, 6],
                             [2, 2, 2, 1, 3, 3]])
    c = agreement_by_loop(clusters)  # Eq. (3)
    assert c[0][1] == c[0][2] == c[1][2] == 3 and c[0][3] == 1 and c[3][4] == 1 and c[4][5] == 1
    # t_e = 3 (unanimity): {0, 1, 2} form a triangle (2 connections each); 3, 4, 5 have none
    for t_c, kept in [(1, [0, 1, 2]), (2, [0, 1, 2]), (3, [])]:
        keep, group = profeat.ensemble_groups(clusters, t_e=3, t_c=t_c)
        assert keep.nonzero().squeeze(1).tolist() == kept
        expected = {(i, j) for i in kept for j in kept}
        assert {(i, j) for i in range(6) for j in range(6) if group[i, j]} == expected
    # t_e = 1: any agreement connects; t_e compares with >= (c = t_e connects)
    keep, group = profeat.ensemble_groups(clusters, t_e=1, t_c=1)
    for i in range(6):
        for j in range(6):
            assert bool(group[i, j]) == (i == j or c[i][j] >= 1), (i, j)


def test_ensemble_pruning_is_one_pass_and_drops_pairs():
    # E = 2, t_e = 1: member 0 links 0-1, 2-3, 4-5 and member 1 links 1-2, 3-4: a chain 0-1-2-3-4-5.
    clusters = torch.tensor([[0, 0, 1, 1, 2, 2],
                             [5, 6, 6, 7, 7, 8]])
    keep, group = profeat.ensemble_groups(clusters, t_e=1, t_c=2)
    # the chain's ends have 1 connection and are dropped with their pairs; one pass (as written): 1 and 4 are kept
    # although they lose a connection to the dropped ends (a repeated pruning would empty the batch)
    assert keep.tolist() == [False, True, True, True, True, False]
    expected = {(i, i) for i in [1, 2, 3, 4]} | {(1, 2), (2, 1), (2, 3), (3, 2), (3, 4), (4, 3)}
    assert {(i, j) for i in range(6) for j in range(6) if group[i, j]} == expected
    keep, group = profeat.ensemble_groups(clusters, t_e=2, t_c=1)    # no pair is unanimous: nothing survives
    assert not keep.any() and not group.any()


# ---------------------------------------------------------------------------------------------------------------
# Eq. (1) against a naive transcription
# ---------------------------------------------------------------------------------------------------------------
def eq1_by_loop(z, positives, tau):
    """L_g = -sum_{(i,j) in P} log exp(sim(z_i, z_j)/tau) / sum_{(k,l) in Q_i} exp(sim(z_k, z_l)/tau), divided by |P|,
    with Q = every ordered pair of distinct views and Q_i = the pairs of Q whose first element is i."""
    V = z.shape[0]
    sim = lambda u, v: (u @ v) / (u.norm() * v.norm())
    Q = [(k, l) for k in range(V) for l in range(V) if k != l]
    P = [(i, j) for i in range(V) for j in range(V) if positives[i, j]]
    total = 0.0
    for i, j in P:
        denom = sum(torch.exp(sim(z[k], z[l]) / tau) for k, l in Q if k == i)
        total = total - torch.log(torch.exp(sim(z[i], z[j]) / tau) / denom)
    return total / len(P)


@pytest.mark.parametrize("kind", ["simclr", "clusters", "random"])
def test_refinement_loss_matches_eq1_values_and_gradients(kind):
    g = torch.Generator().manual_seed(1)
    n = 5
    if kind == "simclr":        # iteration 1: each image its own group
        group = torch.eye(n, dtype=torch.bool)
    elif kind == "clusters":    # two confident clusters {0, 1, 2} and {3, 4}
        cl = torch.tensor([0, 0, 0, 1, 1])
        group = cl[:, None] == cl[None, :]
    else:                       # any symmetric relation (an ensemble's connections need not be transitive)
        r = torch.rand(n, n, generator=g) < 0.4
        group = r | r.t() | torch.eye(n, dtype=torch.bool)
    positives = profeat.view_positives(group)
    raw = torch.randn(2 * n, 8, generator=g, dtype=torch.float64)
    z1 = raw.clone().requires_grad_(True)
    z2 = raw.clone().requires_grad_(True)
    ours = profeat.refinement_loss(F.normalize(z1, dim=1), positives, temperature=0.1)
    naive = eq1_by_loop(z2, positives, 0.1)
    ours.backward()
    naive.backward()
    assert torch.allclose(ours, naive, rtol=1e-10, atol=1e-10)
    assert torch.allclose(z1.grad, z2.grad, rtol=1e-8, atol=1e-10)
    if kind == "simclr":        # and it is SimCLR's NT-Xent (cross-entropy towards the other view)
        z = F.normalize(raw, dim=1)
        logits = (z @ z.t() / 0.1).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        assert torch.allclose(ours.detach(), F.cross_entropy(logits, target), rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    torch.set_num_threads(1)
    args = profeat.parse_args(TINY + ["--out-dir", str(tmp_path_factory.mktemp("unit"))])
    args.device = "cpu"
    pretext, train, test = profeat.load_data(args)
    args.num_clusters = len(train.classes)
    args.pretext_batch_size = runtime.batch_for(len(pretext.images))          # as run() sets --quick's
    profeat.check_args(args, len(train.images))
    torch.manual_seed(0)
    g_model = profeat.ContrastiveModel(profeat.make_backbone("smallcnn", train.images.shape[1], args.width))
    return args, train, test, g_model


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_clustering_step_trains_a_copy_and_never_touches_g(tiny_setup, monkeypatch, tmp_path):
    args, train, test, g_model = tiny_setup
    args = copy.copy(args)
    args.out_dir, args.scan_epochs, args.selflabel_epochs, args.warmup_steps = str(tmp_path), 1, 0, 0
    args.mine_pixels = False                                                   # the features alone (pixels: below)
    before, seen = state(g_model), {}
    original = profeat.train_scan

    def spy(args_, stage, model, *rest):                                       # g' at the start of the SCAN stage
        seen["g_prime_start"], seen["g_prime"], seen["neighbor_idx"] = state(model.backbone), model.backbone, rest[0]
        return original(args_, stage, model, *rest)
    monkeypatch.setattr(profeat, "train_scan", spy)
    feats = F.normalize(runtime.predict(g_model.backbone, train.images, train.mean, train.std), dim=1)
    model, head, info = profeat.clustering_step(args, 1, 0, g_model, train, test, None)
    whitened = whitening(feats)(feats)                                         # mined on g(x), PCA-whitened
    assert torch.equal(seen["neighbor_idx"], profeat.knn(whitened, k=args.num_neighbors)[1])
    assert not torch.equal(seen["neighbor_idx"], profeat.knn(feats, k=args.num_neighbors)[1])
    g_backbone = {k[len("backbone."):]: v for k, v in before.items() if k.startswith("backbone.")}
    assert seen["g_prime_start"].keys() == g_backbone.keys()
    assert all(torch.equal(seen["g_prime_start"][k], g_backbone[k]) for k in g_backbone)     # g' starts as g
    assert all(torch.equal(v, state(g_model)[k]) for k, v in before.items())                 # g untouched, BN too
    assert seen["g_prime"] is not g_model.backbone and model.backbone is seen["g_prime"]
    assert any(not torch.equal(v, g_backbone[k]) for k, v in state(seen["g_prime"]).items())  # g' was trained
    assert 0 <= head < args.num_heads and "neighbor_acc" in info


def test_clustering_step_with_mine_pixels_mines_on_the_features_and_the_pixels(tiny_setup, monkeypatch, tmp_path):
    args, train, test, g_model = tiny_setup
    seen = {}
    monkeypatch.setattr(profeat, "train_scan", lambda args_, stage, model, neighbor_idx, *rest: (
        seen.setdefault(args_.mine_pixels, neighbor_idx), (model, 0))[1])   # the graph it was given, nothing trained
    for mine_pixels in (False, True):
        run = copy.copy(args)
        run.out_dir, run.selflabel_epochs, run.mine_pixels = str(tmp_path), 0, mine_pixels
        profeat.clustering_step(run, 1, 0, g_model, train, test, None)
    feats = F.normalize(runtime.predict(g_model.backbone, train.images, train.mean, train.std).double(), dim=1)
    pixels = F.normalize(train.images.flatten(1).double(), dim=1)              # 16 px: not resized
    white = lambda x: whitening(x.float())(x.float()).double()
    sim = (white(feats) @ white(feats).T + white(pixels) @ white(pixels).T) / 2   # the mean of the two cosines
    naive = sim.fill_diagonal_(-2).topk(args.num_neighbors, dim=1).indices
    same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(seen[True], naive)]
    assert sum(same) >= 0.98 * len(same) and not torch.equal(seen[True], seen[False])


def test_clustering_step_with_mine_features_middle_mines_on_the_second_stage(tiny_setup, monkeypatch, tmp_path):
    args, train, test, g_model = tiny_setup
    seen = {}
    monkeypatch.setattr(profeat, "train_scan", lambda args_, stage, model, neighbor_idx, *rest: (
        seen.setdefault(args_.mine_features, neighbor_idx), (model, 0))[1])   # the graph it was given, nothing trained
    for features in ("backbone", "middle"):
        run = copy.copy(args)
        run.out_dir, run.selflabel_epochs, run.mine_pixels, run.mine_features = str(tmp_path), 0, False, features
        profeat.clustering_step(run, 1, 0, g_model, train, test, None)
    z = F.normalize(scan.middle_features(g_model.backbone, train.images, train.mean, train.std), dim=1)  # scan.py's
    assert torch.equal(seen["middle"], profeat.knn(whitening(z)(z), k=args.num_neighbors)[1])
    assert not torch.equal(seen["middle"], seen["backbone"])


@pytest.mark.parametrize("mine_pixels", [False, True])
def test_clustering_step_checks_its_graph_against_the_raw_pixels_neighbours(tiny_setup, monkeypatch, tmp_path,
                                                                            capsys, mine_pixels):
    args, train, test, g_model = tiny_setup
    monkeypatch.setattr(profeat, "train_scan", lambda args_, stage, model, *rest: (model, 0))   # nothing trained
    run = copy.copy(args)
    run.out_dir, run.selflabel_epochs, run.mine_pixels, run.pixel_check = str(tmp_path), 0, mine_pixels, 10 ** 6
    info = profeat.clustering_step(run, 2, 0, g_model, train, test, None)[2]
    pixels = F.normalize(train.images.flatten(1).double(), dim=1)              # 16 px: not resized
    p = whitening(pixels.float())(pixels.float()).double()                     # whitened, as the features are
    naive = (p @ p.T).fill_diagonal_(-2).topk(args.num_neighbors, dim=1).indices   # [N, K], not itself
    labels = train.labels
    assert info["pixel_neighbor_acc_top20"] == pytest.approx(
        (labels[naive] == labels[:, None]).double().mean().item(), abs=0.01)
    assert info["neighbor_acc_top20"] == pytest.approx(info["neighbor_acc"])  # every image checked: the whole graph
    assert ("pretext_neighbor_acc_top20" in info) == mine_pixels              # the features' own graph, when mixed
    printed = capsys.readouterr().out
    assert "[it002_m0_mine] top-20 neighbours with the anchor's label: " in printed
    run.pixel_check = 0
    assert "pixel_agreement" not in profeat.clustering_step(run, 2, 0, g_model, train, test, None)[2]


@pytest.mark.parametrize("carry", [False, True])
def test_carry_h_starts_head_0_from_the_previous_iterations_h(tiny_setup, monkeypatch, carry, tmp_path):
    args, train, test, g_model = tiny_setup
    args = copy.copy(args)
    args.out_dir, args.scan_epochs, args.selflabel_epochs, args.carry_h = str(tmp_path), 1, 0, carry
    args.num_heads, args.warmup_steps = 2, 0
    torch.manual_seed(123)
    previous = profeat.ClusteringModel(g_model.backbone, args.num_clusters, 3)  # its kept head: 2
    seen = {}
    original = profeat.train_scan

    def spy(args_, stage, model, *rest):                                       # h at the start of the SCAN stage
        seen["heads"], seen["carried"], seen["start_feats"] = [state(h) for h in model.heads], rest[5:], rest[2]
        return original(args_, stage, model, *rest)
    monkeypatch.setattr(profeat, "train_scan", spy)
    profeat.clustering_step(args, 2, 0, g_model, train, test, (previous, 2))
    carried = state(previous.heads[2])
    same = [all(torch.equal(h[k], carried[k]) for k in carried) for h in seen["heads"]]
    assert same == [carry, False]                                              # only head 0, only with --carry-h
    assert seen["carried"] == (int(carry),)                                    # a warm-up candidate (warm_up_heads)
    for got, net in zip(seen["start_feats"], [g_model.backbone, g_model]):     # the other candidates' k-means spaces
        assert torch.allclose(got, F.normalize(runtime.predict(net, train.images, train.mean, train.std), dim=1))


def test_representation_step_skips_batches_where_nothing_survives(tiny_setup, tmp_path):
    args, train, test, g_model = tiny_setup
    args = copy.copy(args)
    args.out_dir = str(tmp_path)
    model = copy.deepcopy(g_model)
    before = state(model)
    clusters = torch.arange(len(train.images)).repeat(2, 1)  # every image its own cluster: no connection anywhere
    groups_of = lambda idx: profeat.ensemble_groups(clusters[:, idx], t_e=2, t_c=1)
    row = profeat.representation_step(args, 2, 7, model, train, groups_of)
    steps = len(train.images) // args.pretext_batch_size
    assert row["skipped_batches"] == steps and row["kept_images"] == 0 and row["positive_pairs"] == 0
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # when pairs survive: two confident clusters (even / odd index), every image kept (rounded down to a multiple of
    # 8 per process) -> the model moves, and the cross-image positive pairs are C(a, 2) + C(B' - a, 2)
    probs = F.one_hot(torch.arange(len(train.images)) % 2, 10).float()
    groups_of = lambda idx: profeat.confident_groups(probs[idx], 0.99)
    row = profeat.representation_step(args, 3, 7, model, train, groups_of)
    kept = args.pretext_batch_size // 8 * 8
    assert row["skipped_batches"] == 0 and row["kept_images"] == kept
    possible = [a * (a - 1) // 2 + (kept - a) * (kept - a - 1) // 2 for a in range(kept + 1)]
    assert min(possible) <= row["positive_pairs"] <= max(possible)
    assert any(not torch.equal(after[k], v) for k, v in state(model).items())


def test_pretext_warmup_raises_the_rate_linearly_over_the_first_representation_epochs(tiny_setup, tmp_path,
                                                                                         monkeypatch, capsys):
    args, train, test, g_model = tiny_setup
    args = copy.copy(args)
    args.out_dir, args.pretext_batch_size, args.pretext_epochs, args.refine_epochs = str(tmp_path), 100, 2, 2
    args.iterations, args.pretext_warmup, args.pretext_lr_min = 2, 3, 0.0               # 4 epochs, 3 of warm-up
    rates, step = [], torch.optim.SGD.step                                     # 300 images: 3 steps an epoch
    monkeypatch.setattr(torch.optim.SGD, "step", lambda opt: rates.append(opt.param_groups[0]["lr"]) or step(opt))
    groups_of = lambda idx: (torch.ones(len(idx), dtype=torch.bool), torch.eye(len(idx), dtype=torch.bool))
    for it in (1, 2):                                                          # every image its own group: NT-Xent
        profeat.representation_step(args, it, 0, copy.deepcopy(g_model), train, groups_of)
    cosine = [args.pretext_lr * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert rates == pytest.approx([cosine[e] * min(1, (e + s / 3) / 3) for e in range(4) for s in (1, 2, 3)])
    assert profeat.parse_args(["--quick"]).pretext_warmup == 2 and profeat.parse_args([]).pretext_warmup == 0
    assert "collapsed" not in capsys.readouterr().out
    args.out_dir = str(tmp_path / "collapsed")                                 # iteration 1's last epoch is checked
    os.makedirs(args.out_dir)
    monkeypatch.setattr(profeat, "refinement_loss", lambda z, positives, t: z.sum() * 0 + math.log(len(z) - 1))
    profeat.representation_step(args, 1, 0, copy.deepcopy(g_model), train, groups_of)
    assert "WARNING: the pretext collapsed" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# End to end (subprocess): smoke runs, resume, bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def profeat_s_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("s") / "run")
    proc = run(TINY + ["--out-dir", out])
    return out, proc


def test_smoke_profeat_s(profeat_s_run):
    out, proc = profeat_s_run
    rows = results(out)
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["stage"] == "iteration" for r in rows)
    for r in rows:
        assert 0 <= r["acc"] <= 1 and 0 <= r["nmi"] <= 1 and -1 <= r["ari"] <= 1
    assert rows[0]["positive_pairs"] == 0                 # iteration 1 is SimCLR: no cross-image positives
    assert rows[-1]["acc"] > 0.2                          # 10 balanced classes: chance is about 0.1
    lines = open(os.path.join(out, "predictions.csv")).read().splitlines()
    assert lines[0] == "index,label,cluster,confidence" and len(lines) == 1 + 1000
    assert all(0 <= float(line.split(",")[3]) <= 1 for line in lines[1:])   # confidences are probabilities
    assert os.path.getsize(os.path.join(out, "prototypes.png")) > 0
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    stages = [(r["stage"], r.get("epoch")) for r in log]
    assert {"it001_m0_pretext", "it002_m0_pretext", "it002_m0_scan", "it002_m0_selflabel", "iteration"} <= \
        {s for s, _ in stages}
    assert len(stages) == len(set(stages))                # each (stage, epoch) once
    again = run(TINY + ["--out-dir", out])                # a rerun of a finished run adds nothing to the log
    assert len(open(os.path.join(out, "log.jsonl")).readlines()) == len(stages) and "epoch 1/" not in again.stdout


def test_smoke_profeat_e_two_members(tmp_path):
    out = str(tmp_path / "run")
    run(TINY + ["--ensemble", "2", "--out-dir", out])
    rows = results(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert len(rows[-1]["member_acc"]) == 2 and rows[-1]["kept_member"] in (0, 1)
    assert rows[-1]["member_scan_eval_loss"][rows[-1]["kept_member"]] == rows[-1]["scan_eval_loss"]
    assert os.path.exists(os.path.join(out, "it002_m1_selflabel.pt"))
    assert rows[-1]["kept_images"] >= 0 and rows[-1]["acc"] > 0.2


def test_resume_between_iterations_gives_the_same_run(profeat_s_run, tmp_path):
    out, _ = profeat_s_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(out, resumed)
    for f in os.listdir(resumed):                          # as if killed after iteration 2's representation step
        if f.startswith(("it002_m0_scan", "it002_m0_selflabel", "results.json", "predictions.csv")):
            os.remove(os.path.join(resumed, f))
    proc = run(TINY + ["--out-dir", resumed])
    assert "[it001_m0_pretext] epoch" not in proc.stdout and "[it002_m0_scan] epoch" in proc.stdout
    a, b = results(out), results(resumed)
    for ra, rb in zip(a, b):
        for k in ["acc", "nmi", "ari", "kept_images", "positive_pairs", "head", "train_confident"]:
            assert ra[k] == rb[k], (ra["epoch"], k, ra[k], rb[k])


@pytest.mark.parametrize("extra, words", [
    (["--dataset", "no-such-set"], "Unknown dataset"),
    (["--num-clusters", "1"], "--num-clusters"),
    (["--num-clusters", "400"], "more than"),
    (["--ensemble", "2", "--t-e", "3"], "--t-e"),
    (["--ensemble", "0"], "--ensemble"),
    (["--t-s", "1.5"], "--t-s"),
    (["--num-neighbors", "300"], "--num-neighbors"),
    (["--threads", "0"], "--threads"),
    (["--subset", "1"], "--subset"),
    (["--pretext-lr", "-1"], "--pretext-lr"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, extra, words):
    args = TINY + ["--out-dir", str(tmp_path / "run")]
    if "--dataset" in extra:
        args = args[2:]
    with pytest.raises(SystemExit) as exc:       # in-process (fast); main() turns the error into exit status 2
        runtime.main("profeat.py", profeat.run, args + extra)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and words in err and err.startswith("profeat.py: error:"), err
    assert not os.path.exists(tmp_path / "run" / "results.json")


def test_bad_input_in_a_subprocess_exits_2_without_traceback(tmp_path):
    os.makedirs(tmp_path / "empty")                # an image folder without images (never touches the network)
    proc = run(["--dataset", f"imagefolder:{tmp_path / 'empty'}", "--out-dir", str(tmp_path / "run")], check=False)
    assert proc.returncode == 2 and str(tmp_path / "empty") in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1   # one paragraph


def test_corrupted_or_foreign_checkpoint_exit_2_and_kept(profeat_s_run, tmp_path):
    out, _ = profeat_s_run
    bad = str(tmp_path / "bad")
    shutil.copytree(out, bad)
    path = os.path.join(bad, "it002_m0_scan.pt")
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    proc = run(TINY + ["--out-dir", bad], check=False)
    assert proc.returncode == 2 and "it002_m0_scan.pt" in proc.stderr and "Traceback" not in proc.stderr
    assert open(path, "rb").read() == b"not a checkpoint"                  # nothing overwritten
    # iteration 2's representation checkpoint over iteration 1's: refused, not silently used
    shutil.copy(os.path.join(bad, "it002_m0_pretext.pt"), os.path.join(bad, "it001_m0_pretext.pt"))
    proc = run(TINY + ["--out-dir", bad], check=False)
    assert proc.returncode == 2 and "it002_m0_pretext" in proc.stderr and "Traceback" not in proc.stderr
    before = open(os.path.join(out, "results.json")).read()
    proc = run(TINY + ["--out-dir", out, "--t-s", "0.7"], check=False)    # another configuration
    assert proc.returncode == 2 and "--t-s 0.99 (now 0.7)" in proc.stderr and "Traceback" not in proc.stderr
    assert open(os.path.join(out, "results.json")).read() == before


def test_restart_removes_only_profeats_files(profeat_s_run, tmp_path):
    out, _ = profeat_s_run
    mine = str(tmp_path / "run")
    shutil.copytree(out, mine)
    open(os.path.join(mine, "my_backup.pt"), "wb").write(b"mine")
    run(TINY + ["--out-dir", mine, "--restart", "--iterations", "1"])
    assert open(os.path.join(mine, "my_backup.pt"), "rb").read() == b"mine"
    assert not os.path.exists(os.path.join(mine, "it002_m0_scan.pt"))


def test_keep_member_is_the_medoid_and_ties_go_to_the_lowest_scan_loss():
    a = torch.arange(300) % 3
    b = a.clone()
    b[:30] = (b[:30] + 1) % 3               # close to a
    c = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(0))  # unrelated to both
    preds = torch.stack([c, b, a]).numpy()  # a and b agree with each other; c is the outlier, never the medoid
    nmi = lambda x, y: profeat.metrics.nmi(preds[x], preds[y])
    mean_nmi = [(nmi(e, (e + 1) % 3) + nmi(e, (e + 2) % 3)) / 2 for e in range(3)]
    assert profeat.keep_member(preds, [0.0, 0.0, 0.0]) == max(range(3), key=lambda e: mean_nmi[e]) != 0
    assert profeat.keep_member(preds[:2], [-1.0, -2.0]) == 1 and profeat.keep_member(preds[:2], [-3.0, -2.0]) == 0
    assert profeat.keep_member(preds[:1], [5.0]) == 0
