"""The CNN6 of "R-GAP: Recursive Gradient Attack on Privacy" (Zhu & Blaschko, ICLR 2021).

Six convolutions without pooling or normalisation, each followed by an invertible activation,
and a linear classifier: the kind of network R-GAP inverts in closed form
(:mod:`fedleak.attacks.rgap`).  Channels 12, 36, 36, 36, 64, 128; kernels 4, 3, 3, 3, 3, 3;
strides 2, 2, 1, 1, 2, 1; paddings 2, 1, 1, 1, 1, 1 (32 -> 17 -> 9 -> 9 -> 9 -> 5 -> 5 on
CIFAR-10, 8 -> 5 -> 3 -> 3 -> 3 -> 2 -> 2 on 8x8 digits).  The paper's network ends in one
logistic output; here the classifier has ``task.num_classes`` outputs for cross-entropy.

A file of its own rather than an option of :mod:`~fedleak.models.convnet` or
:mod:`~fedleak.models.lenet`: those pool or use ReLU, which R-GAP cannot invert, and their
layer shapes are not the ones whose rank the paper analyses.  Like the paper's code, the layers
have no biases by default (R-GAP then reads the classifier's input off the rank-1 structure of
its weight gradient); ``bias = true`` adds them.  Weights keep PyTorch's default init.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from torch import nn

from fedleak.core import Task
from fedleak.models import MODELS, _layers

# (output channels, kernel, stride, padding) per convolution, as in the paper's CNN6
CONVS = ((12, 4, 2, 2), (36, 3, 2, 1), (36, 3, 1, 1), (36, 3, 1, 1), (64, 3, 2, 1), (128, 3, 1, 1))
# Invertible activations only; LeakyReLU's slope 0.2 is the paper's.
ACTIVATIONS = {
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


@MODELS.register("rgap_cnn")
@dataclass
class RGAPCNN:
    """R-GAP's CNN6: 6 convolutions with invertible activations, no pooling, a linear head."""

    activation: Literal["leaky_relu", "sigmoid", "tanh"] = "leaky_relu"
    bias: bool = False  # the paper's layers have none

    def __post_init__(self) -> None:
        _layers.check_options("rgap_cnn", self)

    def __call__(self, task: Task) -> nn.Module:
        """The network for ``task``; the classifier's input size follows from the image size."""
        channels, height, width = _layers.image_shape("rgap_cnn", task)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (outputs, kernel, stride, padding) in enumerate(CONVS):
            layers[f"conv{i}"] = nn.Conv2d(
                channels, outputs, kernel, stride=stride, padding=padding, bias=self.bias
            )
            layers[f"act{i}"] = ACTIVATIONS[self.activation]()
            channels = outputs
            height = (height + 2 * padding - kernel) // stride + 1
            width = (width + 2 * padding - kernel) // stride + 1
        layers["flatten"] = nn.Flatten()
        layers["linear"] = nn.Linear(channels * height * width, task.num_classes, bias=self.bias)
        return nn.Sequential(layers)
