"""The LeNet-style CNN of "Deep Leakage from Gradients" (Zhu et al. 2019).

Three 5x5 convolutions of 12 channels (strides 2, 2, 1) with sigmoids and one linear layer.
Sigmoids are twice differentiable everywhere, which is why gradient matching (DLG) recovers
images from it so well; the original also draws every weight and bias from U(-0.5, 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from fedleak.core import Task
from fedleak.models import MODELS, _layers

STRIDES = (2, 2, 1)


@MODELS.register("lenet")
@dataclass
class LeNet:
    """DLG's LeNet: 3 sigmoid convolutions of 12 channels and a linear classifier."""

    activation: Literal["sigmoid", "relu"] = "sigmoid"
    init: Literal["dlg", "pytorch"] = "dlg"  # dlg: all weights ~ U(-0.5, 0.5) as in the paper

    def __post_init__(self) -> None:
        _layers.check_options("lenet", self)

    def __call__(self, task: Task) -> nn.Module:
        """The network for ``task``; the classifier's input size follows from the image size."""
        channels, height, width = _layers.image_shape("lenet", task)
        layers: list[nn.Module] = []
        for stride in STRIDES:
            layers += [
                nn.Conv2d(channels, 12, kernel_size=5, padding=2, stride=stride),
                _layers.ACTIVATIONS[self.activation](),
            ]
            channels = 12
            # a 5x5 kernel with padding 2: size -> ceil(size / stride)
            height, width = -(-height // stride), -(-width // stride)
        model = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(12 * height * width, task.num_classes)
        )
        if self.init == "dlg":
            for parameter in model.parameters():
                nn.init.uniform_(parameter, -0.5, 0.5)
        return model
