"""An MLP encoder with a SimCLR projector and a linear classifier reading the projector output.

For the contrastive client objective (:mod:`fedleak.training.contrastive`; Zhang, Wang, Cui,
Pan, Lei, Jegelka & Wang, "Beyond Interpretability: The Gains of Feature Monosemanticity on
Model Robustness", ICLR 2025, after Wang et al.'s non-negative contrastive learning, ICLR 2024).
``embed(x)`` is the projector output ``z`` the contrastive loss reads; with
``nonnegative = true`` it passes through a ReLU (NCL), so the features are non-negative and, the
paper finds, sparse and class-aligned (monosemantic).  The classifier ``head`` reads ``z`` and is
trained by the trainer on detached features (solo-learn's online linear probe), so the model's
logits are a meaningful federated test accuracy and the server sees a classifier update.

Departures: the paper uses a ResNet-18 and reads the probe off the backbone; here the encoder is
an MLP (CPU scale) and the head reads the projector output, the representation whose
monosemanticity is measured — which is also what a server's label and feature attacks read.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from torch import Tensor, nn

from fedleak.core import Task
from fedleak.models import MODELS, _layers


class ContrastiveNet(nn.Module):
    """``head(z)`` with ``z = projector(encoder(x))``, ReLU'd when ``nonnegative``."""

    def __init__(
        self, encoder: nn.Module, projector: nn.Module, width: int, classes: int, nonnegative: bool
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.nonnegative = nonnegative
        self.head = nn.Linear(width, classes)

    def embed(self, inputs: Tensor) -> Tensor:
        """The projector output ``z`` (non-negative for NCL): what the contrastive loss reads."""
        z = self.projector(self.encoder(inputs))
        return nn.functional.relu(z) if self.nonnegative else z

    def forward(self, inputs: Tensor) -> Tensor:
        """Class logits of the projector output."""
        return self.head(self.embed(inputs))


@MODELS.register("contrastive_mlp")
@dataclass
class ContrastiveMLP:
    """MLP encoder -> two-layer projector (ReLU between) -> [ReLU] -> linear classifier."""

    hidden: tuple[int, ...] = (256, 256)  # encoder widths
    projector: tuple[int, int] = (256, 128)  # projector hidden width and output (feature) width
    nonnegative: bool = False  # ReLU on the projector output: non-negative contrastive learning

    def __post_init__(self) -> None:
        _layers.check_options("contrastive_mlp", self)
        if not self.hidden or any(width < 1 for width in self.hidden):
            raise ValueError(
                f"contrastive_mlp: hidden needs at least one width >= 1, got {self.hidden}"
            )
        if len(self.projector) != 2 or any(width < 1 for width in self.projector):
            raise ValueError(
                "contrastive_mlp: projector is [hidden width, output width], both >= 1, got "
                f"{self.projector}"
            )

    def __call__(self, task: Task) -> nn.Module:
        """The network for ``task``'s input size and classes."""
        widths = (math.prod(task.input_shape), *self.hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for inputs, outputs in itertools.pairwise(widths):
            layers += [nn.Linear(inputs, outputs), nn.ReLU()]
        inner, out = self.projector
        projector = nn.Sequential(nn.Linear(widths[-1], inner), nn.ReLU(), nn.Linear(inner, out))
        return ContrastiveNet(
            nn.Sequential(*layers), projector, out, task.num_classes, self.nonnegative
        )
