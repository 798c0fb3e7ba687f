"""Secure aggregation, simulated: the server learns the round's aggregate, not one update.

Bonawitz et al. ("Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017; SecAgg+ in Bell et al., CCS 2020) let clients mask their updates so that the masks
cancel only in the sum.  An honest-but-curious server then learns exactly what it needs for
FedAvg: the example-weighted mean of the round's models, plus each client's example count (in
plaintext, as in Flower's SecAgg+).  This plugin is that ideal functionality: no masks are
computed, and what the capture records is the weighted mean over the round's surviving clients
(``client = -1`` in the run directory), which an attack sees as one large client holding every
participant's examples.  The cryptographic protocol itself (Flower's SecAgg+ on its legacy API)
changes the server's view only by its quantisation error.

Threat model: the server cannot see individual updates; everything else is as without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedleak.core import Params
from fedleak.defenses import DEFENSES


@DEFENSES.register("secure_aggregation")
@dataclass
class SecureAggregation:
    """Simulated secure aggregation: the server sees only the round's weighted mean model."""

    def aggregate(self, received: list[Params], weights: list[int]) -> Params:
        """The example-weighted mean of the floating tensors (FedAvg's aggregate)."""
        if not received or len(received) != len(weights) or sum(weights) <= 0:
            raise ValueError(
                f"secure_aggregation: need matching states and positive weights, got "
                f"{len(received)} states and weights {weights}"
            )
        total = float(sum(weights))
        first = received[0]
        return {
            name: sum(r[name] * (w / total) for r, w in zip(received, weights, strict=True))
            if tensor.is_floating_point()
            else tensor
            for name, tensor in first.items()
        }
