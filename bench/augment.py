"""Batched device augmentation (augment.py) vs torchvision's per-image PIL pipeline, images/s at 32x32 (or --size).

SimCLR: RandomResizedCrop(0.2-1) + flip + ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 + grayscale p=0.2 + normalise.
Strong: SCAN's "ours" augmentation: flip + 4 of 14 PIL ops with random magnitudes + normalise + Cutout.
The PIL side is what the reference implementation runs per image in its DataLoader workers (one process here).

    python bench/augment.py                    # 32x32 RGB, batch 512, torch threads 1
    python bench/augment.py --channels 1 --size 28
    python bench/augment.py --default-malloc   # without runtime.keep_freed_memory(): glibc's defaults
"""
import argparse
import os
import random
import sys
import time

import torch
import torchvision.transforms as T
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import augment
import runtime

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def pil_strong_ops():
    """SCAN's 14 strong ops on PIL images, magnitude drawn uniformly in each op's range (as in SCAN's augment.py)."""
    u = random.uniform
    return [lambda im: im, ImageOps.autocontrast, ImageOps.equalize,
            lambda im: im.rotate(u(-30, 30)),
            lambda im: ImageOps.solarize(im, int(u(0, 256))),
            lambda im: ImageEnhance.Color(im).enhance(u(0.05, 0.95)),
            lambda im: ImageEnhance.Contrast(im).enhance(u(0.05, 0.95)),
            lambda im: ImageEnhance.Brightness(im).enhance(u(0.05, 0.95)),
            lambda im: ImageEnhance.Sharpness(im).enhance(u(0.05, 0.95)),
            lambda im: im.transform(im.size, Image.AFFINE, (1, u(-0.1, 0.1), 0, 0, 1, 0)),
            lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, u(-0.1, 0.1), 1, 0)),
            lambda im: im.transform(im.size, Image.AFFINE, (1, 0, u(-0.1, 0.1) * im.size[0], 0, 1, 0)),
            lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, u(-0.1, 0.1) * im.size[1])),
            lambda im: ImageOps.posterize(im, int(u(4, 8.99)))]


class PILStrong:
    def __init__(self, size, mean, std):
        self.ops, self.size = pil_strong_ops(), size
        self.flip, self.to_tensor, self.norm = T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)

    def __call__(self, im):
        im = self.flip(im)
        for op in random.choices(self.ops, k=4):
            im = op(im)
        x = self.norm(self.to_tensor(im))
        side = random.randint(1, self.size // 2)                               # Cutout, one hole
        cy, cx = random.randrange(self.size), random.randrange(self.size)
        x[:, max(0, cy - side // 2):cy - side // 2 + side, max(0, cx - side // 2):cx - side // 2 + side] = 0
        return x


def rate_pil(transform, pil_images, seconds):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.stack([transform(im) for im in pil_images[:100]])
        n += 100
    return n / (time.perf_counter() - t0)


def rate_batched(fn, images, batch, seconds):
    fn(images[:batch])                                                         # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(0, len(images), batch):
            fn(images[i:i + batch])
            n += len(images[i:i + batch])
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="image side")
    p.add_argument("--channels", type=int, default=3, choices=[1, 3], help="3 = RGB, 1 = grayscale")
    p.add_argument("--batch", type=int, default=512, help="batch size of the batched augmentation")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (PIL side: one process)")
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds; each side's best is kept")
    p.add_argument("--default-malloc", action="store_true", help="skip runtime.keep_freed_memory() (glibc's defaults)")
    args = p.parse_args()
    kept = not args.default_malloc and runtime.keep_freed_memory()            # what runtime.setup() does
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    images = torch.randint(0, 256, (2048, args.channels, args.size, args.size), dtype=torch.uint8)
    mode = "RGB" if args.channels == 3 else "L"
    pil_images = [Image.fromarray(im.permute(1, 2, 0).squeeze(2).numpy() if args.channels == 1
                                  else im.permute(1, 2, 0).numpy(), mode) for im in images[:100]]
    mean, std = MEAN[:args.channels], STD[:args.channels]
    color = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2)] \
        if args.channels == 3 else [T.RandomApply([T.ColorJitter(0.4, 0.4)], p=0.8)]
    pil_simclr = T.Compose([T.RandomResizedCrop(args.size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), *color,
                            T.ToTensor(), T.Normalize(mean, std)])
    # The machine may be shared: alternate the two sides for --rounds rounds and keep each side's best rate.
    pil_strong, rows = PILStrong(args.size, mean, std), []
    for name, pil_fn, ours_fn in [("SimCLR", pil_simclr, lambda x: augment.simclr_augment(x, mean, std)),
                                  ("strong (SCAN)", pil_strong, lambda x: augment.strong_augment(x, mean, std))]:
        pil, ours = 0.0, 0.0
        for _ in range(args.rounds):
            pil = max(pil, rate_pil(pil_fn, pil_images, args.seconds))
            ours = max(ours, rate_batched(ours_fn, images, args.batch, args.seconds))
        rows.append((name, pil, ours))
    print(f"{args.size}x{args.size}x{args.channels}, batch {args.batch}, torch threads {args.threads}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, keep_freed_memory {'on' if kept else 'off'}")
    print("| augmentation | PIL per image (img/s) | batched augment.py (img/s) | ratio |")
    print("|---|---:|---:|---:|")
    for name, pil, ours in rows:
        print(f"| {name} | {pil:,.0f} | {ours:,.0f} | {ours / pil:.1f}x |")


if __name__ == "__main__":
    main()
