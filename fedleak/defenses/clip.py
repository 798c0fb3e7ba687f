"""Clipping of the update: bound how much any one client's update, or coordinate, can say.

Clipping the whole update to a global L2 norm (``clip``) is the per-client step of DP-FedAvg
(McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018) and of
Flower's ``LocalDpMod``.  On its own it only rescales the update and keeps its direction; its
purpose is to bound each client's contribution (the sensitivity) so that added noise
(``gaussian_noise``) means something.

Clamping every coordinate to ``[-bound, bound]`` (``coordinate_clip``) bounds the L∞
sensitivity instead, the natural partner of Laplacian noise; unlike L2 clipping it changes the
update's direction (large coordinates saturate).  It is the clipping step of the DP-SGD-style
defense of Chen, Gürsoy & Lei ("Optimal Defenses Against Gradient Reconstruction Attacks",
arXiv 2411.03746), whose code clamps each gradient coordinate to ±c before adding noise.

Clipping every *example's* gradient to an L2 norm before averaging (``per_example_clip``) is
DP-SGD's clipping step (Abadi et al., CCS 2016) without its noise: it bounds how much any one
example moves the update, the record-level sensitivity, and is a defense on its own in the
gradient-inversion literature (Paper A, Liu et al., lists "gradient clipping").  It needs the
batch, so it is a gradient defense, run by the trainer at each local step; per-example
gradients come from ``torch.func`` (``vmap`` of ``grad`` over the examples, one forward and
backward for the whole batch), which needs layers that treat examples independently (no
BatchNorm).  It *recomputes* the step's gradient from the batch and so discards what an earlier
gradient defense did to it: list it first among the gradient defenses.  Forward hooks that draw
randomness (fedleak's ``dropout``) draw fresh masks, one per example, for this recomputation.

Threat model: the client transforms what it sends; the server sees only the clipped update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedleak.core import Batch, LossFn, Params, Setting
from fedleak.defenses import DEFENSES, _params


@DEFENSES.register("clip")
@dataclass
class Clip:
    """Scale the update down so its global L2 norm is at most ``max_norm``."""

    max_norm: float = 1.0  # bound on the L2 norm over all floating-point tensors together

    def __post_init__(self) -> None:
        if not self.max_norm > 0:  # also rejects NaN
            raise ValueError(f"clip: max_norm must be > 0, got {self.max_norm}")

    def __call__(self, delta: Params, rng: torch.Generator) -> Params:
        """Return ``delta`` scaled by ``min(1, max_norm / norm)``; ``rng`` is unused."""
        norm = _params.global_norm(_params.floating(delta))
        if not norm > self.max_norm:  # below the bound, a zero update or a NaN norm: unchanged
            return dict(delta)
        scale = self.max_norm / norm
        return _params.map_floating(delta, lambda d: d * scale)


@DEFENSES.register("coordinate_clip")
@dataclass
class CoordinateClip:
    """Clamp every coordinate of the update to ``[-bound, bound]``."""

    bound: float = 0.01  # largest |coordinate| sent, in update units (the L∞ sensitivity)

    def __post_init__(self) -> None:
        if not self.bound > 0:  # also rejects NaN
            raise ValueError(f"coordinate_clip: bound must be > 0, got {self.bound}")

    def __call__(self, delta: Params, rng: torch.Generator) -> Params:
        """Return ``delta`` clamped coordinate-wise; ``rng`` is unused."""
        return _params.map_floating(delta, self._clamp)

    def _clamp(self, tensor: torch.Tensor) -> torch.Tensor:
        # A bound beyond the dtype's range (1e6 in half precision) clamps nothing, but torch
        # refuses to convert it; cap it at the largest finite value first.
        bound = min(self.bound, torch.finfo(tensor.dtype).max)
        return tensor.clamp(-bound, bound)


@DEFENSES.register("per_example_clip")
@dataclass
class PerExampleClip:
    """Clip each example's gradient to L2 norm ``max_norm``, then average (DP-SGD, no noise)."""

    max_norm: float = 1.0  # bound on every example's gradient norm; inf = off (Python only)

    def __post_init__(self) -> None:
        if not self.max_norm > 0:  # also rejects NaN; 0 would erase every gradient
            raise ValueError(
                f"per_example_clip: max_norm must be > 0 (inf = no clipping), got {self.max_norm}"
            )

    def check(self, setting: Setting) -> None:
        """Refuse, when the experiment loads, a model this defense cannot train."""
        self.validate(setting.model)

    def validate(self, model: nn.Module) -> None:
        """Raise ValueError if per-example gradients of ``model`` do not exist (BatchNorm)."""
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError(
                "per_example_clip: BatchNorm mixes the examples of a batch, so per-example "
                'gradients do not exist; use group norm instead ([model] norm = "group").'
            )

    def gradients(
        self, model: nn.Module, batch: Batch, loss_fn: LossFn, grads: Params, rng: torch.Generator
    ) -> Params:
        """The mean of the clipped per-example gradients; same keys, shapes, dtypes as ``grads``."""
        if math.isinf(self.max_norm) or not grads:  # no bound: the batch gradient as it is
            return dict(grads)
        clipped = self.clipped(model, batch, loss_fn, list(grads))
        return {n: clipped[n].mean(0).to(dtype=g.dtype) for n, g in grads.items()}

    def clipped(
        self, model: nn.Module, batch: Batch, loss_fn: LossFn, names: list[str]
    ) -> dict[str, Tensor]:
        """Every example's gradient of the parameters ``names``, clipped: ``[B, *shape]`` each."""
        self.validate(model)
        per_example = per_example_gradients(model, batch, loss_fn, names)
        # One norm per example over all parameters together, as DP-SGD (Opacus: flat clipping).
        squares = sum(g.double().flatten(1).square().sum(1) for g in per_example.values())
        norms = torch.as_tensor(squares, device=batch.labels.device).sqrt()
        # norm 0 gives inf -> factor 1; NaN norms stay NaN, as a NaN gradient would.
        factor = (self.max_norm / norms).clamp(max=1.0)
        return {
            n: g * factor.view(-1, *[1] * (g.dim() - 1)).to(g.dtype) for n, g in per_example.items()
        }


def per_example_gradients(
    model: nn.Module, batch: Batch, loss_fn: LossFn, names: list[str]
) -> dict[str, Tensor]:
    """``∇_θ loss(model(x_i), y_i)`` for every example i, for the parameters ``names``.

    ``loss_fn`` is mean-reduced, so on one example it is that example's loss and the batch
    gradient is the mean of these.  ``torch.func``: one vmapped forward and backward pass.
    """
    from torch.func import functional_call, grad, vmap

    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in names}

    def loss_of_one(params: dict[str, Tensor], inputs: Tensor, label: Tensor) -> Tensor:
        output = functional_call(model, params, (inputs.unsqueeze(0),))
        return loss_fn(output, label.unsqueeze(0))

    with torch.enable_grad():
        return vmap(grad(loss_of_one), in_dims=(None, 0, 0), randomness="different")(
            params, batch.inputs, batch.labels
        )
