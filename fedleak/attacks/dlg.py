"""Deep Leakage from Gradients (Zhu, Liu & Han, NeurIPS 2019).

Optimise a dummy batch and dummy soft labels with L-BFGS until the gradient they induce on the
global model matches the client's, in squared Euclidean distance summed over all parameters.

Threat model: an honest-but-curious server that knows the architecture, the weights it sent,
the loss and the client's hyper-parameters.  The attack assumes the update is one step of plain
SGD (so ``view.gradient()`` is the exact gradient) on a small batch; with several local steps
it matches an average of gradients and degrades.  ``view.loss_fn`` must accept probability
targets (torch's ``cross_entropy`` does), since the labels are optimised as soft labels.  It
works best on small, untrained, smooth (sigmoid) networks, and is the baseline other inversion
attacks are measured against.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedleak.attacks import ATTACKS
from fedleak.core import Reconstruction, ServerView


@ATTACKS.register("dlg")
@dataclass
class DLG:
    """Gradient matching with L-BFGS on dummy inputs and soft labels."""

    modality: ClassVar[str] = "image"
    steps: int = 300  # outer L-BFGS steps (each runs up to max_iter iterations)
    lr: float = 1.0  # L-BFGS step size, as in the paper's code
    max_iter: int = 20  # inner L-BFGS iterations per step (torch's default)
    batch: int = 0  # examples to reconstruct; 0 = as many as the client reports

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"dlg: steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"dlg: lr must be > 0, got {self.lr}")
        if self.max_iter < 1:
            raise ValueError(f"dlg: max_iter must be >= 1, got {self.max_iter}")
        if self.batch < 0:
            raise ValueError(f"dlg: batch must be >= 0 (0 = the client's count), got {self.batch}")

    def __call__(self, view: ServerView, rng: torch.Generator) -> Reconstruction:
        """Reconstruct the client's batch; ``info`` holds the best ``loss``, ``steps``, ``seconds``.

        Randomness (the dummy initialisation) comes from ``rng`` only.
        """
        start = time.perf_counter()
        model = view.model()
        # The client trained in train mode, so BatchNorm normalised with batch statistics; the
        # dummy batch must be normalised the same way.  Running buffers change only on this copy.
        model.train()
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        observed = view.gradient()
        target = [observed[name].detach() for name, _ in named]

        size = self.batch or view.num_examples
        dtype = target[0].dtype
        x = torch.randn((size, *view.task.input_shape), generator=rng, dtype=dtype)
        y = torch.randn((size, view.task.num_classes), generator=rng, dtype=dtype)
        x.requires_grad_()
        y.requires_grad_()
        optimizer = torch.optim.LBFGS([x, y], lr=self.lr, max_iter=self.max_iter)

        best = _Best(math.inf, x.detach().clone(), y.detach().clone())
        last = math.inf

        def closure() -> Tensor:
            nonlocal best, last
            optimizer.zero_grad()
            # Soft labels as probability targets: for hard labels this is exactly the client's
            # cross-entropy, and torch's cross_entropy accepts probabilities.
            loss = view.loss_fn(model(x), y.softmax(-1))
            grads = torch.autograd.grad(loss, params, create_graph=True)
            distance = sum(((g - t) ** 2).sum() for g, t in zip(grads, target, strict=True))
            # Differentiate w.r.t. the dummies only: backward() would also fill the model's .grad.
            x.grad, y.grad = torch.autograd.grad(distance, [x, y])
            last = distance.item()
            # L-BFGS evaluates several points per step; keep the best one it ever saw.
            if last < best.loss:
                best = _Best(last, x.detach().clone(), y.detach().clone())
            return distance

        done = 0
        while done < self.steps:
            optimizer.step(closure)
            done += 1
            if not math.isfinite(last):
                break  # diverged: later iterates are NaN, the best one is already kept

        return Reconstruction(
            inputs=best.x,
            labels=best.y.argmax(-1),
            info={"loss": best.loss, "steps": float(done), "seconds": time.perf_counter() - start},
        )


@dataclass(frozen=True)
class _Best:
    """The lowest-loss iterate seen so far."""

    loss: float
    x: Tensor
    y: Tensor
