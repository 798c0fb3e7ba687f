"""MNIST from its original IDX files under a data root (torchvision's raw files work as they are).

Nothing is downloaded unless ``download = true``: experiments should run offline from a shared,
checked copy of the data.  When only the 10,000 test images are at hand (as in a small benchmark
copy), they are split into train and test so the source still works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fedleak.core import Dataset, Task
from fedleak.data import DATASETS, _sources

FILES = "MNIST IDX files"
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@DATASETS.register("mnist")
@dataclass
class MNIST:
    """MNIST handwritten digits, 28x28 grey, 10 classes (read from IDX files in a data root)."""

    modality: ClassVar[str] = "image"
    task: ClassVar[Task] = Task("image", (1, 28, 28), 10, mean=(0.1307,), std=(0.3081,))

    root: str = ""  # folder with the IDX files (also searched: MNIST/raw, raw)
    download: bool = False  # fetch the files with torchvision when the full set is missing
    test_fraction: float = 0.2  # used only when a single split is found
    limit: int = 0  # keep the first N training-pool examples (0 = all), for fast runs

    def __post_init__(self) -> None:
        _sources.check_options("mnist", FILES, self.root, self.test_fraction, self.limit)

    def load(self) -> Dataset:
        """Read the splits found under ``root`` (downloading first if asked and incomplete)."""
        dirs = search_dirs(self.root)
        train, test = read(dirs)
        if (train is None or test is None) and self.download:
            _sources.download("mnist", "MNIST", self.root)
            train, test = read(dirs)
        if train is None and test is None:
            wanted = ", ".join(f"{name}[.gz]" for pair in SPLITS.values() for name in pair)
            raise _sources.not_found("mnist", f"{FILES} ({wanted})", [str(d) for d in dirs])
        return _sources.dataset("mnist", self.task, train, test, self.test_fraction, self.limit)


def search_dirs(root: str) -> list[Path]:
    """The root itself, torchvision's layout, and a plain ``raw`` folder."""
    base = Path(root).expanduser()
    return [base, base / "MNIST" / "raw", base / "raw"]


def read(dirs: list[Path]) -> tuple[_sources.Pool | None, _sources.Pool | None]:
    """The (train, test) pools in file order; None for a split whose two files are not found."""

    def pair(images: str, labels: str) -> _sources.Pool | None:
        image_path, label_path = _sources.find(dirs, images), _sources.find(dirs, labels)
        if image_path is None or label_path is None:
            return None
        pixels = _sources.read_idx(image_path)[:, None]  # [N, 28, 28] -> [N, 1, 28, 28]
        return _sources.pool(pixels, _sources.read_idx(label_path), label_path)

    return pair(*SPLITS["train"]), pair(*SPLITS["test"])
