"""Tests of bench/reliability.py: its checks catch what they claim to (on made-up folders), its kills land where
they claim to (on a stand-in process), and a small real benchmark of scan.py passes (about a minute).

    python -m pytest tests/test_reliability.py -q
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("reliability", os.path.join(ROOT, "bench", "reliability.py"))
reliability = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reliability)
torch.set_num_threads(1)


def finished_folder(path):
    """A folder shaped like a finished run: a checkpoint, log.jsonl, results.json, predictions.csv."""
    os.makedirs(path)
    torch.save({"stage": "pretext", "epoch": 2, "model": {"w": torch.ones(3)}}, os.path.join(path, "pretext.pt"))
    with open(os.path.join(path, "log.jsonl"), "w") as f:
        for e in (1, 2):
            f.write(json.dumps({"stage": "pretext", "epoch": e, "loss": 1.0 / e, "seconds": 0.1 * e}) + "\n")
    json.dump({"rows": [{"stage": "scan", "acc": 0.5, "seconds": 3.0}, {"stage": "selflabel", "acc": 0.6}]},
              open(os.path.join(path, "results.json"), "w"))
    open(os.path.join(path, "predictions.csv"), "w").write("index,cluster\n0,1\n")
    return path


def test_compare_passes_a_copy_that_differs_only_in_time_fields(tmp_path):
    ref = finished_folder(str(tmp_path / "ref"))
    run = str(tmp_path / "run")
    shutil.copytree(ref, run)
    results = json.load(open(os.path.join(run, "results.json")))
    results["rows"][0]["seconds"] = 99.0                                   # time: never compared
    json.dump(results, open(os.path.join(run, "results.json"), "w"))
    assert reliability.compare(run, ref) == (0, 0, 0, [], [])


def test_compare_counts_corrupt_and_stale_files_duplicates_and_mismatches(tmp_path):
    ref = finished_folder(str(tmp_path / "ref"))
    run = str(tmp_path / "run")
    shutil.copytree(ref, run)
    with open(os.path.join(run, "pretext.pt"), "r+b") as f:                # a checkpoint cut short
        f.truncate(40)
    open(os.path.join(run, "scan.pt.tmp"), "w").write("half")              # a write a kill cut short, left over
    open(os.path.join(run, ".lock"), "w").write("{}")                      # a lock never released
    with open(os.path.join(run, "log.jsonl"), "a") as f:                   # epoch 2 logged twice
        f.write(json.dumps({"stage": "pretext", "epoch": 2, "loss": 0.5, "seconds": 1.0}) + "\n")
    results = json.load(open(os.path.join(run, "results.json")))
    results["rows"][1]["acc"] = 0.61                                       # a metric that differs
    json.dump(results, open(os.path.join(run, "results.json"), "w"))
    open(os.path.join(run, "predictions.csv"), "w").write("index,cluster\n0,2\n")
    corrupt, duplicates, mismatches, log_differing, notes = reliability.compare(run, ref)
    assert (corrupt, duplicates, mismatches) == (3, 1, 2)                  # pretext.pt + scan.pt.tmp + .lock
    assert any("pretext.pt" in n for n in notes) and any("scan.pt.tmp" in n for n in notes)
    os.remove(os.path.join(run, "predictions.csv"))                        # a missing output: a mismatch too
    assert reliability.compare(run, ref)[2] == 2


def test_compare_reports_log_rows_that_lack_a_metric(tmp_path):
    ref = finished_folder(str(tmp_path / "ref"))
    with open(os.path.join(ref, "log.jsonl"), "a") as f:
        f.write(json.dumps({"stage": "pretext", "epoch": 3, "loss": 0.3, "knn_acc": 0.4}) + "\n")
    run = str(tmp_path / "run")
    shutil.copytree(ref, run)
    lines = open(os.path.join(run, "log.jsonl")).read().splitlines()
    lines[-1] = json.dumps({"stage": "pretext", "epoch": 3, "loss": 0.3})
    open(os.path.join(run, "log.jsonl"), "w").write("\n".join(lines) + "\n")
    assert reliability.compare(run, ref)[:4] == (0, 0, 0, ["pretext 3 (lacks knn_acc)"])


def test_epochs_lost_allows_the_epoch_in_flight_only():
    a = {("pretext", 1), ("pretext", 2), ("pretext", 3)}
    later = [a, {("pretext", 3), ("pretext", 4)}]                          # the rerun redoes epoch 3 only
    assert reliability.epochs_lost([(1, a)], later) == 0
    later = [a, {("pretext", 2), ("pretext", 3), ("pretext", 4)}]          # ... epochs 2 and 3: one lost
    assert reliability.epochs_lost([(1, a)], later) == 1
    later = [a, set(), {("pretext", 3)}]                                   # redone two runs later: still counted
    assert reliability.epochs_lost([(1, a), (2, set())], later) == 0


def test_a_write_targeted_kill_lands_at_the_write_and_a_timed_one_on_time(tmp_path):
    folder = str(tmp_path)
    writer = ("import os, sys, time\nd = sys.argv[1]\nprint('[pretext] epoch 1/3 loss 1', flush=True)\n"
              "for i in range(3):\n    open(os.path.join(d, f'x{i}.log.jsonl.tmp'), 'w').close()\n"
              "    time.sleep(0.3)\n    open(os.path.join(d, f'x{i}.pt.tmp'), 'w').close()\n    time.sleep(0.3)\n"
              "time.sleep(30)\n")
    cmd = [sys.executable, "-c", writer, folder]
    r = reliability.attempt(cmd, folder, str(tmp_path / "out.txt"), kill_at=0.0, target=".pt.tmp")
    assert r["killed"] and r["rc"] < 0 and r["seconds"] < 10
    assert r["new_tmp"] == ["x0.log.jsonl.tmp", "x0.pt.tmp"]               # killed at the first .pt.tmp
    assert r["finished"] == {("pretext", 1)}
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    r = reliability.attempt(cmd, folder, str(tmp_path / "out.txt"), kill_at=0.2)
    assert r["killed"] and r["seconds"] < 10 and "x2.pt.tmp" not in r["new_tmp"]
    r = reliability.attempt([sys.executable, "-c", "pass"], folder, str(tmp_path / "out.txt"), kill_at=30)
    assert not r["killed"] and r["rc"] == 0                                 # finished before its kill moment


def test_scan_survives_three_kills(tmp_path):
    """The real thing, small: 3 SIGKILLs of scan.py (--quick-config) and reruns; nothing corrupt, doubled or changed."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "reliability.py"), "--scripts", "scan.py", "--kills", "3",
           "--quick-config", "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("script"))
    names = [c for c in lines[head].split("  ") if c.strip()]
    row = dict(zip([n.strip() for n in names], lines[head + 2].split()))
    assert row["script"] == "scan.py" and row["kills"] == "3", p.stdout
    assert (row["corrupt"], row["log dups"], row["mismatches"]) == ("0", "0", "0"), p.stdout
