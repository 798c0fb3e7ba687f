"""Norm clipping of the update: bound how much any one client's update can say.

Clipping the whole update to a global L2 norm is the per-client step of DP-FedAvg (McMahan et
al., "Learning Differentially Private Recurrent Language Models", ICLR 2018) and of Flower's
``LocalDpMod``.  On its own it only rescales the update and keeps its direction; its purpose is to
bound each client's contribution (the sensitivity) so that added noise (``gaussian_noise``)
means something.

Threat model: the client transforms what it sends; the server sees only the clipped update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedleak.core import Params
from fedleak.defenses import DEFENSES


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
        floating = [d for d in delta.values() if d.is_floating_point()]
        if not floating:
            return dict(delta)
        # Accumulate in float64 so that half-precision updates do not overflow the norm.
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(d.double()).cpu() for d in floating])
        )
        scale = min(1.0, self.max_norm / float(norm)) if norm > 0 else 1.0
        return {name: d * scale if d.is_floating_point() else d for name, d in delta.items()}
