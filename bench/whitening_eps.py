"""How much purer PCA whitening makes a finished scan.py run's neighbours, for several eps.

scan.py mines the K nearest neighbours of every train image in the L2-normalised features of its pretext
(--mine-features, the backbone by default), PCA-whitened by knn.whitening with eps = d / N (--no-whiten: plain
cosine). This script reads finished runs (their pretext.pt and mine.pt; the settings from the checkpoints' config),
rebuilds the train split and the features as scan.py did, and for each --eps measures the share of every image's
top-5 / top-20 neighbours (knn.knn) that carry its label (metrics.neighbor_acc; labels only score):
  - none: no whitening, the L2-normalised features (SCAN's cosine);
  - auto: knn.whitening's default, eps = d / N;
  - a number: that eps (relative to the largest eigenvalue).
The raw pixels (data.pixel_vectors: images above 32 px resized to 32, as scan.py's) are measured the same way, plain
and whitened (auto), and so are the features and the pixels together, each whitened as the run did (the mean of the
two cosines: scan.py --mine-pixels, --quick's default). The row with the run's own setting is checked against the
graph its mine stage saved: the share of its neighbours that are also there (100%, up to ties that rounding orders
differently). A row per run, then mean +- std (sample std) over the runs.

    python bench/whitening_eps.py runs/fm-s0 runs/fm-s1 runs/fm-s2 --eps none 1e-3 1e-2 auto
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data
import metrics
import scan
from knn import knn, search_space, whitening
from runtime import predict


def eps_value(text):
    """"none" -> None (no whitening), "auto" -> "auto" (d / N), else a float >= 0."""
    if text in ("none", "auto"):
        return None if text == "none" else text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"--eps {text!r}: none, auto or a number >= 0")
    return value


def load_run(out_dir, data_root):
    """(config, train split, L2-normalised features of the mined space [N, d], the mined neighbor_idx [N, K])."""
    paths = [os.path.join(out_dir, name) for name in ("mine.pt", "pretext.pt")]
    if not all(os.path.exists(p) for p in paths):
        sys.exit(f"{out_dir}: no pretext.pt and mine.pt there; run scan.py to its mine stage first.")
    mine, pretext = (torch.load(p, map_location="cpu", weights_only=False) for p in paths)
    config = mine["config"]
    if "whiten" not in config:
        sys.exit(f"{out_dir}: made by an earlier scan.py (its mine.pt has no whiten setting); rerun its mine stage.")
    train = data.load_dataset(config["dataset"], root=data_root, split=config["train_split"],
                              image_size=config["image_size"])
    if config["subset"] is not None and config["subset"] < len(train.images):   # scan.load_data's subset
        keep = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(config["seed"]))
        keep = keep[:config["subset"]]
        train = train._replace(images=train.images[keep], labels=train.labels[keep])
    if len(train.images) != len(mine["neighbor_idx"]):
        sys.exit(f"{out_dir}: mine.pt has {len(mine['neighbor_idx'])} images, the train split {len(train.images)}: "
                 "another --data-root?")
    model = scan.ContrastiveModel(scan.make_backbone(config["arch"], train.images.shape[1], config["width"],
                                                     config["dataset"].startswith("stl10")))
    model.load_state_dict(pretext["model"])
    if config["mine_features"] == "middle":
        z = scan.middle_features(model.backbone, train.images, train.mean, train.std)
    else:
        z = predict(model if config["mine_features"] == "projection" else model.backbone, train.images, train.mean,
                    train.std)
    return config, train, F.normalize(z, dim=1), mine["neighbor_idx"]


def neighbours(z, eps, k):
    """The k nearest neighbours of every row of z [N, d] (cosine), after whitening unless eps is None."""
    if eps is not None:
        z = whitening(z, None if eps == "auto" else eps)(z)
    return knn(z, k=k)[1]


def mean_std(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dirs", nargs="+", help="finished scan.py runs (their --out-dir), e.g. one per seed")
    p.add_argument("--eps", type=eps_value, nargs="+", default=[None, 1e-3, 1e-2, "auto"],
                   help="none, auto (d / N) or numbers (default: none 1e-3 1e-2 auto)")
    p.add_argument("--data-root", default="./data", help="as the runs' (fashion-mnist: found without it)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start, table, pixel_rows = time.time(), {}, {}  # (features, eps) -> [(top-5, top-20) per run]; split -> rows
    name = lambda eps: "none" if eps is None else "auto" if eps == "auto" else f"{eps:g}"
    print("| run | features | eps | top-5 | top-20 | scan.py's graph |\n|---|---|---|---:|---:|---|")
    for out_dir in args.out_dirs:
        config, train, z, mined = load_run(out_dir, args.data_root)
        K = mined.shape[1]
        own = "auto" if config["whiten"] else None                             # the eps scan.py used
        pixels = F.normalize(data.pixel_vectors(train.images), dim=1)
        both = search_space(z, pixels, whiten=own is not None)                # scan.py --mine-pixels' space
        split = tuple(config[k] for k in ("dataset", "train_split", "image_size", "subset")) + (
            config["seed"] if config["subset"] else None,)                     # the pixels' rows: once per split
        for features, x, eps_list in [(config["mine_features"], z, args.eps), ("raw pixels", pixels, [None, "auto"]),
                                      (config["mine_features"] + " + pixels", both, [None])]:
            for eps in eps_list:
                if x is pixels and (split, eps) in pixel_rows:
                    top5, top20 = pixel_rows[split, eps]
                else:
                    idx = neighbours(x, eps, max(20, K))
                    top5, top20 = (metrics.neighbor_acc(idx[:, :k], train.labels) for k in (5, 20))
                    if x is pixels:
                        pixel_rows[split, eps] = (top5, top20)
                label = "pretext" + " + pixels" * (x is both) if x is not pixels else "raw pixels"
                eps = own if x is both else eps                                # both: as the run whitened
                table.setdefault((label, name(eps)), []).append((top5, top20))
                ours = (x is both) if config.get("mine_pixels") else (x is z and eps == own)
                same = metrics.neighbor_agreement(idx[:, :K].cpu(), mined) if ours else None
                print(f"| {out_dir} | {features} | {name(eps)} | {top5:.3f} | {top20:.3f} | "
                      + (f"{100 * same:.2f}% the same |" if same is not None else "|"), flush=True)
    if len(args.out_dirs) > 1:
        print(f"\nmean ± std over {len(args.out_dirs)} runs (sample std):\n\n| features | eps | top-5 | top-20 |\n"
              "|---|---|---:|---:|")
        for (label, eps), rows in table.items():
            print(f"| {label} | {eps} | {mean_std([r[0] for r in rows])} | "
                  f"{mean_std([r[1] for r in rows])} |")
    print(f"\nwall time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
