"""Client-side pruning: train locally, then prune the model on the client's own data.

The client runs local SGD (this trainer's options are the ``sgd`` trainer's), then prunes its
trained model with a structured pruner from :data:`fedleak.pruning.PRUNERS` (``pruner``, e.g.
``{name = "goa", ratio = 0.2}``), its private training examples serving as calibration data.
Mask mode: the state it sends keeps the global shape, its pruned heads and FFN channels zeros;
a server strategy that averages each weight over the clients that kept it
(``server.name = "masked_fedavg"``) rebuilds the global model (HeteroFL-style).

What leaks, beyond the state: the masks (``head_mask [blocks, heads]``, ``channel_mask
[blocks, channels]``, 1 = kept) are the argmax of scores computed from the client's text — the
second moments E[x xᵀ] of its hidden states (GOA), channel variances (FLAP) or activation norms
(Wanda-sp), and its attention maps (GOA's head similarity) — so they are a low-bit summary of
those statistics; with ``send_scores = true`` the per-channel scores themselves go too
(``channel_scores [pruned blocks, channels]``), a direct per-channel statistic of the client's
activations.  The zeros in the sent state reveal the masks anyway: declaring them is honest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fedleak.core import Batch, LossFn, Messages, TrainResult
from fedleak.pruning import PRUNERS
from fedleak.pruning.structured import StructuredOptions
from fedleak.registry import ConfigError
from fedleak.training import TRAINERS
from fedleak.training.sgd import SGD


@TRAINERS.register("prune")
@dataclass
class PruneTrainer(SGD):
    """Local SGD, then structured pruning on the client's own data; sends the masks it chose."""

    sends: ClassVar[dict[str, str]] = {
        "head_mask": "[blocks, heads] 1 = attention head kept: which heads the client's text "
        "made least useful (argmax of statistics of its private activations)",
        "channel_mask": "[blocks, channels] 1 = FFN channel kept: the same for FFN channels "
        "(second moments / variances / norms of its hidden states, thresholded)",
        "channel_scores": "[pruned blocks, channels] the per-channel scores themselves (only "
        "with send_scores = true): per-channel statistics of the client's activations",
    }
    # The structured pruner's options (a [training.pruner] table): name and its fields.
    pruner: dict = field(default_factory=lambda: {"name": "goa", "refit": False})
    send_scores: bool = False  # also send the per-channel scores (a richer leakage channel)

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            built = PRUNERS.build(self.pruner, "training.pruner")
        except ConfigError as err:
            raise ValueError(f"prune: {err}") from None
        if not isinstance(built, StructuredOptions):
            raise ValueError(
                f"prune: pruner {built.name!r} is unstructured; the masks a client sends are "
                "per head and channel, so use a structured one (goa, flap, wanda_sp, magnitude, "
                "random)"
            )
        if built.mode != "mask":
            raise ValueError(
                "prune: pruner.mode must be 'mask' (a client's state keeps the global shape)"
            )
        self._pruner = built

    def fit(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        defenses: tuple = (),
        instructions: Messages | None = None,
    ) -> TrainResult:
        """Train with local SGD, then prune on ``data`` (the client's own examples)."""
        result = super().fit(model, data, loss_fn, rng, defenses, instructions)
        pruned = self._pruner.prune(model, data.inputs, rng)
        messages = {
            "head_mask": pruned.head_mask.float(),
            "channel_mask": pruned.channel_mask.float(),
        }
        if self.send_scores and "channel_scores" in pruned.stats:
            messages["channel_scores"] = pruned.stats["channel_scores"]
        return TrainResult(result.loss, result.steps, result.batch_size, result.used, messages)
