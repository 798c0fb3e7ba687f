"""The data-selection baselines SkMM is compared with: uniform, herding, k-center, leverage.

The baselines of Dong, Phan, Pan & Lei, "Sketchy Moment Matching", NeurIPS 2024 (their
synthetic experiment and the DeepCore suite), on the same representation as SkMM: each
example's random-target gradient over the fine-tuned layers (:mod:`fedleak.selection.gradients`),
unsketched unless ``sketch_dim`` is set.

* uniform: ``n`` examples uniformly without replacement (what plain FedAvg subsampling does).
* herding (Welling, ICML 2009; Chen, Welling & Smola, UAI 2010): greedily adds the example
  that keeps the selected mean closest to the full mean.
* k-center greedy (Sener & Savarese, ICLR 2018): from a random first example, adds the example
  farthest from those selected.
* ridge leverage scores (Alaoui & Mahoney, NeurIPS 2015): ``n`` examples sampled without
  replacement in proportion to ``g_i^T (G^T G + alpha I)^-1 g_i``, with ``alpha`` = ``ridge``
  times the mean squared row norm (the authors' notebook fixes ``alpha`` in absolute units).

What leaks: none of them sends anything beyond the model; the update is a function of the
chosen examples only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from fedleak.core import Batch, LossFn, Messages, Selection
from fedleak.selection import SELECTORS
from fedleak.selection.gradients import Budget, GradientOptions


def uniform(count: int, n: int, rng: torch.Generator) -> Tensor:
    """``n`` of ``range(count)`` uniformly without replacement."""
    return torch.randperm(count, generator=rng)[:n]


def herding(x: Tensor, n: int) -> Tensor:
    """Kernel herding on the rows of ``x``, deterministic (ties: the lowest index).

    Each step adds the row that brings the running sum closest to ``(t + 1)`` times the mean.
    """
    x = x.double()
    mean = x.mean(0)
    total = torch.zeros_like(mean)
    free = torch.ones(len(x), dtype=torch.bool)
    chosen = []
    for t in range(n):
        gap = ((total + x - (t + 1) * mean) ** 2).sum(1).masked_fill(~free, float("inf"))
        j = int(torch.argmin(gap))
        chosen.append(j)
        free[j] = False
        total = total + x[j]
    return torch.tensor(chosen, dtype=torch.int64)


def k_center(x: Tensor, n: int, rng: torch.Generator) -> Tensor:
    """Greedy k-center: a uniformly random first row, then each time the farthest row."""
    x = x.double()
    first = int(torch.randint(len(x), (1,), generator=rng))
    chosen = [first]
    distance = ((x - x[first]) ** 2).sum(1)
    for _ in range(n - 1):
        distance[chosen] = -1.0
        j = int(torch.argmax(distance))
        chosen.append(j)
        distance = torch.minimum(distance, ((x - x[j]) ** 2).sum(1))
    return torch.tensor(chosen, dtype=torch.int64)


def ridge_leverage(x: Tensor, ridge: float) -> Tensor:
    """Ridge leverage scores of the rows of ``x``; ``alpha = ridge * mean squared row norm``."""
    x = x.double()
    alpha = ridge * float((x * x).sum()) / len(x)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return (u**2 * (s**2 / (s**2 + alpha))).sum(1)


def leverage(x: Tensor, n: int, rng: torch.Generator, ridge: float = 1.0) -> Tensor:
    """``n`` rows sampled without replacement in proportion to their ridge leverage scores."""
    scores = ridge_leverage(x, ridge)
    scores = scores + 1e-12 * float(scores.max().clamp_min(1e-300))  # zero rows stay drawable
    return torch.multinomial(scores, n, replacement=False, generator=rng)


@SELECTORS.register("uniform")
@dataclass
class Uniform(Budget):
    """A uniformly random subset of the partition each round."""

    sends: ClassVar[dict[str, str]] = {}

    def select(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        instructions: Messages,
    ) -> Selection:
        """``size`` examples uniformly without replacement."""
        return Selection(uniform(len(data), self.size(len(data)), rng))


@dataclass
class Coreset(GradientOptions):
    """A baseline that picks its examples from their random-target gradients alone."""

    sends: ClassVar[dict[str, str]] = {}

    def select(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        instructions: Messages,
    ) -> Selection:
        """``size`` examples, as :meth:`choose` picks them from the gradients."""
        x = self.features(model, data, loss_fn, rng, instructions)
        return Selection(self.choose(x, self.size(len(data)), rng))

    def choose(self, x: Tensor, n: int, rng: torch.Generator) -> Tensor:
        """The indices of ``n`` rows of ``x``."""
        raise NotImplementedError


@SELECTORS.register("herding")
@dataclass
class Herding(Coreset):
    """Herding on the examples' random-target gradients: the selected mean tracks the full one."""

    def choose(self, x: Tensor, n: int, rng: torch.Generator) -> Tensor:
        """The herding order's first ``n`` rows."""
        return herding(x, n)


@SELECTORS.register("k_center")
@dataclass
class KCenter(Coreset):
    """Greedy k-center on the examples' random-target gradients (a covering coreset)."""

    def choose(self, x: Tensor, n: int, rng: torch.Generator) -> Tensor:
        """``n`` centres, farthest first."""
        return k_center(x, n, rng)


@SELECTORS.register("leverage")
@dataclass
class Leverage(Coreset):
    """Ridge leverage-score sampling on the examples' random-target gradients."""

    ridge: float = 1.0  # alpha relative to the mean squared gradient norm

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ridge < 0:
            raise ValueError(f"leverage: ridge must be >= 0, got {self.ridge}")

    def choose(self, x: Tensor, n: int, rng: torch.Generator) -> Tensor:
        """``n`` rows sampled by their ridge leverage."""
        return leverage(x, n, rng, self.ridge)
