"""Generated class-conditional images, for tests and for runs at any scale without files.

Each class has a random smooth prototype (coarse noise, upsampled); an example is its class
prototype plus pixel noise, clamped to [0, 1].  The classes are therefore learnable, and the
images have the local structure image priors expect.  The data have their own ``seed``, so they
stay the same when the experiment seed changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch.nn import functional

from fedleak import seeding
from fedleak.core import Dataset, Task
from fedleak.data import DATASETS, _sources


@DATASETS.register("synthetic_images")
@dataclass
class SyntheticImages:
    """Random smooth class prototypes plus noise: learnable images of any size."""

    modality: ClassVar[str] = "image"

    examples: int = 256  # training-pool size
    test_examples: int = 64
    channels: int = 1
    size: int = 8  # images are size x size
    classes: int = 4
    noise: float = 0.15  # std of the pixel noise around a prototype (larger = harder)
    seed: int = 0  # the data's own seed, independent of the experiment seed

    def __post_init__(self) -> None:
        for name in ("examples", "test_examples", "channels", "size", "classes"):
            if (value := getattr(self, name)) < 1:
                raise ValueError(f"synthetic_images: {name} must be >= 1, got {value}")
        if self.noise < 0:
            raise ValueError(f"synthetic_images: noise must be >= 0, got {self.noise}")

    @property
    def generated_examples(self) -> int:
        """The pool plus the test set."""
        return self.examples + self.test_examples

    @property
    def task(self) -> Task:
        """The task; mean 0.5 and std 0.25 are a convention, not measured."""
        shape = (self.channels, self.size, self.size)
        return Task("image", shape, self.classes, (0.5,) * self.channels, (0.25,) * self.channels)

    def load(self) -> Dataset:
        """Draw prototypes, then the training pool and the test set from them."""
        rng = seeding.numpy_rng(self.seed, "synthetic_images")
        grid = max(2, self.size // 4)  # one random value per ~4x4 pixels: smooth, yet varied
        coarse = rng.random((self.classes, self.channels, grid, grid))
        prototypes = functional.interpolate(
            torch.from_numpy(coarse), size=(self.size, self.size), mode="bilinear"
        ).numpy()

        def draw(n: int) -> _sources.Pool:
            labels = rng.permutation(np.arange(n) % self.classes)  # balanced classes
            noise = self.noise * rng.standard_normal((n, *prototypes.shape[1:]))
            return np.clip(prototypes[labels] + noise, 0, 1).astype(np.float32), labels

        train, test = draw(self.examples), draw(self.test_examples)
        return _sources.pack(self.task, train, test)
