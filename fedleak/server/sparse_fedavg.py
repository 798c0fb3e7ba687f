"""Sparse FedAvg: unstructured-pruned client states averaged entry by entry over who kept them.

Every client prunes its own weights (:mod:`fedleak.training.sparse_prune`) and says which in
its message ``weight_mask``.  The server averages each prunable entry over the clients that kept
it, weighted by their example counts (a zero a client pruned is not an update towards zero); an
entry no client kept keeps its global value, as HeteroFL (Diao, Ding & Tarokh, ICLR 2021) does for
parameters outside every sub-model.  Everything else is FedAvg's weighted mean.  So pruning
compresses what clients *send*, while the global model stays dense.

Threat model: an honest-but-curious server.  It asks nothing beyond the model and reads every
client's mask (which its sparse state reveals anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedleak.core import Messages, Params, Reply, Setting, sends
from fedleak.server import SERVER_STRATEGIES
from fedleak.server.fedavg import weighted_mean
from fedleak.training.sparse_prune import unpack


@SERVER_STRATEGIES.register("sparse_fedavg")
@dataclass
class SparseFedAvg:
    """Average each weight over the clients that kept it (unstructured client pruning)."""

    sends: ClassVar[dict[str, str]] = {}

    def check(self, setting: Setting) -> None:
        """The clients must say what they kept: a trainer that sends ``weight_mask``."""
        if "weight_mask" not in sends(setting.trainer):
            raise ValueError(
                f"sparse_fedavg: [training] {setting.trainer.name!r} does not send "
                "'weight_mask'; use training.name = 'sparse_prune'"
            )

    def instructions(self, round: int, params: Params, rng: torch.Generator) -> Messages:
        """Nothing beyond the model."""
        return {}

    def aggregate(self, round: int, params: Params, replies: list[Reply]) -> Params:
        """Per prunable entry, the example-weighted mean over the replies that kept it."""
        mean = weighted_mean([r.params for r in replies], [r.num_examples for r in replies])
        masks = [unpack(r.messages["weight_mask"], params) for r in replies]
        for name in masks[0] if masks else ():
            total = torch.zeros_like(params[name], dtype=torch.float64)
            weight = torch.zeros_like(total)
            for reply, mask in zip(replies, masks, strict=True):
                w = mask[name].to(torch.float64) * reply.num_examples
                total += w * reply.params[name].double()
                weight += w
            averaged = total / weight.clamp_min(1e-300)
            mean[name] = torch.where(weight > 0, averaged, params[name].double()).to(
                params[name].dtype
            )
        return mean
