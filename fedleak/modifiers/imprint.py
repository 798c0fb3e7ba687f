"""The imprint block of "Robbing the Fed" (Fowl, Geiping, Czaja, Goldblum & Goldstein, ICLR 2022).

Threat model: a malicious server that changes the architecture.  :meth:`Imprint.architecture`
puts a block in front of the model's input::

    x -> x + back(relu(bins(flatten(x))))

``bins`` is a ``Linear(D, k)`` whose rows all measure one scalar statistic of the input, here
its brightness ``m(x) = mean(x)`` (of the normalised input), and whose biases are minus ``k``
bin edges ``e_0 < ... < e_{k-1}``: the quantiles ``i/k`` of a Gaussian fit ``N(mean, std²)`` of
the brightness over the data (``e_0`` is ``mean - 10 std``, so every example activates row 0).
Unit ``i`` fires for the examples with ``m(x) > e_i``, so consecutive rows differ by exactly
the examples whose brightness falls in ``(e_i, e_{i+1}]``, and ``back`` (every column the same
constant, so each example's upstream gradient is the same for all rows) maps the bins back to
the input so the rest of the model still sees its input (shifted by a brightness-dependent
constant).  One example alone in a bin is recovered exactly from a gradient (see
:mod:`fedleak.attacks.imprint`); the choice of ``std`` against the data's spread sets how many
examples share bins.

The block is ``imprint`` (children ``imprint.bins``, ``imprint.back``), and the original model
becomes ``model``: :func:`locate` finds the block in any model.  ``mean`` and ``std`` are the
server's guess of the brightness distribution, e.g. from public data of the same kind (of
normalised images: digits 0 ± 0.09, MNIST 0 ± 0.14, CIFAR-10 0.04 ± 0.51).

Secrets (tensors): ``imprint.edges`` (``[k]``, ascending) and ``imprint.direction`` (``[D]``,
the measurement's weights).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from statistics import NormalDist
from typing import ClassVar

import torch
from torch import Tensor, nn

from fedleak import seeding
from fedleak.core import Params, Secrets
from fedleak.modifiers import MODIFIERS
from fedleak.registry import ConfigError


class ImprintBlock(nn.Module):
    """``x + back(relu(bins(flatten(x))))``, shaped like its input."""

    def __init__(self, inputs: int, bins: int) -> None:
        super().__init__()
        self.bins = nn.Linear(inputs, bins)
        self.relu = nn.ReLU()
        self.back = nn.Linear(bins, inputs)

    def forward(self, x: Tensor) -> Tensor:
        """The input plus the (constant-column) image of its active bins."""
        if x[0].numel() != self.bins.in_features:
            raise ValueError(
                f"imprint: the block takes inputs of {self.bins.in_features} values, got "
                f"{tuple(x.shape[1:])}; set the modifier's input_shape to the data's shape"
            )
        return x + self.back(self.relu(self.bins(x.flatten(1)))).view_as(x)


def locate(model: nn.Module) -> str:
    """The name of the :class:`ImprintBlock` in ``model``; a ValueError if it has none."""
    found = [name for name, m in model.named_modules() if isinstance(m, ImprintBlock)]
    if len(found) != 1:
        raise ValueError(
            f"imprint: expected one imprint block in the model, found {len(found)}; build the "
            "model with the imprint modifier's architecture()"
        )
    return found[0]


@MODIFIERS.register("imprint")
@dataclass
class Imprint:
    """Insert an imprint block (brightness bins) in front of the model (Robbing the Fed)."""

    adversarial: ClassVar[bool] = True
    bins: int = 64  # k: examples are separated when no two share a bin
    mean: float = 0.0  # the server's guess of the mean brightness of the normalised inputs
    std: float = 0.5  # ... and of its standard deviation over the data
    input_shape: tuple[int, ...] = ()  # the model's input shape; () = read off a Linear first layer
    rounds: tuple[int, ...] = ()  # server rounds (1-based) to plant the block in; empty = all

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise ValueError(f"imprint: bins must be >= 2, got {self.bins}")
        if not (self.std > 0 and math.isfinite(self.std) and math.isfinite(self.mean)):
            raise ValueError(
                f"imprint: mean must be finite and std > 0, got mean={self.mean}, std={self.std}"
            )
        if any(s < 1 for s in self.input_shape):
            raise ValueError(f"imprint: input_shape must be positive, got {self.input_shape}")
        if any(r < 1 for r in self.rounds):
            raise ValueError(f"imprint: rounds must all be >= 1, got {self.rounds}")

    def applies_to(self, round: int) -> bool:
        """Whether the server plants the block before ``round``."""
        return not self.rounds or round in self.rounds

    def edges(self) -> Tensor:
        """The ``bins`` ascending edges: Gaussian quantiles ``i / bins``, the first far below."""
        normal = NormalDist(self.mean, self.std)
        inner = [normal.inv_cdf(i / self.bins) for i in range(1, self.bins)]
        return torch.tensor([self.mean - 10 * self.std, *inner], dtype=torch.float64)

    def architecture(self, model: nn.Module) -> nn.Module:
        """``Sequential(imprint=ImprintBlock, model=model)``, the block already planted."""
        inputs = math.prod(self.input_shape) if self.input_shape else _input_size(model)
        # Fixed seed: every node builds the same module (the planting below overwrites all of
        # it but back's bias; seeding.isolated restores the global RNG).
        with seeding.isolated(0, "imprint", inputs, self.bins):
            block = ImprintBlock(inputs, self.bins)
        wrapped = nn.Sequential(OrderedDict(imprint=block, model=model))
        state = {f"imprint.{k}": v for k, v in block.state_dict().items()}
        planted, _ = self(state, 0, torch.Generator())
        wrapped.load_state_dict({**wrapped.state_dict(), **planted})
        return wrapped

    def __call__(self, params: Params, round: int, rng: torch.Generator) -> tuple[Params, Secrets]:
        """Plant the brightness bins (deterministic: ``rng`` is not used)."""
        path = _block_path(params)
        weight = params[f"{path}.bins.weight"]
        bins, inputs = weight.shape
        if bins != self.bins:
            raise ValueError(
                f"imprint: the model's block has {bins} bins but bins = {self.bins}; build the "
                "model with this modifier's architecture()"
            )
        direction = torch.full((inputs,), 1 / inputs, dtype=torch.float64, device=weight.device)
        edges = self.edges().to(weight.device)
        planted = dict(params)
        planted[f"{path}.bins.weight"] = direction.expand(bins, inputs).to(weight.dtype).clone()
        planted[f"{path}.bins.bias"] = (-edges).to(weight.dtype)
        # Equal columns: every bin passes an example the same upstream gradient, which the
        # attack's differences of consecutive rows rely on.  1/bins keeps the shift of the
        # input ~ the bins' mean activation, rather than their sum.
        back = params[f"{path}.back.weight"]
        planted[f"{path}.back.weight"] = torch.full_like(back, 1 / bins)
        planted[f"{path}.back.bias"] = torch.zeros_like(params[f"{path}.back.bias"])
        secrets = {"imprint.edges": edges, "imprint.direction": direction}
        return planted, {k: v.to(weight.dtype) for k, v in secrets.items()}


def _input_size(model: nn.Module) -> int:
    """Values per input example, when the model's first layer is a Linear (after Flatten)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)), None)
    if isinstance(first, nn.Linear):
        return first.in_features
    raise ConfigError(
        "imprint: cannot infer the input size of a model whose first layer is not an "
        "nn.Linear; set input_shape (e.g. [1, 8, 8] for digits, [3, 32, 32] for CIFAR-10)"
    )


def _block_path(params: Params) -> str:
    """The imprint block's name in a state dict."""
    paths = [
        k.removesuffix(".bins.weight")
        for k in params
        if k.endswith(".bins.weight") and k.replace(".bins.weight", ".back.weight") in params
    ]
    if len(paths) != 1:
        raise ValueError(
            f"imprint: expected one imprint block (<path>.bins, <path>.back) in the parameters, "
            f"found {len(paths)}; build the model with this modifier's architecture()"
        )
    return paths[0]
