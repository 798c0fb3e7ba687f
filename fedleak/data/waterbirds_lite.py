"""Waterbirds-lite: digits pasted on scikit-image textures, the texture a spurious cue.

A CPU-sized stand-in for Waterbirds (Sagawa, Koh, Hashimoto & Liang, ICLR 2020), the benchmark
of Controllable Prompt Tuning (Phan, Wilson & Lei, ICML 2024; :mod:`fedleak.robust`), built
from data bundled with installed packages (research notes, training.md 4.6 and 8):

* the label ``y`` is whether scikit-learn's 8x8 digit is >= 5 (two classes);
* the spurious attribute ``a`` is the background: a random crop of one of scikit-image's
  ``grass``, ``brick`` or ``gravel`` textures, tinted (green, red, grey) like Waterbirds' land
  and water backgrounds, with the digit upsampled and pasted on it in white;
* in training ``a = y`` with probability ``correlation`` (else another texture, uniformly),
  so the background predicts the label almost as well as the digit and far more simply;
* in the test set every held-out digit appears once on every texture: balanced groups.

Groups are ``y * A + a`` (A textures): with grass and brick, (<5, grass) and (>=5, brick) are
the majority groups.  The group ids ride with the data set (:meth:`WaterbirdsLite.groups`), in
pool order; the client trainer :mod:`fedleak.training.cpt` reads them from ``Batch.groups``
when the runtime carries it.  Images are 3 x size x size, normalised with their own pool's mean
and standard deviation per channel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch
from scipy import ndimage

from fedleak import seeding
from fedleak.core import Dataset, Task
from fedleak.data import DATASETS, _sources

TINTS = {"grass": (0.35, 0.75, 0.3), "brick": (0.85, 0.4, 0.3), "gravel": (0.6, 0.6, 0.65)}


@dataclass(frozen=True)
class Pool:
    """Images [N, 3, S, S] in [0, 1], labels [N] and background attributes [N]."""

    images: np.ndarray
    labels: np.ndarray
    attributes: np.ndarray


@DATASETS.register("waterbirds_lite")
@dataclass
class WaterbirdsLite:
    """Digits < 5 vs >= 5 on textures (grass, brick, gravel) that follow the label in training."""

    modality: ClassVar[str] = "image"

    size: int = 16  # image side in pixels; the 8x8 digit is upsampled to it
    textures: tuple[str, ...] = ("grass", "brick")  # attribute a = position in this list
    correlation: float = 0.95  # P(a = y) in the training pool; the test set is balanced
    test_fraction: float = 0.2  # digits held out, each shown on every texture in the test set
    seed: int = 0  # the crops' and attributes' own seed, independent of the experiment seed

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 64:
            raise ValueError(f"waterbirds_lite: size must be in 8..64 pixels, got {self.size}")
        unknown = [t for t in self.textures if t not in TINTS]
        if (
            unknown
            or not 2 <= len(self.textures) <= len(TINTS)
            or len(set(self.textures)) < len(self.textures)
        ):
            raise ValueError(
                f"waterbirds_lite: textures must be 2 or 3 distinct names among {sorted(TINTS)}, "
                f"got {list(self.textures)}"
            )
        if not 0 <= self.correlation <= 1:
            raise ValueError(
                f"waterbirds_lite: correlation is P(texture = label), in [0, 1]; got "
                f"{self.correlation}"
            )
        if not 0 < self.test_fraction < 1:
            raise ValueError(
                f"waterbirds_lite: test_fraction must be in (0, 1), got {self.test_fraction}"
            )

    @property
    def num_groups(self) -> int:
        """Groups ``y * A + a``: 2 labels x A textures."""
        return 2 * len(self.textures)

    @cached_property
    def pools(self) -> tuple[Pool, Pool]:
        """The training pool (correlated) and the test set (every digit on every texture)."""
        from skimage import data as textures  # here: importing scikit-image takes seconds
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = (digits.images / 16).astype(np.float32)
        labels = (digits.target >= 5).astype(np.int64)
        (train_x, train_y), (test_x, test_y) = _sources.split(
            (pixels, labels), self.test_fraction, "waterbirds_lite"
        )
        sheets = [getattr(textures, name)().astype(np.float32) / 255 for name in self.textures]
        rng = seeding.numpy_rng(self.seed, "waterbirds_lite", "attributes")
        others = rng.integers(1, len(self.textures), len(train_y))  # offset to another texture
        keep = rng.random(len(train_y)) < self.correlation
        # labels 0 and 1 are their own majority textures; a third texture is never a majority
        train_a = np.where(keep, train_y, (train_y + others) % len(self.textures))
        test_a = np.repeat(np.arange(len(self.textures)), len(test_y))
        test_x, test_y = (
            np.tile(test_x, (len(self.textures), 1, 1)),
            np.tile(test_y, len(self.textures)),
        )
        return (
            Pool(self._paste(train_x, train_a, sheets, "train"), train_y, train_a),
            Pool(self._paste(test_x, test_a, sheets, "test"), test_y, test_a),
        )

    def _paste(
        self, digits: np.ndarray, attributes: np.ndarray, sheets: list[np.ndarray], split: str
    ) -> np.ndarray:
        """Each digit upsampled, in white, over a tinted random crop of its texture."""
        rng = seeding.numpy_rng(self.seed, "waterbirds_lite", "crops", split)
        side = self.size
        strokes = np.clip(ndimage.zoom(digits, (1, side / 8, side / 8), order=1), 0, 1)
        tints = np.array([TINTS[name] for name in self.textures], dtype=np.float32)
        out = np.empty((len(digits), 3, side, side), dtype=np.float32)
        for i, a in enumerate(attributes):
            sheet = sheets[a]
            row, col = (
                rng.integers(0, sheet.shape[0] - side),
                rng.integers(0, sheet.shape[1] - side),
            )
            crop = sheet[row : row + side, col : col + side]
            background = tints[a][:, None, None] * crop[None]
            out[i] = (1 - strokes[i]) * background + strokes[i]
        return out

    def groups(self, split: str = "train") -> np.ndarray:
        """Group ids ``y * A + a`` of the training pool or the test set, in data-set order."""
        pool = self.pools[{"train": 0, "test": 1}[split]]
        return pool.labels * len(self.textures) + pool.attributes

    def load(self) -> Dataset:
        """The training pool and the balanced test set, normalised with the pool's statistics.

        Both carry their group ids (``Batch.groups``): CPT's clients balance them, and the
        server's evaluation reports the worst group's accuracy.
        """
        train, test = self.pools
        mean = tuple(float(m) for m in train.images.mean(axis=(0, 2, 3)))
        std = tuple(float(s) for s in train.images.std(axis=(0, 2, 3)))
        task = Task("image", (3, self.size, self.size), 2, mean=mean, std=std)
        data = _sources.pack(task, (train.images, train.labels), (test.images, test.labels))
        return replace(
            data,
            train=replace(data.train, groups=torch.from_numpy(self.groups("train"))),
            test=replace(data.test, groups=torch.from_numpy(self.groups("test"))),
        )
