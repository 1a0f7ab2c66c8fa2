"""Kill-and-resume reliability of scan.py, profeat.py and deepcluster.py: SIGKILL at random moments, rerun the same
command until the run completes, and check that nothing was corrupted, lost, logged twice or changed.

For each script:
  1. an uninterrupted tiny run in a fresh folder: the reference (its results.json, log.jsonl, predictions.csv and file
     names) and its duration T;
  2. in another fresh folder the same command, SIGKILLed at a random moment, then rerun, again and again until a run
     completes; then another fresh folder, until --kills kills have been made. Most kills come at a moment uniform in
     [0, T] ("timed"); --write-kills of them come at the first checkpoint write (a *.pt.tmp file created) or log.jsonl
     write (log.jsonl.tmp) after such a moment, seen through inotify, so that some land inside a write or between
     the log row and the checkpoint of an epoch;
  3. after every kill: every *.pt must load with torch.load; after the final run: no *.tmp, .lock or other file that
     the reference run does not have, each (stage, epoch) once in log.jsonl, the metric rows of results.json (time
     fields left out) and predictions.csv identical to the reference (same seed, same device: same results).

The table, one row per script:
  kills        SIGKILLs made (timed + write-targeted)
  mid-write    kills that left a new *.tmp behind: they landed inside an atomic write (information, not a failure)
  corrupt      a *.pt torch.load cannot read, a log.jsonl / results.json that is not JSON (after any kill or at the
               end), or a file left over after the final run (a *.tmp, the .lock, anything the reference lacks)
  epochs lost  epochs recomputed beyond the one in flight at each kill: of the epochs a killed run reported finished
               ("[stage] epoch k/E" on its stdout), those reported again by a later run of the same folder, less one
  log dups     (stage, epoch) pairs present more than once in log.jsonl after the final run
  mismatches   results.json rows differing from the reference, plus a differing predictions.csv, a missing output
               file, or a rerun that failed (exited neither 0 nor killed)
  wall s       the script's whole benchmark: reference run, killed runs and reruns
Exit status 1 if any corrupt file, log duplicate or mismatch, else 0. Epochs lost are reported, not judged.

    python bench/reliability.py                                  # 20 kills per script, a few minutes each
    python bench/reliability.py --scripts scan.py --kills 3 --quick-config    # the test's run, about a minute
    python bench/reliability.py --out runs/reliability --seed 1  # keep the runs: each script's folder holds the
                                                                 # reference, killedNN/, logs/ (every run's stdout)
                                                                 # and attempts.jsonl (kind, moment, exit of each run)

The scripts run from a copy of the repository's top-level modules taken at the start (in --out), so that an edit
of the working tree during the benchmark cannot change a rerun. Every run uses --device cpu --threads 1. Each start
of a script imports torch (seconds), so kills early in the window hit the import; that too must be harmless.
"""
import argparse
import ctypes
import json
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny runs: (normal, --quick-config). --out-dir is added per folder.
COMMON = ["--dataset", "synthetic", "--quick", "--image-size", "16", "--device", "cpu", "--threads", "1",
          "--log-every", "1000"]
CONFIGS = {
    "scan.py": (["--subset", "300", "--pretext-epochs", "4", "--scan-epochs", "2", "--selflabel-epochs", "2",
                 "--warmup-steps", "30", "--pixel-check", "100"],
                ["--subset", "300", "--pretext-epochs", "2", "--scan-epochs", "1", "--selflabel-epochs", "1",
                 "--warmup-steps", "10", "--pixel-check", "50"]),
    "profeat.py": (["--subset", "300", "--warmup-steps", "30"],
                   ["--subset", "300", "--pretext-epochs", "2", "--refine-epochs", "1", "--scan-epochs", "1",
                    "--warmup-steps", "10"]),
    "deepcluster.py": (["--subset", "500", "--test-subset", "500", "--epochs", "4"],
                       ["--subset", "300", "--test-subset", "300", "--epochs", "2"]),
}
TIME_KEYS = re.compile(r"seconds|per_s|time")           # row fields that measure time: never compared
EPOCH_LINE = re.compile(r"^\[([^\]\s]+)\] epoch (\d+)/\d+\b", re.M)   # "[stage] epoch k/E ...": epoch k finished
WRITE_TARGETS = [".pt.tmp", "log.jsonl.tmp"]             # write-targeted kills alternate between these


# ---- watching a folder for new files (inotify; polling where there is none) -------------------------------------
class Watcher:
    """new_files(timeout) -> names created in (or moved into) folder since the last call, waiting at most timeout."""
    IN_CREATE, IN_MOVED_TO = 0x100, 0x80

    def __init__(self, folder):
        self.folder, self.fd, self.seen = folder, -1, set(os.listdir(folder))
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd >= 0 and libc.inotify_add_watch(fd, folder.encode(), self.IN_CREATE | self.IN_MOVED_TO) >= 0:
                self.fd = fd
            elif fd >= 0:
                os.close(fd)
        except (OSError, AttributeError):
            pass

    def new_files(self, timeout):
        if self.fd < 0:                                  # polling: sees files that live longer than the interval
            time.sleep(min(timeout, 0.0005))
            names = set(os.listdir(self.folder))
            new, self.seen = names - self.seen, names
            return sorted(new)
        if not select.select([self.fd], [], [], timeout)[0]:
            return []
        try:
            buf = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        names, off = [], 0
        while off + 16 <= len(buf):
            _, _, _, n = struct.unpack_from("iIII", buf, off)
            names.append(buf[off + 16:off + 16 + n].rstrip(b"\0").decode(errors="replace"))
            off += 16 + n
        return names

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---- one run of a script ------------------------------------------------------------------------------------------
def attempt(cmd, folder, log_path, kill_at=None, target=None):
    """Run cmd once. kill_at: seconds after the start from which to SIGKILL it, at once (target None) or at the first
    file created whose name ends with target. Returns dict(rc, killed, seconds, finished {(stage, epoch)}, new_tmp,
    tail)."""
    before = set(os.listdir(folder))
    watcher = Watcher(folder) if kill_at is not None and target else None
    with open(log_path, "w") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        killed = False
        try:
            if kill_at is None:
                proc.wait()
            elif watcher is None:                        # a timed kill
                try:
                    proc.wait(timeout=kill_at)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
            else:                                        # the first target write after kill_at
                while proc.poll() is None:
                    names = watcher.new_files(0.05)
                    if time.monotonic() - t0 >= kill_at and any(n.endswith(target) for n in names):
                        proc.send_signal(signal.SIGKILL)
                        killed = True
                        break
        finally:
            if proc.poll() is None and not killed:       # the harness itself was interrupted
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            if watcher is not None:
                watcher.close()
        seconds = time.monotonic() - t0
    killed = killed and proc.returncode == -signal.SIGKILL   # it may have finished just before the signal
    text = open(log_path, errors="replace").read()
    return dict(rc=proc.returncode, killed=killed, seconds=seconds,
                finished={(s, int(e)) for s, e in EPOCH_LINE.findall(text)},
                new_tmp=sorted(n for n in set(os.listdir(folder)) - before if ".tmp" in n),
                tail="\n".join(text.splitlines()[-5:]))


# ---- reading a folder -----------------------------------------------------------------------------------------------
def unreadable(folder):
    """Names of the files a resume would need that cannot be read: *.pt (torch.load), log.jsonl, results.json."""
    import torch
    bad = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        try:
            if name.endswith(".pt"):
                torch.load(path, map_location="cpu", weights_only=False)
            elif name == "log.jsonl":
                [json.loads(line) for line in open(path) if line.strip()]
            elif name == "results.json":
                json.load(open(path))
        except Exception:
            bad.append(name)
    return bad


def log_rows(folder):
    path = os.path.join(folder, "log.jsonl")
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


def metrics_only(row):
    return {k: v for k, v in row.items() if not TIME_KEYS.search(k)}


def read_file(folder, name):
    path = os.path.join(folder, name)
    return open(path, "rb").read() if os.path.exists(path) else None


def compare(folder, ref_folder):
    """(corrupt, duplicates, mismatches, log_rows_differing, notes) of a completed folder against the reference."""
    notes, names, ref_names = [], set(os.listdir(folder)), set(os.listdir(ref_folder))
    corrupt = unreadable(folder)
    stale = sorted(names - ref_names)                    # *.tmp, a .lock, anything the uninterrupted run lacks
    if corrupt:
        notes.append(f"unreadable at the end: {', '.join(corrupt)}")
    if stale:
        notes.append(f"left over after the final run: {', '.join(stale)}")
    missing = sorted(ref_names - names)
    if missing:
        notes.append(f"missing after the final run: {', '.join(missing)}")
    rows = log_rows(folder) if "log.jsonl" not in corrupt else []
    keys = [(r.get("stage"), r.get("epoch")) for r in rows]
    duplicates = len(keys) - len(set(keys))
    if duplicates:
        notes.append("logged twice: " + ", ".join(sorted({f"{s} {e}" for s, e in keys if keys.count((s, e)) > 1})))
    mismatches = len(missing)
    try:
        got, want = json.load(open(os.path.join(folder, "results.json")))["rows"], \
            json.load(open(os.path.join(ref_folder, "results.json")))["rows"]
        differing = sum(metrics_only(a) != metrics_only(b) for a, b in zip(got, want)) + abs(len(got) - len(want))
        if differing:
            notes.append(f"results.json: {differing} of {len(want)} rows differ from the uninterrupted run")
        mismatches += differing
    except (OSError, ValueError, KeyError):
        pass                                             # counted as missing or corrupt above
    if "predictions.csv" in names and read_file(folder, "predictions.csv") != read_file(ref_folder, "predictions.csv"):
        notes.append("predictions.csv differs from the uninterrupted run")
        mismatches += 1
    ref_log = {(r.get("stage"), r.get("epoch")): metrics_only(r) for r in log_rows(ref_folder)}
    mine = {(r.get("stage"), r.get("epoch")): metrics_only(r) for r in rows}
    log_differing = sorted(f"{k[0]} {k[1]}" + (f" (lacks {', '.join(sorted(set(ref_log[k]) - set(mine[k])))})"
                                               if k in mine and set(ref_log[k]) - set(mine[k]) else "")
                           for k in set(ref_log) | set(mine) if ref_log.get(k) != mine.get(k))
    return len(corrupt) + len(stale), duplicates, mismatches, log_differing, notes


def epochs_lost(finished_by_kill, later):
    """finished_by_kill: (i, epochs) per kill of a folder: the (stage, epoch) pairs its run reported finished, and
    the index of the next run in later (every run's finished pairs, in order). Each kill may cost the epoch in flight
    (finished, not yet saved: its log row or checkpoint was being written); every further epoch of it that a later
    run finishes again was lost."""
    lost = 0
    for i, done in finished_by_kill:
        lost += max(0, len(done & set().union(*later[i:])) - 1)
    return lost


# ---- one script ---------------------------------------------------------------------------------------------------
def snapshot_sources(out):
    """Copy the repository's top-level modules to a folder of out and return it: every run of the benchmark uses
    these, so that an edit of the working tree during the benchmark (minutes) cannot make a rerun differ."""
    src = tempfile.mkdtemp(prefix="src-", dir=out)
    for name in sorted(os.listdir(ROOT)):
        if name.endswith(".py"):
            shutil.copy2(os.path.join(ROOT, name), src)
    return src


def bench_script(script, extra, kills, write_kills, rng, out, src):
    stem = os.path.splitext(script)[0]
    base = tempfile.mkdtemp(prefix=stem + "-", dir=out)
    logs = os.path.join(base, "logs")
    os.makedirs(logs)
    cmd = lambda folder: [sys.executable, os.path.join(src, script), *COMMON, *extra, "--out-dir", folder]
    t_start = time.monotonic()
    ref = os.path.join(base, "reference")
    os.makedirs(ref)
    r = attempt(cmd(ref), ref, os.path.join(logs, "reference.txt"))
    if r["rc"] != 0:
        raise SystemExit(f"reliability.py: the uninterrupted {script} run failed (exit {r['rc']}):\n{r['tail']}\n"
                         f"command: {' '.join(cmd(ref))}")
    T = r["seconds"]
    n_write = min(kills, round(kills * write_kills)) if write_kills > 0 else 0
    n_write = max(n_write, 1) if write_kills > 0 and kills > 0 else n_write
    plan = ["timed"] * (kills - n_write) + [WRITE_TARGETS[i % len(WRITE_TARGETS)] for i in range(n_write)]
    rng.shuffle(plan)
    s = dict(script=script, kills=0, kinds={}, mid_write=0, corrupt=0, lost=0, dups=0, mismatches=0, folders=0,
             attempts=0, reference_s=T, notes=[], log_differing=0)
    while s["kills"] < kills:
        s["folders"] += 1
        folder = os.path.join(base, f"killed{s['folders']:02d}")
        os.makedirs(folder)
        finished_by_kill = []                            # per kill in this folder: the epochs its run had finished
        later = []                                       # per attempt after each kill: the epochs it finished
        while True:
            s["attempts"] += 1
            log = os.path.join(logs, f"killed{s['folders']:02d}-{s['attempts']:03d}.txt")
            kind = plan[s["kills"]] if s["kills"] < kills else None
            kill_at = rng.uniform(0, T) if kind else None
            r = attempt(cmd(folder), folder, log, kill_at, None if kind == "timed" else kind)
            later.append(r["finished"])
            with open(os.path.join(base, "attempts.jsonl"), "a") as f:   # what happened, run by run
                f.write(json.dumps(dict(folder=os.path.basename(folder), log=os.path.basename(log), kind=kind,
                                        kill_at=kill_at, **{k: r[k] for k in ("rc", "killed", "seconds", "new_tmp")},
                                        finished=sorted(r["finished"]))) + "\n")
            if r["killed"]:
                s["kills"] += 1
                s["kinds"][kind] = s["kinds"].get(kind, 0) + 1
                s["mid_write"] += bool(r["new_tmp"])
                finished_by_kill.append((len(later), r["finished"]))
                bad = unreadable(folder)
                if bad:
                    s["corrupt"] += len(bad)
                    s["notes"].append(f"{os.path.basename(folder)}: after kill {s['kills']} ({kind} at "
                                      f"{kill_at:.2f} s) unreadable: {', '.join(bad)}")
                continue
            if r["rc"] != 0:                             # a rerun that failed: the folder cannot complete
                s["mismatches"] += 1
                s["notes"].append(f"{os.path.basename(folder)}: a rerun exited {r['rc']} (log {log}):\n{r['tail']}")
                break
            corrupt, dups, mismatches, log_differing, notes = compare(folder, ref)
            s["corrupt"] += corrupt
            s["dups"] += dups
            s["mismatches"] += mismatches
            s["log_differing"] += len(log_differing)
            s["notes"] += [f"{os.path.basename(folder)}: {n}" for n in notes]
            if log_differing:
                s["notes"].append(f"{os.path.basename(folder)}: log.jsonl rows differing in metrics from the "
                                  f"uninterrupted run (not judged): {'; '.join(log_differing)}")
            break
        s["lost"] += epochs_lost(finished_by_kill, later)
    s["wall_s"] = time.monotonic() - t_start
    s["base"] = base
    return s


def table(results):
    head = ["script", "kills", "mid-write", "corrupt", "epochs lost", "log dups", "mismatches", "wall s"]
    rows = [[r["script"], r["kills"], r["mid_write"], r["corrupt"], r["lost"], r["dups"], r["mismatches"],
             f"{r['wall_s']:.0f}"] for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scripts", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="scripts to test")
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs per script (at least)")
    p.add_argument("--write-kills", type=float, default=0.25,
                   help="share of the kills made at a checkpoint or log write instead of at a plain random moment")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--out", default=None, help="folder for the runs, kept (default: a temporary folder, removed "
                   "unless something failed)")
    p.add_argument("--quick-config", action="store_true", help="even smaller runs (fewer epochs)")
    args = p.parse_args(argv)
    if args.kills < 1 or not 0 <= args.write_kills <= 1:
        p.error("--kills must be at least 1 and --write-kills within [0, 1]")
    out = args.out or tempfile.mkdtemp(prefix="reliability-")
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    rng, results, src = random.Random(args.seed), [], snapshot_sources(out)
    t0 = time.monotonic()
    for script in args.scripts:
        print(f"{script}: reference run, then {args.kills} kills ...", flush=True)
        s = bench_script(script, CONFIGS[script][args.quick_config], args.kills, args.write_kills, rng, out, src)
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(s["kinds"].items()))
        print(f"{script}: reference run {s['reference_s']:.1f} s; {s['kills']} kills ({kinds}) over {s['folders']} "
              f"folders, {s['attempts']} runs; runs in {s['base']}", flush=True)
        results.append(s)
    print()
    print(table(results))
    print(f"total wall time {time.monotonic() - t0:.0f} s; kill moments uniform in [0, reference run time], seed "
          f"{args.seed}; mid-write: kills that left a *.tmp behind")
    changed = [n for n in sorted(os.listdir(src)) if not os.path.exists(os.path.join(ROOT, n))
               or open(os.path.join(ROOT, n), "rb").read() != open(os.path.join(src, n), "rb").read()]
    if changed:
        print(f"note: {', '.join(changed)} changed in the working tree during the benchmark; the runs used the "
              f"copies taken at its start")
    for s in results:
        for note in s["notes"]:
            print(f"{s['script']}: {note}")
    failed = any(s["corrupt"] or s["dups"] or s["mismatches"] for s in results)
    if args.out is None and not failed:
        shutil.rmtree(out, ignore_errors=True)
    elif failed:
        print(f"runs kept in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
