"""scikit-learn's bundled 8x8 digits: the default data source, offline and with no data root.

1,797 images are small enough that a full experiment (training, attacks, metrics) runs in
seconds on a CPU, which makes this the data set of tests, examples and quick sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedleak.core import Dataset, Task
from fedleak.data import DATASETS, _sources


@DATASETS.register("digits")
@dataclass
class Digits:
    """Handwritten digits, 8x8 grey, 10 classes (bundled with scikit-learn)."""

    modality: ClassVar[str] = "image"
    # mean and std of all 1,797 images after scaling to [0, 1], computed once
    task: ClassVar[Task] = Task("image", (1, 8, 8), 10, mean=(0.3053,), std=(0.3760,))

    test_fraction: float = 0.2  # share of the images held out as the test set

    def __post_init__(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"digits: test_fraction must be in (0, 1), got {self.test_fraction}")

    def load(self) -> Dataset:
        """The fixed split (it does not depend on the experiment seed)."""
        from sklearn.datasets import load_digits  # here: importing scikit-learn takes seconds

        digits = load_digits()
        pixels = (digits.images[:, None] / 16).astype(np.float32)  # values 0..16 -> [0, 1]
        train, test = _sources.split((pixels, digits.target), self.test_fraction, "digits")
        return _sources.pack(self.task, train, test)
