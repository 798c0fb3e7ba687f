"""Clipping of the update: bound how much any one client's update, or coordinate, can say.

Clipping the whole update to a global L2 norm (``clip``) is the per-client step of DP-FedAvg
(McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018) and of
Flower's ``LocalDpMod``.  On its own it only rescales the update and keeps its direction; its
purpose is to bound each client's contribution (the sensitivity) so that added noise
(``gaussian_noise``) means something.

Clamping every coordinate to ``[-bound, bound]`` (``coordinate_clip``) bounds the L∞
sensitivity instead, the natural partner of Laplacian noise; unlike L2 clipping it changes the
update's direction (large coordinates saturate).  It is the clipping step of the DP-SGD-style
defense of Chen, Gürsoy & Lei ("Optimal Defenses Against Gradient Reconstruction Attacks",
arXiv 2411.03746), whose code clamps each gradient coordinate to ±c before adding noise.

Threat model: the client transforms what it sends; the server sees only the clipped update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedleak.core import Params
from fedleak.defenses import DEFENSES, _params


@DEFENSES.register("clip")
@dataclass
class Clip:
    """Scale the update down so its global L2 norm is at most ``max_norm``."""

    max_norm: float = 1.0  # bound on the L2 norm over all floating-point tensors together

    def __post_init__(self) -> None:
        if not self.max_norm > 0:  # also rejects NaN
            raise ValueError(f"clip: max_norm must be > 0, got {self.max_norm}")

    def __call__(self, delta: Params, rng: torch.Generator) -> Params:
        """Return ``delta`` scaled by ``min(1, max_norm / norm)``; ``rng`` is unused."""
        norm = _params.global_norm(_params.floating(delta))
        if not norm > self.max_norm:  # below the bound, a zero update or a NaN norm: unchanged
            return dict(delta)
        scale = self.max_norm / norm
        return _params.map_floating(delta, lambda d: d * scale)


@DEFENSES.register("coordinate_clip")
@dataclass
class CoordinateClip:
    """Clamp every coordinate of the update to ``[-bound, bound]``."""

    bound: float = 0.01  # largest |coordinate| sent, in update units (the L∞ sensitivity)

    def __post_init__(self) -> None:
        if not self.bound > 0:  # also rejects NaN
            raise ValueError(f"coordinate_clip: bound must be > 0, got {self.bound}")

    def __call__(self, delta: Params, rng: torch.Generator) -> Params:
        """Return ``delta`` clamped coordinate-wise; ``rng`` is unused."""
        return _params.map_floating(delta, self._clamp)

    def _clamp(self, tensor: torch.Tensor) -> torch.Tensor:
        # A bound beyond the dtype's range (1e6 in half precision) clamps nothing, but torch
        # refuses to convert it; cap it at the largest finite value first.
        bound = min(self.bound, torch.finfo(tensor.dtype).max)
        return tensor.clamp(-bound, bound)
