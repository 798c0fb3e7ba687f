"""Structured (or unstructured) pruning of the global model by the server, data-free.

The server prunes the global transformer before sending it, with any pruner of
:data:`fedleak.pruning.PRUNERS` (GOA, FLAP, Wanda-sp, magnitude, random; SparseGPT, Wanda) —
e.g. GOA (Li, Dong & Lei, CPAL 2025) — in the rounds listed in ``rounds`` (empty: every round;
``[R]`` with R the last round: once at the end).  Unstructured magnitude pruning of any model
is the separate ``prune_global`` modifier.  The server holds no client data, so the pruner's
calibration is data-free: ``calibration = "random_tokens"`` feeds ``samples`` sequences of
``length`` uniformly random token ids (how GOA estimates Σ without data); data-free pruners
(magnitude, random) need none.

Threat model: benign, part of the training protocol.  Mask mode keeps the architecture and the
state_dict shapes: the pruned heads and channels are zeros that anyone can read off the sent
model, so nothing is secret.  Clients train the zeros like any other weight, so pruning again in
every round keeps the model pruned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from fedleak.core import Params, Secrets, Setting
from fedleak.modifiers import MODIFIERS
from fedleak.pruning import PRUNERS
from fedleak.pruning.adapters import adapter
from fedleak.registry import ConfigError


@MODIFIERS.register("prune_model")
@dataclass
class PruneModel:
    """Prune the global transformer with a fedleak.pruning pruner (data-free calibration)."""

    adversarial: ClassVar[bool] = False
    # The pruner's options (a [modifiers.pruner] table): name and its fields; mask mode.
    pruner: dict = field(default_factory=lambda: {"name": "magnitude", "ratio": 0.2})
    rounds: tuple[int, ...] = ()  # server rounds (1-based) to prune in; empty = every round
    calibration: Literal["random_tokens", "none"] = "random_tokens"
    samples: int = 32  # random-token calibration sequences
    length: int = 16  # tokens per sequence

    def __post_init__(self) -> None:
        try:
            self._pruner = PRUNERS.build(self.pruner, "modifiers.pruner")
        except ConfigError as err:
            raise ValueError(f"prune_model: {err}") from None
        if getattr(self._pruner, "mode", "mask") != "mask":
            raise ValueError(
                "prune_model: pruner.mode must be 'mask' (the sent state keeps the global shape)"
            )
        if any(r < 1 for r in self.rounds):
            raise ValueError(f"prune_model: rounds must all be >= 1, got {list(self.rounds)}")
        if self.calibration not in ("random_tokens", "none"):
            raise ValueError(
                f"prune_model: calibration must be 'random_tokens' or 'none', got "
                f"{self.calibration!r}"
            )
        if self.calibration == "none" and getattr(self._pruner, "needs_data", True):
            raise ValueError(
                f"prune_model: pruner {self._pruner.name!r} scores on data; set calibration = "
                "'random_tokens' or use a data-free pruner (magnitude, random)"
            )
        if self.samples < 1 or self.length < 2:
            raise ValueError(
                f"prune_model: samples must be >= 1 and length >= 2, got {self.samples}, "
                f"{self.length}"
            )
        self._template: nn.Module | None = None

    def check(self, setting: Setting) -> None:
        """The model must be a transformer the pruning adapters cover."""
        adapter(setting.model)

    def applies_to(self, round: int) -> bool:
        """Whether the server prunes before ``round``."""
        return not self.rounds or round in self.rounds

    def architecture(self, model: nn.Module) -> nn.Module:
        """Mask mode: the architecture is unchanged (a copy is kept to load states into)."""
        self._template = copy.deepcopy(model)
        return model

    def __call__(self, params: Params, round: int, rng: torch.Generator) -> tuple[Params, Secrets]:
        """The pruned global state, and no secrets (the zeros are public)."""
        if self._template is None:
            raise RuntimeError("prune_model: architecture() must run before the first round")
        model = copy.deepcopy(self._template)
        model.load_state_dict(params)
        calibration = None
        if self.calibration == "random_tokens":
            vocab = (
                model.get_input_embeddings().num_embeddings
                if hasattr(model, "get_input_embeddings")
                else model.vocab_size
            )
            calibration = torch.randint(vocab, (self.samples, self.length), generator=rng).to(
                next(model.parameters()).device
            )
        self._pruner.prune(model, calibration, rng)
        state = model.state_dict()
        return {k: state[k].detach().clone() for k in params}, {}
