"""Gradient pruning: send only the largest-magnitude coordinates of the update.

Zhu et al. (DLG, NeurIPS 2019) found pruning the smallest-magnitude gradient coordinates the most
effective of their defenses: DLG failed once more than about 20% were pruned.  Pruning is also a
compression method (deep gradient compression sends the top coordinates), so the same defense
covers sparsified updates.  Chen, Gürsoy & Lei ("Optimal Defenses Against Gradient
Reconstruction Attacks", arXiv 2411.03746) prune with one global threshold over all parameters;
GradAttack's ``GradPruneDefense`` uses one threshold per tensor; ``scope`` picks either.

Counts are exact: ``round(amount * n)`` coordinates are zeroed, as ``torch.nn.utils.prune``
rounds, with ties among equal magnitudes broken by position (earlier coordinates, in key order,
go first), so the mask does not depend on the sorting algorithm.  Every floating-point tensor of
the update takes part, running statistics of normalisation layers included.

Threat model: the client sparsifies what it sends; the server sees the surviving coordinates
and which ones were zeroed.  Adaptive attacks match only those coordinates (e.g. a masked cosine
loss), which makes pruning much weaker than against a defense-unaware attack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedleak.core import Params
from fedleak.defenses import DEFENSES, _params


@DEFENSES.register("gradient_pruning")
@dataclass
class GradientPruning:
    """Zero the fraction ``amount`` of update coordinates with the smallest magnitude."""

    amount: float = 0.5  # fraction of coordinates zeroed, in [0, 1)
    scope: Literal["global", "layer"] = "global"  # one threshold over all tensors, or per tensor

    def __post_init__(self) -> None:
        if not 0 <= self.amount < 1:  # also rejects NaN
            raise ValueError(f"gradient_pruning: amount must be in [0, 1), got {self.amount}")
        if self.scope not in ("global", "layer"):
            raise ValueError(
                f"gradient_pruning: scope must be 'global' or 'layer', got {self.scope!r}"
            )

    def __call__(self, delta: Params, rng: torch.Generator) -> Params:
        """Return ``delta`` with its smallest coordinates zeroed; ``rng`` is unused."""
        if self.scope == "layer":
            return _params.map_floating(delta, self._prune)
        tensors = _params.floating(delta)
        magnitudes = _params.flat(tensors).abs()
        mask = _params.smallest(magnitudes, round(self.amount * len(magnitudes)))
        masks = iter(_params.unflat(mask, tensors))
        return _params.map_floating(delta, lambda d: d.masked_fill(next(masks), 0))

    def _prune(self, tensor: torch.Tensor) -> torch.Tensor:
        magnitudes = _params.flat([tensor]).abs()
        mask = _params.smallest(magnitudes, round(self.amount * len(magnitudes)))
        return tensor.masked_fill(_params.unflat(mask, [tensor])[0], 0)
