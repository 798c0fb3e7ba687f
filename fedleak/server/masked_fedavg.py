"""Masked FedAvg: clients' pruned sub-models averaged back into the global shape (HeteroFL-style).

Diao, Ding & Tarokh, "HeteroFL: Computation and Communication Efficient Federated Learning for
Heterogeneous Clients", ICLR 2021: every client trains (here: prunes) its own sub-model of the
global model, and the server averages each parameter entry over the clients whose sub-model
holds it, weighted by their example counts; an entry no client kept keeps its global value.
Departure: HeteroFL's sub-models are fixed nested slices chosen by the server; here each client
chooses its own heads and FFN channels by pruning on its private data
(:mod:`fedleak.training.prune`) and says which in its messages ``head_mask`` ``[blocks,
heads]`` and ``channel_mask`` ``[blocks, channels]`` (global coordinates), which the server maps
to tensor entries by the Llama / BERT parameter names
(:func:`fedleak.pruning.adapters.entry_masks`).  Clients send their state in the global shape
(mask mode: pruned entries are zeros), so the runtime's shapes never change.

Threat model: an honest-but-curious server.  It asks nothing beyond the model, but it reads the
masks, and with them which heads and channels each client's private text made least useful: a
summary of that text's statistics (see the trainer's ``sends``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedleak.core import Messages, Params, Reply, Setting, sends
from fedleak.pruning.adapters import entry_masks
from fedleak.server import SERVER_STRATEGIES
from fedleak.server.fedavg import weighted_mean

MASKS = ("head_mask", "channel_mask")


@SERVER_STRATEGIES.register("masked_fedavg")
@dataclass
class MaskedFedAvg:
    """Average each weight over the clients that kept it (pruned sub-models, HeteroFL-style)."""

    sends: ClassVar[dict[str, str]] = {}

    def check(self, setting: Setting) -> None:
        """The clients must say what they kept: a trainer that sends both masks."""
        missing = [m for m in MASKS if m not in sends(setting.trainer)]
        if missing:
            raise ValueError(
                f"masked_fedavg: [training] {setting.trainer.name!r} does not send {missing[0]!r}; "
                "use a pruning trainer (training.name = 'prune')"
            )

    def instructions(self, round: int, params: Params, rng: torch.Generator) -> Messages:
        """Nothing beyond the model."""
        return {}

    def aggregate(self, round: int, params: Params, replies: list[Reply]) -> Params:
        """Per entry, the example-weighted mean over the replies that kept it."""
        mean = weighted_mean([r.params for r in replies], [r.num_examples for r in replies])
        masks = [
            entry_masks(r.params, r.messages[MASKS[0]], r.messages[MASKS[1]])
            if all(m in r.messages for m in MASKS)
            else {}
            for r in replies
        ]
        names = set().union(*masks)
        for name in sorted(names):
            total = torch.zeros_like(params[name], dtype=torch.float64)
            weight = torch.zeros_like(total)
            for reply, mask in zip(replies, masks, strict=True):
                kept = mask.get(name)
                kept = torch.ones((), dtype=torch.bool) if kept is None else kept
                w = kept.to(torch.float64) * reply.num_examples
                total += w * reply.params[name].double()
                weight += w.expand_as(total)
            averaged = total / weight.clamp_min(1e-300)
            mean[name] = torch.where(weight > 0, averaged, params[name].double()).to(
                params[name].dtype
            )
        return mean
