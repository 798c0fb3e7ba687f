"""FedAvg: the next global state is the example-weighted mean of the clients' states.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017.

Threat model: an honest-but-curious server that sees every client's state individually (unless
a secure-aggregation defense hides them); it asks nothing beyond the model.

The arithmetic is Flower's ``aggregate_arrayrecords``, step for step (weights ``n_k / n`` as
Python floats, products accumulated in reply order in the tensor's own precision), so runs are
bit-identical to those made with Flower's FedAvg.  One departure: integer buffers (batch norm's
``num_batches_tracked``) are averaged in float64 and rounded back to their integer type, where
Flower returned them as float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedleak.core import Messages, Params, Reply
from fedleak.server import SERVER_STRATEGIES


@SERVER_STRATEGIES.register("fedavg")
@dataclass
class FedAvg:
    """The example-weighted mean of the clients' states."""

    sends: ClassVar[dict[str, str]] = {}

    def instructions(self, round: int, params: Params, rng: torch.Generator) -> Messages:
        """Nothing beyond the model."""
        return {}

    def aggregate(self, round: int, params: Params, replies: list[Reply]) -> Params:
        """Weighted mean of the replies' states (weights: reported example counts)."""
        return weighted_mean([r.params for r in replies], [r.num_examples for r in replies])


def weighted_mean(states: list[Params], counts: list[int | float]) -> Params:
    """``sum_k (n_k / n) * state_k`` with Flower's order of operations, per tensor."""
    if not states:
        raise ValueError("no client state to average")
    total = sum(counts)
    if not total > 0:
        raise ValueError(f"the clients report {total} examples in all; cannot weight their states")
    weights = [n / total for n in counts]
    mean = {}
    for key, first in states[0].items():
        exact = first.is_floating_point()
        acc = None
        for state, weight in zip(states, weights, strict=True):
            value = state[key] if exact else state[key].to(torch.float64)
            acc = value * weight if acc is None else acc.add_(value * weight)
        mean[key] = acc if exact else acc.round().to(first.dtype)
    return mean
