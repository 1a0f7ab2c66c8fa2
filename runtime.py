"""Run plumbing shared by scan.py, deepcluster.py and profeat.py: algorithm-free, like data.py, knn.py and metrics.py.

Everything here is about running, not about the methods, so the three scripts share one copy and one vocabulary:

- main():        bad input -> one paragraph and exit 2; Ctrl-C -> one line saying where the run resumes, exit 130.
- setup():       device, threads, seed and, under torchrun, the process group (NCCL on CUDA, gloo on CPU).
- take_out_dir() a run owns its output folder: a lock file (owner's pid and host) released on exit, a stale lock
                 taken over, --restart removing only the script's own files.
- checkpoints:   save_checkpoint() never writes non-finite weights and stamps each file with the script, stage and
                 settings that made it; load_checkpoint() refuses a file made elsewhere or with other settings.
- log_row():     log.jsonl holds each (stage, epoch) once, also after a kill and resume.
- gather(), shard(): the few collective operations the scripts need, identity in a single process.
- parse_args(), num_clusters(), batch_for(): flags and presets (an explicit flag wins), and the defaults that depend
                 on the data: the cluster count from the classes, --quick's SimCLR batch from the image count.
"""
import argparse
import ctypes
import errno
import io
import json
import math
import os
import re
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

import augment
import data


class UsageError(Exception):
    """Bad input, a checkpoint made elsewhere, a non-finite loss: the message is for the user. Exit status 2."""


STATE = {"rank": 0, "world": 1, "lock": None, "saved": None}  # this process: its rank, its lock, its last checkpoint


def main(script, run, argv=None):
    """run(argv) with the project's exit codes: 0 done, 2 bad input, 130 interrupted, 1 only for a bug."""
    signal.signal(signal.SIGINT, signal.default_int_handler)                 # Ctrl-C -> KeyboardInterrupt again
    try:
        run(argv)
    except (UsageError, data.DataError) as e:
        stop(script, f"error: {e}", 2)
    except KeyboardInterrupt:
        stop(script, f"interrupted; {resume_hint()}.", 130)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        stop(script, f"error: cannot write {e.filename or 'to the output folder'} ({e.strerror}). Files written "
                     f"before are intact (every write goes to a temporary file first); free some space or choose "
                     f"another --out-dir; {resume_hint()}.", 2)
    finally:
        release_out_dir()
        if dist.is_initialized():
            dist.destroy_process_group()


def resume_hint():
    saved = STATE["saved"]
    return f"rerun the same command to resume after {saved}" if saved else "nothing was saved yet"


def stop(script, message, code):
    if STATE["rank"] == 0:
        print(f"{script}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def keep_freed_memory():
    """CPU speed on Linux: glibc returns large freed blocks to the OS, so each step's fresh multi-MB tensors
    page-fault in again. Keep them in the process, as MALLOC_MMAP_THRESHOLD_=256M MALLOC_TRIM_THRESHOLD_=1G would
    (both thresholds: setting one switches off glibc's own adaptation). A no-op without glibc. Returns success."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, 256 << 20)) and bool(mallopt(-1, 1 << 30))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def setup(args):
    """Threads, device, seed and, under torchrun (RANK/WORLD_SIZE set), the process group. Returns the device."""
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1 (got {args.threads}).")
    keep_freed_memory()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    device = next(d for d in ["cuda", "mps", "cpu"] if available[d]) if args.device == "auto" else args.device
    if not available.get(device, False):
        raise UsageError(f"--device {args.device} is not available here; use --device auto or cpu.")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    STATE.update(rank=rank, world=world)
    if world > 1:
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = not args.deterministic   # benchmark picks the fastest, not always the same
        torch.backends.cudnn.deterministic = args.deterministic
        if args.deterministic:                                     # atomics (index_add_, scatter_add_) warn, not fail
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)
    return device


def gather(x, grad=False):
    """Concatenate x [n_r, ...] of every rank r along dim 0, in rank order (n_r may differ). grad=True keeps the
    autograd graph: the backward pass sums each rank's gradient for x, so a loss computed on the gathered global
    batch, with DDP averaging the weights' gradients, gives exactly the single-process gradient."""
    if STATE["world"] == 1:
        return x
    sizes = torch.tensor([len(x)], device=x.device)
    sizes = [int(s) for s in torch.cat(_all_gather(sizes))]
    padded = torch.cat([x, x.new_zeros(max(sizes) - len(x), *x.shape[1:])])  # all_gather needs equal shapes
    if grad:
        from torch.distributed.nn.functional import all_gather as all_gather_with_grad  # imported when needed
        parts = all_gather_with_grad(padded)
    else:
        parts = _all_gather(padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def _all_gather(x):
    parts = [torch.empty_like(x) for _ in range(STATE["world"])]
    dist.all_gather(parts, x)
    return parts


def shard(n):
    """This rank's contiguous share of n items: (start, stop), ceil(n / world) each (the last may be shorter);
    gather() of the shares gives the n items back in order."""
    per = -(-n // STATE["world"])
    return min(n, STATE["rank"] * per), min(n, (STATE["rank"] + 1) * per)


def broadcast(x):
    """Rank 0's tensor on every rank (same shape and dtype everywhere)."""
    if STATE["world"] > 1:
        dist.broadcast(x, 0)
    return x


# ---- arguments ------------------------------------------------------------------------------------------------
class DefaultsInHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, unless it is None or False or the help text already says what it is."""
    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(script, description):
    """An ArgumentParser whose errors are one line and exit status 2 (no usage dump), with defaults in --help."""
    p = argparse.ArgumentParser(prog=script, description=description, allow_abbrev=False,
                                formatter_class=DefaultsInHelp)

    def error(message):
        print(f"{script}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
    p.error = error
    return p


def at_least(low, kind=int):
    """argparse type: a number >= low, e.g. type=at_least(1) for epochs, at_least(0.0, float) for a rate."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}")
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {text})")
        return value
    parse.__name__ = kind.__name__
    return parse


def parse_args(p, argv, presets):
    """Parse, then apply the presets (dicts of argument values) that presets(args) lists, in order, to the
    arguments not given explicitly."""
    args = p.parse_args(argv)
    tokens = sys.argv[1:] if argv is None else argv
    given = {a.dest for a in p._actions for t in tokens if t.split("=")[0] in a.option_strings}
    for preset in presets(args):
        for k, v in preset.items():
            if k not in given:
                setattr(args, k, v)
    return args


def batch_for(n, steps=16, largest=256, smallest=32):
    """The power of two nearest n / steps, within [smallest, largest]: about `steps` steps an epoch over n images.
    --quick's SimCLR batch: 256 left a small folder's few epochs too few steps to train (RESULTS.md)."""
    return min(largest, max(smallest, 2 ** round(math.log2(max(n, 1) / steps))))


def fit_batches(args, n_pretext, n_train):
    """The pretext batch (--quick: batch_for), then each batch held to its data set (to a multiple of the processes):
    a folder smaller than a batch trains on all of it at once, and the logs, rates and collapse check see that size."""
    world = STATE["world"]
    args.pretext_batch_size = min(args.pretext_batch_size or batch_for(n_pretext), n_pretext - n_pretext % world)
    for name in ("scan_batch_size", "selflabel_batch_size"):
        setattr(args, name, min(getattr(args, name), n_train - n_train % world))


def num_clusters(args, classes):
    """--num-clusters, or else the number of classes (an image folder's class sub-folders), of which 2 are needed."""
    if args.num_clusters is None and len(classes) < 2:
        what = f"a single class ({classes[0]!r})" if classes else "no classes"
        raise UsageError(f"{args.dataset} has {what} to count clusters by; give --num-clusters.")
    return args.num_clusters or len(classes)


# ---- the output folder ----------------------------------------------------------------------------------------
def take_out_dir(out_dir, script, own_files, restart):
    """Create and lock out_dir for this run (rank 0 does it; an error stops every rank). own_files: a regex of the
    file names this script writes; --restart removes exactly those, never another file of the folder."""
    error = None
    if STATE["rank"] == 0:
        try:
            prepare_out_dir(out_dir, script, own_files, restart)
        except UsageError as e:
            error = str(e)
    if STATE["world"] > 1:                                                 # every rank learns rank 0's outcome
        shared = [error]
        dist.broadcast_object_list(shared, 0)
        error = shared[0]
    if error is not None:
        raise UsageError(error)


def prepare_out_dir(out_dir, script, own_files, restart):
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out-dir {out_dir} is a file, not a folder; choose another --out-dir.")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"Cannot create the output folder {out_dir} ({e.strerror}); choose another --out-dir.")
    lock(out_dir, script)
    try:
        other = json.load(open(os.path.join(out_dir, "results.json"))).get("script", script)
    except (OSError, ValueError, AttributeError):                          # none yet, or not ours to read
        other = script
    if other != script:
        raise UsageError(f"{out_dir} holds the results of {other}; choose another --out-dir for {script}.")
    for name in os.listdir(out_dir):
        if re.fullmatch(own_files, name) and (restart or name.endswith(".tmp")):
            os.remove(os.path.join(out_dir, name))                         # .tmp: a write cut short by a kill


def lock(out_dir, script):
    path = os.path.join(out_dir, ".lock")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "script": script, "started": time.ctime()}
    for _ in range(2):
        try:
            with open(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w") as f:
                json.dump(me, f)
            STATE["lock"] = path
            return
        except FileExistsError:
            try:
                owner = json.load(open(path))
            except (OSError, ValueError):
                owner = {}
            if owner.get("host") == me["host"] and not alive(owner.get("pid", -1)):
                os.remove(path)                             # left by a process that no longer exists: stale
                continue
            raise UsageError(f"{out_dir} is in use by {owner.get('script', 'another run')} (pid {owner.get('pid')} "
                             f"on {owner.get('host')}, started {owner.get('started')}). Wait for it to finish or "
                             f"choose another --out-dir; if that process is gone, delete {path}.")
    raise UsageError(f"Cannot lock {out_dir}: {path} keeps reappearing; another run is starting there.")


def alive(pid):
    """Whether process pid still runs. A zombie does not: it was killed and its parent has not reaped it yet (a
    torchrun worker whose launcher was killed waits for init to reap it), so the lock it left is stale."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:                                   # "pid (name) state ..." on Linux
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return not os.path.isdir("/proc/self")                                 # gone since, or no /proc (macOS)


def release_out_dir():
    if STATE["lock"] is not None and os.path.exists(STATE["lock"]):
        os.remove(STATE["lock"])
    STATE["lock"] = None


def atomic_write(path, obj):
    """Write a str as text, anything else with torch.save, to path.tmp then rename: never a half-written file. The
    bytes are made in memory first, so that a full disk is an ordinary OSError (torch.save to a file says less)."""
    tmp = path + ".tmp"
    if isinstance(obj, str):
        payload = obj.encode()
    else:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        payload = buffer.getvalue()
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def log_row(out_dir, row):
    """Append row to out_dir/log.jsonl, replacing an earlier row of the same (stage, epoch): a resumed epoch
    overwrites the line its interrupted first attempt left. Every rank may call it; rank 0 writes."""
    if STATE["rank"] != 0:
        return
    path, key = os.path.join(out_dir, "log.jsonl"), (row.get("stage"), row.get("epoch"))
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    kept = [line for line in lines if line.strip() and tuple(map(json.loads(line).get, ("stage", "epoch"))) != key]
    atomic_write(path, "".join(line + "\n" for line in kept + [json.dumps(row)]))


# ---- checkpoints ----------------------------------------------------------------------------------------------
def save_checkpoint(path, script, stage, config, **state):
    """Write state (its "model" a state_dict) stamped with script, stage and config. Refuses non-finite weights or
    BatchNorm statistics: a diverged run stops with the last good checkpoint intact."""
    check_weights(state.get("model", {}), stage, state.get("epoch"))
    if STATE["rank"] == 0:
        atomic_write(path, {"script": script, "stage": stage, "config": config, **state})
    STATE["saved"] = f"{stage} epoch {state['epoch']} ({path})" if "epoch" in state else STATE["saved"]


def check_weights(state_dict, stage, epoch):
    """Stop (UsageError) if a weight or BatchNorm statistic is not finite."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UsageError(f"{stage}: the weights became non-finite at epoch {epoch} ({', '.join(bad[:3])}); "
                         + diverged_hint())


def diverged_hint():
    return ("nothing of that epoch was saved. Rerun with a lower learning rate (the learning-rate flags may change "
            "when a stage resumes): " + (f"it resumes after {STATE['saved']}." if STATE["saved"] else
                                         "it starts from the beginning."))


def check_losses(losses, stage, epoch):
    """losses [steps] or [steps, heads] of one epoch (one host sync): stop at the first non-finite one."""
    bad = (~torch.isfinite(losses.reshape(len(losses), -1))).any(1).nonzero()
    if len(bad):
        raise UsageError(f"{stage}: the loss became non-finite at epoch {epoch} step {int(bad[0]) + 1}; "
                         + diverged_hint())


def load_checkpoint(path, script, stage, config, may_change=(), model=None, opt=None, lr=None):
    """The checkpoint dict at path, or None when there is none. Refuses (UsageError) a corrupted file, one written
    by another script or stage, and one made with other settings, except the keys in may_change (learning rates:
    a stage diverged can be resumed with a lower one), whose new values are taken and reported. Its weights are
    loaded into model and, while the stage is unfinished, its state into the optimizer opt, at the learning rate lr
    (the one given now)."""
    if not os.path.exists(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        made_by = (ckpt["script"], ckpt["stage"], ckpt["config"])
    except Exception as e:
        raise UsageError(f"Cannot read the checkpoint {path} ({type(e).__name__}: {e}); it is corrupted or not a "
                         f"checkpoint of {script}. Delete it, or pass --restart.") from None
    if made_by[:2] != (script, stage):
        raise UsageError(f"{path} was written by {made_by[0]} for its stage '{made_by[1]}', not by {script} for "
                         f"'{stage}'. Move it away, or pass --restart.")
    diff = {k: (made_by[2].get(k), v) for k, v in config.items() if made_by[2].get(k) != v}
    changed = {k: d for k, d in diff.items() if k in may_change and not ckpt.get("complete", False)}
    if set(diff) - set(changed):
        flags = "; ".join(f"--{k.replace('_', '-')} {a!r} (now {b!r})" for k, (a, b) in diff.items())
        raise UsageError(f"{path} was made with other settings: {flags}. Rerun with those settings to continue it, "
                         f"pass --restart to start over, or choose another --out-dir.")
    for k, (old, new) in changed.items():
        print(f"[{stage}] resuming with --{k.replace('_', '-')} {new} (the checkpoint used {old})", flush=True)
    STATE["saved"] = f"{stage} epoch {ckpt['epoch']} ({path})" if "epoch" in ckpt else STATE["saved"]
    if model is not None:
        model.load_state_dict(ckpt["model"])
        if opt is not None and not ckpt["complete"]:
            opt.load_state_dict(ckpt["optimizer"])
            for group in opt.param_groups:
                group["lr"] = lr
            say(f"[{stage}] resuming after epoch {ckpt['epoch']}")
    return ckpt


def reseed(seed, stage, epoch):
    """Reseed for one epoch of one stage, so that a resumed run draws what an uninterrupted one would: torch's
    global RNG (augmentation; different on every rank) and the returned generator (the shuffle; the same on every
    rank, so that the ranks split one global batch)."""
    s = seed * 1_000_003 + sum(map(ord, stage)) * 10_007 + epoch
    torch.manual_seed(s * 64 + STATE["rank"])
    return torch.Generator().manual_seed(s)


class Progress:
    """Prints 'stage epoch step loss images/s ETA' every `every` seconds (rank 0)."""
    def __init__(self, stage, total_steps, every):
        self.stage, self.total, self.every, self.done, self.images = stage, total_steps, every, 0, 0
        self.start = self.last = time.time()

    def step(self, epoch, step, loss, images):
        self.done, self.images, now = self.done + 1, self.images + images, time.time()
        if now - self.last >= self.every and STATE["rank"] == 0:               # loss.item(): a sync, now and then
            self.last, rate = now, self.images / (now - self.start)
            eta = (now - self.start) / self.done * (self.total - self.done) / 60
            print(f"[{self.stage}] epoch {epoch + 1} step {step + 1} loss {loss.mean().item():.4f} {rate:.0f} img/s "
                  f"ETA {eta:.1f} min", flush=True)


def say(message):
    """Print on rank 0 only (every rank computes the same numbers)."""
    if STATE["rank"] == 0:
        print(message, flush=True)


# ---- training and inference helpers ---------------------------------------------------------------------------
def warn_if_collapsed(stage, loss, batch_size):
    """NT-Xent over B pairs is log(2B - 1) when every projection is one point (all similarities equal), its value
    for a network that learnt nothing; a pretext ending within 3% of it collapsed (label-free, printed and returned)."""
    collapsed = loss > 0.97 * math.log(2 * batch_size - 1)
    if collapsed:
        say(f"[{stage}] WARNING: the pretext collapsed: NT-Xent {loss:.4f}, log(2B - 1) = "
            f"{math.log(2 * batch_size - 1):.4f} when every image maps to one point. Its neighbours and everything "
            "built on them are near chance; rerun with --restart and a learning-rate warm-up (--pretext-warmup 2 or "
            "more) or a lower --pretext-lr.")
    return collapsed


def wrap(model, device, compile=False):
    """(model on the device, the callable that trains it): DDP under torchrun, torch.compile when asked, bf16
    autocast on CUDA, channels_last everywhere (on a CPU too: BatchNorm and max-pooling run 1.6x faster in it).
    Load checkpoints into model before wrapping it."""
    cuda = device.startswith("cuda")
    model = model.to(device, memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None) \
        if STATE["world"] > 1 else model
    net = torch.compile(net) if compile else net

    def forward(x):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            return net(x.contiguous(memory_format=torch.channels_last)).float()
    return model, forward


def batches(n, batch_size, generator, device):
    """This rank's share (batch_size / world images) of each global batch of a fresh permutation of range(n); the
    generator is the same on every rank, so the ranks split one global batch. The last partial batch is dropped."""
    batch_size = min(batch_size, n - n % STATE["world"])                    # a data set smaller than one batch
    perm, (lo, hi) = torch.randperm(n, generator=generator).to(device), shard(batch_size)
    return [perm[s + lo:s + hi] for s in range(0, n - batch_size + 1, batch_size)]


@torch.no_grad()
def predict(model, images, mean, std, batch_size=1000):
    """model(normalised uint8 images) in eval mode over all images, concatenated on dim -2 (rows of [.., N, D]).
    Under torchrun each rank computes a share and every rank gets all rows."""
    model.eval()                                                             # BatchNorm: running statistics
    start, stop = shard(len(images))
    outs = [model(augment.normalize(images[i:min(i + batch_size, stop)].float() / 255, mean, std)
                  .contiguous(memory_format=torch.channels_last)).float() for i in range(start, stop, batch_size)]
    out = torch.cat(outs, dim=-2).movedim(-2, 0)                             # rows first, to gather
    return gather(out).movedim(0, -2)


def finished_run(out_dir, script):
    """--predict: (args, final) of the finished run of script in out_dir, read from its results.json."""
    path = os.path.join(out_dir, "results.json")
    finished = json.load(open(path)) if os.path.exists(path) else {}
    if finished.get("script") != script or "final" not in finished:
        raise UsageError(f"{out_dir} holds no finished {script} run (no complete results.json); finish the run "
                         f"first, or point --out-dir at the folder of one.")
    return finished["args"], finished["final"]


def write_predictions(args, probs, images, files):
    """--predict's outputs in --out-dir: predict-NAME.csv (file, cluster, confidence) and predict-NAME.png, NAME
    that of the image or folder clustered. probs [N, K]."""
    name = os.path.splitext(os.path.basename(os.path.normpath(args.predict)))[0] or "images"
    if STATE["rank"] == 0:
        write_outputs(args.out_dir, probs, images, {"file": files}, f"predict-{name}.csv", f"predict-{name}.png")
    say(f"{len(files)} image{'s' * (len(files) != 1)} clustered into {args.out_dir}/predict-{name}.csv and "
        f"predict-{name}.png")


def write_outputs(out_dir, probs, images, columns, csv_name, png_name, per_row=8):
    """csv_name: the given columns (name -> one value per image), then cluster and confidence; png_name: the
    per_row most confident images of each cluster, one row per cluster. probs [N, K], images uint8 [N, C, H, W]."""
    from torchvision.utils import save_image
    conf, cluster = probs.max(1)
    columns = {**columns, "cluster": cluster.tolist(), "confidence": [f"{c:.6f}" for c in conf.tolist()]}
    lines = [",".join(columns)] + [",".join(map(str, row)) for row in zip(*columns.values())]
    atomic_write(os.path.join(out_dir, csv_name), "\n".join(lines) + "\n")
    tiles = torch.ones(probs.shape[1] * per_row, *images.shape[1:])
    for c in range(probs.shape[1]):
        members = (cluster == c).nonzero().squeeze(1)
        top = members[conf[members].argsort(descending=True)[:per_row]]
        tiles[c * per_row:c * per_row + len(top)] = images[top.to(images.device)].float().cpu() / 255
    tmp = os.path.join(out_dir, png_name + ".tmp.png")
    save_image(tiles, tmp, nrow=per_row, padding=1)
    os.replace(tmp, os.path.join(out_dir, png_name))
