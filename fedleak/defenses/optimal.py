"""Sensitivity-weighted noise and pruning: the "optimal" defenses of Chen, Gürsoy & Lei.

"Optimal Defenses Against Gradient Reconstruction Attacks" (arXiv 2411.03746) bound any
attacker's reconstruction error from below by a Bayesian Cramér–Rao bound whose data term, for
noise of per-coordinate std σ_j, is Σ_j ‖J_j‖²/σ_j², with ``J_j`` the row of the Jacobian of the
gradient with respect to the batch (:mod:`fedleak.defenses._sensitivity`).  Spending a fixed
utility budget Σ_j g_j² σ_j² to maximise the bound gives σ_j² ∝ ‖J_j‖/|g_j|: more noise where the
gradient reveals much about the data and matters little for the descent.  Pruning coordinate j
removes its information at a utility cost of about g_j², so the best coordinates to prune are
the largest ‖J_j‖/|g_j| (a fractional knapsack), not the smallest |g_j|.

Both act on every local step's gradient, because the Jacobian needs the batch: they are
gradient defenses (``gradients(model, batch, loss_fn, grads, rng)``), called by the trainer
between backward and the optimiser step.  In FedSGD (one step) the update is therefore exactly
``-lr`` times the defended gradient; in FedAvg every step is defended.  Compare them with
``gaussian_noise`` / ``gradient_pruning`` at equal total noise power (``optimal_noise(std=k)``
adds noise whose per-coordinate stds have RMS k, as ``gaussian_noise(std=k)`` on the gradient)
and at equal pruned fraction (``amount``).  Estimating ‖J_j‖ costs ``samples`` extra backward
passes per step (see ``simulations/benchmarks/optimal_defense_cost.py``); ``refresh = R``
amortises it over the local steps of a round, estimating at every R-th step and reusing the
estimate in between (:class:`~fedleak.defenses._sensitivity.Amortised`; FedAvg only, since
FedSGD takes one step a round).

Differences from the authors' ``defense.py``: the ratio always uses |g_j| (their quantisation
variant clamps the signed gradient, giving negative coordinates the maximal ratio); the prune
fraction is its own option (they reuse the noise scale); pruning zeroes exactly
``round(amount·n)`` coordinates with ties broken by position, as ``gradient_pruning`` does
(they zero everything at or below a threshold, so ties can zero more), and coordinates whose
gradient is exactly 0 count as the cheapest to prune (pruning them costs no utility).  Noise
keeps their clamps: ratio = ‖J_j‖ / max(|g_j|, 1e-8), capped at 1e6.

Threat model: the client perturbs or sparsifies each step's gradient with knowledge of its own
batch; the server sees only the resulting update and knows the defense and its options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from fedleak.core import Batch, LossFn, Params
from fedleak.defenses import DEFENSES, _params, _sensitivity

EPS = 1e-8  # |g_j| below this counts as this (the authors' clamp), so the ratio stays finite
MAX_RATIO = 1e6  # cap on ‖J_j‖ / |g_j| for noise, as in the authors' code


def _check_samples(name: str, samples: int, refresh: int) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"{name}: samples must be an integer >= 1, got {samples!r}")
    if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
        raise ValueError(
            f"{name}: refresh must be an integer >= 1 (1 = estimate at every step), got {refresh!r}"
        )


@DEFENSES.register("optimal_noise")
@dataclass
class OptimalNoise:
    """Gaussian noise with per-coordinate std ∝ √(‖J_j‖/|g_j|), RMS std = ``std``."""

    std: float = 0.01  # RMS of the per-coordinate stds: the isotropic baseline's std, in grad units
    samples: int = 10  # Gaussian directions K for estimating ‖J_j‖ (relative error ~ 1/√(2K))
    layerwise: bool = False  # one std per tensor, ∝ √(‖J_layer‖_F / ‖g_layer‖_F)
    refresh: int = 1  # estimate ‖J_j‖ every `refresh` local steps, reuse it in between
    _norms: _sensitivity.Amortised = field(
        default_factory=_sensitivity.Amortised, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not self.std >= 0:  # also rejects NaN
            raise ValueError(f"optimal_noise: std must be >= 0, got {self.std}")
        _check_samples("optimal_noise", self.samples, self.refresh)
        if not isinstance(self.layerwise, bool):
            raise ValueError(f"optimal_noise: layerwise must be a bool, got {self.layerwise!r}")

    def gradients(
        self, model: nn.Module, batch: Batch, loss_fn: LossFn, grads: Params, rng: torch.Generator
    ) -> Params:
        """``grads`` plus sensitivity-shaped Gaussian noise; all randomness from ``rng``."""
        if self.std == 0 or not grads:  # no noise: skip the Jacobian work
            return dict(grads)
        norms = self._norms.row_norms(self.refresh, model, batch, loss_fn, grads, self.samples, rng)
        stds = self.stds(norms, grads)
        out = {}
        for name, g in grads.items():
            # Drawn tensor by tensor in key order on the CPU, like gaussian_noise.
            noise = torch.randn(g.shape, generator=rng, dtype=g.dtype).to(g.device)
            out[name] = g + noise * stds[name].to(dtype=g.dtype, device=g.device)
        return out

    def stds(self, norms: Params, grads: Params) -> Params:
        """The noise std of every coordinate, given the row norms ‖J_j‖ and the gradients.

        float64 on the CPU; a 0-dim tensor stands for one std shared by a whole tensor
        (``layerwise``, or the isotropic fallback).  The metrics' reconstruction bound
        (:mod:`fedleak.metrics.bound`) uses them too.
        """
        shape = {n: self._shape(norms[n], g) for n, g in grads.items()}
        # Rescale so that the RMS of the stds over all coordinates is `std`: the same total noise
        # power E‖ε‖² as gaussian_noise(std) on the gradient.
        power = sum(
            float(s.square().sum()) * g.numel() / s.numel()
            for s, g in zip(shape.values(), grads.values(), strict=True)
        )
        total = sum(g.numel() for g in grads.values())
        rms = math.sqrt(power / total) if total else 0.0
        if not rms > 0:  # ‖J‖ = 0 everywhere: nothing to weight by, fall back to isotropic noise
            return {n: torch.full((), self.std, dtype=torch.float64) for n in grads}
        return {n: (self.std / rms) * shape[n] for n in grads}

    def _shape(self, norm: Tensor, grad: Tensor) -> Tensor:
        """Unnormalised std: per coordinate, or one 0-dim value per tensor (float64)."""
        if self.layerwise:
            ratio = _params.global_norm([norm]) / max(_params.global_norm([grad]), EPS)
            return torch.tensor(min(ratio, MAX_RATIO), dtype=torch.float64).sqrt()
        ratio = norm.double() / grad.detach().double().abs().clamp_min(EPS)
        return ratio.clamp_max(MAX_RATIO).sqrt().cpu()


@DEFENSES.register("optimal_pruning")
@dataclass
class OptimalPruning:
    """Zero the fraction ``amount`` of gradient coordinates with the largest ‖J_j‖/|g_j|."""

    amount: float = 0.5  # fraction of coordinates zeroed, in [0, 1)
    samples: int = 10  # Gaussian directions K for estimating ‖J_j‖ (relative error ~ 1/√(2K))
    scope: Literal["global", "layer"] = "global"  # one threshold over all tensors, or per tensor
    refresh: int = 1  # estimate ‖J_j‖ every `refresh` local steps, reuse it in between
    _norms: _sensitivity.Amortised = field(
        default_factory=_sensitivity.Amortised, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not 0 <= self.amount < 1:  # also rejects NaN
            raise ValueError(f"optimal_pruning: amount must be in [0, 1), got {self.amount}")
        _check_samples("optimal_pruning", self.samples, self.refresh)
        if self.scope not in ("global", "layer"):
            raise ValueError(
                f"optimal_pruning: scope must be 'global' or 'layer', got {self.scope!r}"
            )

    def gradients(
        self, model: nn.Module, batch: Batch, loss_fn: LossFn, grads: Params, rng: torch.Generator
    ) -> Params:
        """``grads`` with its most data-revealing coordinates (per unit of descent) zeroed."""
        if self.amount == 0 or not grads:  # nothing to prune: skip the Jacobian work
            return dict(grads)
        norms = self._norms.row_norms(self.refresh, model, batch, loss_fn, grads, self.samples, rng)
        names, tensors = list(grads), list(grads.values())
        scores = [score(norms[n], grads[n]) for n in names]
        if self.scope == "layer":
            masks = [
                _params.unflat(self._mask(s), [g])[0] for s, g in zip(scores, tensors, strict=True)
            ]
        else:
            masks = _params.unflat(self._mask(torch.cat(scores)), tensors)
        return {n: g.masked_fill(m, 0) for n, g, m in zip(names, tensors, masks, strict=True)}

    def _mask(self, scores: Tensor) -> Tensor:
        # The exact-count, position-tie-broken selection gradient_pruning uses.
        return _params.largest(scores, round(self.amount * len(scores)))


def score(norm: Tensor, grad: Tensor) -> Tensor:
    """The pruning priority ‖J_j‖/|g_j| of every coordinate, flat, float64, on the CPU.

    A coordinate whose gradient is exactly zero scores +inf: zeroing it costs no descent, so it
    goes first (as in ``gradient_pruning``, where zeros are the smallest magnitudes).
    """
    ratio = _params.flat([norm]) / _params.flat([grad]).abs()  # x/0 = inf, 0/0 = nan
    return torch.where(_params.flat([grad]) == 0, math.inf, ratio)
