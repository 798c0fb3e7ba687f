"""ResNet-18 in its CIFAR form (He et al. 2016): the larger model of gradient-inversion studies.

The CIFAR variant replaces ImageNet's 7x7 stride-2 stem and max-pool with one 3x3 stride-1
convolution, so 32x32 inputs keep their resolution; global average pooling makes any input
size from 8x8 up work.  Initialisation follows torchvision (Kaiming normal, fan-out).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor, nn

from fedleak.core import Task
from fedleak.models import MODELS, _layers
from fedleak.models._layers import Norm

BLOCKS = (2, 2, 2, 2)  # basic blocks per stage: ResNet-18


@MODELS.register("resnet18")
@dataclass
class ResNet18:
    """ResNet-18, CIFAR variant: 3x3 stem, four stages of two basic blocks, average pool."""

    width: int = 64  # channels of the first stage; the stages have width × 1, 2, 4, 8
    norm: Norm = "batch"

    def __post_init__(self) -> None:
        _layers.check_options("resnet18", self)
        if self.width < 1:
            raise ValueError(f"resnet18: width must be >= 1, got {self.width}")

    def __call__(self, task: Task) -> nn.Module:
        """The network for ``task``'s channels and classes."""
        channels, _, _ = _layers.image_shape("resnet18", task)
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            stem=_conv(channels, self.width, 3, 1, self.norm),
            stem_norm=_layers.norm2d(self.norm, self.width),
            stem_relu=nn.ReLU(),
        )
        inputs = self.width
        for stage, blocks in enumerate(BLOCKS):
            outputs, stride, stage_blocks = self.width * 2**stage, 1 if stage == 0 else 2, []
            for _ in range(blocks):  # only a stage's first block changes the shape
                stage_blocks.append(_Block(inputs, outputs, stride, self.norm))
                inputs, stride = outputs, 1
            layers[f"stage{stage + 1}"] = nn.Sequential(*stage_blocks)
        layers["pool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["fc"] = nn.Linear(inputs, task.num_classes)
        model = nn.Sequential(layers)
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        return model


class _Block(nn.Module):
    """Basic residual block: two 3x3 convolutions, plus a 1x1 projection when the shape changes."""

    def __init__(self, inputs: int, outputs: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = _conv(inputs, outputs, 3, stride, norm)
        self.norm1 = _layers.norm2d(norm, outputs)
        self.conv2 = _conv(outputs, outputs, 3, 1, norm)
        self.norm2 = _layers.norm2d(norm, outputs)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                _conv(inputs, outputs, 1, stride, norm), _layers.norm2d(norm, outputs)
            )

    def forward(self, x: Tensor) -> Tensor:
        """``relu(branch(x) + shortcut(x))``."""
        branch = self.norm2(self.conv2(self.relu(self.norm1(self.conv1(x)))))
        return self.relu(branch + self.shortcut(x))


def _conv(inputs: int, outputs: int, kernel: int, stride: int, norm: str) -> nn.Conv2d:
    # a bias before a normalisation layer is cancelled by it; keep one only without norm
    return nn.Conv2d(
        inputs, outputs, kernel, stride=stride, padding=kernel // 2, bias=norm == "none"
    )
