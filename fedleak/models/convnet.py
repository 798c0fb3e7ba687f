"""The ConvNet of "Inverting Gradients" (Geiping et al. 2020), the benchmark model of breaching.

Eight 3x3 conv-norm-ReLU blocks of widths w, 2w, 2w, 4w, 4w, 4w | pool | 4w, 4w | pool, then a
linear classifier on a 3x3 map.  The two 3x3 max-pools are the original's (32 -> 10 -> 3 on
CIFAR, 28 -> 9 -> 3 on MNIST); a pool is skipped on maps smaller than 9, and a final adaptive
pool brings any map to 3x3, so small inputs (8x8 digits) work and the classifier always has
36·w inputs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from torch import nn

from fedleak.core import Task
from fedleak.models import MODELS, _layers
from fedleak.models._layers import Norm

LAYERS = (1, 2, 2, 4, 4, 4, "pool", 4, 4, "pool")  # conv widths as multiples of width


@MODELS.register("convnet")
@dataclass
class ConvNet:
    """Geiping et al.'s ConvNet: 8 conv-norm-ReLU blocks, 2 max-pools, a linear classifier."""

    width: int = 16  # channels of the first block (the original uses 32 or 64; breaching 64)
    norm: Norm = "batch"
    # "default": PyTorch's (weight variance 1/(3 fan-in)), whose signal fades over the eight
    # ReLU blocks (output std 0.24 -> 0.015 at width 16, the gradient's energy in the last bias);
    # "kaiming": He et al.'s fan-in normal (variance 2/fan-in, zero biases), which keeps it.
    init: Literal["default", "kaiming"] = "default"

    def __post_init__(self) -> None:
        _layers.check_options("convnet", self)
        if self.width < 1:
            raise ValueError(f"convnet: width must be >= 1, got {self.width}")

    def __call__(self, task: Task) -> nn.Module:
        """The network for ``task``; only the pooling depends on the image size."""
        channels, height, width = _layers.image_shape("convnet", task)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        size, convs, pools = min(height, width), 0, 0
        for step in LAYERS:
            if step == "pool":
                if size >= 9:
                    layers[f"pool{pools}"], size = nn.MaxPool2d(3), size // 3
                pools += 1
                continue
            outputs = step * self.width
            layers[f"conv{convs}"] = nn.Conv2d(channels, outputs, kernel_size=3, padding=1)
            layers[f"norm{convs}"] = _layers.norm2d(self.norm, outputs)
            layers[f"relu{convs}"] = nn.ReLU()
            channels, convs = outputs, convs + 1
        layers["resize"] = nn.AdaptiveMaxPool2d(3)  # a no-op on the original's inputs
        layers["flatten"] = nn.Flatten()
        layers["linear"] = nn.Linear(channels * 9, task.num_classes)
        model = nn.Sequential(layers)
        if self.init == "kaiming":
            for module in model.modules():
                if isinstance(module, nn.Conv2d | nn.Linear):
                    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                    nn.init.zeros_(module.bias)
        return model
