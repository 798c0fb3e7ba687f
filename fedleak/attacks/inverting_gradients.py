"""Inverting Gradients (Geiping, Bauermeister, Dröge & Moeller, NeurIPS 2020).

Optimise a candidate batch so that the update it induces has the client's update's *direction*:
cosine distance over all parameters (magnitude carries the learning rate and the batch size,
not the images), plus total variation as an image prior.  Labels are recovered first and held
fixed.  The optimiser is the paper's: Adam on the *sign* of the gradient, step decay at 3/8, 5/8
and 7/8 of the budget, projection into the valid pixel box after every step; or plain Adam, or
L-BFGS with a strong-Wolfe line search (breaching's alternative, fast where the objective is
smooth).  As breaching runs it, each trial returns its best iterate (lowest objective, not the
last one), and restarts are scored by the gradient-matching distance alone, so the prior's
weight does not decide which trial wins.

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
from typing import ClassVar, Literal

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
    restarts: int = 1  # independent trials; the one that matches the update best is returned
    # "signed_adam": Adam on the sign of the gradient (the paper's); "adam"; "lbfgs": L-BFGS,
    # one iteration per step with a strong-Wolfe line search (lr 1 is its natural step).
    optimizer: Literal["signed_adam", "adam", "lbfgs"] = "signed_adam"
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

        ``loss`` is the returned candidate's gradient-matching distance.  Randomness
        (initialisation of every restart) comes from ``rng`` only.
        """
        start = time.perf_counter()
        update = Update(view, unroll=self.unroll)
        size = self.batch or view.num_examples
        labels = _labels.recover(view, size, self.labels)
        weights = layer_weights(len(update.names), self.layer_weights)
        terms = self._terms(view, update, labels, rng)
        low, high = _box(view)

        trials: list[tuple[float, Tensor, Tensor]] = []  # (match, inputs, labels)
        for restart in range(self.restarts):
            if update.unrolled and restart:
                # Which example the client trained on in which local step is unknown, and an
                # unrolled prediction depends on it: later restarts try other assignments.
                labels = labels[torch.randperm(len(labels), generator=rng).to(labels.device)]
            leaves, images = self._parametrise(view, size, rng)

            def objective(x: Tensor, labels: Tensor = labels) -> Tensor:
                loss = distance(update(x, labels), update.observed, self.distance, weights)
                if self.tv:
                    loss = loss + self.tv * total_variation(x)
                for term in terms:
                    loss = loss + term(x)
                return loss

            pixels = self.boxed and leaves[0] is images()  # pixels are the parameters: project
            found = self._optimise(leaves, images, objective, (low, high) if pixels else None)
            match = distance(update(found, labels), update.observed, self.distance, weights).item()
            trials.append((match, found, labels))
        best_loss, best_x, best_labels = min(trials, key=lambda trial: trial[0])
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

    def _optimise(
        self,
        leaves: list[Tensor],
        images: Callable[[], Tensor],
        objective: Callable[[Tensor], Tensor],
        box: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """Minimise ``objective(images())`` over ``leaves``; return the best iterate's images.

        Each iteration first evaluates the current iterate (after the last projection), so the
        best one seen is a candidate the box allows.  A non-finite objective ends the trial.
        """
        if self.optimizer == "lbfgs":
            optimizer: torch.optim.Optimizer = torch.optim.LBFGS(
                leaves, lr=self.lr, max_iter=1, history_size=100, line_search_fn="strong_wolfe"
            )
            schedule = None
        else:
            optimizer = torch.optim.Adam(leaves, lr=self.lr)
            milestones = [int(self.steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
            schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        best_value, best_x = math.inf, None
        evaluated: list[tuple[float, Tensor]] = []  # every objective evaluation of this step

        def closure() -> Tensor:
            optimizer.zero_grad()
            x = images()
            loss = objective(x)
            grads = torch.autograd.grad(loss, leaves)
            for leaf, grad in zip(leaves, grads, strict=True):
                leaf.grad = grad.sign() if self.optimizer == "signed_adam" else grad
            evaluated.append((loss.item(), x.detach()))
            return loss

        for _ in range(self.steps):
            evaluated.clear()
            optimizer.step(closure)
            value, x = evaluated[0]  # the iterate this step started from (line searches add more)
            if not math.isfinite(value):
                break
            if value < best_value:
                best_value, best_x = value, x.clone()
            if schedule is not None:
                schedule.step()
            if box is not None:
                with torch.no_grad():
                    leaves[0].copy_(torch.maximum(torch.minimum(leaves[0], box[1]), box[0]))
        if best_x is None:  # the very first objective was not finite
            with torch.no_grad():
                best_x = images().detach().clone()
        return best_x

    def _parametrise(
        self, view: ServerView, size: int, rng: torch.Generator
    ) -> tuple[list[Tensor], Callable[[], Tensor]]:
        """The optimised leaves and how to turn them into a candidate batch (model inputs).

        Here the leaves are the pixels themselves, initialised from a standard normal in model
        input space (the paper's ``randn``).
        """
        x = torch.randn((size, *view.task.input_shape), generator=rng).to(view.device)
        x.requires_grad_()
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
    mean = torch.tensor(task.mean or (0.0,) * channels, device=view.device).view(1, -1, 1, 1)
    std = torch.tensor(task.std or (1.0,) * channels, device=view.device).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std
