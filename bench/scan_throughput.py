"""Training throughput (images/s through the network, augmentation included) of each scan.py stage on this machine.

One training step = what scan.py's loops do: pretext (two SimCLR views + NT-Xent), scan (strong views of anchors and
neighbours + SCAN loss over all heads), selflabel (un-augmented forward + strong view + confidence CE).

    python bench/scan_throughput.py --arch smallcnn --size 28 --channels 1 --batch 256
    python bench/scan_throughput.py --arch resnet18 --batch 128 --steps 2
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import runtime
import scan
from augment import simclr_augment, strong_augment


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="smallcnn", choices=["smallcnn", "resnet18"])
    p.add_argument("--width", type=int, default=16, help="smallcnn width")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=256,
                   help="images per batch (pretext: x2 views; scan: anchors + neighbours)")
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="timed steps per stage (after one warm-up step)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--default-malloc", action="store_true", help="skip runtime.keep_freed_memory() (glibc's defaults)")
    args = p.parse_args()
    kept = not args.default_malloc and runtime.keep_freed_memory()            # what runtime.setup() does
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, args.channels, args.size, args.size), dtype=torch.uint8)
    mean, std = (0.5,) * args.channels, (0.25,) * args.channels
    B = args.batch
    model = scan.ContrastiveModel(scan.make_backbone(args.arch, args.channels, args.width))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    clus = scan.ClusteringModel(model.backbone, 10, args.heads)
    copt = torch.optim.Adam(clus.parameters(), lr=1e-4)
    single = scan.ClusteringModel(model.backbone, 10, 1)
    sopt = torch.optim.Adam(single.parameters(), lr=1e-4)

    def pretext():
        z = model(torch.cat([simclr_augment(images, mean, std), simclr_augment(images, mean, std)]))
        loss = scan.nt_xent(z[:B], z[B:])
        opt.zero_grad(), loss.backward(), opt.step()
        return 2 * B

    def scan_step():
        logits = clus(strong_augment(torch.cat([images, images.flip(0)]), mean, std))  # [H, 2B, C]: anchors + "nbrs"
        loss = scan.scan_loss(logits[:, :B], logits[:, B:])[0].sum()          # every head at once, as scan.py
        copt.zero_grad(), loss.backward(), copt.step()
        return 2 * B

    def selflabel():
        single.eval()
        with torch.no_grad():
            weak = single(scan.plain(images, mean, std))[0] * 50             # sharpened: some confident samples
        single.train()
        loss, _ = scan.confidence_ce(weak, single(strong_augment(images, mean, std))[0], 0.99)
        if loss is not None:
            sopt.zero_grad(), loss.backward(), sopt.step()
        return 2 * B                                                           # one forward + one forward/backward

    print(f"{args.arch} {args.size}x{args.size}x{args.channels}, batch {B}, threads {args.threads}, "
          f"torch {torch.__version__}, keep_freed_memory {'on' if kept else 'off'}")
    print("| stage | images/s |")
    print("|---|---:|")
    for name, step in [("pretext (SimCLR)", pretext), ("scan", scan_step), ("selflabel", selflabel)]:
        step()
        t0, n = time.perf_counter(), 0
        for _ in range(args.steps):
            n += step()
        print(f"| {name} | {n / (time.perf_counter() - t0):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
