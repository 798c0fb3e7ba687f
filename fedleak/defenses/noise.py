"""Additive noise on the update: the simplest (non-DP) perturbation defense.

Adding noise to the shared gradient is the defense Zhu et al. (DLG, NeurIPS 2019) evaluate
first, with Gaussian and Laplacian noise: with enough variance it stops gradient inversion, at a
cost in accuracy.  Noise added to one update without clipping gives no differential-privacy
guarantee (the update's sensitivity is unbounded); pair it with ``clip`` (L2, for Gaussian
noise) or ``coordinate_clip`` (L∞ per coordinate, for Laplacian noise) for a mechanism-like
update, or use DP-SGD.

Both distributions share one code path: draw standard noise of the tensor's shape and dtype
from the client's ``rng``, scale it, add it.

Threat model: the client perturbs what it sends; the server sees only the noisy update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedleak.core import Params
from fedleak.defenses import DEFENSES, _params

Sampler = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # unit noise shaped like a tensor


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
        return _add_noise(delta, self.std, _standard_normal, rng)


@DEFENSES.register("laplacian_noise")
@dataclass
class LaplacianNoise:
    """Add Laplace(0, scale) to every coordinate of the update (std = √2·scale)."""

    scale: float = 0.01  # the Laplace scale b, in update units; the noise std is √2·b

    def __post_init__(self) -> None:
        if not self.scale >= 0:  # also rejects NaN
            raise ValueError(f"laplacian_noise: scale must be >= 0, got {self.scale}")

    def __call__(self, delta: Params, rng: torch.Generator) -> Params:
        """Return a noisy copy of ``delta``; integer tensors (counters) pass through unchanged."""
        return _add_noise(delta, self.scale, _standard_laplace, rng)


def _add_noise(delta: Params, scale: float, sample: Sampler, rng: torch.Generator) -> Params:
    # Draws tensor by tensor in key order, so the same rng gives the same noise.
    return _params.map_floating(delta, lambda d: d + scale * sample(d, rng))


def _standard_normal(tensor: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    # The generator lives on the CPU; draw there and move, so any device gets the same stream.
    return torch.randn(tensor.shape, generator=rng, dtype=tensor.dtype).to(tensor.device)


def _standard_laplace(tensor: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    # The difference of two Exp(1) draws is Laplace(0, 1).  Unlike the inverse CDF of a uniform
    # draw, it never yields an infinity (a uniform 0 would, once in 2^24 float32 draws).
    first = torch.empty(tensor.shape, dtype=tensor.dtype).exponential_(generator=rng)
    second = torch.empty(tensor.shape, dtype=tensor.dtype).exponential_(generator=rng)
    return (first - second).to(tensor.device)
