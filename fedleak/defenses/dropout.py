"""Dropout during local training: the update is computed through random masks the server lacks.

Dropout was proposed as a defense against gradient inversion because the attacker, replaying the
client's forward pass, does not know which units were dropped.  Scheliga, Mäder & Seeland
("Dropout is NOT All You Need to Prevent Gradient Leakage", AAAI 2023) show it only stops
defense-unaware attacks: their Dropout Inversion Attack optimises the masks along with the data
and reconstructs as well as without dropout.  This defense is the setting they attack.

Implementation: inverted dropout (scale kept units by 1/(1-p), as ``nn.Dropout``) applied to the
*input* of every ``nn.Linear`` (and, with ``conv``, every convolution) through forward
pre-hooks, so the state-dict keys and shapes stay those of the global model; masks come from the
client's training ``rng``, one per forward pass, and only in train mode.  The first linear layer
of an MLP therefore sees dropped *pixels*, and its weight gradient is built from the masked
input.  Layers used functionally (e.g. the input projection inside ``nn.MultiheadAttention``)
are not reached by hooks.

The trainer has no "after training" callback, so the hooks stay on the model it was given: the
client's local copy, which is discarded after the round (only its state dict is sent), never
the global model.

Threat model: the client trains with private random masks; the server sees the resulting update
and knows the architecture and ``p``, not the masks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from fedleak.core import Batch
from fedleak.defenses import DEFENSES

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@DEFENSES.register("dropout")
@dataclass
class Dropout:
    """Train with dropout on the inputs of every linear (and optionally conv) layer."""

    p: float = 0.5  # probability of dropping each input unit, in [0, 1)
    conv: bool = False  # also drop the inputs of Conv1d/2d/3d layers (elementwise)

    def __post_init__(self) -> None:
        if not 0 <= self.p < 1:  # also rejects NaN
            raise ValueError(f"dropout: p must be in [0, 1), got {self.p}")

    def wrap(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Iterable[Batch],
        rng: torch.Generator,
        *,
        data: Batch | None = None,
    ) -> tuple[nn.Module, torch.optim.Optimizer, Iterable[Batch]]:
        """Hook dropout into ``model`` (the client's local copy) in place; the rest unchanged.

        ``data`` (the client's partition) is not needed: the batches are trained on as planned.
        """
        if self.p == 0:  # nothing to drop: leave the model exactly as it was
            return model, optimizer, batches
        layers = (nn.Linear, *_CONVOLUTIONS) if self.conv else (nn.Linear,)
        for module in model.modules():
            if isinstance(module, layers):
                module.register_forward_pre_hook(partial(_drop_input, p=self.p, rng=rng))
        return model, optimizer, batches


def _drop_input(module: nn.Module, args: tuple, *, p: float, rng: torch.Generator) -> tuple | None:
    if not module.training:  # evaluation sees the whole input, as with nn.Dropout
        return None
    inputs, *rest = args
    # The generator lives on the CPU; draw there and move, so any device gets the same masks.
    keep = torch.rand(inputs.shape, generator=rng).to(inputs.device) >= p
    scale = keep.to(inputs.dtype) / (1 - p)
    return (inputs * scale, *rest)
