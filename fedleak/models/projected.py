"""An MLP whose classifier reads the features through a projector the server sets.

For the approximately-shared-features strategy (Zhong, Pan & Lei, "Bridging Domains with
Approximately Shared Features", AISTATS 2025; :mod:`fedleak.server.shared_features`): the
projector is a buffer of the global state, the identity until the server replaces it by the
projector onto the content (invariant plus approximately shared) feature directions, so that
every client, the server's evaluation and a target client fine-tuning the head all read the
same projected features.  ``features(x)`` gives the encoder's output before the projector.

``projectionnet`` is the paper's practical network, three learned linear projections of the
encoder's features (label-specific, shared, environmental) with a label head and a domain
head; its trainer is :class:`fedleak.training.shared_features.ProjectionNetTrainer`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fedleak.core import Task
from fedleak.models import MODELS, _layers


class Projected(nn.Module):
    """``head(encoder(x) @ projector)``; the projector is a buffer (sent, never trained)."""

    def __init__(self, encoder: nn.Module, width: int, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("projector", torch.eye(width))
        self.head = nn.Linear(width, classes)

    def features(self, inputs: Tensor) -> Tensor:
        """The encoder's features, before the projector."""
        return self.encoder(inputs)

    def forward(self, inputs: Tensor) -> Tensor:
        """Logits of the projected features."""
        return self.head(self.encoder(inputs) @ self.projector)


@MODELS.register("projected_mlp")
@dataclass
class ProjectedMLP:
    """An MLP encoder, a server-set feature projector, then a linear head."""

    hidden: tuple[int, ...] = (64,)  # encoder widths; the last one is the feature dimension
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"

    def __post_init__(self) -> None:
        _layers.check_options("projected_mlp", self)
        if not self.hidden or any(width < 1 for width in self.hidden):
            raise ValueError(
                f"projected_mlp: hidden needs at least one width >= 1 (the features), got "
                f"{self.hidden}"
            )

    def __call__(self, task: Task) -> nn.Module:
        """The network for ``task``'s input size and classes."""
        return Projected(*_encoder(task, self.hidden, self.activation), task.num_classes)


class ProjectionNet(nn.Module):
    """An encoder, then label-specific, shared and environmental projections of its features."""

    def __init__(self, encoder: nn.Module, width: int, classes: int, domains: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.project = nn.ModuleDict(
            {part: nn.Linear(width, width, bias=False) for part in ("label", "shared", "env")}
        )
        self.label_head = nn.Linear(2 * width, classes)
        self.domain_head = nn.Linear(2 * width, domains)

    def parts(self, inputs: Tensor) -> dict[str, Tensor]:
        """The three projections of the encoder's features."""
        h = self.encoder(inputs)
        return {part: proj(h) for part, proj in self.project.items()}

    def forward(self, inputs: Tensor) -> Tensor:
        """Label logits from the label-specific and shared projections."""
        parts = self.parts(inputs)
        return self.label_head(torch.cat([parts["label"], parts["shared"]], 1))


@MODELS.register("projectionnet")
@dataclass
class ProjectionNetModel:
    """ProjectionNet (Zhong et al.): label, shared and environmental projections of MLP features."""

    hidden: tuple[int, ...] = (64,)  # encoder widths; the last one is the feature dimension
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"
    domains: int = 8  # outputs of the domain head: the source domains' ids are 0..domains-1

    def __post_init__(self) -> None:
        _layers.check_options("projectionnet", self)
        if not self.hidden or any(width < 1 for width in self.hidden):
            raise ValueError(
                f"projectionnet: hidden needs at least one width >= 1 (the features), got "
                f"{self.hidden}"
            )
        if self.domains < 2:
            raise ValueError(f"projectionnet: domains must be >= 2, got {self.domains}")

    def __call__(self, task: Task) -> nn.Module:
        """The network for ``task``'s input size and classes."""
        encoder, width = _encoder(task, self.hidden, self.activation)
        return ProjectionNet(encoder, width, task.num_classes, self.domains)


def _encoder(task: Task, hidden: tuple[int, ...], activation: str) -> tuple[nn.Module, int]:
    """The MLP encoder of both networks, and its feature width."""
    widths = (math.prod(task.input_shape), *hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    for inputs, outputs in itertools.pairwise(widths):
        layers += [nn.Linear(inputs, outputs), _layers.ACTIVATIONS[activation]()]
    return nn.Sequential(*layers), widths[-1]
