"""A fully connected network: the simplest model whose gradients reveal its inputs.

For a linear first layer the input is recoverable in closed form from one example's gradient,
which makes the MLP the baseline of analytic attacks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

from torch import nn

from fedleak.core import Task
from fedleak.models import MODELS, _layers


@MODELS.register("mlp")
@dataclass
class MLP:
    """Flatten, then hidden linear layers with an activation, then a linear classifier."""

    hidden: tuple[int, ...] = (128,)  # widths of the hidden layers; () is logistic regression
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"

    def __post_init__(self) -> None:
        _layers.check_options("mlp", self)
        if any(width < 1 for width in self.hidden):
            raise ValueError(f"mlp: hidden widths must be >= 1, got {self.hidden}")

    def __call__(self, task: Task) -> nn.Module:
        """The network for ``task``'s input size and classes."""
        widths = (math.prod(task.input_shape), *self.hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for inputs, outputs in itertools.pairwise(widths):
            layers += [nn.Linear(inputs, outputs), _layers.ACTIVATIONS[self.activation]()]
        return nn.Sequential(*layers, nn.Linear(widths[-1], task.num_classes))
