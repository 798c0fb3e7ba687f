"""Secure aggregation, simulated: the server learns the round's aggregate, not one update.

Bonawitz et al. ("Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017; SecAgg+ in Bell et al., CCS 2020) let clients mask their updates so that the masks
cancel only in the sum.  An honest-but-curious server then learns exactly what it needs for
FedAvg: the example-weighted mean of the round's models, plus each client's example count (in
plaintext, as in Flower's SecAgg+).  This plugin is that ideal functionality: no masks are
computed, and what the capture records is the weighted mean over the round's surviving clients
(``client = -1`` in the run directory), which an attack sees as one large client holding every
participant's examples.

``protocol = "secaggplus"`` runs the cryptographic protocol itself instead: Flower's SecAgg+
(``SecAggPlusWorkflow`` and ``secaggplus_mod``, which exist only on Flower's legacy API; see
:mod:`fedleak.sim.secaggplus`).  Clients then send masked, quantised vectors; the server
unmasks only their sum.  Its view differs from the simulated one by the quantisation error
(about ``clipping_range / quantization_range`` per coordinate) and by clipping every model
value to ``±clipping_range``; it costs four round trips per round.  Both options are read by
the simulation layer; this module stays free of Flower.

Threat model: the server cannot see individual updates; everything else is as without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedleak.core import Params
from fedleak.defenses import DEFENSES


@DEFENSES.register("secure_aggregation")
@dataclass
class SecureAggregation:
    """Secure aggregation: the server sees only the round's weighted mean model.

    ``num_shares`` and ``reconstruction_threshold`` follow Flower's ``SecAggPlusWorkflow``: an
    int is a count of clients, a float a fraction of the round's clients.
    """

    protocol: str = "simulated"  # "simulated" (ideal functionality) or "secaggplus" (Flower)
    num_shares: int | float = 1.0  # SecAgg+ neighbours per client; 1.0 = all (plain SecAgg)
    reconstruction_threshold: int | float = 0.5  # shares needed to unmask a dropped client
    clipping_range: float = 8.0  # SecAgg+ clips every model value to ±this before quantising
    quantization_range: int = 2**22  # quantisation levels over [-clipping_range, clipping_range]
    # SecAgg+ scales each model by num_examples / max_weight before quantising, so a loose
    # bound costs precision (step ≈ 2·clipping_range / quantization_range · max_weight / n).
    max_weight: float = 0.0  # 0 = the largest client's partition size (tight, never capped)

    def __post_init__(self) -> None:
        if self.protocol not in ("simulated", "secaggplus"):
            raise ValueError(
                f"secure_aggregation: protocol must be 'simulated' or 'secaggplus', "
                f"got {self.protocol!r}"
            )
        if self.max_weight < 0:
            raise ValueError(
                f"secure_aggregation: max_weight must be >= 0 (0 = largest partition), "
                f"got {self.max_weight}"
            )
        for name in ("num_shares", "reconstruction_threshold", "clipping_range"):
            if not (value := getattr(self, name)) > 0:
                raise ValueError(f"secure_aggregation: {name} must be > 0, got {value}")
        if (levels := self.quantization_range) < 2:
            raise ValueError(f"secure_aggregation: quantization_range must be >= 2, got {levels}")

    def check_round(self, participants: int, examples: int) -> None:
        """Refuse rounds SecAgg+ would skip (one client) or weigh wrongly (too many examples)."""
        if self.protocol != "secaggplus":
            return
        if participants < 2:
            raise ValueError(
                f"secure_aggregation: SecAgg+ needs at least 2 clients per round, got "
                f"clients_per_round={participants}"
            )
        if self.max_weight and examples > self.max_weight:
            raise ValueError(
                f"secure_aggregation: a client may report {examples} examples, more than "
                f"max_weight={self.max_weight:g}, and SecAgg+ would cap its weight; "
                f"set max_weight >= {examples}"
            )

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
