"""Datasets as whole uint8 tensors: CIFAR-10/20/100, STL-10, (Fashion-)MNIST, an image folder, and a synthetic set
(made by synthetic.py).

`load_dataset(name, root, split)` returns a `Dataset` tuple: `images` uint8 [N, C, H, W], `labels` int64 [N] (-1 where
unknown), `classes`, and per-channel `mean`/`std` in [0, 1] for normalisation. Everything is read into memory at once
(CIFAR-10 is 150 MB): training loops index batches from one tensor, no DataLoader. `load_image_files` reads new images.

The on-disk formats are read here directly (CIFAR python pickles, STL-10 binaries, MNIST idx files): torchvision's
classes verify md5 sums of the full files and loop over PIL images, both of which we skip; it only downloads a missing
dataset (in exactly these formats). Without the files and without network, `DataError` is raised with a one-paragraph
message; scripts print it and exit with status 2.
"""
import gzip
import math
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


class DataError(Exception):
    """Missing or unreadable data, or a bad dataset name or split. The message is meant for the user as it is."""


class Dataset(NamedTuple):
    images: torch.Tensor  # [N, C, H, W] uint8
    labels: torch.Tensor  # [N] int64, -1 where unknown
    classes: list  # class names: len(classes) ground-truth classes (0 for a flat, unlabelled image folder)
    mean: tuple  # per channel, in [0, 1]
    std: tuple


NAMES = ["cifar10", "cifar20", "cifar100", "stl10", "fashion-mnist", "mnist", "imagefolder:PATH", "synthetic"]
# Published per-channel statistics of the training sets, so that every split is normalised identically.
STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
         "cifar20": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
         "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
         "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
         "mnist": ((0.1307,), (0.3081,)), "fashion-mnist": ((0.2860,), (0.3530,))}
MNIST_CLASSES = [f"{d} - {w}" for d, w in enumerate("zero one two three four five six seven eight nine".split())]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def load_dataset(name, root="./data", split="train", image_size=None, download=True, **synthetic_args) -> Dataset:
    """Load one split as a whole. `image_size` resizes to a square (image folders default to 64, synthetic to 32);
    `download=False` never touches the network; `synthetic_args` go to `synthetic.make_synthetic`."""
    if name not in STATS and name != "synthetic" and not name.startswith("imagefolder:"):
        raise DataError(f"Unknown dataset '{name}'. Available: {', '.join(NAMES)} (imagefolder:PATH reads a folder "
                        f"of images, one sub-folder per class or all in one folder).")
    splits = ["train", "test", "unlabeled", "train+unlabeled"] if name == "stl10" else ["train", "test"]
    if split not in splits:
        raise DataError(f"Dataset '{name}' has no split '{split}'; choose one of: {', '.join(splits)}.")
    if synthetic_args and name != "synthetic":
        raise DataError(f"Options {sorted(synthetic_args)} only apply to the 'synthetic' dataset, not to '{name}'.")
    _check_image_size(64 if image_size is None else image_size)
    if name == "synthetic":
        from synthetic import make_synthetic  # (it imports this module)
        return make_synthetic(split=split, image_size=image_size or 32, **synthetic_args)
    if name.startswith("imagefolder:"):
        return _load_image_folder(name[len("imagefolder:"):], split, image_size or 64)
    reader = _read_stl10 if name == "stl10" else _read_cifar if name.startswith("cifar") else _read_mnist
    images, labels, classes = reader(name, root, split, download)
    if image_size is not None and image_size != images.shape[-1]:
        images = resize(images, image_size)
    return Dataset(images, labels, classes, *STATS[name])


def _check_image_size(size):  # an int of at least 8 (False and True are below 8 too)
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise DataError(f"The image size must be at least 8 pixels (got {size!r}); set --image-size to e.g. 32 or 64.")


def _fetch(name, root, split, where, download, how_to):
    """The files are missing: let torchvision download them (it writes the formats read below), or explain."""
    reason = "downloading is switched off"
    if download:
        import torchvision.datasets as tv  # imported only here: it takes seconds (torch._dynamo)
        cls = {"cifar10": tv.CIFAR10, "cifar20": tv.CIFAR100, "cifar100": tv.CIFAR100, "stl10": tv.STL10,
               "mnist": tv.MNIST, "fashion-mnist": tv.FashionMNIST}[name]
        try:
            return cls(root, download=True, **({"split": split} if name == "stl10" else {"train": split == "train"}))
        except Exception as e:  # no network (URLError), server down, disk full, broken archive ...
            reason = f"downloading it failed ({type(e).__name__}: {e})"
    raise DataError(f"Dataset '{name}' ({split} split) was not found in {where} and {reason}. Provide it by running "
                    f"once with network access (it is then saved under the data root, here {os.path.abspath(root)}), "
                    f"or {how_to}, or point the data root (--data-root) at a folder that already holds it.")


# ---------------------------------------------------------------------------------------------------- CIFAR
def _unpickle(path):
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")  # the files were pickled by Python 2
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    except Exception as e:
        raise DataError(f"Cannot read CIFAR file {path} ({type(e).__name__}: {e}); delete it to re-download.") from None


def _read_cifar(name, root, split, download):
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} or cifar-100-python/{train, test, meta}:
    pickled dicts with 'data' [N, 3072] uint8 (R, G, B planes of 32x32) and the labels; CIFAR-100's coarse labels
    are the 20 superclasses (cifar20)."""
    ten = name == "cifar10"
    folder = os.path.join(root, "cifar-10-batches-py" if ten else "cifar-100-python")
    files = ([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]) if ten else [split]
    files.append("batches.meta" if ten else "meta")
    if not all(os.path.isfile(os.path.join(folder, f)) for f in files):
        _fetch(name, root, split, os.path.abspath(folder), download, "download https://www.cs.toronto.edu/~kriz/"
               f"cifar-{'10' if ten else '100'}-python.tar.gz and extract it into {os.path.abspath(root)}")
    *batches, meta = [_unpickle(os.path.join(folder, f)) for f in files]
    label_key, names_key = {"cifar10": ("labels", "label_names"), "cifar100": ("fine_labels", "fine_label_names"),
                            "cifar20": ("coarse_labels", "coarse_label_names")}[name]
    images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[label_key] for b in batches])
    return torch.from_numpy(images), torch.from_numpy(labels).long(), list(meta[names_key])


# ---------------------------------------------------------------------------------------------------- STL-10
def _read_stl10(name, root, split, download):
    """stl10_binary/{train,test,unlabeled}_X.bin: uint8 [N, 3, 96, 96], each plane stored column-major (hence the
    transpose); {train,test}_y.bin: labels 1..10; class_names.txt. The unlabeled images get label -1."""
    folder = os.path.join(root, "stl10_binary")
    parts = ["train", "unlabeled"] if split == "train+unlabeled" else [split]
    files = [f"{p}_{xy}.bin" for p in parts for xy in "Xy" if (p, xy) != ("unlabeled", "y")] + ["class_names.txt"]
    if not all(os.path.isfile(os.path.join(folder, f)) for f in files):
        _fetch(name, root, split, os.path.abspath(folder), download, "download http://ai.stanford.edu/~acoates/stl10/"
               f"stl10_binary.tar.gz and extract it into {os.path.abspath(root)}")
    arrays = [np.fromfile(os.path.join(folder, f"{p}_X.bin"), dtype=np.uint8) for p in parts]
    if any(a.size % (3 * 96 * 96) for a in arrays):
        raise DataError(f"An STL-10 image file in {folder} is truncated; delete it to download it again.")
    images = torch.cat([torch.from_numpy(a).view(-1, 3, 96, 96).transpose(2, 3) for a in arrays])  # contiguous copy
    labels = [torch.from_numpy(np.fromfile(os.path.join(folder, f"{p}_y.bin"), dtype=np.uint8)).long() - 1
              if p != "unlabeled" else torch.full((a.size // (3 * 96 * 96),), -1) for p, a in zip(parts, arrays)]
    with open(os.path.join(folder, "class_names.txt")) as f:
        classes = [line.strip() for line in f if line.strip()]
    return images, torch.cat(labels), classes


# ---------------------------------------------------------------------------------------------------- (Fashion-)MNIST
def _read_idx(path):
    """IDX format: magic 0x0000080<ndim> (unsigned bytes), ndim big-endian int32 sizes, then the bytes."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    ndim = raw[3] if len(raw) >= 4 else 0
    shape = tuple(np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)) if len(raw) >= 4 + 4 * ndim else ()
    if raw[:3] != b"\x00\x00\x08" or not shape or len(raw) != 4 + 4 * ndim + math.prod(shape):
        raise DataError(f"{path} is not a valid IDX file of unsigned bytes (truncated or corrupted); delete it.")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


def _read_mnist(name, root, split, download):
    """Raw idx files, gzipped or not, where torchvision puts them (root/MNIST/raw, root/FashionMNIST/raw) or, for
    Fashion-MNIST, where Debian's package dataset-fashion-mnist does. Images [N, 1, 28, 28]."""
    stems = [f"{'train' if split == 'train' else 't10k'}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
    folder = os.path.abspath(os.path.join(root, "MNIST" if name == "mnist" else "FashionMNIST", "raw"))
    places = [folder] + ([FASHION_MNIST_DEBIAN] if name == "fashion-mnist" else [])

    def find():  # the first place holding both files, each plain or gzipped
        for d in places:
            paths = [os.path.join(d, s + ("" if os.path.isfile(os.path.join(d, s)) else ".gz")) for s in stems]
            if all(map(os.path.isfile, paths)):
                return paths
    if find() is None:
        how = (f"install Debian's package dataset-fashion-mnist (it puts the files in {FASHION_MNIST_DEBIAN})"
               if name == "fashion-mnist" else f"put {stems[0]}.gz and {stems[1]}.gz into {folder}")
        _fetch(name, root, split, " or ".join(places), download, how)
    images_path, labels_path = find()
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.dim() != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"{images_path} {tuple(images.shape)} and {labels_path} {tuple(labels.shape)} do not match.")
    classes = MNIST_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES
    return images.unsqueeze(1), labels.long(), list(classes)


# ---------------------------------------------------------------------------------------------------- image folders
def _load_image_folder(path, split, image_size):
    """One sub-folder per class (labels by sorted folder name, images searched recursively) or all images in the folder
    itself (labels -1, no classes). With `train/` and `test/` sub-folders, `split` picks one; otherwise both splits
    are the whole folder (clustering is evaluated on the images it clusters). Images are read as `_read_image` says."""
    if not os.path.isdir(path):
        raise DataError(f"'{path}' is a file, not a folder: imagefolder:PATH takes a folder of images (one sub-folder "
                        "per class, or all in one folder); classify a single image with a trained model by the scripts'"
                        " --predict." if os.path.exists(path) else
                        f"Image folder '{path}' does not exist; check the path given after 'imagefolder:'.")
    roots = [os.path.join(path, s) for s in ("train", "test")]
    folder, roots = (os.path.join(path, split), roots) if all(map(os.path.isdir, roots)) else (path, [path])
    subdirs = lambda d: {e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e)) and not e.startswith(".")}
    classes = sorted(set().union(*map(subdirs, roots)))  # the same class indices in train and test
    found = [(f, i) for i, c in enumerate(classes) for f in _find_images(os.path.join(folder, c))] if classes else [
        (f, -1) for f in _find_images(folder)]
    if not found:
        raise DataError(f"Image folder '{folder}' contains no images ({', '.join(IMAGE_EXTENSIONS)} files, in the "
                        "folder itself or in one sub-folder per class); add images or give another folder.")
    images = _read_images([f for f, _ in found], image_size)
    return Dataset(images, torch.tensor([i for _, i in found]), classes, *channel_stats(images))


def load_image_files(path, image_size, channels):
    """New images for a trained model: `path` is one image file or a folder (searched recursively, sorted, hidden
    files skipped). Each image is read as image folders are, then converted to `channels`, 1 or 3 (1: luma, exactly
    by PIL's "L"; 3: grayscale repeated). Returns (uint8 [N, channels, S, S], the files)."""
    _check_image_size(image_size)
    if not os.path.exists(path):
        raise DataError(f"'{path}' does not exist; give an image file or a folder of images.")
    files = _find_images(path) if os.path.isdir(path) else [path]
    if not files:
        raise DataError(f"Folder '{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)} files, searched "
                        "recursively, hidden ones skipped); add images or give another folder or an image file.")
    images = _read_images(files, image_size, "L" if channels == 1 else None)
    return images.expand(-1, channels, -1, -1).contiguous(), files


def _find_images(folder):  # image files under `folder`, recursively, sorted; hidden files and folders skipped
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS) and f[0] != "."]
    return sorted(found)


def _read_images(files, size, mode=None):
    """uint8 [N, C, size, size]: C = 1 when every image is grayscale, else 3 (grayscale images repeated)."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL releases the GIL while decoding
        arrays = [a.reshape(size, size, -1) for a in pool.map(lambda f: _read_image(f, size, mode), files)]
    c = max(a.shape[2] for a in arrays)
    images = np.stack([np.broadcast_to(a, (size, size, c)) for a in arrays])  # [N, size, size, C]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _read_image(path, size, mode=None):
    """uint8 [size, size] (grayscale: modes 1, L, LA, I;16, I) or [size, size, 3] (colour): 16-bit values scaled by
    the full range (v * 255 / 65535, rounded; mode I clipped to 0..65535), palette images through their palette, CMYK
    by PIL, images with alpha (or a transparent colour) composited over a white background. Then the shorter side is
    resized (bicubic) to `size`, the centre cropped square and, if `mode` is given, the image converted to it."""
    from PIL import Image  # Pillow comes with torchvision
    try:
        with Image.open(path) as img:
            img.draft(None, (size, size))  # JPEG: decode at a reduced scale when the image is much larger (fast)
            if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I
                v = np.asarray(img).astype(np.int64).clip(0, 65535)
                img = Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8))  # rounded, mode L
            gray = img.mode in ("1", "L", "LA", "La")
            if img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info:
                img = Image.alpha_composite(Image.new("RGBA", img.size, (255,) * 4), img.convert("RGBA"))
            img = img.convert("L" if gray else "RGB")
            scale = size / min(img.size)
            w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
            left, top = (w - size) // 2, (h - size) // 2
            img = img.resize((w, h), Image.BICUBIC).crop((left, top, left + size, top + size))
            return np.asarray(img.convert(mode) if mode else img)
    except Exception as e:
        raise DataError(f"Cannot read image {path} ({type(e).__name__}: {e}). Remove or replace the file.") from None


# ---------------------------------------------------------------------------------------------------- helpers
def resize(images, size, chunk=4096):
    """uint8 [N, C, H, W] -> [N, C, size, size], bilinear with antialiasing, in chunks to bound memory."""
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear", antialias=True)
        out[i:i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def pixel_vectors(images, size=32):
    """uint8 [N, C, H, W] -> float [N, C * s * s] on images' device, s = min(H, size): the raw pixels as vectors for a
    neighbour search, larger images resized down first (bounds the search's cost: 3,072 values for 96-px RGB)."""
    small = images if images.shape[-1] <= size else resize(images.cpu(), size).to(images.device)
    return small.flatten(1).float()


def channel_stats(images, chunk=4096):
    """Exact per-channel mean and std in [0, 1] of uint8 [N, C, H, W] images, from a histogram of the 256 values."""
    counts = torch.zeros(images.shape[1], 256, dtype=torch.float64)
    for i in range(0, images.shape[0], chunk):
        for c in range(images.shape[1]):
            counts[c] += torch.bincount(images[i:i + chunk, c].flatten(), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum(1) / counts.sum(1)
    std = ((counts * (values - mean[:, None]) ** 2).sum(1) / counts.sum(1)).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
