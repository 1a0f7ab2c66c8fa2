"""One prepared check of the project's CUDA path: correctness, throughput, projected schedules, k-NN, augmentation,
and a short real run, in at most --minutes (default 7.5) of one GPU, start included. Prints ONE table (part, what,
value, unit, note) and writes every number to gpu_check.json (--out).

  1. correctness  augment.py's ops (fixed parameters, or the random ones drawn on the CPU from a fixed seed), the losses
                  of scan.py, profeat.py and deepcluster.py and their gradients, knn.knn: computed on CUDA and on the
                  CPU from the same inputs (made on the CPU, then moved); the max absolute difference of each.
  2. throughput   images/s of one training step of each script (as its progress line counts them), ResNet-18 on
                  Fashion-MNIST resized to 32x32 and repeated to 3 channels (a CIFAR-10-shaped load), bf16 autocast +
                  channels_last through runtime.wrap, eager and torch.compile'd (in a child process, in order of
                  importance, until the deadline), with the peak GPU memory of each; plus what the schedules need
                  besides training steps: evaluation passes (runtime.predict), checkpoint writes, k-means, DeepCluster's
                  per-epoch clustering.
  3. projection   wall time of the paper schedules on CIFAR-10 (50k train, 10k test images) from those numbers: SCAN
                  (500 pretext + 50 SCAN + 200 self-label epochs; target: <= 60 minutes on one H200), DeepCluster (its
                  default arch and epochs, and ResNet-18), ProFeat_s (500 + 9 x 50 representation epochs, 10 x (50
                  SCAN + 200 self-label epochs)).
  4. k-NN         knn.knn on the GPU: 50k x 128 self-search (k=20), the scripts' other searches at CIFAR-10 size, 100k
                  queries against 1M keys (extrapolated to 1M queries), and, if time is left at the end, the 1M x 128
                  self-search itself in a child process with a timeout.
  5. augmentation batched augment.simclr_augment on the GPU vs torchvision's per-image PIL pipeline (one process), the
                  ratio (target >= 100x); and the batched strong augmentation's rate.
  6. real run     scan.py on Fashion-MNIST (28x28x1, ResNet-18), 3 + 2 + 1 epochs, as a subprocess with a timeout:
                  exit status, every stage finished, finite losses, ACC per stage, wall time.

On a GPU machine: copy the repository and Fashion-MNIST's four raw .gz files into ./data/FashionMNIST/raw/ (or
install Debian's dataset-fashion-mnist), then from the repository's root:

    python bench/gpu_check.py                          # everything, <= 7.5 minutes; writes ./gpu_check.json
    python bench/gpu_check.py --parts 1,5 --minutes 2  # a subset
    python bench/gpu_check.py --cpu-dry-run            # the same code on the CPU with tiny sizes (tests, CI)

Every part checks the time left before each measurement and skips what no longer fits, with a note; a SIGTERM
(`timeout`) still prints the table and writes the JSON. Exit status 0, or 1 when a check failed or a measurement
raised; the table says which. On the GPU the subprocesses (the compile child, the real run, the 1M self-search) run
one at a time, after the in-process parts, so that no measurement shares the GPU; the dry run starts its compile
child and its real run at once, alongside the other parts (its timings mean nothing), to stay well under a minute.
"""
import time

T_START = time.time()  # the budget counts the imports too

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import augment  # noqa: E402
import data  # noqa: E402
import deepcluster  # noqa: E402
import metrics  # noqa: E402
import profeat  # noqa: E402
import runtime  # noqa: E402
import scan  # noqa: E402
import synthetic  # noqa: E402
from knn import knn  # noqa: E402

TAG = "@@gpu_check "          # a child process's result lines start with this
N_CIFAR, N_CIFAR_TEST = 50_000, 10_000
STAGES = ["pretext", "selflabel", "scan", "profeat", "deepcluster"]  # compiled in this order: most time first


class Interrupted(Exception):
    """SIGTERM (e.g. from `timeout`): finish the table and the JSON with what was measured."""


# ---- sizes -------------------------------------------------------------------------------------------------------
def config(dry):
    """What is measured at which size: the real sizes on a GPU, tiny ones for --cpu-dry-run."""
    if not dry:
        return argparse.Namespace(
            dry=False, device="cuda", size=32, arch="resnet18", width=32, dc_archs=["alexnet", "resnet18"],
            n_train=N_CIFAR, n_test=N_CIFAR_TEST,
            batch=dict(pretext=512, scan=128, selflabel=1000, deepcluster=256, profeat=512),
            warmup=3, target_s=2.5, min_steps=5, n_inference=20_000, aug_seconds=2.0, pil_seconds=3.0,
            knn_small=4000, knn_self=50_000, knn_monitor=(10_000, 50_000), knn_pixels=(5000, 50_000, 3072),
            knn_big=(100_000, 1_000_000), knn_big_self=1_000_000, kmeans_n=50_000, warmup_steps=200,
            real_run_timeout=300, scale=1.0)
    return argparse.Namespace(
        dry=True, device="cpu", size=16, arch="smallcnn", width=8, dc_archs=["small"], n_train=512, n_test=256,
        batch=dict(pretext=32, scan=16, selflabel=64, deepcluster=32, profeat=32), warmup=1, target_s=0.0,
        min_steps=2, n_inference=256, aug_seconds=0.1, pil_seconds=0.2, knn_small=300, knn_self=1000,
        knn_monitor=(200, 1000), knn_pixels=(100, 1000, 768), knn_big=(500, 5000), knn_big_self=3000, kmeans_n=1000,
        warmup_steps=20, real_run_timeout=120, scale=0.1)


# ---- the report ----------------------------------------------------------------------------------------------------
class Report:
    """Rows (part, what, value, unit, note, ok, extra), written to the JSON after every part."""
    def __init__(self, path, meta):
        self.path, self.meta, self.rows = path, meta, []

    def add(self, part, what, value, unit="", note="", ok=None, **extra):
        value = None if value is None else float(value)
        if value is not None and not math.isfinite(value):
            value, note = None, f"{note}; value {value}".strip("; ")
        row = dict(part=part, what=what, value=value, unit=unit, note=note, ok=ok, extra=extra)
        self.rows.append(row)
        flag = "" if ok is None else (" ok" if ok else " FAILED")
        log(f"part {part}: {what}: {fmt(value)} {unit}{flag} {note}".rstrip())
        return row

    def skip(self, part, what, reason):
        return self.add(part, what, None, note=f"skipped: {reason}")

    def fail(self, part, what, error):
        return self.add(part, what, None, note=f"error: {type(error).__name__}: {str(error)[:300]}", ok=False)

    def sorted(self):  # by part, in the order measured within a part
        return sorted(self.rows, key=lambda r: r["part"])

    def save(self):
        self.meta["elapsed_s"] = time.time() - T_START
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(clean({"meta": self.meta, "rows": self.sorted()}), f, indent=1, default=str, allow_nan=False)
        os.replace(tmp, self.path)

    def table(self):
        head = ["part", "what", "value", "unit", "note"]
        flag = lambda r: "" if r["ok"] is None else "ok" if r["ok"] else "FAILED"
        body = [[str(r["part"]), r["what"], fmt(r["value"]), r["unit"], "; ".join(filter(None, [flag(r), r["note"]]))]
                for r in self.sorted()]
        widths = [max(len(line[i]) for line in [head] + body) for i in range(4)]
        line = lambda cells: "| " + " | ".join([c.ljust(w) if i != 2 else c.rjust(w) for i, (c, w) in
                                               enumerate(zip(cells, widths))] + [cells[4]]) + " |"
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|---|"
        return "\n".join([line(head), rule] + [line(b) for b in body])


def clean(obj):
    """JSON without NaN or infinities: those become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def fmt(v):
    if v is None:
        return "-"
    if v == 0 or not math.isfinite(v):
        return str(v if not float(v).is_integer() else int(v))
    a = abs(v)
    return f"{v:,.0f}" if a >= 1000 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"


def log(message):
    print(f"[gpu_check {time.time() - T_START:6.1f}s] {message}", flush=True)


class Budget:
    def __init__(self, deadline, scale):
        self.deadline, self.scale = deadline, scale

    def left(self):
        return self.deadline - time.time()

    def allows(self, need):  # need: seconds the next measurement takes on a GPU (scaled down for the dry run)
        return self.left() >= need * self.scale

    def why(self, need):
        return f"{max(0.0, self.left()):.0f} s of the budget left, it needs ~{need * self.scale:.0f} s"


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


# ---- 1. correctness: the same inputs on CUDA and on the CPU --------------------------------------------------------
@contextlib.contextmanager
def cpu_random(seed):
    """Inside: torch.rand, torch.randint and Tensor.uniform_ draw from one CPU generator seeded with seed and move the
    numbers to the requested device, so that augment.py's random ops draw the same parameters on every device."""
    g = torch.Generator().manual_seed(seed)
    rand, randint, uniform_ = torch.rand, torch.randint, torch.Tensor.uniform_

    def p_rand(*size, device=None, generator=None, **kw):
        return rand(*size, generator=g, **kw).to(device or "cpu")

    def p_randint(*args, device=None, generator=None, **kw):
        return randint(*args, generator=g, **kw).to(device or "cpu")

    def p_uniform_(self, a=0.0, b=1.0, generator=None):
        return self.copy_(uniform_(torch.empty(self.shape, dtype=self.dtype), a, b, generator=g))
    torch.rand, torch.randint, torch.Tensor.uniform_ = p_rand, p_randint, p_uniform_
    try:
        yield
    finally:
        torch.rand, torch.randint, torch.Tensor.uniform_ = rand, randint, uniform_


def run_on(device, fn, inputs, grad=(), seed=None):
    """fn(*inputs moved to device) -> (outputs on the CPU, gradients of outputs[0].sum() w.r.t. the inputs[i], i in
    grad)."""
    xs = [x.detach().clone().to(device) for x in inputs]
    xs = [x.requires_grad_(i in grad) if x.is_floating_point() else x for i, x in enumerate(xs)]
    with cpu_random(seed) if seed is not None else contextlib.nullcontext():
        out = fn(*xs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    outs = [o if torch.is_tensor(o) else torch.tensor(float(o)) for o in outs]
    grads = torch.autograd.grad(outs[0].sum(), [xs[i] for i in grad]) if grad else []
    return [o.detach().float().cpu() for o in outs], [g.cpu() for g in grads]


def compare(report, device, what, fn, inputs, grad=(), seed=None, tol=1e-4, rel=False, frac_ok=None, note=""):
    """One row: max |device - CPU| over fn's outputs (and one for the gradients). tol: absolute, or relative to the
    largest CPU value when rel. frac_ok: discontinuous ops (thresholds, rounding) may flip a few values; then the check
    is that at most this fraction of them differs by more than tol."""
    try:
        (ref, ref_g), (out, out_g) = run_on("cpu", fn, inputs, grad, seed), run_on(device, fn, inputs, grad, seed)
        diffs = [(o - r).abs() for o, r in zip(out, ref)]
        big = max(1.0, max(float(r.abs().max()) for r in ref)) if rel else 1.0
        worst = max(float(d.max()) for d in diffs)
        frac = sum(int((d > tol * big).sum()) for d in diffs) / sum(d.numel() for d in diffs)
        ok = worst <= tol * big or (frac_ok is not None and frac <= frac_ok)
        extra = dict(mean_abs_diff=sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs),
                     fraction_above_tol=frac, tol=tol * big)
        n = f"; {frac:.2%} of values above tol" if frac and frac_ok is not None else ""
        report.add(1, what, worst, "max abs diff", (note + n).strip("; "), ok, **extra)
        if grad:
            g_big = max(1.0, max(float(r.abs().max()) for r in ref_g)) if rel else 1.0
            g_worst = max(float((o - r).abs().max()) for o, r in zip(out_g, ref_g))
            report.add(1, what + " (gradient)", g_worst, "max abs diff", "", g_worst <= tol * g_big, tol=tol * g_big)
    except Interrupted:
        raise
    except Exception as e:
        report.fail(1, what, e)


def part1(report, cfg, budget):
    dev, g = cfg.device, torch.Generator().manual_seed(0)
    if not budget.allows(15):
        return report.skip(1, "correctness", budget.why(15))
    B, S = 64, 32
    x = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=g).float() / 255  # on the uint8 grid
    ident = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    theta = ident + 0.3 * torch.randn(B, 2, 3, generator=g)
    for pad in ["zeros", "border", "reflection"]:
        compare(report, dev, f"augment.affine ({pad})", lambda x, t, p=pad: augment.affine(x, t, p), [x, theta])
    # random_resized_crop_flip's warp with fixed parameters: crop sides w, h, centre (cx, cy), flip, as it builds them
    w, h = 0.45 + 0.55 * torch.rand(B, generator=g), 0.45 + 0.55 * torch.rand(B, generator=g)
    cx, cy = (torch.rand(B, generator=g) * 2 - 1) * (1 - w), (torch.rand(B, generator=g) * 2 - 1) * (1 - h)
    crop = torch.zeros(B, 2, 3)
    flip = torch.where(torch.arange(B) % 2 == 0, -1.0, 1.0)
    crop[:, 0, 0], crop[:, 0, 2], crop[:, 1, 1], crop[:, 1, 2] = w * flip, cx, h, cy
    compare(report, dev, "random_resized_crop_flip warp (fixed crops, border)",
            lambda x, t: augment.affine(x, t, "border"), [x, crop])
    compare(report, dev, "random_resized_crop_flip (seeded draws)", lambda x: augment.random_resized_crop_flip(x),
            [x], seed=1)
    f = 0.6 + 0.8 * torch.rand(B, generator=g)                                 # factors in [0.6, 1.4]
    shift = 0.2 * torch.rand(B, generator=g) - 0.1                             # hue in [-0.1, 0.1] turns
    hue = lambda x, s: torch.einsum("bij,bjhw->bihw", augment.hue_matrix(s), x).clamp(0, 1)
    for name, fn, args in [("adjust_brightness", augment.adjust_brightness, [x, f]),
                           ("adjust_contrast", augment.adjust_contrast, [x, f]),
                           ("adjust_saturation", augment.adjust_saturation, [x, f]),
                           ("hue_matrix applied", hue, [x, shift]),
                           ("grayscale", augment.grayscale, [x]),
                           ("normalize", lambda x: augment.normalize(x, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), [x])]:
        compare(report, dev, f"augment.{name} (fixed factors)", fn, args)
    compare(report, dev, "color_jitter (seeded draws)", lambda x: augment.color_jitter(x, grayscale_p=0.2), [x], seed=2)
    u = torch.rand(B, generator=g)
    for i in range(len(augment.STRONG_OPS)):
        compare(report, dev, f"STRONG_OPS[{i}] {_op_name(i)} via apply_per_image (fixed u)",
                lambda x, u, i=i: augment.apply_per_image(x, torch.full_like(u, i).long(), u, augment.STRONG_OPS),
                [x, u])
    compare(report, dev, "apply_per_image, all 14 ops mixed (fixed u)",
            lambda x, u: augment.apply_per_image(x, torch.arange(len(u), device=u.device) % 14, u, augment.STRONG_OPS),
            [x, u])
    compare(report, dev, "cutout (seeded draws)", lambda x: augment.cutout(x), [x], seed=3)
    u8 = (x * 255).round().to(torch.uint8)
    m3, s3 = (0.286,) * 3, (0.353,) * 3
    note = "whole pipeline; discontinuous ops (posterize, solarize, equalize) can amplify rounding"
    compare(report, dev, "simclr_augment (seeded draws)", lambda x: augment.simclr_augment(x, m3, s3), [u8], seed=4,
            tol=1e-3, frac_ok=1e-3, note=note)
    compare(report, dev, "strong_augment (seeded draws)", lambda x: augment.strong_augment(x, m3, s3), [u8], seed=5,
            tol=1e-3, frac_ok=1e-3, note=note)
    compare(report, dev, "strong_augment 1-channel 28x28 (seeded draws)",
            lambda x: augment.strong_augment(x, (0.286,), (0.353,)), [u8[:, :1, 2:30, 2:30].contiguous()], seed=6,
            tol=1e-3, frac_ok=1e-3, note=note)
    compare(report, dev, "deepcluster.sobel", deepcluster.sobel, [augment.normalize(x, m3, s3)], tol=1e-3, rel=True,
            note="a conv2d: TF32 on CUDA unless torch.backends.cudnn.allow_tf32 is off")
    # the losses, on the CPU-made inputs; rel: tolerance relative to the loss' size
    z1, z2 = torch.randn(512, 128, generator=g), torch.randn(512, 128, generator=g)
    compare(report, dev, "scan.nt_xent (B 512)", lambda a, b: scan.nt_xent(F.normalize(a), F.normalize(b), 0.1),
            [z1, z2], grad=(0, 1), rel=True)
    la, ln = 3 * torch.randn(2, 128, 10, generator=g), 3 * torch.randn(2, 128, 10, generator=g)
    compare(report, dev, "scan.scan_loss (2 heads, B 128)", lambda a, n: scan.scan_loss(a, n, 5.0), [la, ln],
            grad=(0, 1), rel=True, note="total, consistency and entropy")
    za, zn = F.normalize(torch.randn(128, 128, generator=g)), F.normalize(torch.randn(128, 128, generator=g))
    compare(report, dev, "scan.structured_loss (2 heads, B 128)", lambda a, n, p, q: scan.structured_loss(a, n, p, q),
            [la, ln, za, zn], grad=(0, 1), rel=True, note="all four terms")
    weak, strong = 8 * torch.randn(1000, 10, generator=g), torch.randn(1000, 10, generator=g)
    compare(report, dev, "scan.confidence_ce (B 1000)", lambda w, s: scan.confidence_ce(w, s, 0.99), [weak, strong],
            grad=(1,), rel=True, note=f"{int((weak.softmax(1).max(1).values > 0.99).sum())} confident; loss and counts")
    probs = F.one_hot(torch.randint(0, 10, (256,), generator=g), 10).float() * 0.995 + 0.0005
    keep, group = profeat.confident_groups(probs, 0.99)
    positives = profeat.view_positives(group[keep][:, keep])
    zr = torch.randn(2 * int(keep.sum()), 128, generator=g)
    compare(report, dev, "profeat.refinement_loss (256 images, 10 groups)",
            lambda z, p: profeat.refinement_loss(F.normalize(z), p, 0.1), [zr, positives], grad=(0,), rel=True)
    logits, targets = 2 * torch.randn(256, 100, generator=g), torch.randint(0, 100, (256,), generator=g)
    compare(report, dev, "deepcluster.pseudo_label_loss (B 256, 100 clusters)", deepcluster.pseudo_label_loss,
            [logits, targets], grad=(0,), rel=True)
    knn_agreement(report, cfg)


def _op_name(i):
    return ["identity", "autocontrast", "equalize", "rotate", "solarize", "color", "contrast", "brightness",
            "sharpness", "shear_x", "shear_y", "translate_x", "translate_y", "posterize"][i]


def knn_agreement(report, cfg):
    g, n = torch.Generator().manual_seed(7), cfg.knn_small
    feats, queries = torch.randn(n, 64, generator=g), torch.randn(n // 4, 64, generator=g)
    for what, args, kw in [(f"knn.knn cosine self-search {n} x 64, k=20", (feats,), dict(k=20)),
                           (f"knn.knn l2 {n // 4} queries x {n} keys, k=20", (queries, feats),
                            dict(k=20, metric="l2"))]:
        try:
            s_cpu, i_cpu = knn(*args, **kw)
            s_dev, i_dev = knn(*[a.to(cfg.device) for a in args], **kw)
            same = float((i_dev.cpu() == i_cpu).all(1).float().mean())
            common = sum(len(set(a) & set(b)) for a, b in zip(i_dev.cpu().tolist(), i_cpu.tolist()))
            sets = common / i_cpu.numel()
            diff = float((s_dev.cpu() - s_cpu).abs().max())
            report.add(1, what + ": identical index lists", same, "fraction of rows",
                       f"neighbour sets {sets:.4f}; scores max abs diff {diff:.2g}", same >= 0.99,
                       set_agreement=sets, score_max_abs_diff=diff)
        except Interrupted:
            raise
        except Exception as e:
            report.fail(1, what, e)


# ---- 2. throughput of each script's training step ----------------------------------------------------------------
def load_images(cfg, data_root):
    """(train, test) Datasets (uint8 on cfg.device): Fashion-MNIST's first 50k train and 10k test images resized to
    32x32 and repeated to 3 channels; synthetic images when it is missing (and in the dry run)."""
    note = "Fashion-MNIST resized to 32x32, repeated to 3 channels"
    try:
        if cfg.dry:
            raise data.DataError("dry run: synthetic images")
        sets = [data.load_dataset("fashion-mnist", data_root, s, download=False) for s in ("train", "test")]
        sets = [d._replace(images=data.resize(d.images[:n], cfg.size).repeat(1, 3, 1, 1), labels=d.labels[:n],
                           mean=d.mean * 3, std=d.std * 3) for d, n in zip(sets, (cfg.n_train, cfg.n_test))]
    except data.DataError as e:
        note = f"synthetic {cfg.size}x{cfg.size}x3 images ({str(e)[:80]})"
        sets = [synthetic.make_synthetic(s, num_images=n, image_size=cfg.size, channels=3)
                for s, n in (("train", cfg.n_train), ("test", cfg.n_test))]
    return [d._replace(images=d.images.to(cfg.device), labels=d.labels.to(cfg.device)) for d in sets], note


class Batches:
    """Random batches of indices, a fresh permutation per pass, as runtime.batches gives the scripts."""
    def __init__(self, n, device):
        self.n, self.device, self.perm, self.pos = n, device, None, n

    def __call__(self, b):
        if self.pos + b > self.n:
            self.perm, self.pos = torch.randperm(self.n, device=self.device), 0
        self.pos += b
        return self.perm[self.pos - b:self.pos]


def build_stage(name, cfg, train, compile, dc_arch=None):
    """(step, model, optimizer) of one training step as the script's loop runs it; step() returns the images it sent
    through the network, counted as the script's progress line counts them."""
    dev, images, mean, std, N = cfg.device, train.images, train.mean, train.std, len(train.images)
    B, batches, C = cfg.batch[name], Batches(N, cfg.device), images.shape[1]
    if name in ("pretext", "profeat"):
        mod = scan if name == "pretext" else profeat
        model = mod.ContrastiveModel(mod.make_backbone(cfg.arch, C, cfg.width))
        opt = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.9, weight_decay=1e-4)
        model, forward = runtime.wrap(model, dev, compile)
        model.train()
        # ProFeat's refinement step: confident clusters of the previous clustering (here: random, all confident)
        probs = F.one_hot(torch.randint(0, 10, (N,), device=dev), 10).float()

        def step():
            idx = batches(B)
            if name == "pretext":
                z = forward(torch.cat([augment.simclr_augment(images[idx], mean, std, 0.2) for _ in range(2)]))
                loss, n = scan.nt_xent(z[:B], z[B:], 0.1), B
            else:                                               # profeat.representation_step, one process
                keep, group = profeat.confident_groups(probs[idx], 0.99)
                share = keep.view(1, -1)
                keep = (share & (share.cumsum(1) <= share.sum(1, keepdim=True) // 8 * 8)).view(-1)
                n = int(keep.sum())
                x = images[idx[keep]]
                z = forward(torch.cat([augment.simclr_augment(x, mean, std, 0.2) for _ in range(2)]))
                loss = profeat.refinement_loss(z, profeat.view_positives(group[keep][:, keep]), 0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return 2 * n
        return step, model, opt
    if name in ("scan", "selflabel"):
        model = scan.ClusteringModel(scan.make_backbone(cfg.arch, C, cfg.width), 10, 1)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)
        model, forward = runtime.wrap(model, dev, compile)
        model.train()
        neighbor_idx = torch.randint(0, N, (N, 20), device=dev)

        def scan_step():                                        # scan.train_scan's loop body
            anchor = batches(B)
            neighbor = neighbor_idx[anchor, torch.randint(0, 20, (B,), device=dev)]
            logits = forward(augment.strong_augment(images[torch.cat([anchor, neighbor])], mean, std))
            loss = scan.scan_loss(logits[:, :B], logits[:, B:], 5.0)[0]
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            return 2 * B

        def selflabel_step(threshold=0.0):                     # scan.train_selflabel's loop body; threshold 0: no
            idx = batches(B)                                    # batch is skipped, every image is "confident"
            model.train()
            with torch.no_grad():
                weak = forward(scan.plain(images[idx], mean, std))[0]
            if not (weak.softmax(1).max(1).values > threshold).any():
                return 0
            strong = forward(augment.strong_augment(images[idx], mean, std))[0]
            loss, _ = scan.confidence_ce(weak, strong, threshold)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return 2 * B
        return (scan_step if name == "scan" else selflabel_step), model, opt
    # deepcluster.train_network's loop body, 100 clusters (10 x the classes)
    model = deepcluster.DeepClusterNet(dc_arch, C, use_sobel=True).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-5)
    model, forward = runtime.wrap(model, dev, compile)
    model.train()
    top = deepcluster.new_top_layer(model.feature_dim, 100, torch.Generator().manual_seed(0)).to(dev)
    top_opt = torch.optim.SGD(top.parameters(), lr=0.05, weight_decay=1e-5)
    targets = torch.randint(0, 100, (N,), device=dev)

    def dc_step():
        idx = batches(B)
        logits = top(F.relu(forward(deepcluster.augment(images[idx], mean, std, 0.08))))
        loss = deepcluster.pseudo_label_loss(logits, targets[idx])
        opt.zero_grad(set_to_none=True)
        top_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        top_opt.step()
        return B
    return dc_step, model, opt


def measure(step, cfg):
    """Warm up (the first step: cuDNN's benchmark, or torch.compile), then time enough steps for cfg.target_s."""
    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first, _ = timed(step, cfg.device)
    for _ in range(cfg.warmup - 1):
        step()
    probe, _ = timed(lambda: [step() for _ in range(2)], cfg.device)
    steps = max(cfg.min_steps, math.ceil(cfg.target_s / max(probe / 2, 1e-6)))
    seconds, images = timed(lambda: sum(step() for _ in range(steps)), cfg.device)
    return dict(rate=images / seconds, steps=steps, seconds=seconds, step_ms=1000 * seconds / steps, images=images,
                first_step_s=first, peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def stage_list(cfg):
    """(key, stage, DeepCluster arch, label) in order of importance."""
    out = [(s, s, None) for s in STAGES if s != "deepcluster"]
    out += [(f"deepcluster-{a}", "deepcluster", a) for a in cfg.dc_archs]
    labels = {"pretext": f"SimCLR pretext step (scan.py, B {cfg.batch['pretext']})",
              "selflabel": f"self-label step (scan.py, B {cfg.batch['selflabel']})",
              "scan": f"SCAN step (scan.py, B {cfg.batch['scan']} + neighbours)",
              "profeat": f"ProFeat refinement step (profeat.py, B {cfg.batch['profeat']})"}
    return [(k, s, a, labels.get(k, f"DeepCluster step ({a}, Sobel, B {cfg.batch['deepcluster']})"))
            for k, s, a in out]


def add_rate_rows(report, label, kind, key, res, cfg, more=""):
    arch = key.split("-")[1] if key.startswith("deepcluster") else cfg.arch
    report.add(2, f"{label} [{kind}]", res["rate"], "img/s",
               f"{arch} {cfg.size}x{cfg.size}x3; {res['steps']} steps in {res['seconds']:.1f} s; first step "
               f"{res['first_step_s']:.1f} s{more}", None, stage=key, compiled=kind == "compiled", **res)
    if res.get("peak_gib") is not None:
        report.add(2, f"{label} [{kind}] peak GPU memory", res["peak_gib"], "GiB",
                   "max_memory_allocated, the data set on the GPU included", stage=key)


def part2_eager(report, cfg, budget, train, test, numbers):
    """Eager rates of every stage, then what the schedules need besides training steps."""
    for key, stage, arch, label in stage_list(cfg):
        if not budget.allows(15):
            report.skip(2, f"{label} [eager]", budget.why(15))
            continue
        try:
            step, model, opt = build_stage(stage, cfg, train, False, arch)
            res = measure(step, cfg)
            numbers["eager"][key] = res["rate"]
            add_rate_rows(report, label, "eager", key, res, cfg)
            extras(report, cfg, budget, key, model, opt, train, test, numbers)
        except Interrupted:
            raise
        except Exception as e:
            report.fail(2, f"{label} [eager]", e)
        model = opt = step = None
        cleanup(cfg)


def cleanup(cfg):
    if cfg.device.startswith("cuda"):
        torch.cuda.empty_cache()


def extras(report, cfg, budget, key, model, opt, train, test, numbers):
    """The non-training work of the schedules, measured once with the stage's model."""
    dev, tmp = cfg.device, tempfile.mkdtemp(prefix="gpu_check_ckpt_")
    try:
        if budget.allows(5):
            ckpt = lambda: runtime.save_checkpoint(os.path.join(tmp, "c.pt"), "gpu_check.py", "bench", {},
                                                   model=model.state_dict(), optimizer=opt.state_dict(), epoch=1)
            timed(ckpt, dev)
            t, _ = timed(ckpt, dev)
            numbers[f"ckpt-{key}"] = t
            report.add(2, f"checkpoint write ({key}: weights + {type(opt).__name__} state)", t, "s",
                       "runtime.save_checkpoint, once per epoch in every script")
        if key == "pretext" and budget.allows(10):
            n = min(cfg.n_inference, len(train.images))
            runtime.predict(model, train.images[:min(2000, n)], train.mean, train.std)    # cuDNN picks algorithms
            t, _ = timed(lambda: runtime.predict(model, train.images[:n], train.mean, train.std), dev)
            numbers["inference"] = n / t
            report.add(2, "inference pass (runtime.predict, fp32, batch 1000)", n / t, "img/s",
                       f"{n} images; the evaluation passes of every epoch")
        if key == "pretext" and budget.allows(10):
            feats = F.normalize(torch.randn(cfg.kmeans_n, 512, device=dev))
            scan.kmeans(feats[:1000], 10, iters=2, n_init=1)
            t, _ = timed(lambda: scan.kmeans(feats, 10), dev)
            numbers["kmeans-mine"] = t * N_CIFAR / cfg.kmeans_n
            report.add(2, f"scan.kmeans {cfg.kmeans_n} x 512, k=10, 5 inits x 50 iterations", t, "s",
                       "the mine stage runs it twice (projection, backbone)")
        if key == "scan" and budget.allows(10):
            ns = argparse.Namespace(warmup_steps=cfg.warmup_steps, scan_batch_size=cfg.batch["scan"], seed=0,
                                    device=dev, weight_decay=1e-4, loss="scan", entropy_weight=5.0)
            sub = train._replace(images=train.images[:2000])
            nbr = torch.randint(0, len(sub.images), (len(sub.images), 20), device=dev)
            spaces = [F.normalize(torch.randn(len(sub.images), d, device=dev), dim=1) for d in (512, 128)]  # k-means'
            t, _ = timed(lambda: scan.warm_up_heads(ns, model, sub, nbr, None, spaces), dev)
            inf = numbers.get("inference", float("inf"))                  # its predict of the train set, once
            numbers["warmup-2000"] = N_CIFAR / inf + 2000 * max(0.0, t - len(sub.images) / inf) / cfg.warmup_steps
            report.add(2, f"SCAN head warm-up, {cfg.warmup_steps} steps (scan.warm_up_heads, "
                          f"{len(sub.images)} images)", t, "s", "one predict of the images, then the steps; "
                       f"projected to the default 2000 steps on 50k images: {numbers['warmup-2000']:.1f} s")
        if key.startswith("deepcluster") and budget.allows(20):
            deepcluster_epoch(report, cfg, key, model, train, test, numbers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def deepcluster_epoch(report, cfg, key, model, train, test, numbers):
    """Everything deepcluster.train_network does per epoch besides the training steps (features of all train images
    in fp32, PCA-whitening, k-means with k = 100 and the 10-NN graph, the k-NN monitor on the test images), and one
    restart of the final evaluation's k-means."""
    dev = cfg.device
    ns = argparse.Namespace(pic_neighbors=5, clustering="kmeans", num_clusters=100, kmeans_iters=20, seed=0)

    def epoch(tr, te):
        feats = deepcluster.extract_features(model, tr.images, tr.mean, tr.std)
        pca = deepcluster.pca_whitening(feats, 256)
        desc = deepcluster.whiten(feats, *pca)
        labels, _, nn10 = deepcluster.cluster(ns, desc, 1, graph=True)
        metrics.nmi(labels, tr.labels)
        metrics.ratio_edge_intra_class(nn10, tr.labels)
        test_desc = deepcluster.whiten(deepcluster.extract_features(model, te.images, te.mean, te.std), *pca)
        deepcluster.weighted_knn_acc(desc, tr.labels, test_desc, te.labels, 200)
        full = torch.full((len(tr.images),), -1, dtype=torch.long, device=dev).index_copy_(
            0, torch.arange(len(tr.images), device=dev), labels)
        deepcluster.uniform_cluster_sample(full, len(tr.images), torch.Generator().manual_seed(0))
        return feats, test_desc
    small = lambda d, n: d._replace(images=d.images[:n], labels=d.labels[:n])
    epoch(small(train, 1000), small(test, 500))                               # first calls: cuDNN, cuSOLVER
    t, (feats, _) = timed(lambda: epoch(train, test), dev)
    scale = N_CIFAR / len(train.images)
    numbers[f"epoch-{key}"] = t * scale
    report.add(2, f"DeepCluster epoch besides training ({key.split('-')[1]}, {len(train.images)} images)", t, "s",
               "features (fp32), PCA-whitening, k-means k=100, 10-NN graph, k-NN monitor, sampling")
    x = F.normalize(deepcluster.extract_features(model, test.images, test.mean, test.std))
    t1, _ = timed(lambda: deepcluster.kmeans(x, 10, 20, seed=1), dev)
    numbers[f"final-{key}"] = 150 * t1 * N_CIFAR_TEST / len(test.images)
    report.add(2, f"DeepCluster final k-means, one restart ({len(test.images)} test images)", t1, "s",
               "the final evaluation runs 3 feature sets x 50 restarts")


# ---- children: torch.compile and the 1M self-search run in processes that can be killed at the deadline ----------
def emit(obj):
    print(TAG + json.dumps(obj), flush=True)


def child_compile(args, cfg):
    """Compiled rates, stage by stage in order of importance, each reported as soon as it is measured."""
    if args.cpu_dry_run:                 # tracing only: inductor's C++ compile takes minutes on a small CPU
        import functools
        torch.compile = functools.partial(torch.compile, backend="eager")
    (train, _), _ = load_images(cfg, args.data_root)
    longest = 0.0
    for i, (key, stage, arch, label) in enumerate(stage_list(cfg)):
        left = args.child_deadline - time.time()
        if args.cpu_dry_run and i > 0:
            emit(dict(key=key, label=label, skipped="the dry run compiles the first stage only"))
            continue
        if left < 1.3 * longest + 10 * cfg.scale:
            emit(dict(key=key, label=label, skipped=f"{left:.0f} s left, the last compile took {longest:.0f} s"))
            continue
        try:
            step = build_stage(stage, cfg, train, True, arch)[0]    # the step holds the model and the optimizer
            res = measure(step, cfg)
            longest = max(longest, res["first_step_s"])
            emit(dict(key=key, label=label, result=res))
        except Exception as e:
            emit(dict(key=key, label=label, error=f"{type(e).__name__}: {str(e)[:300]}"))
        step = None                                                  # freed before the next peak is measured
        cleanup(cfg)


def child_knn_self(args, cfg):
    n, dev = args.child_n, cfg.device
    x = torch.randn(n, 128, device=dev, generator=torch.Generator(dev).manual_seed(0))
    t, _ = timed(lambda: knn(x, k=20), dev)
    emit(dict(seconds=t, n=n))


CHILDREN = []  # running subprocesses, killed on the way out
TEMP_DIRS = []  # the real run's output folders, removed on the way out


class Proc:
    """A subprocess in a session of its own (killed with everything it started), its output read by a thread:
    result lines (TAG) parsed, the others kept and, with echo, passed on to stderr."""
    def __init__(self, cmd, name, echo):
        self.name, self.results, self.lines, self.t0 = name, [], [], time.time()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        CHILDREN.append(self.proc)
        self.reader = threading.Thread(target=self.read, args=(echo,), daemon=True)
        self.reader.start()

    def read(self, echo):
        for line in self.proc.stdout:
            if line.startswith(TAG):
                self.results.append(json.loads(line[len(TAG):]))
            else:
                self.lines.append(line.rstrip())
                if echo:
                    print(f"    [{self.name}] {line.rstrip()}", file=sys.stderr, flush=True)

    def finish(self, timeout):
        """Wait at most timeout s from now, then kill. Returns True when it had to be killed."""
        try:
            self.proc.wait(max(0.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            kill(self.proc)
            timed_out = True
        self.reader.join(10)
        CHILDREN.remove(self.proc)
        self.wall, self.rc = time.time() - self.t0, self.proc.returncode
        return timed_out


def start_child(args, kind, timeout, extra=()):
    """This script as --child KIND, told to stop starting new work after timeout s."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--child-deadline", str(time.time() + timeout),
           "--data-root", args.data_root, *(["--cpu-dry-run"] if args.cpu_dry_run else []), *extra]
    return Proc(cmd, kind, echo=True)


def kill(proc):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def start_compiled(cfg, budget, args):
    """The compile child, given what is left of the budget; None when too little is left."""
    if not budget.allows(60):
        return None
    cleanup(cfg)
    timeout = budget.left() - 15 * cfg.scale
    log(f"part 2: torch.compile'd steps in a child process, at most {timeout:.0f} s")
    child = start_child(args, "compile", timeout)
    child.timeout = timeout
    return child


def finish_compiled(report, cfg, budget, child, numbers):
    labels = {k: label for k, _, _, label in stage_list(cfg)}
    if child is None:
        for key in labels:
            report.skip(2, f"{labels[key]} [compiled]", budget.why(60))
        return
    timed_out = child.finish(child.timeout - (time.time() - child.t0) + 5)
    done = set()
    for r in child.results:
        done.add(r["key"])
        if "result" in r:
            numbers["compiled"][r["key"]] = r["result"]["rate"]
            add_rate_rows(report, r["label"], "compiled", r["key"], r["result"], cfg, " (the compile)")
        elif "skipped" in r:
            report.skip(2, f"{r['label']} [compiled]", r["skipped"])
        else:
            report.add(2, f"{r['label']} [compiled]", None, note=f"error: {r['error']}", ok=False)
    for key in labels:
        if key not in done:
            why = "killed at the deadline while compiling" if timed_out else \
                f"child exited {child.rc}: {' / '.join(child.lines[-5:])}"
            report.add(2, f"{labels[key]} [compiled]", None, note=f"skipped: {why}", ok=None if timed_out else False)


# ---- 3. projected wall time of the paper schedules -----------------------------------------------------------------
def part3(report, cfg, numbers):
    best = {k: max(v, numbers["compiled"].get(k, 0.0)) for k, v in numbers["eager"].items()}
    used = [k for k in best if numbers["compiled"].get(k, 0.0) > numbers["eager"][k]]
    cuda = cfg.device.startswith("cuda")
    missing = []

    def get(name, default=0.0):
        if numbers.get(name) is None:
            missing.append(name)
            return default
        return numbers[name]
    if not numbers["eager"]:
        return report.skip(3, "projection", "needs the rates of part 2")
    inf = get("inference", float("inf"))
    ck_sgd, ck_adam = get("ckpt-pretext"), get("ckpt-scan")
    knn50, mon, pix = get("knn-self-50k"), get("knn-monitor"), get("knn-pixels")
    N, NT = N_CIFAR, N_CIFAR_TEST
    for label, rates in [("eager", numbers["eager"]), ("best of eager and compiled", best)]:
        r = lambda k: rates.get(k) or float("nan")
        pre = 500 * (N // 512) * 1024 / r("pretext") + 10 * ((N + NT) / inf + mon)
        mine = 2 * (N + NT) / inf + knn50 + pix + 2 * get("kmeans-mine")
        scan_t = get("warmup-2000") + 50 * (N // 128) * 256 / r("scan") + 51 * N / inf + 50 * NT / inf
        selflabel = 200 * (N // 1000) * 2000 / r("selflabel") + 200 * NT / inf
        ckpts = 500 * ck_sgd + 250 * ck_adam
        total = pre + mine + scan_t + selflabel + ckpts
        parts = dict(pretext=pre, mine=mine, scan=scan_t, selflabel=selflabel, checkpoints=ckpts)
        compiled = "" if label == "eager" else f"; compiled rates of: {', '.join(used) or 'none'}"
        report.add(3, f"SCAN schedule, CIFAR-10 ({label})", total / 60, "min",
                   "; ".join(f"{k} {v / 60:.1f}" for k, v in parts.items()) + "; target <= 60 min" + compiled,
                   total <= 3600 if label != "eager" and cuda else None, **{k + "_s": v for k, v in parts.items()})
        rep = 950 * (N // 512) * 1024 / r("profeat")
        clus = 10 * (N / inf + knn50 + scan_t + selflabel + (N + NT) / inf) + pix
        ckpts = 950 * ck_sgd + 2500 * ck_adam
        report.add(3, f"ProFeat_s schedule, CIFAR-10 ({label})", (rep + clus + ckpts) / 60, "min",
                   f"representation {rep / 60:.1f}; clustering {clus / 60:.1f}; checkpoints {ckpts / 60:.1f} "
                   f"(all 512 images of a batch kept: an upper bound)", representation_s=rep, clustering_s=clus,
                   checkpoints_s=ckpts)
        for key in [k for k in rates if k.startswith("deepcluster")]:
            train = 200 * (N // 256) * 256 / r(key)
            other = 200 * get(f"epoch-{key}") + 200 * get(f"ckpt-{key}") + get(f"final-{key}")
            default = " (the default arch)" if key.endswith("alexnet") else ""
            report.add(3, f"DeepCluster 200 epochs, CIFAR-10, {key.split('-')[1]}{default} ({label})",
                       (train + other) / 60, "min", f"training {train / 60:.1f}; clustering, evaluation and "
                       f"checkpoints {other / 60:.1f}", training_s=train, other_s=other)
    if missing:
        report.rows[-1]["note"] += f"; not measured, counted as 0: {', '.join(sorted(set(missing)))}"


# ---- 4. k-NN on the GPU ------------------------------------------------------------------------------------------
def part4(report, cfg, budget, numbers):
    dev, g = cfg.device, torch.Generator(cfg.device).manual_seed(0)
    rand = lambda n, d: torch.randn(n, d, device=dev, generator=g)
    n = cfg.knn_self
    cases = [("knn-self-50k", f"{n} x 128 self-search, k=20", lambda: (rand(n, 128),), dict(k=20), 10),
             ("knn-monitor", "{} queries x {} keys x 128, k=200 (the k-NN monitor)".format(*cfg.knn_monitor),
              lambda: (rand(cfg.knn_monitor[0], 128), rand(cfg.knn_monitor[1], 128)), dict(k=200), 10),
             ("knn-pixels", "{} x {} keys x {} (mine's pixel check), k=21".format(*cfg.knn_pixels),
              lambda: (rand(cfg.knn_pixels[0], cfg.knn_pixels[2]), rand(*cfg.knn_pixels[1:])),
              dict(k=21, exclude_self=False), 10),
             ("knn-100k-1m", "{} queries x {} keys x 128, k=20".format(*cfg.knn_big),
              lambda: (rand(cfg.knn_big[0], 128), rand(cfg.knn_big[1], 128)), dict(k=20), 25)]
    for key, what, make, kw, need in cases:
        if not budget.allows(need):
            report.skip(4, f"knn.knn {what}", budget.why(need))
            continue
        try:
            inputs = make()
            knn(*[x[:256] for x in inputs], **{**kw, "k": min(kw["k"], 100)})         # first calls
            t, _ = timed(lambda: knn(*inputs, **kw), dev)
            numbers[key] = t * (N_CIFAR / n) ** 2 if key == "knn-self-50k" else t
            report.add(4, f"knn.knn {what}", t, "s", "", None, points_per_s=inputs[0].shape[0] / t)
            if key == "knn-100k-1m":
                factor = cfg.knn_big[1] / cfg.knn_big[0]
                report.add(4, f"knn.knn {cfg.knn_big[1]} x 128 self-search, k=20 (extrapolated)", t * factor, "s",
                           f"EXTRAPOLATED: {cfg.knn_big[0]} queries x {cfg.knn_big[1]} keys x {factor:.0f}; the "
                           f"self-search computes half the products but in smaller blocks (not measured here)")
            inputs = None
        except Interrupted:
            raise
        except Exception as e:
            report.fail(4, f"knn.knn {what}", e)
        cleanup(cfg)


def part4_big_self(report, cfg, budget, args):
    what = f"knn.knn {cfg.knn_big_self} x 128 self-search, k=20 (measured)"
    if not budget.allows(40):
        return report.skip(4, what, budget.why(40) + "; see the extrapolated row")
    cleanup(cfg)
    if args.cpu_dry_run:                 # the child machinery is exercised by the compile child already
        x = torch.randn(cfg.knn_big_self, 128, generator=torch.Generator().manual_seed(0))
        return report.add(4, what, timed(lambda: knn(x, k=20), cfg.device)[0], "s", "dry run: in this process")
    timeout = budget.left() - 5 * cfg.scale
    child = start_child(args, "knn-self", timeout, ["--child-n", str(cfg.knn_big_self)])
    timed_out = child.finish(timeout)
    if child.results:
        report.add(4, what, child.results[0]["seconds"], "s", "in a child process")
    elif timed_out:
        report.add(4, what, None, note=f"skipped: longer than the {timeout:.0f} s left (killed); see the "
                                       f"extrapolated row", lower_bound_s=timeout)
    else:
        report.add(4, what, None, note=f"error: child exited {child.rc}: {' / '.join(child.lines[-5:])}", ok=False)


# ---- 5. batched augmentation vs torchvision's PIL pipeline ---------------------------------------------------------
def part5(report, cfg, budget, train):
    if not budget.allows(12):
        return report.skip(5, "augmentation", budget.why(12))
    import torchvision.transforms as T
    from PIL import Image
    try:
        mean, std = train.mean, train.std
        pil_images = [Image.fromarray(im.permute(1, 2, 0).cpu().numpy(), "RGB") for im in train.images[:256]]
        pil = T.Compose([T.RandomResizedCrop(cfg.size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                         T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                         T.ToTensor(), T.Normalize(mean, std)])
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < cfg.pil_seconds or n == 0:           # as a DataLoader worker + collate
            torch.stack([pil(im) for im in pil_images])
            n += len(pil_images)
        pil_rate = n / (time.perf_counter() - t0)
        report.add(5, "torchvision PIL SimCLR pipeline, per image, one process", pil_rate, "img/s",
                   f"{cfg.size}x{cfg.size} RGB; RandomResizedCrop(0.2-1), flip, ColorJitter p 0.8, grayscale 0.2")
        rates, B = {}, cfg.batch["pretext"]
        for name, fn in [("simclr_augment", lambda x: augment.simclr_augment(x, mean, std)),
                         ("strong_augment", lambda x: augment.strong_augment(x, mean, std))]:
            fn(train.images[:B])
            probe, _ = timed(lambda: fn(train.images[:B]), cfg.device)
            steps = max(3, math.ceil(cfg.aug_seconds / max(probe, 1e-6)))
            batches = Batches(len(train.images), cfg.device)
            t, _ = timed(lambda: [fn(train.images[batches(B)]) for _ in range(steps)], cfg.device)
            rates[name] = steps * B / t
        report.add(5, f"batched augment.simclr_augment on {cfg.device}, batch {B}", rates["simclr_augment"], "img/s")
        ratio = rates["simclr_augment"] / pil_rate
        report.add(5, "batched simclr_augment / PIL pipeline", ratio, "x", "target >= 100x on the GPU",
                   ratio >= 100 if cfg.device.startswith("cuda") else None)
        report.add(5, f"batched augment.strong_augment on {cfg.device}, batch {B}", rates["strong_augment"], "img/s",
                   "SCAN and self-label steps; 4 host syncs per call (apply_per_image)")
    except Interrupted:
        raise
    except Exception as e:
        report.fail(5, "augmentation", e)


# ---- 6. a short real run of scan.py --------------------------------------------------------------------------------
def start_real_run(cfg, budget, args):
    """scan.py as a subprocess; None when too little of the budget is left."""
    if not budget.allows(100):
        return None
    try:
        data.load_dataset("fashion-mnist", args.data_root, "test", download=False)
        fashion = True
    except data.DataError:
        fashion = False
    if args.cpu_dry_run:
        flags = ["--dataset", "synthetic", "--quick", "--image-size", "16", "--subset", "200", "--pretext-epochs", "1",
                 "--scan-epochs", "1", "--selflabel-epochs", "1", "--warmup-steps", "10", "--pixel-check", "50",
                 "--device", "cpu", "--threads", "1"]
        epochs = dict(pretext=1, scan=1, selflabel=1)
    else:
        flags = ["--dataset", "fashion-mnist" if fashion else "synthetic", "--data-root", args.data_root,
                 "--pretext-epochs", "3", "--scan-epochs", "2", "--selflabel-epochs", "1", "--warmup-steps", "200",
                 "--device", "cuda"]
        epochs = dict(pretext=3, scan=2, selflabel=1)
    out = tempfile.mkdtemp(prefix="gpu_check_scan_")
    TEMP_DIRS.append(out)
    cmd = [sys.executable, os.path.join(ROOT, "scan.py"), *flags, "--out-dir", out, "--log-every", "10"]
    timeout = min(cfg.real_run_timeout, budget.left() - 30 * cfg.scale)
    log(f"part 6: {' '.join(cmd[1:])} (timeout {timeout:.0f} s)")
    run = Proc(cmd, "scan.py", echo=False)
    run.__dict__.update(out=out, timeout=timeout, epochs=epochs, fashion=fashion, command=" ".join(cmd[1:]),
                        what=f"scan.py {' '.join(flags[:2])} {epochs['pretext']}+{epochs['scan']}+"
                             f"{epochs['selflabel']} epochs")
    return run


def finish_real_run(report, cfg, budget, args, run):
    if run is None:
        return report.skip(6, "scan.py real run", budget.why(100))
    run.finish(run.timeout - (time.time() - run.t0))
    out, epochs, what, rc = run.out, run.epochs, run.what, run.rc
    report.add(6, f"{what}: exit status", rc, "", "killed at the timeout" if rc == -signal.SIGKILL else
               ("" if rc == 0 else " / ".join(run.lines[-8:])[-400:]), rc == 0, command=run.command,
               output_tail=run.lines[-30:])
    report.add(6, f"{what}: wall time", run.wall, "s", "" if run.fashion or args.cpu_dry_run else
               "Fashion-MNIST not found: synthetic data instead")
    try:
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)
        with open(os.path.join(out, "log.jsonl")) as f:
            log_rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        report.add(6, f"{what}: results.json and log.jsonl", None, note=f"missing: {e}", ok=False)
        return shutil.rmtree(out, ignore_errors=True)
    seen = {(r["stage"], r.get("epoch")) for r in log_rows}
    want = {(s, e + 1) for s, n in epochs.items() for e in range(n)} | {("mine", None)}
    stages = {r["stage"] for r in results["rows"]}
    finished = want <= seen and {"pretext+kmeans", "scan", "selflabel"} <= stages and "final" in results
    report.add(6, f"{what}: every stage finished", float(finished), "", "" if finished else
               f"log rows missing: {sorted(map(str, want - seen))}; results stages {sorted(stages)}", finished)
    losses = [v for r in log_rows for v in (r["loss"] if isinstance(r.get("loss"), list) else [r.get("loss")])
              if v is not None]
    empty = [f"{r['stage']} {r['epoch']}" for r in log_rows if "loss" in r and r["loss"] is None]
    finite = all(math.isfinite(v) for v in losses) and len(losses) > 0
    report.add(6, f"{what}: losses finite", float(finite), "", f"{len(losses)} epoch losses" +
               (f"; no confident image (no step) in {', '.join(empty)}" if empty else ""), finite, losses=losses)
    pretext = [r for r in log_rows if r["stage"] == "pretext" and "images_per_s" in r]
    if pretext:
        report.add(6, f"{what}: pretext images/s (its own log, last epoch)", pretext[-1]["images_per_s"], "img/s",
                   f"{run.command.split('--dataset ')[1].split()[0]} as loaded (no resize); epoch "
                   f"{pretext[-1]['seconds']:.1f} s, the k-NN monitor not included")
    for r in results["rows"]:
        name = r["stage"] + (f" ({r['features']})" if "features" in r else "")
        report.add(6, f"{what}: ACC {name}", r.get("acc"), "", f"NMI {r.get('nmi', float('nan')):.3f}, ARI "
                   f"{r.get('ari', float('nan')):.3f}", None, **{k: v for k, v in r.items() if isinstance(v, float)})
    shutil.rmtree(out, ignore_errors=True)


# ---- main ----------------------------------------------------------------------------------------------------------
def environment(cfg):
    meta = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), torch=torch.__version__,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), python=platform.python_version(),
                cpus=os.cpu_count(), device=cfg.device, gpu=None,
                tf32=dict(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32))
    if cfg.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        meta.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
        try:
            meta["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return meta


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="./gpu_check.json", help="where the JSON goes")
    p.add_argument("--parts", default="1,2,3,4,5,6", help="comma-separated subset of the parts 1-6")
    p.add_argument("--minutes", type=float, default=7.5, help="budget of everything, this script's start included")
    p.add_argument("--data-root", default="./data", help="where Fashion-MNIST is (data/FashionMNIST/raw/*.gz)")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU: for tests and CI")
    p.add_argument("--child", default=None, choices=["compile", "knn-self"], help=argparse.SUPPRESS)
    p.add_argument("--child-deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-n", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.data_root = os.path.abspath(args.data_root)
    try:
        args.parts = sorted({int(x) for x in args.parts.split(",") if x.strip()})
    except ValueError:
        p.error(f"--parts takes numbers 1-6 separated by commas, not {args.parts!r}")
    if not set(args.parts) <= set(range(1, 7)):
        p.error(f"--parts takes numbers 1-6 (got {args.parts})")
    return args


def on_sigterm(*_):
    raise Interrupted()


def main(argv=None):
    args = parse_args(argv)
    cfg = config(args.cpu_dry_run)
    if args.cpu_dry_run:
        torch.set_num_threads(1)         # a shared small CPU: more threads only contend
    elif not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device here; run it on a GPU machine, or pass --cpu-dry-run.", file=sys.stderr)
        return 2
    runtime.keep_freed_memory()
    torch.backends.cudnn.benchmark = True                    # what runtime.setup does for the scripts
    torch.manual_seed(0)
    if args.child == "compile":
        return child_compile(args, cfg)
    if args.child == "knn-self":
        return child_knn_self(args, cfg)
    signal.signal(signal.SIGTERM, on_sigterm)
    budget = Budget(T_START + 60 * args.minutes, cfg.scale)
    meta = dict(environment(cfg), dry_run=args.cpu_dry_run, minutes=args.minutes, parts=args.parts,
                command=" ".join(sys.argv))
    report = Report(os.path.abspath(args.out), meta)
    log(f"{meta['gpu'] or 'CPU'}, torch {meta['torch']}, CUDA {meta['cuda']}; budget {args.minutes} min, "
        f"parts {args.parts}")
    numbers, early = dict(eager={}, compiled={}), {}
    if args.cpu_dry_run:  # timings mean nothing here: the two subprocesses run alongside this process' parts
        starts = [("compile", start_compiled, 2), ("real", start_real_run, 6)]
        early = {k: start(cfg, budget, args) for k, start, part in starts if part in args.parts}
    try:
        if 1 in args.parts:
            part1(report, cfg, budget)
            report.save()
        train = test = None
        if {2, 3, 5} & set(args.parts):
            (train, test), note = load_images(cfg, args.data_root)
            meta["images"] = f"{note}: train {tuple(train.images.shape)}, test {tuple(test.images.shape)}"
        if 2 in args.parts:
            part2_eager(report, cfg, budget, train, test, numbers)
            report.save()
        if 5 in args.parts:
            part5(report, cfg, budget, train)
            report.save()
        train = test = None
        cleanup(cfg)
        if 4 in args.parts:
            part4(report, cfg, budget, numbers)
            report.save()
        if 6 in args.parts:
            real = early.pop("real") if "real" in early else start_real_run(cfg, budget, args)
            finish_real_run(report, cfg, budget, args, real)
            report.save()
        if 2 in args.parts:
            child = early.pop("compile") if "compile" in early else start_compiled(cfg, budget, args)
            finish_compiled(report, cfg, budget, child, numbers)
            report.save()
        if 4 in args.parts:
            part4_big_self(report, cfg, budget, args)
        if 3 in args.parts:
            if 2 in args.parts:
                part3(report, cfg, numbers)
            else:
                report.skip(3, "projection", "needs part 2 (--parts)")
    except (Interrupted, KeyboardInterrupt):
        meta["interrupted"] = "SIGTERM: the parts after this point did not run"
        report.add(0, "interrupted by SIGTERM", None, note="the remaining parts did not run")
    finally:
        for proc in list(CHILDREN):
            kill(proc)
        for folder in TEMP_DIRS:
            shutil.rmtree(folder, ignore_errors=True)
    for part in args.parts:
        if not any(r["part"] == part for r in report.rows):
            report.skip(part, "all measurements", "not reached")
    report.save()
    print()
    print(f"gpu_check.py, {meta['date']}: {meta['gpu'] or 'CPU (dry run)'}, "
          f"torch {meta['torch']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}"
          + (f", driver {meta['driver']}" if meta.get("driver") else "") + f"; {meta.get('images', '')}")
    print(report.table())
    failed = [r for r in report.rows if r["ok"] is False]
    print(f"\n{len(report.rows)} rows, {len(failed)} failed, {time.time() - T_START:.0f} s; JSON: {report.path}")
    return 1 if failed or meta.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
