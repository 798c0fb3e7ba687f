"""Data with domains: source domains as clients, and a target domain to adapt to.

For the approximately-shared-features strategy (Zhong, Pan & Lei, AISTATS 2025;
:mod:`fedleak.server.shared_features`), whose claim depends on how features' correlations with
the label vary across domains:

* ``digit_domains``: scikit-learn's bundled digits, each domain in its own style (rotation,
  contrast, pixel noise) with two planted cues: an *approximately shared* one (a marker whose
  position codes the label the same way in every domain, present with a probability that varies
  a little from domain to domain) and an *environmental* one (a marker whose label code is a
  permutation drawn per domain, so what it says about the label changes with the domain).  The
  digit's shape is the invariant feature.  The training pool stacks the source domains in
  order, so the ``blocks`` partition with ``clients = domains`` makes client k domain k; the
  test set is a new target domain (fresh style and environmental code).
* :class:`PlantedDomains`: the linear-Gaussian stand-in of the research notes -- features
  ``z ~ N(0, I)`` seen through an unknown rotation, with invariant, approximately shared and
  environmental coefficients -- for exact excess risks and for recovering the planted
  content directions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
from scipy import ndimage

from fedleak import seeding
from fedleak.core import Dataset, Task
from fedleak.data import DATASETS, PARTITIONS, _sources

# label codes: ten cells each, the shared code on the bottom-right edge, the environmental one
# on the top-left edge, away from the digit's strokes
SHARED_CELLS = [(7, c) for c in range(8)] + [(6, 7), (5, 7)]
ENV_CELLS = [(0, c) for c in range(8)] + [(1, 0), (2, 0)]
TARGET = -1  # the domain index of the target domain


@DATASETS.register("digit_domains")
@dataclass
class DigitDomains:
    """Digits in per-domain styles, with approximately shared and environmental label cues."""

    modality: ClassVar[str] = "image"
    task: ClassVar[Task] = Task("image", (1, 8, 8), 10, mean=(0.3053,), std=(0.3760,))

    domains: int = 8  # source domains, stacked in order in the training pool
    examples_per_domain: int = 200  # drawn per domain from the digits' training split
    shared_strength: float = 0.6  # mean probability that the shared cue is shown
    shared_spread: float = 0.15  # its standard deviation across domains
    env_strength: float = 0.9  # probability that the environmental cue is shown
    noise: float = (
        0.3  # largest pixel-noise std of a domain (each draws its own in [noise/2, noise])
    )
    test_fraction: float = 0.2  # the digits held out, shown in the target domain's style
    seed: int = 0  # the domains' own seed, independent of the experiment seed

    def __post_init__(self) -> None:
        if self.domains < 1 or self.examples_per_domain < 1:
            raise ValueError(
                f"digit_domains: domains and examples_per_domain must be >= 1, got "
                f"{self.domains} and {self.examples_per_domain}"
            )
        for name in ("shared_strength", "env_strength"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(
                    f"digit_domains: {name} is a probability, in [0, 1]; got {getattr(self, name)}"
                )
        if self.noise < 0:
            raise ValueError(f"digit_domains: noise must be >= 0, got {self.noise}")
        if self.shared_spread < 0:
            raise ValueError(f"digit_domains: shared_spread must be >= 0, got {self.shared_spread}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(
                f"digit_domains: test_fraction must be in (0, 1), got {self.test_fraction}"
            )

    def splits(self) -> tuple[_sources.Pool, _sources.Pool]:
        """The digits' fixed train and test splits, as [N, 1, 8, 8] floats in [0, 1]."""
        from sklearn.datasets import load_digits  # here: importing scikit-learn takes seconds

        digits = load_digits()
        pixels = (digits.images[:, None] / 16).astype(np.float32)
        return _sources.split((pixels, digits.target), self.test_fraction, "digit_domains")

    def style(self, domain: int, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``images`` in the style of source ``domain`` (0-based) or of the target (-1)."""
        rng = seeding.numpy_rng(self.seed, "digit_domains", domain)
        angle, gain = rng.uniform(-20, 20), rng.uniform(0.7, 1.0)
        noise = rng.uniform(self.noise / 2, self.noise)
        shared = float(np.clip(self.shared_strength + self.shared_spread * rng.normal(), 0, 1))
        code = rng.permutation(len(ENV_CELLS))  # this domain's environmental label code
        out = ndimage.rotate(images, angle, axes=(2, 3), reshape=False, order=1, mode="constant")
        out = gain * out + noise * rng.standard_normal(out.shape)
        show_shared = rng.random(len(images)) < shared
        show_env = rng.random(len(images)) < self.env_strength
        for i, label in enumerate(labels):
            if show_shared[i]:
                out[i, 0, SHARED_CELLS[label][0], SHARED_CELLS[label][1]] = 1.0
            if show_env[i]:
                row, col = ENV_CELLS[code[label]]
                out[i, 0, row, col] = 1.0
        return np.clip(out, 0, 1).astype(np.float32)

    @property
    def generated_examples(self) -> int:
        """The pool's examples (the target domain adds a share of the 1,797 digits)."""
        return self.domains * self.examples_per_domain

    def load(self) -> Dataset:
        """Source domains stacked in order (the pool), the target domain as the test set.

        The pool's group ids are the examples' source domains (``projectionnet`` trains on them).
        """
        (images, labels), (test_images, test_labels) = self.splits()
        pool_x, pool_y = [], []
        for k in range(self.domains):
            pick = seeding.numpy_rng(self.seed, "digit_domains", "pick", k).choice(
                len(labels),
                self.examples_per_domain,
                replace=self.examples_per_domain > len(labels),
            )
            pool_x.append(self.style(k, images[pick], labels[pick]))
            pool_y.append(labels[pick])
        train = np.concatenate(pool_x), np.concatenate(pool_y)
        test = self.style(TARGET, test_images, test_labels), test_labels
        data = _sources.pack(self.task, train, test)
        domains = torch.arange(self.domains).repeat_interleave(self.examples_per_domain)
        return replace(data, train=replace(data.train, groups=domains))


@PARTITIONS.register("blocks")
@dataclass
class Blocks:
    """Consecutive equal blocks of the pool, in order: with stacked domains, client k = domain k."""

    def __call__(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """Cut ``0..N-1`` into ``num_clients`` equal consecutive blocks."""
        if num_clients < 1 or len(labels) % num_clients:
            raise ValueError(
                f"blocks: the pool's {len(labels)} examples do not cut into {num_clients} equal "
                "blocks; set clients to the number of domains (or a divisor of the pool)"
            )
        return np.split(np.arange(len(labels)), num_clients)


@dataclass(frozen=True)
class PlantedDomains:
    """Linear-Gaussian domains: ``y = <beta_k, z> + noise``, observed as ``x = R z``."""

    invariant: int = 3  # coefficients equal in every domain
    shared: int = 5  # coefficients = a common mean + shared_std * N(0, 1) per domain
    environmental: int = 40  # coefficients N(0, env_std^2) per source, N(0, target_env_std^2)
    shared_std: float = 0.15
    env_std: float = 1.0
    target_env_std: float = 0.15
    noise_std: float = 1.0

    def __post_init__(self) -> None:
        if min(self.invariant, self.shared, self.environmental) < 0 or self.dim < 1:
            raise ValueError(
                "planted domains: feature counts must be >= 0 with at least one feature, got "
                f"{self.invariant}, {self.shared}, {self.environmental}"
            )
        for name in ("shared_std", "env_std", "target_env_std", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"planted domains: {name} must be >= 0, got {getattr(self, name)}")

    @property
    def dim(self) -> int:
        """Number of features."""
        return self.invariant + self.shared + self.environmental

    def world(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The unknown rotation ``R [d, d]`` and the common coefficients (invariant, shared)."""
        rotation, _ = np.linalg.qr(rng.standard_normal((self.dim, self.dim)))
        return rotation, rng.standard_normal(self.invariant + self.shared)

    def coefficients(
        self, world: tuple[np.ndarray, np.ndarray], rng: np.random.Generator, target: bool = False
    ) -> np.ndarray:
        """One domain's head in the observed coordinates, ``R beta``."""
        rotation, common = world
        beta = np.concatenate(
            [
                common[: self.invariant],
                common[self.invariant :] + self.shared_std * rng.standard_normal(self.shared),
                (self.target_env_std if target else self.env_std)
                * rng.standard_normal(self.environmental),
            ]
        )
        return rotation @ beta

    def sample(
        self, head: np.ndarray, n: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` examples ``(x [n, d], y [n])`` of the domain with this head (``x ~ N(0, I)``)."""
        x = rng.standard_normal((n, self.dim))
        return x, x @ head + self.noise_std * rng.standard_normal(n)

    def basis(self, world: tuple[np.ndarray, np.ndarray], part: str) -> np.ndarray:
        """The planted directions ``[d, k]`` of ``part``: "invariant" or "content"."""
        rotation, _ = world
        k = self.invariant if part == "invariant" else self.invariant + self.shared
        return rotation[:, :k]
