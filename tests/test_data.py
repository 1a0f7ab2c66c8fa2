"""data.py: every reader on tiny files written in the real on-disk formats (cross-checked against torchvision's own
readers, whose md5 checks are switched off for the tiny files), image folders, the synthetic set, and the errors."""

import gzip
import os
import pickle
import struct
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

import data

RNG = np.random.default_rng(0)


def random_images(n, c=3, s=32):
    return RNG.integers(0, 256, (n, c, s, s), dtype=np.uint8)  # [N, C, H, W]


def no_md5_checks(monkeypatch):  # torchvision verifies the md5 of the full-size files; ours are tiny
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.stl10, "check_integrity", lambda *a, **k: True)


def cluster_acc(pred, target):
    counts = np.zeros((pred.max() + 1, target.max() + 1))
    np.add.at(counts, (pred, target), 1)
    rows, cols = linear_sum_assignment(-counts)
    return counts[rows, cols].sum() / len(target)


# ------------------------------------------------------------------------------------------------ CIFAR
def write_cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        images, labels = random_images(4 + i), RNG.integers(0, 10, 4 + i).tolist()
        batches[name] = (images, labels)
        entry = {"batch_label": name, "labels": labels, "data": images.reshape(len(labels), 3072),
                 "filenames": [f"img_{k}.png" for k in range(len(labels))]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}, protocol=2))
    return batches, names


def test_cifar10_reader_matches_files_and_torchvision(tmp_path, monkeypatch):
    batches, names = write_cifar10(tmp_path)
    train = data.load_dataset("cifar10", root=str(tmp_path), split="train", download=False)
    expected = np.concatenate([batches[f"data_batch_{j}"][0] for j in range(1, 6)])
    assert train.images.dtype == torch.uint8 and train.images.shape == (4 + 5 + 6 + 7 + 8, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), expected)
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == sum((batches[f"data_batch_{j}"][1] for j in range(1, 6)), [])
    assert train.classes == names and train.mean == data.STATS["cifar10"][0] and len(train.std) == 3
    test = data.load_dataset("cifar10", root=str(tmp_path), split="test", download=False)
    assert np.array_equal(test.images.numpy(), batches["test_batch"][0])
    no_md5_checks(monkeypatch)
    for split, ours in [("train", train), ("test", test)]:
        tv = torchvision.datasets.CIFAR10(str(tmp_path), train=split == "train", download=False)
        assert np.array_equal(ours.images.permute(0, 2, 3, 1).numpy(), tv.data)  # torchvision keeps [N, H, W, C]
        assert ours.labels.tolist() == list(tv.targets)


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar100_and_cifar20_readers(tmp_path, monkeypatch, bytes_keys):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)  # pickles re-saved by Python 3 have bytes keys
    written = {}
    for split, n in [("train", 12), ("test", 5)]:
        images, fine = random_images(n), RNG.integers(0, 100, n)
        coarse = (fine * 7 + 3) % 20  # any superclass assignment: the reader must take it from the file
        written[split] = images, fine, coarse
        entry = {key("data"): images.reshape(n, 3072), key("fine_labels"): fine.tolist(),
                 key("coarse_labels"): coarse.tolist(), key("filenames"): ["x.png"] * n, key("batch_label"): split}
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
    fine_names, coarse_names = [f"fine{i}" for i in range(100)], [f"super{i}" for i in range(20)]
    meta = {key("fine_label_names"): fine_names, key("coarse_label_names"): coarse_names}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    for split, (images, fine, coarse) in written.items():
        c100 = data.load_dataset("cifar100", root=str(tmp_path), split=split, download=False)
        c20 = data.load_dataset("cifar20", root=str(tmp_path), split=split, download=False)
        assert np.array_equal(c100.images.numpy(), images) and np.array_equal(c20.images.numpy(), images)
        assert c100.labels.tolist() == fine.tolist() and c100.classes == fine_names
        assert c20.labels.tolist() == coarse.tolist() and c20.classes == coarse_names
        if not bytes_keys:
            no_md5_checks(monkeypatch)
            tv = torchvision.datasets.CIFAR100(str(tmp_path), train=split == "train", download=False)
            assert np.array_equal(c100.images.permute(0, 2, 3, 1).numpy(), tv.data)
            assert c100.labels.tolist() == list(tv.targets) and c100.classes == tv.classes


def test_cifar_resize_to_image_size(tmp_path):
    write_cifar10(tmp_path)
    ds = data.load_dataset("cifar10", root=str(tmp_path), image_size=16, download=False)
    assert ds.images.shape == (30, 3, 16, 16) and ds.images.dtype == torch.uint8
    flat = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    assert torch.equal(data.resize(flat, 8), torch.full((2, 3, 8, 8), 77, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------ STL-10
def test_stl10_reader_all_splits(tmp_path, monkeypatch):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    written = {"train": (random_images(3, s=96), np.array([1, 10, 4])),
               "test": (random_images(2, s=96), np.array([7, 2])), "unlabeled": (random_images(4, s=96), None)}
    for part, (images, labels) in written.items():
        (folder / f"{part}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())  # planes stored column-major
        if labels is not None:
            (folder / f"{part}_y.bin").write_bytes(labels.astype(np.uint8).tobytes())  # labels 1..10
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    no_md5_checks(monkeypatch)
    for split in ["train", "test", "unlabeled", "train+unlabeled"]:
        ds = data.load_dataset("stl10", root=str(tmp_path), split=split, download=False)
        parts = ["train", "unlabeled"] if split == "train+unlabeled" else [split]
        expected = np.concatenate([written[p][0] for p in parts])
        labels = np.concatenate([written[p][1] - 1 if written[p][1] is not None else [-1] * 4 for p in parts])
        assert ds.images.shape == expected.shape and np.array_equal(ds.images.numpy(), expected)
        assert ds.images.is_contiguous() and ds.labels.dtype == torch.int64
        assert ds.labels.tolist() == labels.tolist() and ds.classes == names
        tv = torchvision.datasets.STL10(str(tmp_path), split=split, download=False)
        assert np.array_equal(ds.images.numpy(), tv.data) and ds.labels.tolist() == tv.labels.tolist()


# ------------------------------------------------------------------------------------------------ (Fashion-)MNIST
def idx_bytes(array):
    return struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("gzipped", [False, True])
def test_mnist_idx_reader(tmp_path, gzipped):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    written = {}
    for split, prefix, n in [("train", "train", 7), ("test", "t10k", 3)]:
        images, labels = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8), RNG.integers(0, 10, n).astype(np.uint8)
        written[split] = images, labels
        for stem, array in [(f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)]:
            content = idx_bytes(array)
            (raw / (stem + ".gz" if gzipped else stem)).write_bytes(gzip.compress(content) if gzipped else content)
    for split, (images, labels) in written.items():
        ds = data.load_dataset("mnist", root=str(tmp_path), split=split, download=False)
        assert ds.images.shape == (len(labels), 1, 28, 28) and np.array_equal(ds.images[:, 0].numpy(), images)
        assert ds.labels.tolist() == labels.tolist() and ds.classes == torchvision.datasets.MNIST.classes
        if not gzipped:  # torchvision reads the unzipped files
            tv = torchvision.datasets.MNIST(str(tmp_path), train=split == "train", download=False)
            assert torch.equal(ds.images[:, 0], tv.data) and torch.equal(ds.labels, tv.targets)
    truncated = idx_bytes(written["train"][0])[:-5]
    (raw / ("train-images-idx3-ubyte" + (".gz" if gzipped else ""))).write_bytes(
        gzip.compress(truncated) if gzipped else truncated)
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.*not a valid IDX"):
        data.load_dataset("mnist", root=str(tmp_path), download=False)


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DEBIAN), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_location(tmp_path):
    train = data.load_dataset("fashion-mnist", root=str(tmp_path), download=False)  # nothing under root
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [6000] * 10 and train.classes[0] == "T-shirt/top"
    mean, std = data.channel_stats(train.images)  # the published statistics are those of these files
    assert abs(mean[0] - train.mean[0]) < 1e-3 and abs(std[0] - train.std[0]) < 1e-3
    test = data.load_dataset("fashion-mnist", root=str(tmp_path), split="test", download=False)
    assert test.images.shape == (10000, 1, 28, 28) and torch.bincount(test.labels).tolist() == [1000] * 10


# ------------------------------------------------------------------------------------------------ image folders
def save_png(path, array):  # array [H, W, 3] uint8
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_imagefolder_with_class_subfolders_and_flat(tmp_path):
    pixels = {f: RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8) for f in ["cat/a.png", "cat/b.png", "dog/x/c.png"]}
    for f, array in pixels.items():
        save_png(tmp_path / "classes" / f, array)
    (tmp_path / "classes" / "cat" / "notes.txt").write_text("not an image")
    ds = data.load_dataset(f"imagefolder:{tmp_path / 'classes'}", image_size=16)
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1]
    assert ds.images.shape == (3, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), np.stack(list(pixels.values())))  # PNG: lossless
    assert ds.mean == pytest.approx(tuple(np.stack(list(pixels.values())).mean((0, 1, 2)) / 255))
    save_png(tmp_path / "flat" / "one.png", RNG.integers(0, 256, (20, 40, 3), dtype=np.uint8))  # not square
    Image.fromarray(RNG.integers(0, 256, (50, 30), dtype=np.uint8)).save(tmp_path / "flat" / "two.jpg")  # grayscale
    flat = data.load_dataset(f"imagefolder:{tmp_path / 'flat'}", image_size=8)
    assert flat.images.shape == (2, 3, 8, 8) and flat.labels.tolist() == [-1, -1] and flat.classes == []
    assert data.load_dataset(f"imagefolder:{tmp_path / 'flat'}").images.shape == (2, 3, 64, 64)  # default size


def test_imagefolder_train_test_subfolders(tmp_path):
    for f in ["train/a/1.png", "train/b/2.png", "train/b/3.png", "test/b/4.png"]:  # class 'a' missing from test
        save_png(tmp_path / f, RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    train = data.load_dataset(f"imagefolder:{tmp_path}", split="train", image_size=8)
    test = data.load_dataset(f"imagefolder:{tmp_path}", split="test", image_size=8)
    assert train.classes == test.classes == ["a", "b"]
    assert train.labels.tolist() == [0, 1, 1] and test.labels.tolist() == [1]  # 'b' keeps its index


def one_paragraph_error(match, fn, *args, **kwargs):
    with pytest.raises(data.DataError, match=match) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_imagefolder_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    one_paragraph_error("'.*empty' contains no images", data.load_dataset, f"imagefolder:{tmp_path / 'empty'}")
    one_paragraph_error("'.*nowhere' does not exist", data.load_dataset, f"imagefolder:{tmp_path / 'nowhere'}")
    save_png(tmp_path / "bad" / "good.png", np.zeros((8, 8, 3), dtype=np.uint8))
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    one_paragraph_error(r"Cannot read image .*broken\.jpg", data.load_dataset, f"imagefolder:{tmp_path / 'bad'}")
    file = tmp_path / "bad" / "good.png"
    message = one_paragraph_error(f"'{file}' is a file, not a folder", data.load_dataset, f"imagefolder:{file}")
    assert "imagefolder:PATH takes a folder" in message and "--predict" in message
    for size in [-4, 2, 0, 7, 8.5, "64", True]:  # never blames an image file
        message = one_paragraph_error("image size must be at least 8 pixels", data.load_dataset,
                                      f"imagefolder:{tmp_path / 'bad'}", image_size=size)
        assert "Cannot read" not in message and repr(size) in message
    one_paragraph_error("image size must be at least 8 pixels", data.load_image_files, str(file), 2, 3)


# Tiny images in every mode a folder may hold, 8x8 so that reading at image size 8 neither resizes nor crops.
SIXTEEN_BIT = np.array([0, 32768, 65535, 1000, 257, 128, 65407, 40000] * 8, dtype=np.uint16).reshape(8, 8)
EXPECTED_8BIT = np.round(SIXTEEN_BIT / 65535 * 255).astype(np.uint8)  # the full range, rounded
assert EXPECTED_8BIT[0, :4].tolist() == [0, 128, 255, 4]
PALETTE = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * 756
ALPHA = np.array([0, 255, 128, 64, 200, 1, 254, 100] * 8, dtype=np.uint8).reshape(8, 8)


def mode_image(mode):
    """(PIL image, file suffix, expected uint8 [8, 8] or [8, 8, 3] when read, from PIL or known values)."""
    gray, rgb = RNG.integers(0, 256, (8, 8), dtype=np.uint8), RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    over_white = lambda img: np.asarray(  # PIL's compositing over white
        Image.alpha_composite(Image.new("RGBA", img.size, (255,) * 4), img.convert("RGBA")).convert(
            "L" if img.mode == "LA" else "RGB"))
    if mode == "I;16":
        return Image.fromarray(SIXTEEN_BIT), ".png", EXPECTED_8BIT
    if mode == "I;16B":
        return Image.frombytes("I;16B", (8, 8), SIXTEEN_BIT.astype(">u2").tobytes()), ".tif", EXPECTED_8BIT
    if mode == "I":  # 32-bit: read as 16-bit values, clipped
        values = SIXTEEN_BIT.astype(np.int32)
        values[0, :2] = -5, 70000
        expected = EXPECTED_8BIT.copy()
        expected[0, :2] = 0, 255
        return Image.fromarray(values), ".tif", expected
    if mode in ("P", "P+transparency"):
        img = Image.fromarray(RNG.integers(0, 4, (8, 8), dtype=np.uint8), "L").convert("P")  # indices 0..3
        img.putpalette(PALETTE)
        expected = np.array(PALETTE[:12], dtype=np.uint8).reshape(4, 3)[np.asarray(img)]
        if mode == "P":
            return img, ".png", expected
        img.info["transparency"] = 1  # index 1 (green) is transparent: white
        return img, ".png", np.where((np.asarray(img) == 1)[:, :, None], 255, expected).astype(np.uint8)
    if mode == "1":
        img = Image.fromarray(gray > 127).convert("1")
        return img, ".png", np.asarray(img.convert("L"))
    if mode in ("LA", "RGBA", "PA"):
        base = Image.fromarray(gray if mode == "LA" else rgb)
        if mode == "PA":
            base = base.quantize(16)
        img = Image.merge(mode, [*base.split(), Image.fromarray(ALPHA)])
        return img, ".png", over_white(img)
    if mode == "CMYK":
        img = Image.fromarray(RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8), "CMYK")
        return img, ".tif", np.asarray(img.convert("RGB"))
    return Image.fromarray(gray if mode == "L" else rgb), ".png", gray if mode == "L" else rgb


MODES = ["L", "I;16", "I;16B", "I", "1", "LA", "P", "P+transparency", "PA", "RGBA", "CMYK", "RGB"]


@pytest.mark.parametrize("mode", MODES)
def test_image_modes_are_read_like_pil(tmp_path, monkeypatch, mode):
    img, suffix, expected = mode_image(mode)
    path = tmp_path / "folder" / f"image{suffix}"
    path.parent.mkdir()
    if mode == "PA":  # no format Pillow writes keeps PA: hand the image to the reader as if opened from the file
        path.write_bytes(b"")
        monkeypatch.setattr(Image, "open", lambda p: img)
    else:
        img.save(path)
        assert Image.open(path).mode == mode.split("+")[0]
    channels = 1 if mode in ("L", "I;16", "I;16B", "I", "1", "LA") else 3
    ds = data.load_dataset(f"imagefolder:{path.parent}", image_size=8)
    assert ds.images.shape == (1, channels, 8, 8) and ds.images.is_contiguous() and len(ds.mean) == channels
    assert np.array_equal(ds.images[0].permute(1, 2, 0).squeeze(2).numpy(), expected)
    images, files = data.load_image_files(str(path), 8, channels)
    assert files == [str(path)] and torch.equal(images, ds.images)


def test_alpha_is_composited_over_white():
    for mode in ["LA", "RGBA"]:
        img, _, expected = mode_image(mode)
        colour = np.asarray(img)[..., :-1].astype(float).reshape(8, 8, -1)
        a = ALPHA[:, :, None] / 255
        assert np.abs(expected.reshape(8, 8, -1) - (colour * a + 255 * (1 - a))).max() <= 1  # up to rounding
        assert (expected[ALPHA == 0] == 255).all()


def test_grayscale_folder_stays_grayscale_and_mixed_folder_is_rgb(tmp_path):
    (tmp_path / "gray").mkdir()
    for i, mode in enumerate(["L", "I;16", "1", "LA", "I"]):
        img, suffix, _ = mode_image(mode)
        img.resize((12, 10)).save(tmp_path / "gray" / f"{i}{suffix}")
    gray = data.load_dataset(f"imagefolder:{tmp_path / 'gray'}", image_size=8)
    assert gray.images.shape == (5, 1, 8, 8) and len(gray.mean) == 1
    (tmp_path / "mixed").mkdir()
    grey, colour = RNG.integers(0, 256, (8, 8), dtype=np.uint8), RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(colour).save(tmp_path / "mixed" / "b.png")
    mixed = data.load_dataset(f"imagefolder:{tmp_path / 'mixed'}", image_size=8)
    assert mixed.images.shape == (2, 3, 8, 8) and mixed.images.is_contiguous() and len(mixed.mean) == 3
    assert np.array_equal(mixed.images[0].numpy(), np.stack([grey] * 3)) and np.array_equal(
        mixed.images[1].permute(1, 2, 0).numpy(), colour)


def test_load_image_files(tmp_path):
    for f in ["b.png", "a/z.png", "a/c/d.png", "a/.hidden.png", ".git/e.png"]:
        save_png(tmp_path / "new" / f, RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    (tmp_path / "new" / "a" / "notes.txt").write_text("not an image")
    images, files = data.load_image_files(str(tmp_path / "new"), 16, 3)
    assert files == sorted(str(tmp_path / "new" / f) for f in ["b.png", "a/z.png", "a/c/d.png"])
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8 and images.is_contiguous()
    flat = data.load_dataset(f"imagefolder:{tmp_path / 'new' / 'a' / 'c'}", image_size=16)  # read the same way
    assert torch.equal(images[files.index(str(tmp_path / "new" / "a" / "c" / "d.png"))], flat.images[0])
    single, one = data.load_image_files(files[0], 16, 3)
    assert one == files[:1] and torch.equal(single, images[:1])
    luma, _ = data.load_image_files(str(tmp_path / "new"), 16, 1)  # colour -> 1 channel: PIL's "L"
    reference = [np.asarray(Image.fromarray(x.permute(1, 2, 0).numpy()).convert("L")) for x in images]
    assert luma.shape == (3, 1, 16, 16) and np.array_equal(luma[:, 0].numpy(), np.stack(reference))
    save_png(tmp_path / "gray" / "g.png", RNG.integers(0, 256, (8, 8), dtype=np.uint8))
    gray, _ = data.load_image_files(str(tmp_path / "gray"), 8, 1)
    rgb, _ = data.load_image_files(str(tmp_path / "gray"), 8, 3)  # grayscale -> 3 channels: repeated
    assert gray.shape == (1, 1, 8, 8) and rgb.shape == (1, 3, 8, 8) and torch.equal(rgb, gray.expand(1, 3, 8, 8))
    one_paragraph_error("'.*nowhere' does not exist", data.load_image_files, str(tmp_path / "nowhere"), 8, 3)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("not an image")
    one_paragraph_error("'.*empty' holds no images", data.load_image_files, str(tmp_path / "empty"), 8, 3)
    (tmp_path / "new" / "a" / "broken.png").write_bytes(b"not a png")
    one_paragraph_error(r"Cannot read image .*broken\.png", data.load_image_files, str(tmp_path / "new"), 8, 3)
    one_paragraph_error(r"Cannot read image .*notes\.txt", data.load_image_files, str(tmp_path / "new/a/notes.txt"),
                        8, 3)


# ------------------------------------------------------------------------------------------------ synthetic
def test_synthetic_shapes_determinism_and_stats():
    ds = data.load_dataset("synthetic")
    assert ds.images.shape == (5000, 3, 32, 32) and ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert torch.bincount(ds.labels).tolist() == [500] * 10 and len(ds.classes) == 10
    assert torch.equal(ds.images, data.load_dataset("synthetic").images)  # deterministic
    test = data.load_dataset("synthetic", split="test")
    assert test.images.shape == (1000, 3, 32, 32) and not torch.equal(test.images[:100], ds.images[:100])
    other = data.load_dataset("synthetic", seed=1, num_images=100)
    assert not torch.equal(other.images, ds.images[:100])
    x = ds.images.double() / 255
    assert ds.mean == pytest.approx(tuple(x.mean((0, 2, 3)).tolist()), abs=1e-9)
    assert ds.std == pytest.approx(tuple(x.std((0, 2, 3), unbiased=False).tolist()), abs=1e-9)
    assert x.std((1, 2, 3)).min() > 0.03  # no blank images
    small = data.load_dataset("synthetic", num_images=60, num_classes=25, image_size=48, channels=1, seed=3)
    assert small.images.shape == (60, 1, 48, 48) and len(small.classes) == 25 and small.labels.max() == 24
    with pytest.raises(data.DataError, match="channels"):
        data.load_dataset("synthetic", channels=2)


def test_synthetic_raw_pixels_cluster_above_chance_but_not_perfectly():
    ds = data.load_dataset("synthetic", num_images=1000)
    pred = KMeans(10, n_init=1, random_state=0).fit_predict(ds.images.flatten(1).float().numpy() / 255)
    acc, nmi = cluster_acc(pred, ds.labels.numpy()), normalized_mutual_info_score(ds.labels.numpy(), pred)
    assert 0.25 < acc < 0.8 and nmi > 0.15  # chance is 0.1: colour and layout carry some, not all, of the class


def test_synthetic_classes_survive_crops_flips_and_grayscale():
    """The class is in the luminance texture: after grayscale, random resized crops (scale 0.2-1) and flips, a
    translation-invariant texture feature (normalised amplitude spectrum) still clusters far above chance."""
    n = 600
    ds = data.load_dataset("synthetic", num_images=n)
    gen = torch.Generator().manual_seed(0)
    gray = ds.images.float().mean(1, keepdim=True)  # [N, 1, 32, 32]
    scale, ratio = 0.2 + 0.8 * torch.rand(n, generator=gen), torch.exp((torch.rand(n, generator=gen) - 0.5) * 0.58)
    w, h = (32 * (scale * ratio).sqrt()).clamp(4, 32), (32 * (scale / ratio).sqrt()).clamp(4, 32)
    crops = []
    for i in range(n):  # per-image crop parameters
        top = int(torch.randint(0, 33 - int(h[i]), (1,), generator=gen))
        left = int(torch.randint(0, 33 - int(w[i]), (1,), generator=gen))
        crop = torch.nn.functional.interpolate(gray[i:i + 1, :, top:top + int(h[i]), left:left + int(w[i])], size=32,
                                               mode="bilinear", antialias=True)
        crops.append(crop.flip(-1) if torch.rand(1, generator=gen) < 0.5 else crop)
    crops = torch.cat(crops)[:, 0]
    crops = crops - crops.mean((1, 2), keepdim=True)
    spectrum = torch.fft.rfft2(crops).abs().flatten(1)  # [N, 32 * 17] amplitudes: the same wherever the texture sits
    spectrum = (spectrum / spectrum.norm(dim=1, keepdim=True)).numpy()  # and whatever its contrast
    pred = KMeans(10, n_init=3, random_state=0).fit_predict(spectrum)
    assert cluster_acc(pred, ds.labels.numpy()) > 0.35


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_name_and_bad_split_list_the_choices():
    with pytest.raises(data.DataError, match="Unknown dataset 'imagenet'.*cifar10.*cifar20.*stl10.*synthetic"):
        data.load_dataset("imagenet")
    with pytest.raises(data.DataError, match="no split 'unlabeled'.*train, test"):
        data.load_dataset("cifar10", split="unlabeled")
    with pytest.raises(data.DataError, match="only apply to the 'synthetic'"):
        data.load_dataset("cifar10", num_classes=3)


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar20", "cifar-100-python"),
                                          ("stl10", "stl10_binary"), ("mnist", "MNIST")])
def test_missing_data_without_download(tmp_path, name, folder):
    with pytest.raises(data.DataError) as err:
        data.load_dataset(name, root=str(tmp_path), download=False)
    message = str(err.value)
    assert f"'{name}'" in message and os.path.join(str(tmp_path), folder) in message
    assert "network" in message and "\n" not in message


def test_failed_download_becomes_data_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)  # no real network access in the test
    with pytest.raises(data.DataError, match=r"'cifar10'.*downloading it failed \(URLError.*cifar-10-python\.tar\.gz"):
        data.load_dataset("cifar10", root=str(tmp_path))


def test_pixel_vectors_keep_small_images_and_resize_larger_ones_to_32():
    g = torch.Generator().manual_seed(0)
    small = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=g)
    big = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=g)
    assert torch.equal(data.pixel_vectors(small), small.flatten(1).float())              # [3, 784]
    assert torch.equal(data.pixel_vectors(big), data.resize(big, 32).flatten(1).float())  # [3, 3072]
    assert data.pixel_vectors(big).shape == (3, 3 * 32 * 32)
