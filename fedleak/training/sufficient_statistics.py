"""Clients as tasks: local SGD, plus the sufficient statistics of a conjugate model of the data.

The client side of the ``meta_posterior`` server strategy (:mod:`fedleak.server.meta_posterior`;
Jeon, Lee, Lei & Van Roy, "An Information-Theoretic Analysis of In-Context Learning", ICML
2024).  Each client is a task ``theta_m`` drawn from a shared prior ``psi``; its tokens are

* ``bernoulli``: whether each of its labels is ``positive_class`` -- ``theta_m`` is the
  client's rate of that class, ``psi`` the population's;
* ``gaussian``: each example's input seen along ``dim`` public random directions (drawn from
  ``projection_seed``) -- ``theta_m`` is the client's mean input along them.

It sends the model's sufficient statistics, which make the server's posterior on ``psi``
exact: the count of positive labels and the number of examples, or ``(n I, sum of the
projected inputs)`` (a Gram matrix and a moment, as in linear regression with the unit
vectors as design).  What leaks: exactly what the client's data say about its own
``theta_m`` -- its label rate, or its mean input along the directions
(:meth:`fedleak.analysis.meta_learning.GaussianTasks.leakage` computes how much).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from fedleak import seeding
from fedleak.core import (
    Batch,
    GradientDefense,
    LossFn,
    Messages,
    TrainingDefense,
    TrainResult,
)
from fedleak.training import TRAINERS
from fedleak.training.sgd import SGD


def projection(dim: int, inputs: int, seed: int) -> Tensor:
    """The public directions ``[inputs, dim]`` (orthonormal columns), the same on every node."""
    gen = seeding.rng(seed, "sufficient_statistics")
    q, _ = torch.linalg.qr(torch.randn(inputs, dim, generator=gen, dtype=torch.float64))
    return q


def statistics(
    data: Batch, model: str, positive_class: int, dim: int, projection_seed: int
) -> dict[str, Tensor]:
    """The sufficient statistics of ``data`` under the conjugate ``model``."""
    if model == "bernoulli":
        ones = (data.labels == positive_class).sum().to(torch.float64)
        return {
            "count": ones,
            "tokens": torch.tensor(
                float(len(data)), dtype=torch.float64, device=data.labels.device
            ),
        }
    flat = data.inputs.reshape(len(data), -1).to(torch.float64)
    u = flat @ projection(dim, flat.shape[1], projection_seed).to(flat.device)
    gram = len(data) * torch.eye(dim, dtype=torch.float64, device=flat.device)
    return {"gram": gram, "moment": u.sum(0)}


@TRAINERS.register("sufficient_statistics")
@dataclass
class SufficientStatistics(SGD):
    """Local SGD, plus the sufficient statistics of the client's task under a conjugate model."""

    sends: ClassVar[dict[str, str]] = {
        "count": "bernoulli: how many of the client's labels are positive_class (its label rate)",
        "tokens": "bernoulli: how many examples the client holds",
        "gram": "gaussian: n I_dim, the client's example count (the design's Gram matrix)",
        "moment": "gaussian: the sum of the client's inputs along the public directions (its "
        "mean input, times n)",
    }

    model: Literal["bernoulli", "gaussian"] = "bernoulli"
    positive_class: int = 0  # bernoulli: the class whose rate is the client's parameter
    dim: int = 8  # gaussian: how many public directions
    projection_seed: int = 0  # gaussian: the directions' public seed

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.positive_class < 0:
            raise ValueError(
                f"sufficient_statistics: positive_class must be >= 0, got {self.positive_class}"
            )
        if self.dim < 1:
            raise ValueError(f"sufficient_statistics: dim must be >= 1, got {self.dim}")

    def check(self, setting) -> None:
        """The class exists and the directions fit the inputs."""
        super().check(setting)
        if self.model == "bernoulli" and self.positive_class >= setting.task.num_classes:
            raise ValueError(
                f"sufficient_statistics: positive_class = {self.positive_class}, but the task "
                f"has {setting.task.num_classes} classes (0..{setting.task.num_classes - 1})"
            )
        inputs = math.prod(setting.task.input_shape)
        if self.model == "gaussian" and self.dim > inputs:
            raise ValueError(
                f"sufficient_statistics: dim = {self.dim} directions in {inputs} input values; "
                f"choose dim <= {inputs}"
            )

    def fit(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        defenses: tuple[TrainingDefense | GradientDefense, ...] = (),
        instructions: Messages | None = None,
    ) -> TrainResult:
        """Train with local SGD; send the statistics of the whole partition."""
        stats = statistics(data, self.model, self.positive_class, self.dim, self.projection_seed)
        result = super().fit(model, data, loss_fn, rng, defenses, instructions)
        return replace(result, messages=stats)
