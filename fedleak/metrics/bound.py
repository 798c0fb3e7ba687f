"""Paper B's lower bound on any attacker's reconstruction error, for the noise defenses.

Chen, Gürsoy & Lei ("Optimal Defenses Against Gradient Reconstruction Attacks", arXiv
2411.03746) bound the error of *every* estimator x̂(Y) of a client's batch x (d values) from
its noisy shared gradient Y = G(x) + ε by the Bayesian Cramér–Rao (van Trees) inequality::

    E‖x̂ − x‖² ≥ d² / ( E_π tr(Jᵀ Σ⁻¹ J) + tr I_π )

with J = ∂G/∂x, Σ the noise covariance and I_π the Fisher information of the prior π on x.  For
independent noise of std σ_j on coordinate j the data term is Σ_j ‖J_j‖²/σ_j², the quantity the
optimal defenses shape.  Divided by d, the bound is on the mean squared error per pixel, the
``mse`` the image metrics report, so the two can stand side by side: how far the best attack is
from what is information-theoretically possible.

This is an *evaluation* quantity, computed by the metrics side, which may see ground truth: it
needs the true batch (its Jacobian, and for ``optimal_noise`` its gradient).  No attack sees it.

How it is computed, and what that assumes (each a choice made explicit):

* **Where it applies.** One local SGD step (FedSGD), so the update is −lr·g(x) + noise exactly,
  and exactly one defense, a noise defense: ``gaussian_noise`` (std σ on the update: σ/lr on
  the gradient), ``laplacian_noise`` (scale b; Laplace noise's Fisher information is 1/b², the
  Gaussian's with σ = b, so the same formula holds) or ``optimal_noise`` (per-coordinate stds on
  the gradient).  Anything else (clipping, pruning, several local steps, BatchNorm running
  statistics, which depend on x and would carry information the bound leaves out) makes the
  bound not apply: :func:`mse_lower_bound` returns NaN with the reason.
* **Pixel space.** J is taken with respect to pixels in [0, 1] (the model's input
  normalisation undone), the space the metrics measure MSE in.
* **At the true batch.** E_π over the prior is replaced by the value at the true x (one sample
  of it); ‖J_j‖ is Paper B's random sketch (:mod:`fedleak.defenses._sensitivity`), unbiased for
  Σ_j ‖J_j‖² with ``samples`` directions.  For ``optimal_noise`` the stds are recomputed from an
  independent sketch, not the client's own: about 1/√(2K) relative error per coordinate.
* **The prior.** An isotropic Gaussian prior of per-pixel variance ``prior_var`` (I_π = I/τ²),
  e.g. the data's pixel variance (:func:`pixel_variance`).  The bound then lies in (0, τ²]:
  with no information from the update the best estimate is the prior mean, of error τ².
* **Matching.** The metrics pair reconstructions with truths by the Hungarian algorithm on
  the truth itself before measuring MSE, which no estimator can do; with batches of more than
  one example the matched empirical MSE can therefore dip slightly below the bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fedleak.core import Batch, ServerView, Task
from fedleak.defenses import _sensitivity

NOISE_DEFENSES = ("gaussian_noise", "laplacian_noise", "optimal_noise")


@dataclass(frozen=True)
class Bound:
    """A lower bound on the expected per-pixel MSE of any reconstruction of one view."""

    mse: float  # the bound, in pixel units² (comparable with metrics' "mse"); NaN: not applicable
    fisher: float  # tr(Jᵀ Σ⁻¹ J) / d: the update's Fisher information per pixel
    prior_var: float  # τ², the prior's per-pixel variance (the bound's ceiling)
    reason: str = ""  # why the bound does not apply (empty when it does)


def not_applicable(view: ServerView, defenses: Sequence[Any]) -> str:
    """Why the bound does not apply to ``view`` under ``defenses``; empty when it does."""
    names = [getattr(d, "name", type(d).__name__) for d in defenses]
    if len(defenses) != 1 or names[0] not in NOISE_DEFENSES:
        return (
            f"the bound is for exactly one noise defense ({', '.join(NOISE_DEFENSES)}); "
            f"this run has {names or 'none'}"
        )
    if view.task.modality != "image":
        return f"the bound is for images; this task's modality is {view.task.modality!r}"
    if view.client < 0:
        return "a securely aggregated view mixes several clients' batches"
    if view.local_steps != 1:
        return f"the bound is for one local step (FedSGD); this view took {view.local_steps}"
    if any(b.is_floating_point() for b in view.build_model().buffers()):
        return "the model has floating buffers (e.g. BatchNorm statistics) that depend on x"
    return ""


def mse_lower_bound(
    view: ServerView,
    truth: Batch,
    defenses: Sequence[Any],
    *,
    prior_var: float,
    samples: int = 32,
    rng: torch.Generator,
) -> Bound:
    """Paper B's bound on the per-pixel MSE of any attack on ``view`` (see the module text).

    ``truth`` is the batch the client trained on; ``defenses`` the run's defenses (the bound
    applies when they are one noise defense); ``prior_var`` the prior's per-pixel variance.
    """
    if not prior_var > 0:
        raise ValueError(f"mse_lower_bound: prior_var must be > 0 (inf = flat), got {prior_var}")
    if reason := not_applicable(view, defenses):
        return Bound(math.nan, math.nan, prior_var, reason)
    (defense,) = defenses
    if (defense.scale if defense.name == "laplacian_noise" else defense.std) == 0:
        return Bound(0.0, math.inf, prior_var)  # no noise: the update may reveal x exactly
    model = view.model()
    model.train()  # as the client computed its gradient
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    pixels = _FromPixels(model, view.task)
    batch = Batch(pixels.pixels(truth.inputs), truth.labels)
    wrapped = [f"model.{n}" for n in names]
    norms = _sensitivity.row_norms(pixels, batch, view.loss_fn, wrapped, samples, rng)
    squares = {n: norms[f"model.{n}"].double().square() for n in names}
    if defense.name == "optimal_noise":
        # The client's stds: from its gradient and ‖J_j‖ in its own (normalised) input space.
        loss = view.loss_fn(model(truth.inputs), truth.labels)
        params = [dict(model.named_parameters())[n] for n in names]
        grads = dict(zip(names, torch.autograd.grad(loss, params), strict=True))
        own = _sensitivity.row_norms(model, truth, view.loss_fn, names, samples, rng)
        stds = defense.stds(own, grads)  # gradient units; lr scales signal and noise alike
        # A coordinate that does not depend on x (‖J_j‖ = 0; the defense then gives it no noise
        # either) carries no information: 0, not 0/0.
        information = sum(
            float(torch.where(squares[n] == 0, 0.0, squares[n] / stds[n].square()).sum())
            for n in names
        )
    else:
        # Update-space noise of std σ (Laplace: scale b, Fisher 1/b²) on −lr·g: σ/lr on g.
        sigma = defense.std if defense.name == "gaussian_noise" else defense.scale
        information = sum(float(s.sum()) for s in squares.values()) * (view.lr / sigma) ** 2
    d = truth.inputs.numel()
    fisher = information / d
    return Bound(1.0 / (fisher + 1.0 / prior_var), fisher, prior_var)


def pixel_variance(inputs: Tensor, task: Task) -> float:
    """The mean over pixels of each pixel's variance across ``inputs`` (in pixel space)."""
    if len(inputs) < 2:
        raise ValueError(f"pixel_variance: need at least 2 examples, got {len(inputs)}")
    pixels = task.to_pixels(inputs.detach().double())
    return float(pixels.var(dim=0).mean())


class _FromPixels(nn.Module):
    """``model`` fed with pixels in [0, 1]: normalises them first, so J is per pixel."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        shape = (1, -1, *[1] * (len(task.input_shape) - 1))
        device = next(model.parameters()).device
        self.register_buffer("mean", torch.tensor(task.mean or (0.0,), device=device).view(shape))
        self.register_buffer("std", torch.tensor(task.std or (1.0,), device=device).view(shape))

    def pixels(self, inputs: Tensor) -> Tensor:
        """Model inputs -> pixels, without to_pixels' clamp (the forward pass must be exact)."""
        return inputs.detach() * self.std.to(inputs.dtype) + self.mean.to(inputs.dtype)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model((pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype))
