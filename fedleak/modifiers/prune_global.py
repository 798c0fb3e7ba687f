"""One-shot magnitude pruning of the global model, a benign server-side transform.

In the style of Han et al. ("Learning both Weights and Connections for Efficient Neural
Networks", NeurIPS 2015): the server zeroes the smallest-magnitude fraction of the weight
matrices and convolution kernels before sending the model, either with one threshold across all
layers (``scope = "global"``) or per layer (``scope = "layer"``).

Threat model: benign.  It is part of the training protocol, not an attack: the server plants
nothing, and the masks are public (anyone can read them off the zeros of the sent model), so it
returns no secrets.  Mask mode: architecture, state_dict keys and shapes are unchanged; clients
train the zeroed weights like any other, so the runner re-applies the mask in every round listed
in ``rounds`` to keep them pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from fedleak.core import Params, Secrets
from fedleak.modifiers import MODIFIERS


@MODIFIERS.register("prune_global")
@dataclass
class PruneGlobal:
    """Zero the smallest-magnitude weights of the global model (one-shot magnitude pruning)."""

    adversarial: ClassVar[bool] = False
    amount: float = 0.5  # fraction of prunable weights to zero, in [0, 1)
    scope: Literal["global", "layer"] = "global"  # one threshold for all layers, or one per layer
    rounds: tuple[int, ...] = ()  # server rounds (1-based) to prune in; empty = every round

    def __post_init__(self) -> None:
        if not 0 <= self.amount < 1:
            raise ValueError(f"prune_global: amount must be in [0, 1), got {self.amount}")
        if self.scope not in ("global", "layer"):
            raise ValueError(f"prune_global: scope must be 'global' or 'layer', got {self.scope!r}")
        if any(r < 1 for r in self.rounds):
            raise ValueError(f"prune_global: rounds must all be >= 1, got {self.rounds}")

    def applies_to(self, round: int) -> bool:
        """Whether the server prunes before ``round``."""
        return not self.rounds or round in self.rounds

    def architecture(self, model: nn.Module) -> nn.Module:
        """Mask mode: the architecture is unchanged."""
        return model

    def __call__(self, params: Params, round: int, rng: torch.Generator) -> tuple[Params, Secrets]:
        """Return the pruned parameters and no secrets (magnitude pruning needs no randomness).

        Prunable tensors are floating-point weights of Linear/Conv-like layers: names ending in
        ``weight`` with at least two dimensions.  Biases and normalisation parameters are kept.
        """
        names = [name for name, p in params.items() if _prunable(name, p)]
        groups = [names] if self.scope == "global" else [[name] for name in names]
        pruned = dict(params)
        for group in groups:
            pruned.update(self._prune(group, params))
        return pruned, {}

    def _prune(self, names: list[str], params: Params) -> Params:
        """Zero the ``amount`` smallest-magnitude entries across the tensors ``names``."""
        if not names:
            return {}
        magnitudes = torch.cat([params[name].detach().abs().flatten().float() for name in names])
        # Rounded like torch.nn.utils.prune; exactly k entries are pruned, even among ties
        # (e.g. weights that are already zero), because the mask comes from a stable sort.
        k = round(self.amount * magnitudes.numel())
        if k == 0:
            return {}
        keep = torch.ones_like(magnitudes, dtype=torch.bool)
        keep[torch.sort(magnitudes, stable=True).indices[:k]] = False
        out, start = {}, 0
        for name in names:
            tensor = params[name]
            mask = keep[start : start + tensor.numel()].view(tensor.shape).to(tensor.device)
            out[name] = tensor.masked_fill(~mask, 0)
            start += tensor.numel()
        return out


def _prunable(name: str, tensor: Tensor) -> bool:
    return tensor.is_floating_point() and name.endswith("weight") and tensor.ndim >= 2
