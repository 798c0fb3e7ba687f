"""Additive noise on the update: the simplest (non-DP) perturbation defense.

Adding noise to the shared gradient is the defense Zhu et al. (DLG, NeurIPS 2019) evaluate
first: with enough variance it stops gradient inversion, at a cost in accuracy.  Noise added to
one update without clipping gives no differential-privacy guarantee (the update's sensitivity
is unbounded); pair it with ``clip`` for a Gaussian-mechanism-like update, or use DP-SGD.

Threat model: the client perturbs what it sends; the server sees only the noisy update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedleak.core import Params
from fedleak.defenses import DEFENSES


@DEFENSES.register("gaussian_noise")
@dataclass
class GaussianNoise:
    """Add N(0, std²) to every coordinate of the update (the non-DP noise baseline)."""

    std: float = 0.01  # standard deviation of the noise, in update units

    def __post_init__(self) -> None:
        if not self.std >= 0:  # also rejects NaN
            raise ValueError(f"gaussian_noise: std must be >= 0, got {self.std}")

    def __call__(self, delta: Params, rng: torch.Generator) -> Params:
        """Return a noisy copy of ``delta``; integer tensors (counters) pass through unchanged."""
        return {
            name: d + self.std * _randn_like(d, rng) if d.is_floating_point() else d
            for name, d in delta.items()
        }


def _randn_like(tensor: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    # The generator lives on the CPU; draw there and move, so any device gets the same stream.
    noise = torch.randn(tensor.shape, generator=rng, dtype=tensor.dtype)
    return noise.to(tensor.device)
