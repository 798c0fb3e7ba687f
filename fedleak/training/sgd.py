"""Local SGD: the client procedure of FedSGD and FedAvg (McMahan et al., AISTATS 2017).

FedSGD is one step on the client's whole partition (``local_steps = 1``, ``batch_size = 0``);
FedAvg is several steps or epochs of mini-batch SGD.  Mini-batches are drawn without
replacement from a per-(client, round) shuffle, so the examples a client used are known exactly
and recorded as ground truth.  Training defenses wrap the model, the optimiser and the batches
before the first step; they are also given the client's whole partition (``data=``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fedleak.core import (
    Batch,
    GradientDefense,
    LossFn,
    Messages,
    Setting,
    TrainingDefense,
    TrainResult,
    set_batch_norm,
)
from fedleak.training import TRAINERS


@TRAINERS.register("sgd")
@dataclass
class SGD:
    """Plain local SGD: FedSGD with one full-batch step, FedAvg with more."""

    lr: float = 0.1  # learning rate the server prescribes
    local_steps: int = 1  # optimiser steps per round (ignored when local_epochs > 0)
    local_epochs: int = 0  # > 0: passes over the partition instead of a step count
    batch_size: int = 0  # examples per step; 0 = the whole partition (FedSGD)
    momentum: float = 0.0  # 0 keeps "update = -lr * sum of gradients" exact for attacks
    # Batch norm in the local step: "train" normalises with the batch's own statistics (the
    # server cannot know them); "eval" with the running statistics the server sent, public
    # buffers both sides know (breaching's provide_public_buffers, the literature's setting for
    # B = 1).  Dropout stays on either way.
    batch_norm: Literal["train", "eval"] = "train"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"{self.name}: lr must be > 0, got {self.lr}")
        if self.local_steps < 1:
            raise ValueError(f"{self.name}: local_steps must be >= 1, got {self.local_steps}")
        if self.local_epochs < 0:
            raise ValueError(f"{self.name}: local_epochs must be >= 0, got {self.local_epochs}")
        if self.batch_size < 0:
            raise ValueError(
                f"{self.name}: batch_size must be >= 0 (0 = whole partition), got {self.batch_size}"
            )
        if not 0 <= self.momentum < 1:
            raise ValueError(f"{self.name}: momentum must be in [0, 1), got {self.momentum}")

    def check(self, setting: Setting) -> None:
        """Refuse a learning rate the model's floating-point type cannot hold (torch raises)."""
        for dtype in {p.dtype for p in setting.model.parameters() if p.is_floating_point()}:
            if self.lr > torch.finfo(dtype).max:
                raise ValueError(
                    f"sgd: lr = {self.lr:g} overflows the model's {dtype} parameters "
                    f"(largest {torch.finfo(dtype).max:.3g}); use a learning rate below 1"
                )

    def planned_steps(self, examples: int) -> int:
        """Optimiser steps one round takes on a partition of ``examples`` (0 for none).

        DP-SGD's accountant needs it: each planned step is one Poisson draw, empty or not.
        """
        if examples <= 0:
            return 0
        per_epoch = math.ceil(examples / min(self.batch_size or examples, examples))
        return self.local_epochs * per_epoch if self.local_epochs else self.local_steps

    def schedule(self, n: int, device: torch.device, rng: torch.Generator) -> list[Tensor]:
        """The example indices of each step of one round, in order (epochs reshuffle)."""
        steps = self.planned_steps(n)
        if not steps:
            return []
        size = min(self.batch_size or n, n)
        per_epoch = math.ceil(n / size)
        order = torch.cat(
            [
                torch.randperm(n, generator=rng).to(device)
                for _ in range(math.ceil(steps / per_epoch))
            ]
        )
        return [
            order[epoch * n + k * size : epoch * n + min((k + 1) * size, n)]
            for epoch, k in (divmod(step, per_epoch) for step in range(steps))
        ]

    def batches(self, data: Batch, rng: torch.Generator) -> list[Batch]:
        """The mini-batches of one round, in order."""
        return [data.select(idx) for idx in self.schedule(len(data), data.labels.device, rng)]

    def objective(self, model: nn.Module, batch: Batch, loss_fn: LossFn) -> torch.Tensor:
        """The loss one step descends: the task loss (subclasses add terms)."""
        return loss_fn(model(batch.inputs), batch.labels)

    def fit(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        defenses: tuple[TrainingDefense | GradientDefense, ...] = (),
        instructions: Messages | None = None,
    ) -> TrainResult:
        """Train ``model`` in place for one round; report loss, steps and the examples used.

        Plain SGD needs no instructions beyond the model and sends nothing beside its state.
        """
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum)
        batches = self.batches(data, rng)
        for defense in (d for d in defenses if hasattr(d, "wrap")):
            # The whole partition too: DP-SGD samples from it, not from the planned batches.
            model, optimizer, batches = defense.wrap(model, optimizer, batches, rng, data=data)
        per_step = [d for d in defenses if hasattr(d, "gradients")]
        set_batch_norm(model, self.batch_norm)
        losses, used = [], []
        for batch in batches:
            optimizer.zero_grad()
            loss = self.objective(model, batch, loss_fn)
            loss.backward()
            if per_step:
                _defend_gradients(model, batch, loss_fn, per_step, rng)
            optimizer.step()
            losses.append(loss.item())
            used.append(batch)
        if not used:
            planned = self.planned_steps(len(data))
            raise ValueError(
                "sgd: the client has no examples to train on"
                if not len(data) or not planned
                else f"sgd: all {planned} planned steps were dropped by the training defenses "
                "(with dpsgd: every Poisson draw of dpsgd was empty this round), so the client "
                "has no update to send"
            )
        return TrainResult(
            loss=sum(losses) / len(losses),
            steps=len(used),
            batch_size=len(used[0]),
            used=_first_use(used),
        )


def _defend_gradients(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    defenses: list[GradientDefense],
    rng: torch.Generator,
) -> None:
    """Replace this step's ``.grad``s by what the gradient defenses make of them, in order."""
    params = {n: p for n, p in model.named_parameters() if p.grad is not None}
    grads = {n: p.grad for n, p in params.items()}
    for defense in defenses:
        grads = defense.gradients(model, batch, loss_fn, grads, rng)
    for name, p in params.items():
        p.grad = grads[name]


def _first_use(batches: list[Batch]) -> Batch:
    """The distinct examples of ``batches`` in first-use order (epochs revisit examples)."""
    inputs = torch.cat([b.inputs for b in batches])
    labels = torch.cat([b.labels for b in batches])
    flat = inputs.reshape(len(inputs), -1)
    _, inverse = torch.unique(flat, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(flat), dtype=torch.long, device=flat.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(flat), device=flat.device), reduce="amin")
    keep = first.sort().values
    return Batch(inputs[keep], labels[keep])
