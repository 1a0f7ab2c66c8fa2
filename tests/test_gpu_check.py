"""bench/gpu_check.py keeps working without a GPU: its --cpu-dry-run runs every part on the CPU with tiny sizes.

    python -m pytest -q tests/test_gpu_check.py      # under a minute: the dry run starts three processes
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import torch

import augment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")


def run(tmp_path, *flags, timeout=240):
    out = tmp_path / "gpu_check.json"
    res = subprocess.run([sys.executable, SCRIPT, "--cpu-dry-run", "--out", str(out), *flags], cwd=tmp_path,
                         capture_output=True, text=True, timeout=timeout)
    return res, json.loads(out.read_text()) if out.exists() else None


def test_cpu_dry_run_measures_every_part(tmp_path):
    res, report = run(tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "| part | what" in res.stdout and "0 failed" in res.stdout          # the table, printed once at the end
    assert res.stdout.count("| part | what") == 1
    rows = report["rows"]
    assert report["meta"]["dry_run"] and report["meta"]["torch"] == torch.__version__
    for part in range(1, 7):
        values = [r["value"] for r in rows if r["part"] == part and r["value"] is not None]
        assert values, f"part {part} has no number"
        assert all(math.isfinite(v) for v in values), f"part {part}: {values}"
    assert not [r for r in rows if r["ok"] is False], [r for r in rows if r["ok"] is False]
    # 1: CPU against CPU, so every difference is 0 (or rounding-small) and every k-NN list the same
    diffs = [r for r in rows if r["part"] == 1 and r["unit"] == "max abs diff"]
    assert len(diffs) >= 40 and all(r["value"] <= 1e-6 for r in diffs), diffs
    for name in ["nt_xent", "scan_loss", "structured_loss", "confidence_ce", "refinement_loss", "pseudo_label_loss",
                 "posterize", "equalize", "cutout", "simclr_augment", "strong_augment", "color_jitter"]:
        assert any(name in r["what"] for r in diffs), name
    agreement = [r for r in rows if r["part"] == 1 and r["unit"] == "fraction of rows"]
    assert len(agreement) == 2 and all(r["value"] == 1.0 for r in agreement)
    # 2: eager rates of every stage and at least one compiled one (the child process); 3: the projections
    rates = {(r["extra"]["stage"], r["extra"]["compiled"]) for r in rows if r["part"] == 2 and r["unit"] == "img/s"
             and "stage" in r["extra"] and r["value"] is not None}
    assert {s for s, compiled in rates if not compiled} == {"pretext", "scan", "selflabel", "profeat",
                                                             "deepcluster-small"}
    assert ("pretext", True) in rates
    assert any(r["what"].startswith("SCAN schedule") and r["value"] > 0 for r in rows if r["part"] == 3)
    # 6: the real run finished every stage
    real = {r["what"].split(": ", 1)[1]: r["value"] for r in rows if r["part"] == 6}
    assert real["exit status"] == 0 and real["every stage finished"] == 1 and real["losses finite"] == 1
    assert "ACC scan" in real and "ACC selflabel" in real


def test_out_of_time_parts_are_skipped_with_a_note(tmp_path):
    res, report = run(tmp_path, "--parts", "1,3", "--minutes", "0.001")        # the budget is gone on arrival
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "| part | what" in res.stdout
    rows = report["rows"]
    assert {r["part"] for r in rows} == {1, 3}
    assert all(r["value"] is None and r["note"].startswith("skipped") for r in rows)


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_random_gives_every_device_the_same_draws_and_restores_torch():
    gpu_check = load_gpu_check()
    rand, randint = torch.rand, torch.randint
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    outs = []
    for _ in range(2):
        torch.manual_seed(len(outs))                                           # the global RNG plays no part
        with gpu_check.cpu_random(3):
            outs.append(augment.strong_augment(x, (0.5,) * 3, (0.25,) * 3))
    assert torch.equal(outs[0], outs[1])
    assert torch.rand is rand and torch.randint is randint


def test_table_and_numbers_format():
    gpu_check = load_gpu_check()
    assert [gpu_check.fmt(v) for v in [None, 0.0, 12345.6, 3.14159, 0.000123]] == ["-", "0", "12,346", "3.14",
                                                                                   "0.000123"]
    report = gpu_check.Report(os.devnull, {})
    report.add(2, "b", float("nan"), "s", "x")
    report.add(1, "a", 1.0, "s", "", ok=True)
    assert report.rows[0]["value"] is None and "nan" in report.rows[0]["note"]
    lines = report.table().splitlines()
    assert lines[0].startswith("| part | what") and "| a " in lines[2] and "| b " in lines[3]
