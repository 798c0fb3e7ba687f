"""Server-assisted ("global") sketchy moment matching: the server sums the clients' moments.

Dong, Phan, Pan & Lei, "Sketchy Moment Matching", NeurIPS 2024; the federated reading of
:mod:`fedleak.selection.skmm`.  Under non-IID partitions a client that matches its coreset to
its *own* sketched gradient moment over-fits its local skew; matching the federation's moment
instead asks each client for the examples the global model needs.  Each client selecting with
``[selection] name = "skmm", moments = "global"`` sends its sketched second moment
``C_k = G~_k^T G~_k`` (``m x m``), its partition size and the seed of its sketch; this strategy
averages the states as FedAvg does, sums the moments of the round's replies, and sends the sum,
the total count and the sketch's seed to the next round's clients.

Threat model and what leaks: the server sees every client's ``C_k``: a Johnson-Lindenstrauss
sketch of the Gram structure of its random-target gradients (for a linear head, of its inputs
weighted by the model's predictions), which enables membership and attribute inference beyond
the model update.  What it sends back is an aggregate.

Departures: the global moment is one round stale (computed at the previous global model), and
its sketch stays the one of the first round that produced moments, so moments of different
rounds share coordinates.  The strategy keeps the last sum in memory: a resumed run starts
that chain afresh (its first round matches local moments).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fedleak.core import Messages, Params, Reply, Setting
from fedleak.server import SERVER_STRATEGIES
from fedleak.server.fedavg import weighted_mean


def summed_moments(replies: list[Reply]) -> Messages:
    """The clients' moments summed, their counts summed, and the sketch seed they share."""
    sending = [r for r in replies if "skmm_moment" in r.messages]
    if not sending:
        return {}
    seeds = {int(r.messages["skmm_seed"]) for r in sending}
    if len(seeds) > 1:
        raise ValueError(f"the clients' moments come from different sketches (seeds {seeds})")
    return {
        "skmm_global_moment": sum(r.messages["skmm_moment"].double() for r in sending),
        "skmm_global_count": torch.tensor(
            sum(int(r.messages["skmm_count"]) for r in sending), dtype=torch.int64
        ),
        "skmm_seed": torch.tensor(seeds.pop(), dtype=torch.int64),
    }


@SERVER_STRATEGIES.register("skmm_global")
@dataclass
class SkMMGlobal:
    """FedAvg that also sums the clients' sketched SkMM moments and sends the sum back."""

    sends: ClassVar[dict[str, str]] = {
        "skmm_global_moment": "the sum of last round's clients' sketched gradient moments",
        "skmm_global_count": "how many examples those clients hold in all",
        "skmm_seed": "the seed of the sketch those moments were computed with (public)",
    }
    _last: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def check(self, setting: Setting) -> None:
        """Refuse a run whose clients send no moments."""
        selection = setting.selection
        if getattr(selection, "name", None) != "skmm" or selection.moments != "global":
            raise ValueError(
                "skmm_global sums the moments clients send with [selection] name = 'skmm', "
                "moments = 'global'; set that selection, or use [server] name = 'fedavg'"
            )

    def instructions(self, round: int, params: Params, rng: torch.Generator) -> Messages:
        """Last round's summed moments (nothing before the first replies)."""
        return dict(self._last)

    def aggregate(self, round: int, params: Params, replies: list[Reply]) -> Params:
        """FedAvg's weighted mean; the moments are kept for the next round's instructions."""
        self._last = dict(summed_moments(replies)) or self._last
        return weighted_mean([r.params for r in replies], [r.num_examples for r in replies])
