"""Tests of runtime.py: the output folder's lock, --restart, the log without duplicates, stamped checkpoints,
argument types, exit codes, and writes on a full disk.

    python -m pytest tests/test_runtime.py -q
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def fresh_state():
    runtime.STATE.update(rank=0, world=1, lock=None, saved=None)
    yield
    runtime.release_out_dir()


OWN = r"(a|b)\.pt|results\.json|log\.jsonl"


def test_out_dir_is_locked_and_a_second_run_names_the_first(tmp_path):
    out = str(tmp_path / "run")
    runtime.take_out_dir(out, "scan.py", OWN, restart=False)
    owner = json.load(open(os.path.join(out, ".lock")))
    assert owner["pid"] == os.getpid() and owner["script"] == "scan.py"
    # a second process (alive: this one) is refused, naming the first
    code = ("import sys, runtime; sys.path.insert(0, '.')\n"
            f"runtime.main('profeat.py', lambda argv: runtime.take_out_dir({out!r}, 'profeat.py', {OWN!r}, False))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stderr and "scan.py" in proc.stderr
    assert "Traceback" not in proc.stderr
    runtime.release_out_dir()
    assert not os.path.exists(os.path.join(out, ".lock"))


def test_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "script": "x"}))
    runtime.take_out_dir(str(out), "scan.py", OWN, restart=False)
    assert json.load(open(out / ".lock"))["pid"] == os.getpid()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="zombies are read from Linux's /proc")
def test_a_lock_left_by_a_killed_process_not_yet_reaped_is_stale(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child.kill()                                                           # a zombie until waited for
        for _ in range(500):
            if open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        assert runtime.alive(os.getpid()) and not runtime.alive(child.pid)
        (out / ".lock").write_text(json.dumps({"pid": child.pid, "host": os.uname().nodename, "script": "x"}))
        runtime.take_out_dir(str(out), "scan.py", OWN, restart=False)
        assert json.load(open(out / ".lock"))["pid"] == os.getpid()
    finally:
        child.wait()


def test_restart_removes_only_the_scripts_own_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ["a.pt", "b.pt", "results.json", "log.jsonl", "my_backup.pt", "notes.txt", "a.pt.tmp"]:
        (out / name).write_text("{}")
    runtime.take_out_dir(str(out), "scan.py", OWN + r"|a\.pt\.tmp", restart=True)
    assert sorted(os.listdir(out)) == [".lock", "my_backup.pt", "notes.txt"]


def test_a_folder_of_another_script_or_a_file_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"script": "deepcluster.py"}))
    with pytest.raises(runtime.UsageError, match="deepcluster.py"):
        runtime.take_out_dir(str(out), "scan.py", OWN, restart=False)
    runtime.release_out_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(runtime.UsageError, match="is a file"):
        runtime.take_out_dir(str(tmp_path / "file"), "scan.py", OWN, restart=False)
    with pytest.raises(runtime.UsageError, match="Cannot create"):
        runtime.take_out_dir("/proc/no-such-dir/run", "scan.py", OWN, restart=False)


def test_log_row_keeps_each_stage_and_epoch_once(tmp_path):
    for row in [{"stage": "pretext", "epoch": 1, "loss": 3.0}, {"stage": "pretext", "epoch": 2, "loss": 2.0},
                {"stage": "pretext", "epoch": 2, "loss": 1.5}, {"stage": "mine"}, {"stage": "mine", "x": 1}]:
        runtime.log_row(str(tmp_path), row)
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert rows == [{"stage": "pretext", "epoch": 1, "loss": 3.0}, {"stage": "pretext", "epoch": 2, "loss": 1.5},
                    {"stage": "mine", "x": 1}]


def test_log_row_and_checkpoints_are_written_by_rank_0_only(tmp_path, monkeypatch):
    monkeypatch.setitem(runtime.STATE, "saved", None)               # restored afterwards, as the rank
    monkeypatch.setitem(runtime.STATE, "rank", 1)                   # another process of a torchrun job
    runtime.log_row(str(tmp_path), {"stage": "pretext", "epoch": 1})
    runtime.save_checkpoint(str(tmp_path / "scan.pt"), "scan.py", "scan", {}, model={"w": torch.ones(2)}, epoch=1)
    assert os.listdir(tmp_path) == []
    monkeypatch.setitem(runtime.STATE, "rank", 0)
    runtime.log_row(str(tmp_path), {"stage": "pretext", "epoch": 1})
    assert os.listdir(tmp_path) == ["log.jsonl"]


def test_checkpoints_are_stamped_and_refused_elsewhere(tmp_path):
    path, config = str(tmp_path / "scan.pt"), {"lr": 0.1, "epochs": 5}
    runtime.save_checkpoint(path, "scan.py", "scan", config, model={"w": torch.ones(2)}, epoch=3, complete=False)
    assert runtime.load_checkpoint(path, "scan.py", "scan", config)["epoch"] == 3
    assert "scan epoch 3" in runtime.resume_hint()
    assert runtime.load_checkpoint(str(tmp_path / "none.pt"), "scan.py", "scan", config) is None
    with pytest.raises(runtime.UsageError, match="selflabel"):                  # another stage's file
        runtime.load_checkpoint(path, "scan.py", "selflabel", config)
    with pytest.raises(runtime.UsageError, match="profeat.py"):                 # another script's
        runtime.load_checkpoint(path, "profeat.py", "scan", config)
    with pytest.raises(runtime.UsageError, match="--epochs 5 \\(now 8\\)"):    # other settings
        runtime.load_checkpoint(path, "scan.py", "scan", {"lr": 0.1, "epochs": 8})
    # a learning rate may change while the stage is unfinished, not once it is complete
    assert runtime.load_checkpoint(path, "scan.py", "scan", {"lr": 0.01, "epochs": 5}, may_change=["lr"])
    runtime.save_checkpoint(path, "scan.py", "scan", config, model={"w": torch.ones(2)}, epoch=5, complete=True)
    with pytest.raises(runtime.UsageError, match="--lr 0.1"):
        runtime.load_checkpoint(path, "scan.py", "scan", {"lr": 0.01, "epochs": 5}, may_change=["lr"])
    open(path, "wb").write(b"garbage")
    with pytest.raises(runtime.UsageError, match="corrupted"):
        runtime.load_checkpoint(path, "scan.py", "scan", config)


def test_non_finite_weights_are_never_saved(tmp_path):
    path = str(tmp_path / "scan.pt")
    runtime.save_checkpoint(path, "scan.py", "scan", {}, model={"w": torch.ones(2)}, epoch=1)
    before = open(path, "rb").read()
    bad = {"w": torch.ones(2), "bn.running_var": torch.tensor([1.0, float("inf")]), "steps": torch.tensor(3)}
    with pytest.raises(runtime.UsageError, match="non-finite at epoch 2.*bn.running_var.*resumes after scan epoch 1"):
        runtime.save_checkpoint(path, "scan.py", "scan", {}, model=bad, epoch=2)
    assert open(path, "rb").read() == before


def test_check_losses_names_the_first_bad_step():
    runtime.check_losses(torch.tensor([1.0, 2.0]), "pretext", 1)
    runtime.STATE["saved"] = None
    with pytest.raises(runtime.UsageError, match="pretext: the loss became non-finite at epoch 4 step 2;.*lower "
                                                 "learning rate.*starts from the beginning"):
        runtime.check_losses(torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [float("inf"), 1.0]]), "pretext", 4)


def test_at_least_and_the_one_line_parser_error(capsys):
    p = runtime.parser("scan.py", "test")
    p.add_argument("--epochs", type=runtime.at_least(1), default=3)
    p.add_argument("--lr", type=runtime.at_least(0.0, float), default=0.1)
    assert p.parse_args(["--epochs", "2", "--lr", "0"]).epochs == 2
    for bad in (["--epochs", "0"], ["--epochs", "x"], ["--lr", "-1"], ["--lr", "nan"]):
        with pytest.raises(SystemExit) as exit_info:
            p.parse_args(bad)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("scan.py: error: argument") and err.count("\n") == 1


def test_help_shows_defaults_once_and_never_none():
    p = runtime.parser("x", "test")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out-dir", default=None, help="output folder (default: runs/x)")
    p.add_argument("--subset", type=int, default=None, help="a subset")
    p.add_argument("--quick", action="store_true", help="small run")
    text = " ".join(p.format_help().split())
    assert "random seed (default: 0)" in text and "output folder (default: runs/x) --subset" in text
    assert "None" not in text and "False" not in text


def test_presets_never_override_an_explicit_flag():
    p = runtime.parser("x", "test")
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--lr", type=float, default=0.4)
    p.add_argument("--quick", action="store_true")
    presets = lambda args: [{"epochs": 5, "lr": 0.1}] if args.quick else []
    args = runtime.parse_args(p, ["--quick", "--epochs", "7"], presets)
    assert (args.epochs, args.lr) == (7, 0.1)
    args = runtime.parse_args(p, ["--quick", "--epochs=9"], presets)
    assert args.epochs == 9
    assert runtime.parse_args(p, [], presets).epochs == 500


def test_batch_for_gives_about_16_steps_an_epoch_as_a_power_of_2():
    """--quick's SimCLR batch: 256 on the 4,000- and 3,000-image subsets, smaller on a small folder, 32 at least."""
    sizes = [24, 300, 1228, 1500, 1797, 3000, 4000, 50000]
    assert [runtime.batch_for(n) for n in sizes] == [32, 32, 64, 128, 128, 256, 256, 256]
    for n in range(600, 4000, 7):                                              # the nearest power of 2 to n / 16
        b = runtime.batch_for(n)
        assert all(abs(math.log2(n / 16 / b)) <= abs(math.log2(n / 16 / c)) + 1e-9 for c in (32, 64, 128, 256))


def test_a_batch_larger_than_its_data_set_becomes_all_of_it(monkeypatch):
    """runtime.batches trains such a set as one batch: the logged sizes, rates and collapse check must say so."""
    args = argparse.Namespace(pretext_batch_size=512, scan_batch_size=48, selflabel_batch_size=500)
    runtime.fit_batches(args, 300, 200)
    assert (args.pretext_batch_size, args.scan_batch_size, args.selflabel_batch_size) == (300, 48, 200)
    args = argparse.Namespace(pretext_batch_size=None, scan_batch_size=48, selflabel_batch_size=500)
    runtime.fit_batches(args, 24, 3000)                                       # --quick's batch_for(24) is 32
    assert (args.pretext_batch_size, args.scan_batch_size, args.selflabel_batch_size) == (24, 48, 500)
    monkeypatch.setitem(runtime.STATE, "world", 2)                            # two processes split each batch
    args = argparse.Namespace(pretext_batch_size=None, scan_batch_size=48, selflabel_batch_size=500)
    runtime.fit_batches(args, 4001, 301)
    assert (args.pretext_batch_size, args.scan_batch_size, args.selflabel_batch_size) == (256, 48, 300)
    generator = torch.Generator().manual_seed(0)
    assert [len(b) for b in runtime.batches(301, 300, generator, "cpu")] == [150]   # this rank's half of one batch


def test_num_clusters_comes_from_two_or_more_classes_or_the_flag():
    from argparse import Namespace
    ask = lambda given, classes: runtime.num_clusters(Namespace(dataset="imagefolder:x", num_clusters=given), classes)
    assert ask(None, ["a", "b", "c"]) == 3 and ask(7, ["a", "b", "c"]) == 7 and ask(4, ["a"]) == 4 and ask(2, []) == 2
    for classes, words in [(["cats"], "a single class ('cats')"), ([], "no classes")]:
        with pytest.raises(runtime.UsageError, match="give --num-clusters") as error:
            ask(None, classes)
        assert words in str(error.value)


def test_single_process_collectives_are_the_identity():
    x = torch.randn(5, 3)
    assert runtime.gather(x) is x and runtime.shard(7) == (0, 7) and runtime.broadcast(x) is x


def test_write_outputs_csv_and_prototype_sheet(tmp_path):
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    runtime.write_outputs(str(tmp_path), probs, images, {"file": ["a.png", "b.png", "c.png"]}, "p.csv", "p.png")
    assert open(tmp_path / "p.csv").read().splitlines() == ["file,cluster,confidence", "a.png,0,0.900000",
                                                             "b.png,1,0.800000", "c.png,0,0.600000"]
    from PIL import Image
    assert Image.open(tmp_path / "p.png").size == (8 * 9 + 1, 2 * 9 + 1)       # 8 per row, 2 clusters, 1 px padding


def test_a_full_disk_stops_with_exit_2_and_keeps_what_was_written(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        path = str(mount / "a.pt")
        code = ("import sys, torch, runtime\n"
                "def run(argv):\n"
                f"    runtime.save_checkpoint({path!r}, 's', 'a', {{}}, model={{'w': torch.ones(10)}}, epoch=1)\n"
                f"    runtime.save_checkpoint({path!r}, 's', 'a', {{}}, model={{'w': torch.ones(10**6)}}, epoch=2)\n"
                "runtime.main('scan.py', run)\n")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and "No space left" in proc.stderr and "Traceback" not in proc.stderr
        assert "resume after a epoch 1" in proc.stderr
        assert torch.load(mount / "a.pt", weights_only=False)["epoch"] == 1      # the old checkpoint is intact
        assert os.listdir(mount) == ["a.pt"]                                      # no half-written temporary file
    finally:
        subprocess.run(["umount", str(mount)])
