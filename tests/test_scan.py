"""Tests of scan.py: losses against loop transcriptions of the equations, augmentations, and whole runs (subprocess).

    python -m pytest tests/test_scan.py -q
"""
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import scan  # noqa: E402

torch.set_num_threads(1)


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
    # uniform use of the clusters maximises the entropy term (log K) and so lowers the loss
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
    # Eq. (4)-(5), averaged over the batch
    l_cl = sum(-torch.exp(za[i] @ zb[i] / tau_c) * torch.log(qa[i] @ qb[i]) for i in range(B)) / B
    pa, pb = qa.t(), qb.t()
    pa = torch.stack([p / torch.sqrt(sum(v * v for v in p)) for p in pa])      # unit cluster vectors (cosine)
    pb = torch.stack([p / torch.sqrt(sum(v * v for v in p)) for p in pb])

    def l_cc(p, q):  # Eq. (6), gamma = 1, cosine similarity of the cluster vectors
        total = 0.0
        for l in range(c):
            num = torch.exp(p[l] @ q[l] / tau_cc)
            den = sum(torch.exp(p[l] @ q[j] / tau_cc) for j in range(c) if j != l)
            total = total - torch.log(num / den)
        return total
    L_cc = (l_cc(pa, pb) + l_cc(pb, pa)) / (2 * c)                            # Eq. (7), one batch
    qbar = [sum(qa[i, l] for i in range(B)) / B for l in range(c)]
    L_b = sum(q * torch.log(q) for q in qbar)                                  # Eq. (8)
    return l_cl + eta_cc * L_cc + lambda_b * L_b, l_cl, L_cc, L_b


def test_structured_loss_matches_loop():
    torch.manual_seed(2)
    a, b = torch.randn(7, 5), torch.randn(7, 5)
    za, zb = F.normalize(torch.randn(7, 3), dim=1), F.normalize(torch.randn(7, 3), dim=1)
    args = (8.0, 1.0, 1.0, 5.0)
    v, g = grads(lambda x, y: scan.structured_loss(x, y, za.double(), zb.double(), *args)[0], a, b)
    v_ref, g_ref = grads(lambda x, y: naive_structured(x, y, za.double(), zb.double(), *args)[0], a, b)
    assert torch.allclose(v, v_ref, atol=1e-10) and all(torch.allclose(x, y, atol=1e-10) for x, y in zip(g, g_ref))
    # each term separately, with other weights and temperatures
    terms = scan.structured_loss(a.double(), b.double(), za.double(), zb.double(), 0.5, 0.3, 2.0, 3.0)
    ref = naive_structured(a.double(), b.double(), za.double(), zb.double(), 0.5, 0.3, 2.0, 3.0)
    for t, r in zip(terms, ref):
        assert torch.allclose(t, r, atol=1e-10)
    # the neighbour weights: identical embeddings weigh exp(1 / tau_c), opposite ones exp(-1 / tau_c)
    same = scan.structured_loss(a, b, za, za, 8.0, 1.0, 0.0, 0.0)[1]
    opposite = scan.structured_loss(a, b, za, -za, 8.0, 1.0, 0.0, 0.0)[1]
    assert torch.allclose(same / opposite, torch.tensor(math.exp(2 / 8.0)), rtol=1e-5)


def naive_confidence_ce(weak, strong, thr):
    p = weak.softmax(1)
    conf = [i for i in range(len(p)) if p[i].max() > thr]
    if not conf:
        return None
    labels = {i: int(p[i].argmax()) for i in conf}
    classes = sorted(set(labels.values()))
    per_class = []  # class-balanced: every pseudo-class contributes its mean loss equally
    for c in classes:
        members = [i for i in conf if labels[i] == c]
        per_class.append(sum(-F.log_softmax(strong[i], 0)[c] for i in members) / len(members))
    return sum(per_class) / len(classes)


def test_confidence_ce_matches_loop_and_balances():
    torch.manual_seed(3)
    weak = torch.randn(40, 4) * 4
    weak[:12, 0] += 30                                                         # 12 confident in class 0
    weak[12:15, 2] += 30                                                       # 3 confident in class 2
    strong = torch.randn(40, 4)
    v, g = grads(lambda s: scan.confidence_ce(weak.double(), s, 0.99)[0], strong)
    v_ref, g_ref = grads(lambda s: naive_confidence_ce(weak.double(), s, 0.99), strong)
    assert torch.allclose(v, v_ref, atol=1e-10) and torch.allclose(g[0], g_ref[0], atol=1e-10)
    n = scan.confidence_ce(weak, strong, 0.99)[1]
    assert n == int((weak.softmax(1).max(1).values > 0.99).sum()) >= 15
    unconfident = weak.softmax(1).max(1).values <= 0.99
    assert unconfident.sum() > 10 and g[0][unconfident].abs().sum() == 0       # unconfident samples: no gradient


def test_confidence_ce_no_confident_sample_is_skipped():
    loss, n = scan.confidence_ce(torch.zeros(8, 5), torch.randn(8, 5), 0.99)
    assert loss is None and n == 0


# ---------------------------------------------------------------- augmentations
def images(B=64, C=3, S=32, seed=0):
    return torch.randint(0, 256, (B, C, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("C,S", [(3, 32), (1, 28)])
def test_augment_shapes_ranges_and_independence(C, S):
    x = images(32, C, S)
    x[:] = x[0]                                                                # 32 copies of one image
    mean, std = (0.5,) * C, (0.25,) * C
    for fn in (scan.simclr_augment, scan.strong_augment):
        torch.manual_seed(0)
        out = fn(x, mean, std)
        assert out.shape == (32, C, S, S) and out.dtype == torch.float32 and torch.isfinite(out).all()
        raw = out * 0.25 + 0.5                                                 # un-normalised
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
        distinct = len({tuple(o.flatten().tolist()) for o in out})
        assert distinct >= 30, f"{fn.__name__}: copies of one image must get independent parameters ({distinct})"


def test_augment_identity_at_zero_magnitude():
    x = images(16).float() / 255
    B = len(x)
    one, zero = torch.ones(B), torch.zeros(B)
    assert torch.allclose(scan.random_resized_crop_flip(x, scale=(1, 1), ratio=(1, 1), flip_p=0), x, atol=1e-5)
    assert torch.allclose(scan.color_jitter(x, p=0.0), x, atol=1e-5)
    assert torch.allclose(scan.color_jitter(x, 0, 0, 0, 0, p=1.0), x, atol=1e-6)
    half = torch.full((B,), 0.5)                                               # geometric ops: u = 0.5 is no motion
    warps = [scan.affine(x, scan.affine_matrix(torch.full((B,), k), half)) for k in range(5)]
    for y in [*warps, scan.adjust_brightness(x, one),
              scan.adjust_contrast(x, one), scan.adjust_saturation(x, one), scan.sharpness(x, one),
              scan.posterize(x, 8 * one), scan.solarize(x, one + 1 / 255)]:
        assert torch.allclose(y, x, atol=1e-5)
    assert torch.allclose(scan.hue_matrix(zero), torch.eye(3).expand(B, 3, 3), atol=1e-5)


def test_affine_equals_torch_affine_grid_for_random_matrices():
    x = torch.rand(8, 3, 12, 10)
    theta = torch.randn(8, 2, 3) * 0.5 + torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    for padding in ["zeros", "border"]:
        reference = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode=padding,
                                  align_corners=False)
        assert torch.allclose(scan.affine(x, theta, padding), reference, atol=1e-5)


def test_pixel_ops_match_pil():
    x8 = images(6, 3, 16, seed=4)
    x = x8.float() / 255
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in x8]
    back = lambda ims: torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in ims]).float() / 255
    assert torch.allclose(scan.equalize(x), back([ImageOps.equalize(im) for im in pil]), atol=1.5 / 255)
    assert torch.allclose(scan.autocontrast(x), back([ImageOps.autocontrast(im) for im in pil]), atol=1.5 / 255)
    assert torch.allclose(scan.posterize(x, torch.full((6,), 5.0)), back([ImageOps.posterize(im, 5) for im in pil]), atol=1e-6)
    assert torch.allclose(scan.solarize(x, torch.full((6,), 100 / 255)), back([ImageOps.solarize(im, 100) for im in pil]), atol=1e-6)
    for f in [0.0, 0.5]:                                                       # 0: PIL's SMOOTH filter itself
        pil_sharp = back([ImageEnhance.Sharpness(im).enhance(f) for im in pil])
        assert torch.allclose(scan.sharpness(x, torch.full((6,), f)), pil_sharp, atol=1.5 / 255)
    # a 90-degree rotation by grid_sample is exact on pixel centres (PIL rotates counter-clockwise)
    rot = scan.affine(x, scan.affine_matrix(torch.zeros(6, dtype=torch.long), torch.full((6,), 2.0)))  # u=2: 90 deg
    assert torch.allclose(rot, back([im.rotate(90) for im in pil]), atol=1e-4)


def test_hue_keeps_luma_and_is_identity_on_grayscale():
    x = torch.rand(8, 3, 8, 8) * 0.5 + 0.25
    m = scan.hue_matrix(torch.full((8,), 0.1))
    y = torch.einsum("bij,bjhw->bihw", m, x)
    assert torch.allclose(scan.grayscale(y), scan.grayscale(x), atol=1e-5) and not torch.allclose(y, x, atol=1e-2)
    g = torch.rand(8, 1, 8, 8)
    torch.manual_seed(0)
    out = scan.color_jitter(g, 0, 0, 0.4, 0.1, p=1.0)                           # only saturation and hue: no-ops
    assert torch.allclose(out, g, atol=1e-6)
    assert torch.allclose(scan.color_jitter(g, 0, 0, 0, 0, p=1.0, grayscale_p=1.0), g, atol=1e-6)
    rgb = torch.rand(4, 3, 8, 8)
    gray = scan.color_jitter(rgb, 0, 0, 0, 0, p=0.0, grayscale_p=1.0)           # folded RandomGrayscale
    assert torch.allclose(gray, scan.grayscale(rgb).expand_as(rgb), atol=1e-5)


def test_cutout_one_square_hole():
    x = torch.ones(200, 1, 32, 32)
    out = scan.cutout(x, 0.5)
    for o in out[:, 0]:
        rows, cols = (o == 0).any(1).nonzero().squeeze(1), (o == 0).any(0).nonzero().squeeze(1)
        if len(rows):  # a rectangle (square clipped by the border) with side <= 16
            assert (o[rows.min():rows.max() + 1, cols.min():cols.max() + 1] == 0).all()
            assert len(rows) <= 16 and len(cols) <= 16
    assert (out == 0).sum((1, 2, 3)).float().mean() > 20                     # holes exist


# ---------------------------------------------------------------- whole runs in subprocesses
def run_scan(*args, wait=True, timeout=240):
    cmd = [sys.executable, os.path.join(ROOT, "scan.py"), "--threads", "1", "--log-every", "0.2", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_quick_run_killed_and_resumed(tmp_path):
    """The smoke run: --quick on synthetic, killed during the pretext stage, resumed, ending above chance (0.1)."""
    out = str(tmp_path / "run")
    proc = run_scan("--dataset", "synthetic", "--quick", "--out-dir", out, wait=False)
    ckpt, deadline = os.path.join(out, "pretext.pt"), time.time() + 120
    while not os.path.exists(ckpt) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(ckpt), proc.stdout.read()
    epoch_done = torch.load(ckpt, weights_only=False)["epoch"]
    assert epoch_done < 5                                                      # killed mid-stage
    t0 = time.time()
    res = run_scan("--dataset", "synthetic", "--quick", "--out-dir", out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"[pretext] resuming after epoch {epoch_done}" in res.stdout
    results = json.load(open(os.path.join(out, "results.json")))
    stages = [r["stage"] for r in results["rows"]]
    assert stages == ["pretext+kmeans", "scan", "selflabel"]
    for r in results["rows"]:
        assert r["acc"] > 0.3 and r["nmi"] > 0.2 and r["num_clusters"] == 10 and r["K"] >= 5 and r["n"] == 1000
    lines = open(os.path.join(out, "predictions.csv")).read().splitlines()
    assert lines[0] == "index,cluster,confidence,label" and len(lines) == 1001
    assert all(0 <= float(l.split(",")[2]) <= 1 for l in lines[1:])
    assert os.path.getsize(os.path.join(out, "prototypes.png")) > 1000
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert {r["epoch"] for r in log if r["stage"] == "pretext"} == {1, 2, 3, 4, 5}
    last_selflabel = [r for r in log if r["stage"] == "selflabel"][-1]      # per-epoch test ACC of the final model
    assert last_selflabel["test_acc"] == pytest.approx(results["rows"][-1]["acc"], abs=1e-6)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # same seed, same device: an uninterrupted run gives exactly the same results as the killed + resumed one
    fresh = run_scan("--dataset", "synthetic", "--quick", "--out-dir", str(tmp_path / "fresh"))
    assert fresh.returncode == 0 and json.load(open(tmp_path / "fresh" / "results.json"))["rows"] == results["rows"]
    # complete stages are skipped on a rerun
    again = run_scan("--dataset", "synthetic", "--quick", "--out-dir", out)
    assert again.returncode == 0 and "[pretext] epoch" not in again.stdout and "[scan] epoch" not in again.stdout
    # a checkpoint of another configuration is refused with exit 2
    other = run_scan("--dataset", "synthetic", "--quick", "--out-dir", out, "--temperature", "0.5")
    assert other.returncode == 2 and "another configuration" in other.stderr and "Traceback" not in other.stderr
    assert json.load(open(os.path.join(out, "results.json"))) == results  # nothing lost


@pytest.mark.parametrize("args,message", [
    (["--dataset", "no-such-set"], "no-such-set"),
    (["--dataset", "synthetic", "--quick", "--num-clusters", "1"], "--num-clusters"),
    (["--dataset", "synthetic", "--quick", "--subset", "30", "--num-neighbors", "30"], "--num-neighbors"),
    (["--dataset", "synthetic", "--quick", "--subset", "30", "--num-clusters", "31"], "more than the 30"),
    (["--dataset", "synthetic", "--quick", "--crop-min", "0"], "--crop-min"),
])
def test_bad_input_exits_2(args, message, tmp_path):
    res = run_scan(*args, "--out-dir", str(tmp_path / "bad"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr


def test_corrupted_checkpoint_exits_2(tmp_path):
    out = tmp_path / "corrupt"
    out.mkdir()
    (out / "pretext.pt").write_bytes(b"not a checkpoint")
    res = run_scan("--dataset", "synthetic", "--quick", "--out-dir", str(out))
    assert res.returncode == 2 and "pretext.pt" in res.stderr and "Traceback" not in res.stderr
    assert (out / "pretext.pt").read_bytes() == b"not a checkpoint"         # not overwritten


def test_non_finite_loss_names_epoch_step_and_checkpoint():
    args = type("Args", (), {"out_dir": "/some/run"})()
    scan.check_finite(torch.tensor(1.0), "scan", 3, 7, args)                  # finite: nothing happens
    with pytest.raises(FloatingPointError, match=r"scan loss at epoch 3 step 7.*/some/run/scan.pt"):
        scan.check_finite(torch.tensor(float("nan")), "scan", 3, 7, args)


def test_simclr_crop_min_sets_the_smallest_crop_area(monkeypatch):
    seen = []
    real = scan.random_resized_crop_flip
    monkeypatch.setattr(scan, "random_resized_crop_flip", lambda x, scale, **kw: seen.append(scale) or real(x, scale, **kw))
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    scan.simclr_augment(images, (0.5,), (0.25,))
    scan.simclr_augment(images, (0.5,), (0.25,), crop_min=0.6)
    assert seen == [(0.2, 1.0), (0.6, 1.0)]
    assert "crop_min" in scan.STAGE_KEYS["pretext"]  # a pretext made with another crop is not silently reused


def test_checkpoint_from_before_crop_min_loads_with_the_old_crop(tmp_path):
    args = scan.parse_args(["--dataset", "synthetic", "--quick", "--out-dir", str(tmp_path)])
    old = {k: v for k, v in scan.stage_config(args, "pretext").items() if k != "crop_min"}
    torch.save({"config": old, "epoch": 5}, tmp_path / "pretext.pt")
    assert scan.load_stage(args, "pretext")["epoch"] == 5                  # made with 0.2, the default
    args.crop_min = 0.5
    with pytest.raises(scan.ScanError, match="another configuration"):
        scan.load_stage(args, "pretext")


def test_keep_freed_memory_sets_glibc_thresholds_and_is_a_no_op_without_glibc(monkeypatch):
    if sys.platform.startswith("linux"):
        assert scan.keep_freed_memory() is True                               # the real call: mallopt accepted both
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1
    monkeypatch.setattr(scan.ctypes, "CDLL", lambda name: FakeLibc())
    assert scan.keep_freed_memory() is True
    assert calls == [(-3, 256 << 20), (-1, 1 << 30)]                          # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(scan.ctypes, "CDLL", no_glibc)
    assert scan.keep_freed_memory() is False
    import deepcluster
    import profeat
    for module in (deepcluster, profeat):                                      # the scripts' copies are identical
        assert inspect.getsource(module.keep_freed_memory) == inspect.getsource(scan.keep_freed_memory)
