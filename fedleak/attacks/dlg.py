"""Deep Leakage from Gradients (Zhu, Liu & Han, NeurIPS 2019) and iDLG (Zhao, Mopuri & Bilen 2020).

DLG optimises a dummy batch and dummy soft labels with L-BFGS until the update they induce on
the global model matches the client's, in squared Euclidean distance summed over all parameters.
iDLG is the same optimisation with the labels read off the classifier's gradient first
(:mod:`fedleak.attacks._labels`) and held fixed, which removes DLG's label ambiguity.

Threat model: an honest-but-curious server that knows the architecture, the weights it sent,
the loss and the client's hyper-parameters.  With several local steps the predicted update
unrolls the client's local SGD (:class:`~fedleak.attacks._matching.Update`).  ``view.loss_fn``
must accept probability targets for joint labels (torch's ``cross_entropy`` does).  It works
best on small, untrained, smooth (sigmoid) networks, and is the baseline other inversion
attacks are measured against.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedleak.attacks import ATTACKS, _labels
from fedleak.attacks._matching import Update, distance
from fedleak.core import Reconstruction, ServerView


@ATTACKS.register("dlg")
@dataclass
class DLG:
    """Gradient matching with L-BFGS on dummy inputs and (joint or recovered) labels."""

    modality: ClassVar[str] = "image"
    steps: int = 300  # outer L-BFGS steps (each runs up to max_iter iterations)
    lr: float = 1.0  # L-BFGS step size, as in the paper's code
    max_iter: int = 20  # inner L-BFGS iterations per step (torch's default)
    batch: int = 0  # examples to reconstruct; 0 = as many as the client reports
    labels: str = "joint"  # "joint" soft labels optimised with the inputs, or a recovery strategy
    unroll: bool | str = "auto"  # unroll the client's local steps ("auto": when it took several)

    def __post_init__(self) -> None:
        name = self.name  # type: ignore[attr-defined]  # set by ATTACKS.register
        if self.steps < 1:
            raise ValueError(f"{name}: steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"{name}: lr must be > 0, got {self.lr}")
        if self.max_iter < 1:
            raise ValueError(f"{name}: max_iter must be >= 1, got {self.max_iter}")
        if self.batch < 0:
            raise ValueError(
                f"{name}: batch must be >= 0 (0 = the client's count), got {self.batch}"
            )
        if self.labels != "joint":
            _labels.check(self.labels, name)
        if self.unroll not in (True, False, "auto"):
            raise ValueError(f"{name}: unroll must be true, false or 'auto', got {self.unroll!r}")

    def __call__(self, view: ServerView, rng: torch.Generator) -> Reconstruction:
        """Reconstruct the client's batch; ``info`` holds the best ``loss``, ``steps``, ``seconds``.

        Randomness (the dummy initialisation) comes from ``rng`` only.
        """
        start = time.perf_counter()
        update = Update(view, unroll=self.unroll)
        size = self.batch or view.num_examples
        dtype = update.observed[0].dtype
        # Drawn on the CPU, where the generator lives, then moved: the same start on any device.
        x = torch.randn((size, *view.task.input_shape), generator=rng, dtype=dtype).to(view.device)
        y = torch.randn((size, view.task.num_classes), generator=rng, dtype=dtype).to(view.device)
        joint = self.labels == "joint"
        fixed = None if joint else _labels.recover(view, size, self.labels)
        x.requires_grad_()
        y.requires_grad_(joint)
        leaves = [x, y] if joint else [x]
        optimizer = torch.optim.LBFGS(leaves, lr=self.lr, max_iter=self.max_iter)

        best = _Best(math.inf, x.detach().clone(), y.detach().clone())
        last = math.inf

        def closure() -> Tensor:
            nonlocal best, last
            optimizer.zero_grad()
            # Soft labels as probability targets: for hard labels this is exactly the client's
            # cross-entropy, and torch's cross_entropy accepts probabilities.
            labels = y.softmax(-1) if joint else fixed
            loss = distance(update(x, labels), update.observed, "l2")
            # Differentiate w.r.t. the dummies only: backward() would also fill other .grads.
            for leaf, grad in zip(leaves, torch.autograd.grad(loss, leaves), strict=True):
                leaf.grad = grad
            last = loss.item()
            # L-BFGS evaluates several points per step; keep the best one it ever saw.
            if last < best.loss:
                best = _Best(last, x.detach().clone(), y.detach().clone())
            return loss

        done = 0
        while done < self.steps:
            optimizer.step(closure)
            done += 1
            if not math.isfinite(last):
                break  # diverged: later iterates are NaN, the best one is already kept

        return Reconstruction(
            inputs=best.x,
            labels=best.y.argmax(-1) if joint else fixed,
            info={"loss": best.loss, "steps": float(done), "seconds": time.perf_counter() - start},
        )


@ATTACKS.register("idlg")
@dataclass
class IDLG(DLG):
    """DLG with the labels recovered from the classifier's gradient (iDLG) and held fixed."""

    labels: str = "idlg"


@dataclass(frozen=True)
class _Best:
    """The lowest-loss iterate seen so far."""

    loss: float
    x: Tensor
    y: Tensor
