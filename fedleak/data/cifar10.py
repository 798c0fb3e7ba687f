"""CIFAR-10 from a data root: torchvision's pickled batches, or ``cifar10*.npz`` arrays.

The ``.npz`` form (``images`` uint8 [N, 32, 32, 3], ``labels``) is how small, checked subsets
are shared; the pickled batches are the official release, which ``download = true`` fetches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from fedleak.core import Dataset, Task
from fedleak.data import DATASETS, _sources

FILES = "CIFAR-10 files"
BATCHES = "cifar-10-batches-py"  # torchvision's folder of the official pickles


@DATASETS.register("cifar10")
@dataclass
class CIFAR10:
    """CIFAR-10 natural images, 32x32 colour, 10 classes (read from a data root)."""

    modality: ClassVar[str] = "image"
    task: ClassVar[Task] = Task(
        "image", (3, 32, 32), 10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
    )

    root: str = ""  # folder with cifar10*.npz files or cifar-10-batches-py/
    download: bool = False  # fetch the official batches with torchvision when incomplete
    test_fraction: float = 0.2  # used only when a single split is found
    limit: int = 0  # keep the first N training-pool examples (0 = all), for fast runs

    def __post_init__(self) -> None:
        _sources.check_options("cifar10", FILES, self.root, self.test_fraction, self.limit)

    def load(self) -> Dataset:
        """Read the splits found under ``root`` (downloading first if asked and incomplete)."""
        root = Path(self.root).expanduser()
        train, test = read(root)
        if (train is None or test is None) and self.download:
            _sources.download("cifar10", "CIFAR10", self.root)
            train, test = read(root)
        if train is None and test is None:
            looked = [f"{root / BATCHES} (data_batch_1..5, test_batch)", f"{root} (cifar10*.npz)"]
            raise _sources.not_found("cifar10", FILES, looked)
        return _sources.dataset("cifar10", self.task, train, test, self.test_fraction, self.limit)


def read(root: Path) -> tuple[_sources.Pool | None, _sources.Pool | None]:
    """The (train, test) pools in file order; None for a split that is not found.

    The official batches win over ``.npz`` files when both are present: they are the full set.
    """
    batches = root / BATCHES
    if (batches / "test_batch").is_file() or (batches / "data_batch_1").is_file():
        return read_batches(batches)
    files = sorted(root.glob("cifar10*.npz"))
    train = [f for f in files if "train" in f.name]
    test = [f for f in files if "test" in f.name and f not in train]
    if len(train) == 1 and len(test) == 1:
        return _sources.read_npz(train[0]), _sources.read_npz(test[0])
    if len(files) == 1:
        data = _sources.read_npz(files[0])
        return (data, None) if train else (None, data)
    if files:
        names = ", ".join(f.name for f in files)
        raise ValueError(
            f"cifar10: cannot tell train from test among {names} in {root}; keep one file, "
            "or exactly one whose name contains 'train' and one with 'test'"
        )
    return None, None


def read_batches(folder: Path) -> tuple[_sources.Pool | None, _sources.Pool | None]:
    """The official pickles; the train split only if all five batches are there."""
    names = [f"data_batch_{i}" for i in range(1, 6)]
    train = None
    if all((folder / name).is_file() for name in names):
        parts = [_sources.read_cifar_batch(folder / name) for name in names]
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = folder / "test_batch"
    return train, _sources.read_cifar_batch(test) if test.is_file() else None
