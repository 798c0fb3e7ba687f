"""Quantization of the update: send each coordinate on a grid of ``2**bits`` levels per tensor.

Low-precision updates are a communication saving (QSGD: Alistarh, Grubic, Li, Tomioka & Vojnovic,
"QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS 2017) that
also discards information a reconstruction attack could use; it is one of the compression
defenses gradient-inversion studies evaluate, and Chen, Gürsoy & Lei ("Optimal Defenses Against
Gradient Reconstruction Attacks", arXiv 2411.03746) round gradients to a grid as one of theirs.

Rounding is stochastic by default, as in QSGD: a value between two levels goes to the upper one
with probability equal to its distance from the lower one (in steps), so the quantized update is
unbiased, E[Q(x)] = x, and FedAvg's average stays unbiased.  Deterministic rounding (to the
nearest level) is biased but adds no randomness.  The grid spans a tensor's [min, max]
(``grid = "minmax"``, 2**bits levels including both ends), or is symmetric around 0 with step
max|x| / (2**(bits-1) - 1) (``grid = "symmetric"``, 2**bits - 1 levels, 0 exact).  QSGD scales
by the L2 norm instead; these max-based grids are the common uniform quantizers and waste fewer
levels.

Threat model: the client rounds what it sends; the server sees the quantized update and the
grid (both ends are levels, so it can tell the grid from the update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedleak.core import Params
from fedleak.defenses import DEFENSES, _params


@DEFENSES.register("quantization")
@dataclass
class Quantization:
    """Round every update coordinate to a uniform per-tensor grid of ``2**bits`` levels."""

    bits: int = 8  # levels per tensor = 2**bits, from 2 to 16 bits
    stochastic: bool = True  # unbiased stochastic rounding (QSGD); False = round to nearest
    grid: Literal["minmax", "symmetric"] = "minmax"  # levels over [min, max], or ±max|x| with 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"quantization: bits must be in 2..16, got {self.bits}")
        if self.grid not in ("minmax", "symmetric"):
            raise ValueError(
                f"quantization: grid must be 'minmax' or 'symmetric', got {self.grid!r}"
            )

    def __call__(self, delta: Params, rng: torch.Generator) -> Params:
        """Return the quantized ``delta``; ``rng`` drives stochastic rounding, tensor by tensor."""
        return _params.map_floating(delta, lambda d: self._quantize(d, rng))

    def grid_of(self, tensor: torch.Tensor) -> tuple[float, float, int]:
        """``(lowest level, step, number of steps)`` of ``tensor``'s grid (step 0: constant)."""
        x = tensor.detach().double()
        if self.grid == "minmax":
            low, high, steps = float(x.min()), float(x.max()), 2**self.bits - 1
            return low, (high - low) / steps, steps
        half = 2 ** (self.bits - 1) - 1
        step = float(x.abs().max()) / half
        return -half * step, step, 2 * half

    def _quantize(self, tensor: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        if tensor.numel() == 0:
            return tensor
        low, step, steps = self.grid_of(tensor)
        if not step > 0:  # constant (minmax) or all-zero tensor: on its grid already; NaN: kept
            return tensor
        # Work in float64 on the CPU, where the generator lives: level indices up to 2**16 and
        # the rounding probabilities stay exact, whatever the update's dtype.
        levels = (tensor.detach().double().cpu() - low) / step
        if self.stochastic:
            lower = levels.floor()
            up = torch.rand(levels.shape, generator=rng, dtype=torch.float64) < levels - lower
            levels = lower + up.double()
        else:
            levels = levels.round()
        levels = levels.clamp(0, steps)  # float error must not step off either end of the grid
        return (low + levels * step).to(device=tensor.device, dtype=tensor.dtype)
