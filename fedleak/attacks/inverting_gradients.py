"""Inverting Gradients (Geiping, Bauermeister, Dröge & Moeller, NeurIPS 2020).

Optimise a candidate batch so that the update it induces has the client's update's *direction*:
cosine distance over all parameters (magnitude carries the learning rate and the batch size,
not the images), plus total variation as an image prior.  Labels are recovered first and held
fixed.  The optimiser is the paper's: Adam on the *sign* of the gradient, step decay at 3/8, 5/8
and 7/8 of the budget, projection into the valid pixel box after every step, and restarts
scored by the final objective.

This class is also the engine of the feature-reconstruction attack (Liu, Wang, Chen & Lei),
which subclasses it: it replaces the pixel parametrisation by a deep image prior and adds a
feature-matching term, through :meth:`InvertingGradients._parametrise` and
:meth:`InvertingGradients._terms`.

Threat model: honest-but-curious server; FedSGD, or FedAvg with the local steps unrolled
(:class:`~fedleak.attacks._matching.Update`).  The paper runs 24,000 iterations (4,800 in its
inversefed code); the default budget here is a CPU-sized 1,000, so results at the default are a
"quick tier", which can rank defenses differently from paper-grade budgets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedleak.attacks import ATTACKS, _labels
from fedleak.attacks._matching import (
    DISTANCES,
    LAYER_WEIGHTS,
    Update,
    distance,
    layer_weights,
    total_variation,
)
from fedleak.core import Reconstruction, ServerView

Term = Callable[[Tensor], Tensor]  # an extra loss on the candidate batch (model inputs)


@ATTACKS.register("inverting_gradients")
@dataclass
class InvertingGradients:
    """Cosine gradient matching + total variation, signed Adam, box constraint, restarts."""

    modality: ClassVar[str] = "image"
    steps: int = 1000  # optimiser iterations per restart (paper: 24,000)
    lr: float = 0.1  # Adam step size (signed steps: roughly the per-pixel move)
    tv: float = 0.2  # weight of total variation (on model inputs)
    restarts: int = 1  # independent trials; the one with the lowest objective is returned
    signed: bool = True  # step on the sign of the gradient (the paper's "signed Adam")
    boxed: bool = True  # project the candidate into the valid pixel range after each step
    labels: str = "bias_corrected"  # label recovery strategy (fedleak.attacks._labels)
    distance: str = "cosine"  # "cosine" (the paper), "l2" or "l2_l1"
    layer_weights: str = "equal"  # per-layer weights of the distance: equal, linear, exp
    batch: int = 0  # examples to reconstruct; 0 = as many as the client reports
    unroll: bool | str = "auto"  # unroll the client's local steps ("auto": when it took several)

    def __post_init__(self) -> None:
        name = self.name  # type: ignore[attr-defined]  # set by ATTACKS.register
        checks = {
            "steps": (self.steps >= 1, ">= 1"),
            "lr": (self.lr > 0, "> 0"),
            "tv": (self.tv >= 0, ">= 0"),
            "restarts": (self.restarts >= 1, ">= 1"),
            "batch": (self.batch >= 0, ">= 0 (0 = the client's count)"),
        }
        for option, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"{name}: {option} must be {rule}, got {getattr(self, option)}")
        _labels.check(self.labels, name)
        if self.distance not in DISTANCES:
            raise ValueError(
                f"{name}: distance {self.distance!r} unknown; choose one of {', '.join(DISTANCES)}"
            )
        if self.layer_weights not in LAYER_WEIGHTS:
            raise ValueError(
                f"{name}: layer_weights {self.layer_weights!r} unknown; "
                f"choose one of {', '.join(LAYER_WEIGHTS)}"
            )
        if self.unroll not in (True, False, "auto"):
            raise ValueError(f"{name}: unroll must be true, false or 'auto', got {self.unroll!r}")

    def __call__(self, view: ServerView, rng: torch.Generator) -> Reconstruction:
        """Reconstruct the client's batch; ``info``: ``loss``, ``steps``, ``seconds``, ``it_per_s``.

        Randomness (initialisation of every restart) comes from ``rng`` only.
        """
        start = time.perf_counter()
        update = Update(view, unroll=self.unroll)
        size = self.batch or view.num_examples
        labels = _labels.recover(view, size, self.labels)
        weights = layer_weights(len(update.names), self.layer_weights)
        terms = self._terms(view, update, labels, rng)
        low, high = _box(view)

        best_loss, best_x, best_labels = math.inf, None, labels
        for restart in range(self.restarts):
            if update.unrolled and restart:
                # Which example the client trained on in which local step is unknown, and an
                # unrolled prediction depends on it: later restarts try other assignments.
                labels = labels[torch.randperm(len(labels), generator=rng)]
            leaves, images = self._parametrise(view, size, rng)
            optimizer = torch.optim.Adam(leaves, lr=self.lr)
            milestones = [int(self.steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
            schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
            loss = torch.tensor(math.inf)
            for _ in range(self.steps):
                optimizer.zero_grad()
                x = images()
                loss = distance(update(x, labels), update.observed, self.distance, weights)
                if self.tv:
                    loss = loss + self.tv * total_variation(x)
                for term in terms:
                    loss = loss + term(x)
                grads = torch.autograd.grad(loss, leaves)
                for leaf, grad in zip(leaves, grads, strict=True):
                    leaf.grad = grad.sign() if self.signed else grad
                optimizer.step()
                schedule.step()
                if self.boxed and leaves[0] is x:  # pixels are the parameters: project them
                    with torch.no_grad():
                        x.copy_(torch.maximum(torch.minimum(x, high), low))
                if not math.isfinite(loss.item()):
                    break
            with torch.no_grad():
                final = images().detach().clone()
            score = loss.item()
            if best_x is None or score < best_loss:
                best_loss, best_x, best_labels = score, final, labels
        seconds = time.perf_counter() - start
        return Reconstruction(
            inputs=best_x,
            labels=best_labels,
            info={
                "loss": best_loss,
                "steps": float(self.steps * self.restarts),
                "seconds": seconds,
                "it_per_s": self.steps * self.restarts / seconds,
            },
        )

    def _parametrise(
        self, view: ServerView, size: int, rng: torch.Generator
    ) -> tuple[list[Tensor], Callable[[], Tensor]]:
        """The optimised leaves and how to turn them into a candidate batch (model inputs).

        Here the leaves are the pixels themselves, initialised from a standard normal in model
        input space (the paper's ``randn``).
        """
        x = torch.randn((size, *view.task.input_shape), generator=rng).requires_grad_()
        return [x], lambda: x

    def _terms(
        self, view: ServerView, update: Update, labels: Tensor, rng: torch.Generator
    ) -> list[Term]:
        """Extra loss terms on the candidate, evaluated after the update is predicted."""
        return []


def _box(view: ServerView) -> tuple[Tensor, Tensor]:
    """Per-channel bounds of valid model inputs: pixels in [0, 1], normalised like the task."""
    task = view.task
    channels = task.input_shape[0]
    mean = torch.tensor(task.mean or (0.0,) * channels).view(1, -1, 1, 1)
    std = torch.tensor(task.std or (1.0,) * channels).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std
