"""What the image data sources share: finding and reading files, splitting, normalising.

MNIST and CIFAR-10 differ only in where their files live and how they are encoded.  Searching a
data root, explaining what is missing, dividing a lone split into train and test, capping the
pool and turning pixels into normalised model inputs happen here, once, so all sources behave
alike.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from fedleak import seeding
from fedleak.core import Batch, Dataset, Task

log = logging.getLogger(__name__)

# images [N, C, H, W] (uint8 in 0..255, or float in [0, 1]) and int64 labels [N]
Pool = tuple[np.ndarray, np.ndarray]


def check_options(source: str, files: str, root: str, test_fraction: float, limit: int) -> None:
    """The option checks every file-backed source shares (called from ``__post_init__``)."""
    if not root:
        example = "e.g. -o data.root=../shared/data"
        raise ValueError(f"{source}: set data.root to a folder with the {files} ({example})")
    if not 0 < test_fraction < 1:
        raise ValueError(f"{source}: test_fraction must be in (0, 1), got {test_fraction}")
    if limit < 0:
        raise ValueError(f"{source}: limit must be >= 0 (0 = no limit), got {limit}")


def find(dirs: list[Path], name: str) -> Path | None:
    """The first ``name`` or ``name.gz`` in ``dirs``, or None."""
    candidates = (d / (name + suffix) for d in dirs for suffix in ("", ".gz"))
    return next((path for path in candidates if path.is_file()), None)


def not_found(source: str, files: str, looked: list[str]) -> FileNotFoundError:
    """The error for a data root without the files: every place looked in, and both fixes."""
    places = "\n".join(f"  {place}" for place in looked)
    return FileNotFoundError(
        f"{source}: found no {files}. Looked in:\n{places}\n"
        "Fix: point -o data.root=DIR at the folder that holds them, or set download = true to "
        'fetch them with torchvision (pip install "fedleak[vision]").'
    )


def download(source: str, dataset: str, root: str) -> None:
    """Fetch both splits with ``torchvision.datasets.<dataset>`` into ``root``."""
    try:
        import torchvision
    except ImportError:
        raise ImportError(
            f'{source}: download = true needs torchvision: pip install "fedleak[vision]"'
        ) from None
    for train in (True, False):
        getattr(torchvision.datasets, dataset)(root, train=train, download=True)


def pool(images: np.ndarray, labels: np.ndarray, where: Path) -> Pool:
    """Pair images with labels, checking that they match."""
    if len(images) != len(labels):
        raise ValueError(f"{where}: {len(images)} images but {len(labels)} labels")
    return images, np.asarray(labels, dtype=np.int64)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format), gzipped or not."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
        data = file.read()
    # magic number: two zero bytes, a type code (0x08 = uint8), the number of dimensions
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != np.prod(shape):
        raise ValueError(f"{path}: header says {shape}, but it holds {values.size} values")
    return values.reshape(shape)


def read_npz(path: Path) -> Pool:
    """An ``.npz`` with ``images`` uint8 [N, H, W, C] and ``labels``."""
    with np.load(path) as arrays:
        if not {"images", "labels"} <= set(arrays.files):
            raise ValueError(f"{path} needs arrays 'images' and 'labels', has {arrays.files}")
        return pool(arrays["images"].transpose(0, 3, 1, 2), arrays["labels"], path)


def read_cifar_batch(path: Path) -> Pool:
    """One pickled CIFAR batch: ``b"data"`` uint8 [N, 3072] in CHW order, ``b"labels"``."""
    with open(path, "rb") as file:
        batch = pickle.load(file, encoding="bytes")  # the official format is a pickle
    return pool(batch[b"data"].reshape(-1, 3, 32, 32), batch[b"labels"], path)


def split_indices(n: int, test_fraction: float, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices of a random split that depends on ``source`` alone.

    Not on the experiment seed: every run then scores on the same test set.
    """
    order = seeding.numpy_rng(0, f"{source}-split").permutation(n)
    n_test = min(max(round(n * test_fraction), 1), n - 1)
    return order[n_test:], order[:n_test]


def split(data: Pool, test_fraction: float, source: str) -> tuple[Pool, Pool]:
    """``data`` divided by :func:`split_indices`."""
    train, test = split_indices(len(data[1]), test_fraction, source)
    return (data[0][train], data[1][train]), (data[0][test], data[1][test])


def to_batch(data: Pool, task: Task) -> Batch:
    """Pixels -> float32 inputs normalised with the task's mean and std."""
    images, labels = data
    pixels = images.astype(np.float32) / (255 if images.dtype == np.uint8 else 1)
    shape = (1, -1, 1, 1)
    mean = torch.tensor(task.mean).view(shape)
    std = torch.tensor(task.std).view(shape)
    return Batch((torch.from_numpy(pixels) - mean) / std, torch.from_numpy(labels.astype(np.int64)))


def dataset(
    source: str,
    task: Task,
    train: Pool | None,
    test: Pool | None,
    test_fraction: float,
    limit: int,
) -> Dataset:
    """The :class:`Dataset` from the splits found (at least one), capped at ``limit``."""
    if train is None or test is None:
        only = train if test is None else test
        assert only is not None, "the caller raises not_found when nothing was found"
        log.info(
            "%s: found only the %s split (%d examples); dividing it into train and test with "
            "test_fraction=%s (set download = true for the full data set)",
            source,
            "train" if test is None else "test",
            len(only[1]),
            test_fraction,
        )
        train, test = split(only, test_fraction, source)
    if limit:
        train = (train[0][:limit], train[1][:limit])
    return pack(task, train, test)


def pack(task: Task, train: Pool, test: Pool) -> Dataset:
    """The :class:`Dataset` of two pools."""
    return Dataset(task, to_batch(train, task), to_batch(test, task))
