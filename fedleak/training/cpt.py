"""Controllable Prompt Tuning inside a client: its own groups balanced by the EPO program.

Phan, Wilson & Lei, "Controllable Prompt Tuning for Balancing Group Distributional
Robustness", ICML 2024 (:mod:`fedleak.robust.epo`).  Each local step computes the mean loss of
every group of the client's examples (spurious attribute x label), the gradient of each over a
small tunable *block* (the frozen rest of the model receives nothing), solves the EPO program
on their Gram matrix with the preference ``c`` and descends along the chosen mix.  The
baselines share the loop and change only the group weights: ``erm``, ``reweight`` (balanced
groups) and ``groupdro`` (Sagawa et al., ICLR 2020).  The server averages the blocks (FedAvg),
as in the research notes' "spurious groups inside clients" reading (training.md 4.5).

Groups come with the data (``groups = "data"``: ``Batch.groups``, e.g. from
``waterbirds_lite``) or are the class labels (``groups = "labels"``: class-balanced CPT, for
data without group annotations).

What leaks, beyond the block's update: ``group_losses`` (each group's mean loss at the
received model; 0 marks a group the client does not hold, so it reveals the client's group
and label support) and ``group_weights`` (the mix the client followed, averaged over its steps:
which of its groups the model serves worst).  Departures from the paper: the tunable block is
a set of named parameters, not VPT prompt tokens; GroupDRO's weights restart every round (a
client keeps no state between rounds); the authors' group-reweighted sampler is left out
(``reweight`` is the separate baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
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
from fedleak.robust import baselines
from fedleak.robust.block import block_names
from fedleak.robust.epo import epo_weights, preference_vector
from fedleak.robust.groups import group_gradients, group_losses
from fedleak.training import TRAINERS, refuse_training_defenses
from fedleak.training.sgd import SGD

METHODS = ("epo", "erm", "reweight", "groupdro")


@TRAINERS.register("cpt")
@dataclass
class CPT(SGD):
    """Group-robust local training of a tunable block: CPT's EPO mix, or ERM/reweight/GroupDRO."""

    defend_with: ClassVar[str] = "update defenses (it mixes per-group gradients itself)"
    sends: ClassVar[dict[str, str]] = {
        "group_losses": "each group's mean loss at the received model on the first step's "
        "examples [K]; 0 = no example of that group (the client's group and label support)",
        "group_weights": "the group mix the client followed, mean over its steps [K]: with epo "
        "or groupdro which of its groups the model serves worst; with erm exactly its group "
        "proportions; with reweight its group support",
    }

    lr: float = 0.05  # the step, local_steps / local_epochs and batch_size as in sgd
    method: Literal["epo", "erm", "reweight", "groupdro"] = "epo"
    preference: tuple[float, ...] = ()  # c, one positive number per group; () = uniform
    groups: Literal["data", "labels"] = "data"  # the data's group ids, or the class labels
    num_groups: int = 0  # group ids are 0..num_groups-1; 0 = the number of classes
    block: tuple[str, ...] = ()  # parameter-name prefixes trained; () = every parameter
    dro_step: float = 0.01  # GroupDRO's exponentiated-gradient step
    eps: float = 1e-4  # non-uniformity below which EPO switches from balancing to descent

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_groups < 0:
            raise ValueError(
                f"cpt: num_groups must be >= 0 (0 = number of classes), got {self.num_groups}"
            )
        if self.num_groups and self.preference:
            try:
                preference_vector(self.preference, self.num_groups)
            except ValueError as err:
                raise ValueError(f"cpt: {err}") from None
        elif self.preference and min(self.preference) <= 0:
            raise ValueError(f"cpt: preference entries must be > 0, got {list(self.preference)}")
        if self.preference and self.method != "epo":
            raise ValueError(f"cpt: preference steers method = 'epo' only, not {self.method!r}")
        if not self.dro_step > 0:
            raise ValueError(f"cpt: dro_step must be > 0, got {self.dro_step}")
        if not self.eps >= 0:
            raise ValueError(f"cpt: eps must be >= 0, got {self.eps}")

    def check(self, setting: Setting) -> None:
        """The block names parameters and the groups are countable."""
        super().check(setting)
        block_names((n for n, _ in setting.model.named_parameters()), self.block, "cpt")
        if self.groups == "data" and not self.num_groups:
            raise ValueError(
                "cpt: groups = 'data' needs num_groups (e.g. 4 for waterbirds_lite's 2 labels "
                "x 2 textures)"
            )
        k = self.groups_of(setting.task.num_classes)
        if self.groups == "labels" and k != setting.task.num_classes:
            raise ValueError(
                f"cpt: groups = 'labels' makes {setting.task.num_classes} groups (the classes), "
                f"but num_groups = {self.num_groups}; set num_groups = 0"
            )
        if self.preference:
            try:
                preference_vector(self.preference, k)
            except ValueError as err:
                raise ValueError(f"cpt: {err}") from None

    def groups_of(self, num_classes: int) -> int:
        """K, the number of groups."""
        return self.num_groups or num_classes

    def fit(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        defenses: tuple[TrainingDefense | GradientDefense, ...] = (),
        instructions: Messages | None = None,
    ) -> TrainResult:
        """One round of group-robust training of the block; sends the group losses and mix."""
        refuse_training_defenses(self, defenses)
        if self.groups == "labels":
            groups = data.labels
            with torch.no_grad():  # one group per class: the model's output width
                k = model(data.inputs[:1]).shape[-1]
        else:
            k = self.num_groups
            groups = data.groups
            if groups is None:
                raise ValueError(
                    "cpt: groups = 'data' needs the group id of every example (Batch.groups), "
                    "which this data source does not give; use groups = 'labels', or data "
                    "with groups (e.g. waterbirds_lite)"
                )
        return self.fit_groups(model, data.inputs, data.labels, groups, loss_fn, rng, k)

    def fit_groups(
        self,
        model: nn.Module,
        inputs: Tensor,
        labels: Tensor,
        groups: Tensor,
        loss_fn: LossFn,
        rng: torch.Generator,
        num_groups: int,
    ) -> TrainResult:
        """Train the block of ``model`` in place on examples with group ids in 0..K-1.

        ``num_groups`` (K) is the same for every client, so that their messages line up.
        """
        n = len(labels)
        if n == 0:
            raise ValueError("cpt: the client has no examples to train on")
        k = num_groups
        names = block_names((name for name, _ in model.named_parameters()), self.block, "cpt")
        params = dict(model.named_parameters())
        frozen = [p for name, p in params.items() if name not in names and p.requires_grad]
        block = [params[name] for name in names]
        c = preference_vector(self.preference, k)
        optimizer = torch.optim.SGD(block, lr=self.lr, momentum=self.momentum)
        steps = self.schedule(n, labels.device, rng)
        q = np.full(k, 1.0 / k)  # GroupDRO's weights
        mix, losses_seen, first = np.zeros(k), [], None
        set_batch_norm(model, self.batch_norm)
        for p in frozen:
            p.requires_grad_(False)  # only the block is differentiated
        try:
            for idx in steps:
                per_example = loss_fn(model(inputs[idx]), labels[idx], reduction="none")
                losses, counts = group_losses(per_example, groups[idx], k)
                weights, grads = self._weights(losses, counts, block, c, q)
                q = weights if self.method == "groupdro" else q
                direction = torch.as_tensor(weights, dtype=grads.dtype, device=grads.device) @ grads
                offset = 0
                for p in block:
                    p.grad = direction[offset : offset + p.numel()].view_as(p).clone()
                    offset += p.numel()
                optimizer.step()
                mix += weights / len(steps)
                losses_seen.append(float(per_example.detach().mean()))
                first = losses.detach() if first is None else first
        finally:
            for p in frozen:
                p.requires_grad_(True)
        keep = _first_use(torch.cat(steps))
        return TrainResult(
            loss=sum(losses_seen) / len(losses_seen),
            steps=len(steps),
            batch_size=len(steps[0]),
            used=Batch(inputs[keep], labels[keep]),
            messages={
                "group_losses": first.float().cpu(),
                "group_weights": torch.as_tensor(mix, dtype=torch.float32),
            },
        )

    def _weights(
        self, losses: Tensor, counts: Tensor, block: list[Tensor], c: np.ndarray, q: np.ndarray
    ) -> tuple[np.ndarray, Tensor]:
        """This step's group weights and the group gradients [K, P] they mix."""
        present = counts > 0
        grads = group_gradients(losses, block, present)
        n = counts.detach().cpu().numpy()
        if self.method == "erm":
            return baselines.erm(n), grads
        if self.method == "reweight":
            return baselines.reweighted(n, 1.0), grads
        values = losses.detach().double().cpu().numpy()
        if self.method == "groupdro":
            return baselines.group_dro(q, values, n, self.dro_step), grads
        on = present.cpu().numpy()
        g = grads[present].double()
        # a group fitted to float precision has loss 0; the program needs positive losses
        step = epo_weights(np.maximum(values[on], 1e-12), (g @ g.T).cpu().numpy(), c[on], self.eps)
        weights = np.zeros(len(values))
        weights[on] = step.weights
        return weights, grads


def _first_use(indices: Tensor) -> Tensor:
    """The distinct ``indices`` in order of first appearance."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    first = torch.full((len(unique),), len(indices), dtype=torch.long, device=indices.device)
    first.scatter_reduce_(
        0, inverse, torch.arange(len(indices), device=indices.device), reduce="amin"
    )
    return unique[first.argsort()]
