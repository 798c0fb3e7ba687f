"""mnist and cifar10: real files from a data root, tiny fake files, and every error path."""

import gzip
import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedleak.data import DATASETS, _sources, cifar10, mnist

DATA_ROOT = Path(
    os.environ.get(
        "FEDLEAK_DATA_ROOT", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    )
).resolve()
needs_mnist = pytest.mark.skipif(
    not (DATA_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"no MNIST files in {DATA_ROOT} (set FEDLEAK_DATA_ROOT)",
)
needs_cifar = pytest.mark.skipif(
    not (DATA_ROOT / "cifar10_test_first512.npz").is_file(),
    reason=f"no cifar10_test_first512.npz in {DATA_ROOT} (set FEDLEAK_DATA_ROOT)",
)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, 8, array.ndim, *array.shape)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as file:
        file.write(header + array.tobytes())


# --- real data -------------------------------------------------------------------------------


@needs_mnist
def test_mnist_raw_test_split_is_the_official_one():
    train, test = mnist.read(mnist.search_dirs(str(DATA_ROOT)))
    assert train is None
    images, labels = test
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == np.uint8
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(labels).tolist()[:3] == [980, 1135, 1032]


@needs_mnist
def test_mnist_splits_lone_test_files_and_says_so(caplog):
    with caplog.at_level(logging.INFO):
        data = DATASETS.build({"name": "mnist", "root": str(DATA_ROOT), "limit": 100}).load()
    assert "only the test split" in caplog.text
    assert len(data.train) == 100 and len(data.test) == 2_000
    assert data.train.inputs.shape[1:] == (1, 28, 28)
    pixels = data.task.to_pixels(data.test.inputs)
    assert pixels.min() == 0 and torch.isclose(pixels.max(), torch.tensor(1.0))
    full = DATASETS.build({"name": "mnist", "root": str(DATA_ROOT)}).load()
    assert len(full.train) == 8_000
    assert torch.equal(full.train.inputs[:100], data.train.inputs)  # limit keeps the first N


@needs_cifar
def test_cifar10_raw_npz_keeps_the_official_order():
    train, test = cifar10.read(DATA_ROOT)
    assert train is None
    images, labels = test
    assert images.shape == (512, 3, 32, 32) and images.dtype == np.uint8
    assert labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


@needs_cifar
def test_cifar10_loads_and_normalises():
    data = DATASETS.build({"name": "cifar10", "root": str(DATA_ROOT)}).load()
    assert len(data.train) + len(data.test) == 512 and len(data.test) == round(512 * 0.2)
    assert data.train.inputs.shape[1:] == (3, 32, 32)
    assert data.train.inputs.mean(dim=(0, 2, 3)).abs().max() < 0.15  # the CIFAR mean/std fit
    pixels = data.task.to_pixels(data.train.inputs)
    assert pixels.min() >= 0 and pixels.max() <= 1


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_empty_root_is_a_value_error(name):
    with pytest.raises(ValueError, match=f"{name}: set data.root to a folder"):
        DATASETS[name]()


def test_mnist_missing_files_name_every_place_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        DATASETS.build({"name": "mnist", "root": str(tmp_path)}).load()
    message = str(error.value)
    for place in (tmp_path, tmp_path / "MNIST" / "raw", tmp_path / "raw"):
        assert str(place) in message
    assert "data.root=DIR" in message and "download = true" in message


def test_cifar10_missing_files_name_every_place_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        DATASETS.build({"name": "cifar10", "root": str(tmp_path / "nowhere")}).load()
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in str(error.value)
    assert "data.root=DIR" in str(error.value)


def test_download_without_torchvision_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torchvision", None)  # import fails
    with pytest.raises(ImportError, match=r'pip install "fedleak\[vision\]"'):
        DATASETS.build({"name": "mnist", "root": str(tmp_path), "download": True}).load()


@pytest.mark.parametrize("option", [{"test_fraction": 0.0}, {"limit": -1}])
def test_file_source_options_are_checked(option):
    with pytest.raises(ValueError, match=r"cifar10: (test_fraction|limit) must be"):
        DATASETS.build({"name": "cifar10", "root": "x", **option})


# --- fake files: every format and layout -----------------------------------------------------


def test_mnist_uses_both_splits_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n, suffix in (("train", 30, ".gz"), ("t10k", 10, "")):
        images = rng.integers(0, 256, (n, 28, 28), np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8) % 10)
    data = DATASETS.build({"name": "mnist", "root": str(tmp_path), "limit": 25}).load()
    assert len(data.train) == 25 and len(data.test) == 10  # no split: test is the t10k file
    assert data.test.labels.tolist() == list(range(10))


def test_idx_reader_rejects_other_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        _sources.read_idx(tmp_path / "bad")


def test_cifar10_reads_the_official_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        data = np.full((4, 3072), i, np.uint8)
        data[:, 1024:] = 200  # channels 1 and 2: CHW order means the first 1024 bytes are red
        batch = {b"data": data, b"labels": [i] * 4}
        (folder / name).write_bytes(pickle.dumps(batch))
    np.savez(tmp_path / "cifar10_other.npz", images=np.zeros((1, 32, 32, 3), np.uint8), labels=[0])
    train, test = cifar10.read(tmp_path)  # the official batches win over the npz
    assert train[0].shape == (20, 3, 32, 32) and train[1].tolist() == sorted([0, 1, 2, 3, 4] * 4)
    assert (train[0][:, 0] == train[1][:, None, None]).all() and (train[0][:, 1:] == 200).all()
    assert test[1].tolist() == [5] * 4


def test_cifar10_npz_pair_and_ambiguity(tmp_path):
    def save(name, n, label):
        images = np.zeros((n, 32, 32, 3), np.uint8)
        images[..., 2] = 255  # HWC blue channel must become channel 2
        np.savez(tmp_path / name, images=images, labels=np.full(n, label))

    save("cifar10_train.npz", 6, 1)
    save("cifar10_test.npz", 3, 2)
    data = DATASETS.build({"name": "cifar10", "root": str(tmp_path)}).load()
    assert len(data.train) == 6 and data.test.labels.tolist() == [2, 2, 2]
    assert torch.allclose(data.task.to_pixels(data.train.inputs)[:, 2], torch.tensor(1.0))
    save("cifar10_extra.npz", 2, 0)
    save("cifar10_extra_test.npz", 2, 0)
    with pytest.raises(ValueError, match="cannot tell train from test"):
        cifar10.read(tmp_path)
