"""pare.data: every reader on small synthetic files, transforms, splits, calibration, loaders, corrupt input,
and checks against the real data in ../shared (skipped when absent)."""

from __future__ import annotations

import csv
import gzip
import io
import os
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pare.data import (
    ImageDataset,
    ImageFolderStream,
    ImageNetTransform,
    InMemoryLoader,
    calibration_batches,
    center_crop,
    detect_format,
    folder_loader,
    load_dataset,
    load_image_folder,
    random_crop_flip,
    random_resized_crop,
    read_cifar10_lossless_npz,
    read_idx,
    read_jpeg_tarball,
    resize,
    seeded_generator,
    shard_order,
    to_float,
    train_val_split,
)
from pare.data import cache as disk_cache
from pare.errors import ConfigError, DataError
from tests.conftest import shared_path

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------------------------------- file builders


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes pickles the way Python 2 + numpy wrote the official CIFAR files: bytes as (SHORT_)BINSTRING and
    the array constructor under numpy.core.multiarray."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        name = name or obj.__qualname__  # type: ignore[attr-defined]
        module = "numpy.core.multiarray" if name == "_reconstruct" else "numpy"
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_images(n: int, offset: int) -> np.ndarray:
    """(n, 3072) uint8 rows whose R plane starts with the global id (offset + i), so order is visible."""
    rng = np.random.default_rng(offset)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, 0] = (offset + np.arange(n)) % 256
    return data


def write_cifar10_pickles(
    root: Path, per_batch: int = 4, protocol: int | None = None
) -> dict[str, np.ndarray]:
    """data_batch_1..5, test_batch, batches.meta in the official layout; returns the rows written."""
    root.mkdir(parents=True, exist_ok=True)
    written: dict[str, np.ndarray] = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = cifar_images(per_batch, offset=i * per_batch)
        labels = [(i + j) % 10 for j in range(per_batch)]
        obj = {
            b"batch_label": b"x",
            b"labels": labels,
            b"data": data,
            b"filenames": [f"{j}.png".encode() for j in range(per_batch)],
        }
        if protocol is None:
            raw = py2_pickle(obj)
        else:
            raw = pickle.dumps({k.decode(): v for k, v in obj.items()}, protocol=protocol)
        (root / name).write_bytes(raw)
        written[name] = data
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [n.encode() for n in CIFAR_NAMES],
        b"num_vis": 3072,
    }
    (root / "batches.meta").write_bytes(py2_pickle(meta))
    return written


def write_idx(path: Path, magic: int, array: np.ndarray, *, gz: bool) -> None:
    header = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)


def write_mnist(root: Path, *, gz: bool, n_train: int = 6, n_test: int = 3) -> None:
    root.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    rng = np.random.default_rng(0)
    write_idx(
        root / f"train-images-idx3-ubyte.from_convnetjs{sfx}",
        2051,
        rng.integers(0, 256, (n_train, 28, 28)),
        gz=gz,
    )
    write_idx(root / f"train-labels-idx1-ubyte{sfx}", 2049, np.arange(n_train) % 10, gz=gz)
    write_idx(root / f"t10k-images-idx3-ubyte{sfx}", 2051, rng.integers(0, 256, (n_test, 28, 28)), gz=gz)
    write_idx(root / f"t10k-labels-idx1-ubyte{sfx}", 2049, (np.arange(n_test) + 3) % 10, gz=gz)


def solid_jpeg(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_image_folder(root: Path, classes: list[str], per_class: int, fmt: str = "PNG") -> np.ndarray:
    """root/<class>/NNNN.png|jpg with distinct random 6x5 images; returns them (N, 3, 6, 5), sorted order."""
    rng = np.random.default_rng(1)
    out = []
    for c in sorted(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            img = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / c / f"{j:04d}.{'png' if fmt == 'PNG' else 'jpg'}", format=fmt)
            out.append(img.transpose(2, 0, 1))
    return np.stack(out)


def write_tarball(folder: Path, *, corrupt: str | None = None, bad_label: bool = False) -> tuple[Path, dict]:
    """A tar.gz of train/<class>/NNNN.jpg and test/<class>/NNNN.jpg (solid colours encoding the official
    index) plus official-order CSVs whose order interleaves the classes. Returns (tar path, expected)."""
    folder.mkdir(parents=True, exist_ok=True)
    classes = ["cat", "dog", "emu"]
    expected: dict[str, dict[str, list[int]]] = {}
    members: dict[str, bytes] = {}
    rows: dict[str, list[list[object]]] = {"train": [], "test": []}
    for split, n in (("train", 9), ("test", 6)):
        counters = dict.fromkeys(classes, 0)
        labels, values = [], []
        for idx in range(n):
            label = (idx * 2) % 3  # 0, 2, 1, 0, 2, 1, ...: official order differs from sorted folder order
            cls = classes[label]
            path = f"{split}/{cls}/{counters[cls]:04d}.jpg"
            counters[cls] += 1
            value = 20 * idx + (10 if split == "test" else 0)
            members[path] = solid_jpeg(value)
            labels.append(label)
            values.append(value)
            csv_label = (label + 1) % 3 if bad_label and idx == 1 else label
            if split == "test":
                rows[split].append([idx, csv_label, path])
            else:
                rows[split].append([1 + idx // 5, idx % 5, csv_label, path])
        expected[split] = {"labels": labels, "values": values}
    if corrupt is not None:
        members[corrupt] = members[corrupt][:40]
    tar_path = folder / "images.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        for name in sorted(members, reverse=True):  # archive order unrelated to the official order
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tf.addfile(info, io.BytesIO(members[name]))
    for split, header in (
        ("test", ["index", "label", "jpeg_path"]),
        ("train", ["batch", "index_in_batch", "label", "jpeg_path"]),
    ):
        with open(folder / f"{split}_official_order.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(reversed(rows[split]))  # row order in the file must not matter
    return tar_path, expected


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PARE_CACHE", str(cache))
    return cache


# ------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("protocol", [None, 2, 5], ids=["py2-official", "py3-proto2", "py3-proto5"])
def test_cifar10_pickle_reads_official_layout(tmp_path: Path, protocol: int | None) -> None:
    written = write_cifar10_pickles(tmp_path / "c10", protocol=protocol)
    assert detect_format(tmp_path / "c10")[0] == "cifar10-pickle"
    train = load_dataset(tmp_path / "c10", "train")
    test = load_dataset(tmp_path / "c10", "test")
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (4, 3, 32, 32)
    assert train.labels.dtype == torch.int64
    assert train.classes == CIFAR_NAMES
    expected = np.concatenate([written[f"data_batch_{k}"] for k in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), expected)
    # Row layout: 1024 R bytes, then G, then B -> channel planes.
    assert np.array_equal(test.images[2, 1].numpy().ravel(), written["test_batch"][2, 1024:2048])
    assert train.labels[:4].tolist() == [0, 1, 2, 3] and test.labels.tolist() == [5, 6, 7, 8]


def test_truncated_pickle_names_file(tmp_path: Path) -> None:
    write_cifar10_pickles(tmp_path / "c10")
    target = tmp_path / "c10" / "data_batch_3"
    raw = target.read_bytes()
    target.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"data_batch_3.*truncated"):
        load_dataset(tmp_path / "c10", "train")


def test_pickle_with_foreign_global_is_refused(tmp_path: Path) -> None:
    write_cifar10_pickles(tmp_path / "c10")
    # A pickle that would call os.system if loaded with plain pickle.load.
    evil = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    (tmp_path / "c10" / "test_batch").write_bytes(evil)
    with pytest.raises(DataError, match=r"test_batch.*refusing to load global os\.system"):
        load_dataset(tmp_path / "c10", "test")


def test_cifar100_pickle_fine_and_coarse(tmp_path: Path) -> None:
    root = tmp_path / "c100"
    root.mkdir()
    data = cifar_images(5, 0)
    for split in ("train", "test"):
        obj = {
            b"data": data,
            b"fine_labels": [0, 99, 50, 7, 3],
            b"coarse_labels": [0, 19, 10, 1, 2],
            b"filenames": [b"a"] * 5,
            b"batch_label": b"x",
        }
        (root / split).write_bytes(py2_pickle(obj))
    meta = {
        b"fine_label_names": [f"f{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
    }
    (root / "meta").write_bytes(py2_pickle(meta))
    fine = load_dataset(root, "train")
    coarse = load_dataset(root, "test", label_kind="coarse")
    assert (
        fine.labels.tolist() == [0, 99, 50, 7, 3] and len(fine.classes) == 100 and fine.classes[99] == "f99"
    )
    assert coarse.labels.tolist() == [0, 19, 10, 1, 2] and coarse.classes[19] == "c19"
    assert np.array_equal(fine.images.numpy(), data.reshape(-1, 3, 32, 32))


def test_cifar_binary_10_and_100(tmp_path: Path) -> None:
    root10 = tmp_path / "bin10"
    root10.mkdir()
    rows = {}
    for i, name in enumerate([f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]):
        data = cifar_images(3, i * 3)
        labels = np.array([(i + j) % 10 for j in range(3)], dtype=np.uint8)
        (root10 / name).write_bytes(np.concatenate([labels[:, None], data], axis=1).tobytes())
        rows[name] = (data, labels)
    (root10 / "batches.meta.txt").write_text("\n".join(CIFAR_NAMES) + "\n\n")
    ds = load_dataset(root10, "train")
    assert ds.images.shape == (15, 3, 32, 32) and ds.classes == CIFAR_NAMES
    assert np.array_equal(ds.images[3:6].numpy(), rows["data_batch_2.bin"][0].reshape(-1, 3, 32, 32))
    assert ds.labels[3:6].tolist() == rows["data_batch_2.bin"][1].tolist()

    root100 = tmp_path / "bin100"
    root100.mkdir()
    data = cifar_images(4, 0)
    coarse, fine = np.array([1, 2, 3, 19], np.uint8), np.array([10, 20, 30, 99], np.uint8)
    for split in ("train", "test"):
        (root100 / f"{split}.bin").write_bytes(
            np.concatenate([coarse[:, None], fine[:, None], data], 1).tobytes()
        )
    assert detect_format(root100)[0] == "cifar100-binary"
    assert load_dataset(root100, "test").labels.tolist() == [10, 20, 30, 99]
    assert load_dataset(root100, "test", label_kind="coarse").labels.tolist() == [1, 2, 3, 19]

    # A batch cut mid-record.
    path = root10 / "data_batch_4.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"data_batch_4\.bin.*not a positive multiple of the 3073-byte"):
        load_dataset(root10, "train")


# ------------------------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_mnist_idx(tmp_path: Path, gz: bool) -> None:
    write_mnist(tmp_path / "m", gz=gz)
    assert detect_format(tmp_path / "m")[0] == "mnist"
    train, test = load_dataset(tmp_path / "m", "train"), load_dataset(tmp_path / "m", "test")
    assert train.images.shape == (6, 1, 28, 28) and test.images.shape == (3, 1, 28, 28)
    assert train.labels.tolist() == [0, 1, 2, 3, 4, 5] and test.labels.tolist() == [3, 4, 5]
    raw = read_idx(tmp_path / "m" / f"t10k-images-idx3-ubyte{'.gz' if gz else ''}", 2051)
    assert np.array_equal(test.images[:, 0].numpy(), raw)


def test_mnist_bad_headers(tmp_path: Path) -> None:
    write_mnist(tmp_path / "m", gz=True)
    labels = tmp_path / "m" / "t10k-labels-idx1-ubyte.gz"
    write_idx(labels, 2051, np.arange(3), gz=True)  # image magic on a label file
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte\.gz: bad IDX magic number 2051, expected 2049"
    ):
        load_dataset(tmp_path / "m", "test")
    images = tmp_path / "m" / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: IDX size mismatch"):
        read_idx(images, 2051)
    write_idx(labels, 2049, np.arange(2), gz=True)
    images.write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: 2 labels for 3 images"):
        load_dataset(tmp_path / "m", "test")
    images.write_bytes(gzip.compress(raw)[:30])  # a cut gzip stream
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: cannot read"):
        read_idx(images, 2051)


# ------------------------------------------------------------------------------------------- npz, digits


def test_lossless_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x_test = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    x_train = rng.integers(0, 256, (5, 7, 32, 32, 3), dtype=np.uint8)
    y_test = rng.integers(0, 10, 20).astype(np.uint8)
    y_train = rng.integers(0, 10, (5, 20)).astype(np.uint8)
    path = tmp_path / "subset.npz"
    np.savez(
        path,
        x_test=x_test,
        y_test=y_test,
        x_train=x_train,
        y_train=y_train,
        label_names=np.array(CIFAR_NAMES),
    )
    test = load_dataset(path, "test")
    train = load_dataset(tmp_path, "train")  # the folder holding a single npz
    assert test.images.shape == (7, 3, 32, 32) and train.images.shape == (35, 3, 32, 32)
    assert np.array_equal(test.images.numpy(), x_test.transpose(0, 3, 1, 2))
    assert test.labels.tolist() == y_test[:7].tolist()
    assert np.array_equal(train.images[7:14].numpy(), x_train[1].transpose(0, 3, 1, 2))
    assert train.labels[7:14].tolist() == y_train[1, :7].tolist()
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=x_test, labels=y_test)
    with pytest.raises(DataError, match=r"bad\.npz: missing key\(s\) x_test, y_test, x_train, y_train"):
        read_cifar10_lossless_npz(bad, "test")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:200])  # a cut download: the zip directory is gone
    with pytest.raises(DataError, match=r"truncated\.npz: cannot read npz"):
        read_cifar10_lossless_npz(truncated, "test")


def test_digits_split_is_fixed() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape == (1438, 1, 8, 8) and test.images.shape == (359, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255
    assert sorted(set(train.labels.tolist())) == list(range(10))
    # Disjoint: no image of the test split occurs in the training split (digits has a few exact duplicates,
    # so compare the original row indices through the split function instead).
    tr, te = train_val_split(1797, val_fraction=0.2, seed=0)
    assert set(tr.tolist()).isdisjoint(te.tolist()) and len(tr) + len(te) == 1797
    again = load_dataset("digits", "test", use_cache=False)
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_unrecognised_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt: unrecognised data file"):
        load_dataset(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="unrecognised data set folder"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="split must be"):
        load_dataset("digits", "val")


# ------------------------------------------------------------------------------------------- image folders


def test_image_folder_cached_and_streamed(tmp_path: Path) -> None:
    train_imgs = write_image_folder(tmp_path / "root" / "train", ["b", "a"], 3)
    write_image_folder(tmp_path / "root" / "test", ["b", "a"], 1)
    assert detect_format(tmp_path / "root")[0] == "image-folder"
    ds = load_dataset(tmp_path / "root", "train")
    assert ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(ds.images.numpy(), train_imgs)  # PNG is lossless
    stream = load_dataset(tmp_path / "root", "train", stream=True)
    assert isinstance(stream, ImageFolderStream) and len(stream) == 6
    img, label = stream[4]
    assert label == 1 and torch.equal(img, ds.images[4])

    loader = folder_loader(stream, 4, train=True, size=4, resize_size=5, workers=0, seed=3)
    loader.set_epoch(0)
    batches = list(loader)
    assert [tuple(b[0].shape) for b in batches] == [(4, 3, 4, 4), (2, 3, 4, 4)]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == [0, 0, 0, 1, 1, 1]
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    # A worker process decodes and augments the same items identically (per-item seeding, not per worker).
    with_worker = folder_loader(stream, 4, train=True, size=4, resize_size=5, workers=1, seed=3)
    with_worker.set_epoch(0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, with_worker))
    with_worker.set_epoch(1)
    assert not torch.equal(next(iter(with_worker))[0], batches[0][0])


def test_image_folder_errors(tmp_path: Path) -> None:
    root = tmp_path / "f"
    with pytest.raises(DataError, match="image folder not found"):
        ImageFolderStream(tmp_path / "r" / "x")
    write_image_folder(root, ["a", "b"], 2, fmt="JPEG")
    (root / "c").mkdir()
    with pytest.raises(DataError, match=r"[/\\]c: empty class folder"):
        ImageFolderStream(root)
    (root / "c").rmdir()
    (root / "b" / "0001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"0001\.jpg: unreadable image"):
        load_image_folder(root)
    stream = ImageFolderStream(root)
    assert stream[0][0].shape == (3, 6, 5)
    with pytest.raises(DataError, match=r"b[/\\]0001\.jpg: unreadable image"):
        stream[3]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderStream(empty)


# ------------------------------------------------------------------------------------------- tarball


def test_jpeg_tarball_official_order_and_cache(tmp_path: Path, tmp_cache: Path) -> None:
    tar_path, expected = write_tarball(tmp_path / "jpeg")
    assert detect_format(tmp_path / "jpeg") == ("jpeg-tarball", tar_path)
    got = read_jpeg_tarball(tar_path)
    for split in ("train", "test"):
        ds = got[split]
        assert ds.classes == ["cat", "dog", "emu"]
        assert ds.labels.tolist() == expected[split]["labels"]
        centre = ds.images[:, :, 4, 4].to(torch.int64)
        assert (centre - torch.tensor(expected[split]["values"])[:, None]).abs().max() <= 3
    entries = sorted(tmp_cache.glob("jpegtar-*.npz"))
    assert len(entries) == 2
    # Warm: served from the cache entry; the key follows size and mtime, so touching the tarball forces a
    # fresh decode and a new entry.
    warm = read_jpeg_tarball(tar_path, ("test",))["test"]
    assert torch.equal(warm.images, got["test"].images) and warm.classes == got["test"].classes
    os.utime(tar_path, ns=(time.time_ns(), time.time_ns() + 10**9))
    read_jpeg_tarball(tar_path, ("test",))
    assert len(sorted(tmp_cache.glob("jpegtar-*.npz"))) == 3
    assert not list(tmp_cache.glob("*.tmp"))


def test_jpeg_tarball_cache_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARE_CACHE", "off")
    assert disk_cache.cache_dir() is None
    tar_path, expected = write_tarball(tmp_path / "jpeg")
    ds = load_dataset(tar_path, "test", use_cache=False)
    assert ds.labels.tolist() == expected["test"]["labels"]


def test_jpeg_tarball_corrupt_inputs(tmp_path: Path, tmp_cache: Path) -> None:
    tar_path, _ = write_tarball(tmp_path / "a", corrupt="test/dog/0001.jpg")
    with pytest.raises(DataError, match=r"images\.tar\.gz:test/dog/0001\.jpg: unreadable image"):
        read_jpeg_tarball(tar_path, ("test",))
    tar_path, _ = write_tarball(tmp_path / "b", bad_label=True)
    with pytest.raises(
        DataError, match=r"test_official_order\.csv: label .* disagrees with its class folder"
    ):
        read_jpeg_tarball(tar_path, ("test",))
    tar_path, _ = write_tarball(tmp_path / "c")
    tar_path.write_bytes(tar_path.read_bytes()[:300])
    with pytest.raises(DataError, match=r"images\.tar\.gz: corrupt or truncated tarball"):
        read_jpeg_tarball(tar_path, ("train",))
    assert not list(tmp_cache.glob("jpegtar-*.npz"))


# ------------------------------------------------------------------------------------------- transforms


def test_random_crop_flip_properties() -> None:
    gen = seeded_generator(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), generator=gen, dtype=torch.uint8)
    out = random_crop_flip(images, seeded_generator(1), padding=0)
    assert out.shape == images.shape and out.dtype == torch.uint8
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 10 < int(mirrored.sum()) < 54  # flips really happen, about half the time

    ones = torch.full((256, 1, 6, 6), 255, dtype=torch.uint8)
    cropped = random_crop_flip(ones, seeded_generator(2), padding=4, flip=False)
    zero_frac = (cropped == 0).float().mean().item()
    assert 0.3 < zero_frac < 0.8  # padding shows up as zeros
    assert set(cropped.unique().tolist()) == {0, 255}
    # Every output is an exact window of the zero-padded input (reference: explicit slicing).
    padded = torch.nn.functional.pad(ones[:1], (4, 4, 4, 4))
    windows = {padded[0, 0, r : r + 6, c : c + 6].numpy().tobytes() for r in range(9) for c in range(9)}
    assert all(img[0].numpy().tobytes() in windows for img in cropped)

    a = random_crop_flip(images, seeded_generator(5))
    b = random_crop_flip(images, seeded_generator(5))
    c = random_crop_flip(images, seeded_generator(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_crop_matches_reference_loop() -> None:
    images = torch.randint(0, 256, (16, 3, 5, 7), generator=seeded_generator(9), dtype=torch.uint8)
    gen_a, gen_b = seeded_generator(4), seeded_generator(4)
    out = random_crop_flip(images, gen_a, padding=2)
    offsets = torch.randint(0, 5, (16, 2), generator=gen_b)
    flips = torch.rand(16, generator=gen_b) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(16):
        ref = padded[i, :, offsets[i, 0] : offsets[i, 0] + 5, offsets[i, 1] : offsets[i, 1] + 7]
        if flips[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_normalisation_and_resizing() -> None:
    x = torch.tensor([[[[0, 255]], [[255, 0]], [[128, 128]]]], dtype=torch.uint8)
    y = to_float(x, "cifar")
    assert y.dtype == torch.float32
    assert y[0, 0, 0, 0].item() == pytest.approx((0 - 0.4914) / 0.2023)
    assert y[0, 1, 0, 0].item() == pytest.approx((1 - 0.4822) / 0.1994)
    assert torch.allclose(to_float(x, "none"), x.float() / 255)
    with pytest.raises(ConfigError, match="1 values"):
        to_float(x, "mnist")
    with pytest.raises(ConfigError, match="unknown normalization"):
        to_float(x, "imagenette")

    img = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    assert resize(img, 20).shape == (3, 20, 30)
    assert center_crop(resize(img, 20), 16).shape == (3, 16, 16)
    assert torch.equal(center_crop(img, 10), img[:, 15:25, 25:35])
    rrc = random_resized_crop(img, 24, seeded_generator(0))
    assert rrc.shape == (3, 24, 24) and rrc.dtype == torch.float32
    flat = torch.full((3, 40, 60), 77, dtype=torch.uint8)
    assert torch.allclose(random_resized_crop(flat, 24, seeded_generator(1)), torch.full((3, 24, 24), 77.0))

    tf = ImageNetTransform(train=True, size=16, resize_size=20, normalization="imagenet", seed=1)
    assert torch.equal(tf(img, 3, 0), tf(img, 3, 0))
    assert not torch.equal(tf(img, 3, 0), tf(img, 3, 1))
    ev = ImageNetTransform(train=False, size=16, resize_size=20)
    assert ev(img, 0, 0).shape == (3, 16, 16) and torch.equal(ev(img, 0, 0), ev(img, 5, 9))


# ------------------------------------------------------------------------------------- splits, calibration


def test_train_val_split() -> None:
    tr, va = train_val_split(1000, val_fraction=0.1, seed=3)
    assert len(va) == 100 and len(tr) == 900
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(1000))
    tr2, va2 = train_val_split(1000, val_size=100, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    _, va3 = train_val_split(1000, val_size=100, seed=4)
    assert not torch.equal(va, va3)
    for kwargs in ({}, {"val_fraction": 0.1, "val_size": 5}, {"val_fraction": 1.0}, {"val_size": 1000}):
        with pytest.raises(ConfigError):
            train_val_split(1000, **kwargs)


def _labelled_set(n: int = 50, side_px: int = 4) -> ImageDataset:
    # Each image is filled with its own index (+1, so no image is all zero) so batches can be checked.
    values = torch.arange(1, n + 1, dtype=torch.uint8)[:, None, None, None]
    images = values.expand(n, 3, side_px, side_px).contiguous()
    return ImageDataset(images, torch.arange(n) % 10, [str(i) for i in range(10)], "synthetic")


def _ids(x: torch.Tensor) -> torch.Tensor:
    """Sample index of each normalisation-free float batch (N, C, H, W) built by _labelled_set."""
    return (x.amax(dim=(1, 2, 3)) * 255).round().long() - 1


def test_calibration_batches_fixed_and_unaugmented() -> None:
    ds = _labelled_set()
    train_idx, _ = train_val_split(len(ds), val_size=10, seed=0)
    train = ds.subset(train_idx)
    a = calibration_batches(train, 25, 8, seed=1)
    b = calibration_batches(train, 25, 8, seed=1)
    c = calibration_batches(train, 25, 8, seed=2)
    assert [x.shape[0] for x, _ in a] == [8, 8, 8, 1]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    ids = []
    for x, y in a:
        raw = x * torch.tensor((0.2023, 0.1994, 0.2010)).view(1, 3, 1, 1) + torch.tensor(
            (0.4914, 0.4822, 0.4465)
        ).view(1, 3, 1, 1)
        # Not augmented: every pixel still holds the sample's value exactly.
        sample_id = _ids(raw)
        assert torch.allclose(raw * 255, (sample_id + 1).view(-1, 1, 1, 1).float().expand_as(raw), atol=1e-3)
        assert torch.equal(y, sample_id % 10)
        ids += sample_id.tolist()
    assert len(set(ids)) == 25 and set(ids) <= set(train_idx.tolist())
    with pytest.raises(DataError, match="only 40"):
        calibration_batches(train, 41, 8)


# ------------------------------------------------------------------------------------------- loaders


def test_in_memory_loader_epochs_and_shards() -> None:
    ds = _labelled_set(50)
    loader = InMemoryLoader(ds, 8, normalization="none", seed=7)
    assert len(loader) == 7
    loader.set_epoch(0)
    e0 = [(x.clone(), y.clone()) for x, y in loader]
    assert [x.shape[0] for x, _ in e0] == [8] * 6 + [2]
    ids0 = torch.cat([_ids(x) for x, _ in e0])
    assert sorted(ids0.tolist()) == list(range(50))
    assert torch.equal(torch.cat([y for _, y in e0]), ids0 % 10)
    e0_again = [x for x, _ in loader]
    assert all(torch.equal(a, b) for (a, _), b in zip(e0, e0_again))
    loader.set_epoch(1)
    ids1 = torch.cat([_ids(x) for x, _ in loader])
    assert not torch.equal(ids0, ids1)
    assert len(InMemoryLoader(ds, 8, drop_last=True)) == 6

    shards = []
    for rank in range(3):
        ld = InMemoryLoader(ds, 4, rank=rank, world_size=3, seed=7, normalization="none")
        ld.set_epoch(2)
        shards.append(torch.cat([_ids(x) for x, _ in ld]).tolist())
    assert [len(s) for s in shards] == [16, 16, 16]
    assert len(set(shards[0]) | set(shards[1]) | set(shards[2])) == 48  # disjoint
    ld.set_epoch(3)
    assert torch.cat([_ids(x) for x, _ in ld]).tolist() != shards[2]  # reshuffled per epoch
    with pytest.raises(ConfigError):
        shard_order(10, shuffle=True, seed=0, epoch=0, rank=3, world_size=3)


def test_in_memory_loader_augments_subsets() -> None:
    # 8x8 images: every pad-4 crop overlaps the image, so each crop still shows its sample's value.
    ds = _labelled_set(40, side_px=8)
    sub = ds.subset(torch.arange(10, 30))
    loader = InMemoryLoader(sub, 32, augment="cifar", normalization="none", seed=0)
    ((x, y),) = list(loader)
    assert x.shape == (20, 3, 8, 8)
    ids = _ids(x)
    assert sorted(ids.tolist()) == list(range(10, 30))
    assert torch.equal(y, ids % 10)
    values = set((x * 255).round().long().unique().tolist())
    assert 0 in values  # the zero padding entered some crops
    assert values - {0} == {i + 1 for i in ids.tolist()}
    with pytest.raises(ConfigError, match="unknown augment"):
        InMemoryLoader(sub, 4, augment="imagenet")


# ------------------------------------------------------------------------------------------- real data


@pytest.mark.shared
def test_real_lossless_npz_agrees_with_jpeg_csv_order() -> None:
    npz = shared_path("data", "cifar10_official_truncated", "cifar10_lossless_subset.npz")
    csv_path = shared_path("data", "cifar10_jpeg", "test_official_order.csv")
    test = load_dataset(npz, "test")
    assert test.images.shape == (932, 3, 32, 32)
    with open(csv_path, newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: int(r["index"]))
    assert test.labels.tolist() == [int(r["label"]) for r in rows[:932]]
    train = load_dataset(npz, "train")
    assert train.images.shape == (4660, 3, 32, 32)


@pytest.mark.shared
def test_real_mnist_shapes() -> None:
    root = shared_path("data", "mnist")
    train, test = load_dataset(root, "train"), load_dataset(root, "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.shape == (60000,) and test.labels.shape == (10000,)
    assert abs(train.images.float().mean().item() / 255 - 0.1307) < 1e-3
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.shared
def test_real_jpeg_tarball_official_order() -> None:
    tar_path = shared_path("data", "cifar10_jpeg", "CIFAR-10-images_YoongiKim_d7d0561.tar.gz")
    npz = np.load(shared_path("data", "cifar10_official_truncated", "cifar10_lossless_subset.npz"))
    got = read_jpeg_tarball(tar_path)  # cold ~6 s on one core; later runs read the on-disk cache
    train, test = got["train"], got["test"]
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert test.labels.tolist() == npz["y_test"].astype(int).tolist()
    assert train.labels.tolist() == npz["y_train"].reshape(-1).astype(int).tolist()
    assert train.classes == CIFAR_NAMES
    # Pixels, not just labels, follow the official order: JPEG vs lossless PSNR about 30 dB when aligned.
    lossless = torch.from_numpy(npz["x_test"]).permute(0, 3, 1, 2).float()
    mse = (test.images[:932].float() - lossless).pow(2).mean(dim=(1, 2, 3))
    psnr_db = 10 * torch.log10(255.0**2 / mse)
    assert psnr_db.median().item() > 28.0
    lossless_b3 = torch.from_numpy(npz["x_train"][2]).permute(0, 3, 1, 2).float()
    mse_b3 = (train.images[20000:20932].float() - lossless_b3).pow(2).mean(dim=(1, 2, 3))
    assert (10 * torch.log10(255.0**2 / mse_b3)).median().item() > 28.0
