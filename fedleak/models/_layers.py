"""Building blocks the model files share: option checks, activations, normalisation layers."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

from torch import nn

from fedleak.core import Task
from fedleak.registry import check_type

Norm = Literal["batch", "group", "none"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def check_options(plugin: str, options: object) -> None:
    """Check option types and ``Literal`` choices of a model built in code, not from a config."""
    hints = typing.get_type_hints(type(options))
    for field in dataclasses.fields(options):  # type: ignore[arg-type]
        check_type(getattr(options, field.name), hints[field.name], f"{plugin}: {field.name}")


def image_shape(plugin: str, task: Task) -> tuple[int, int, int]:
    """``task.input_shape`` as (C, H, W), or a ValueError for non-image tasks."""
    if len(task.input_shape) != 3:
        raise ValueError(f"{plugin}: needs image inputs (C, H, W), got {task.input_shape}")
    channels, height, width = task.input_shape
    return channels, height, width


def norm2d(kind: str, channels: int) -> nn.Module:
    """A 2-D normalisation layer; group norm uses up to 32 groups (Wu & He 2018)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)  # the group count must divide
    return nn.Identity()
