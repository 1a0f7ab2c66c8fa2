"""A synthetic image set for tests and demos: ten textures as classes, no files needed (`--dataset synthetic`)."""
import math

import torch

from data import DataError, Dataset, channel_stats

# Each class is a luminance texture (name -> signed value s(u, v, w = 2 pi / period, d = diagonal direction), drawn
# as sigmoid(4 s): sharp but anti-aliased edges). All are unchanged by horizontal flips (the diagonal takes a random
# direction) and survive crops, colour jitter and grayscale, so augmentation-invariant methods can learn them.
PATTERNS = {"horizontal-stripes": lambda u, v, w, d: torch.sin(w * v),
            "vertical-stripes": lambda u, v, w, d: torch.sin(w * u),
            "diagonal-stripes": lambda u, v, w, d: torch.sin(w * (u + d * v) / math.sqrt(2)),
            "checkerboard": lambda u, v, w, d: 2 * torch.sin(w * u) * torch.sin(w * v),
            "rings": lambda u, v, w, d: torch.sin(w * torch.sqrt(u * u + v * v)),
            "spokes": lambda u, v, w, d: torch.sin(8 * torch.atan2(v, u)),
            "dots": lambda u, v, w, d: 2 * (torch.cos(w * u) + torch.cos(w * v) - 1),
            "grid": lambda u, v, w, d: 4 * (torch.maximum(torch.cos(w * u), torch.cos(w * v)) - 0.7),
            "waves": lambda u, v, w, d: torch.sin(w * v + 1.9 * torch.sin(w * u / 2.5)),
            "gradient": lambda u, v, w, d: u * w / 60}  # no texture, a smooth ramp


def make_synthetic(split="train", num_images=None, num_classes=10, image_size=32, channels=3, seed=0) -> Dataset:
    """Class-structured images for tests and demos. Class c is texture c % 10 of PATTERNS (1.6x coarser for each
    further 10 classes) with a dark/light colour pair drawn from templates fixed by `seed`. Per image: random scale
    (0.75-1.35x), rotation (+-15 deg), position, light-on-dark or dark-on-light, random colours instead of the class's
    in 25% of images, an illumination ramp and pixel noise. So raw pixels carry some class signal (colour, layout) and
    k-means on them is far from perfect, while texture features invariant to crops and colour separate the classes.
    Train and test come from the same templates with different seeds (5000 and 1000 images by default)."""
    n, names = num_images or (5000 if split == "train" else 1000), list(PATTERNS)
    if num_classes < 1 or n < 1 or image_size < 8 or channels not in (1, 3):
        raise DataError(f"Synthetic dataset: need num_classes >= 1, num_images >= 1, image_size >= 8 and channels "
                        f"1 or 3 (got {num_classes}, {n}, {image_size}, {channels}).")
    templates = torch.Generator().manual_seed(3 * seed)
    gen = torch.Generator().manual_seed(3 * seed + (1 if split == "train" else 2))
    rand = lambda *shape, g=gen: torch.rand(*shape, generator=g)
    dark, light = 0.4 * rand(num_classes, 3, g=templates), 0.6 + 0.4 * rand(num_classes, 3, g=templates)  # [K, 3]
    class_period = image_size / 32 * 5 * 1.6 ** ((torch.arange(num_classes) // len(names)) % 3)  # [K] pixels/cycle
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]  # balanced
    # Per-image parameters, all drawn up front.
    w = 2 * math.pi / (class_period[labels] * (0.75 + 0.6 * rand(n)))  # [N] angular frequency
    angle = (rand(n) - 0.5) * math.pi / 6
    centre = (rand(n, 2) - 0.5) * image_size  # [N, 2] pattern origin (rings, spokes) anywhere in the image
    direction = rand(n).lt(0.5).float() * 2 - 1
    own = (rand(n) < 0.75).view(n, 1)  # images keeping their class colours (jittered); the others get random ones
    fg = torch.where(own, dark[labels] + 0.15 * (rand(n, 3) - 0.5), 0.4 * rand(n, 3))  # [N, 3]
    bg = torch.where(own, light[labels] + 0.15 * (rand(n, 3) - 0.5), 0.6 + 0.4 * rand(n, 3))
    swap = (rand(n) < 0.5).view(n, 1)
    fg, bg = torch.where(swap, bg, fg), torch.where(swap, fg, bg)
    if channels == 1:
        fg, bg = fg @ torch.tensor([[0.299], [0.587], [0.114]]), bg @ torch.tensor([[0.299], [0.587], [0.114]])
    shade = 0.3 * (rand(n) - 0.5) / image_size  # illumination ramp along the pattern's direction

    # Render one class at a time: one pattern per block, and small blocks stay in cache (fast on a CPU).
    images = torch.empty(n, channels, image_size, image_size, dtype=torch.uint8)
    coords = torch.arange(image_size, dtype=torch.float32) - (image_size - 1) / 2
    for c in range(num_classes):
        i = (labels == c).nonzero().squeeze(1)
        col = lambda t: t[i].view(len(i), -1, 1, 1)  # per-image value -> [m, *, 1, 1]
        x = coords.view(1, 1, -1) - col(centre[:, :1])[:, 0]  # [m, 1, S]
        y = coords.view(1, -1, 1) - col(centre[:, 1:])[:, 0]  # [m, S, 1]
        cos, sin = torch.cos(col(angle)[:, 0]), torch.sin(col(angle)[:, 0])  # [m, 1, 1]
        u, v = cos * x + sin * y, cos * y - sin * x  # [m, S, S] rotated coordinates
        pattern = torch.sigmoid(4 * PATTERNS[names[c % len(names)]](u, v, col(w)[:, 0], col(direction)[:, 0]))
        shading = (col(shade)[:, 0] * u).add_(torch.randn(len(i), image_size, image_size, generator=gen), alpha=0.05)
        img = (col(bg) + shading.unsqueeze(1)).addcmul_(col(fg - bg), pattern.unsqueeze(1))  # [m, C, S, S] in [0, 1]
        images[i] = img.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    classes = [names[c % len(names)] + (f"-{c // len(names)}" if c >= len(names) else "") for c in range(num_classes)]
    return Dataset(images, labels, classes, *channel_stats(images))
