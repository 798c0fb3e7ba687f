"""A two-layer head with a Gaussian first layer, inserted in front of the classifier.

The "inserted linear layer" of Liu, Wang, Chen & Lei ("Data Reconstruction Attacks and Defenses:
A Systematic Evaluation", AISTATS 2025), which makes the tensor method of Wang, Lee & Lei
(AISTATS 2023) applicable to any classifier.

Threat model: a malicious server that chooses the architecture.  :meth:`GaussianHead.architecture`
replaces the model's last ``nn.Linear`` (the classifier, ``d`` inputs ``z``, the penultimate
features) by ``Linear(d, width) -> activation -> Linear(width, classes)``, so the last two layers
form a two-layer network ``h(z) = Σ_j a_j σ(w_jᵀ z)``; the model stays an ordinary classifier
(it trains like any MLP head).  In the rounds it attacks, the server writes fresh Gaussian rows
``w_j = s·ξ_j``, ``ξ_j ~ N(0, I_d)``, into the first layer with a zero bias and keeps ``ξ``;
the second layer (the classifier) is left as it is.  A client's gradient then reveals the
directions of its batch's features ``z_i`` (see :mod:`fedleak.attacks._tensor`).  Because the
classifier's columns ``a_j`` differ between units, the first layer's row gradients ``G_j``
carry ``a_jᵀ r_i``; multiplied by the known ``a_jc`` of a class ``c`` present in the batch they
take the method's form, and stacking one such weighting per present class (``first`` of shape
``[k, m, d]``) measured best (MLP on digits, B = 4: mean |cos| 0.83-0.86 stacked, 0.75 one
class, 0.67 from the second layer's gradient alone).

Layer names: the head is a :class:`Head` module (an ``nn.Sequential``) that takes the
classifier's place and name, say ``fc``; its children are ``fc.hidden`` (the Gaussian layer,
whose input is the feature ``z``), ``fc.activation`` and ``fc.out`` (the classifier).
:func:`locate` finds them in any model.

Scale: the rows are ``s·ξ_j`` with ``s = scale``, by default ``2/√d`` (``1/√d`` for x³ + x²), so
a pre-activation ``s ξ_jᵀz ~ N(0, s²‖z‖²)`` has a standard deviation of 2 (1) times the RMS of
the features, which measured 0.39-1.7 for fedleak's four models on digits and CIFAR-10.  The
tensor method never evaluates σ (a scale only changes the effective activation ``t ↦ σ(s t)``),
but how much signal each moment order carries does depend on it; per unit, measured
``|E[σ'(sX) He_{n-1}(X)]| / RMS`` for ``X ~ N(0, 1)`` (after removing the mean of σ')::

    std of ξᵀz:     0.5    1     2     4     6
    selu   n = 2:  0.09  0.41  0.60  0.71  0.75     (the order-2 coefficient dips to ~0 at 0.5)
    selu   n = 3:  0.34  0.32  0.29  0.20  0.15
    tanh   n = 3:  0.38  0.50  0.58  0.51  0.43
    x3x2   n = 2:  0.34  0.20  0.10  0.05  0.04     (and x³ + x² of large inputs overflows)
    x3x2   n = 3:  0.23  0.25  0.25  0.26  0.26
    relu:          n = 2: 0.80, n = 4: 0.33 at any scale (ReLU is positively homogeneous)

Secrets (tensors, merged with other modifiers' under this prefix): ``gaussian_head.xi`` (``ξ``,
``[width, d]``, unscaled) and ``gaussian_head.xi_scale`` (``s``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from fedleak import models, seeding
from fedleak.core import Params, Secrets
from fedleak.modifiers import MODIFIERS


class X3X2(nn.Module):
    """``x³ + x²``: the activation whose third derivative is a constant (and fourth zero)."""

    activation = "x3x2"  # its name for code that recognises activations by module

    def forward(self, x: Tensor) -> Tensor:
        """Apply it elementwise."""
        return x**3 + x**2


# The activations of the head; fedleak.attacks._tensor knows the same names.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "tanh": nn.Tanh,
    "x3x2": X3X2,
}


class Head(nn.Sequential):
    """``hidden`` (Gaussian in attacked rounds) -> ``activation`` -> ``out`` (the classifier)."""

    def __init__(self, features: int, width: int, classes: int, activation: str) -> None:
        super().__init__(
            OrderedDict(
                hidden=nn.Linear(features, width),
                activation=ACTIVATIONS[activation](),
                out=nn.Linear(width, classes),
            )
        )
        self.activation_name = activation  # what the attack must assume for σ


@dataclass(frozen=True)
class HeadLayers:
    """Where a :class:`Head` sits in a model: module names, as in ``named_modules``."""

    path: str  # the head (it replaced the classifier under this name)
    hidden: str  # the Gaussian first layer: its input is the feature vector z
    out: str  # the second layer, the classifier
    activation: str  # name of σ, a key of ACTIVATIONS
    features: int  # d, the feature dimension
    width: int  # m, the hidden units


def locate(model: nn.Module) -> HeadLayers:
    """The Gaussian head of ``model``; a ValueError if the model has none (or several)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, Head)]
    if len(found) != 1:
        raise ValueError(
            f"gaussian_head: expected one Gaussian head in the model, found {len(found)}; "
            "build it with the gaussian_head modifier's architecture()"
        )
    path, head = found[0]
    prefix = f"{path}." if path else ""  # "" when the head is the whole model
    return HeadLayers(
        path=path,
        hidden=f"{prefix}hidden",
        out=f"{prefix}out",
        activation=head.activation_name,
        features=head.hidden.in_features,
        width=head.hidden.out_features,
    )


@MODIFIERS.register("gaussian_head")
@dataclass
class GaussianHead:
    """Insert a two-layer head with Gaussian first-layer rows in front of the classifier."""

    adversarial: ClassVar[bool] = True
    width: int = 1000  # hidden units m; the tensor method's error shrinks like √(d/m)
    activation: Literal["relu", "selu", "tanh", "x3x2"] = "selu"
    scale: float = 0.0  # rows are scale·ξ; 0 = 2/√d (1/√d for x3x2), see the module docstring
    rounds: tuple[int, ...] = ()  # server rounds (1-based) to plant ξ in; empty = every round

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"gaussian_head: width must be >= 1, got {self.width}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"gaussian_head: activation must be one of {', '.join(ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        if not (self.scale >= 0 and math.isfinite(self.scale)):
            raise ValueError(f"gaussian_head: scale must be >= 0 (0 = default), got {self.scale}")
        if any(r < 1 for r in self.rounds):
            raise ValueError(f"gaussian_head: rounds must all be >= 1, got {self.rounds}")

    def applies_to(self, round: int) -> bool:
        """Whether the server plants Gaussian rows before ``round``."""
        return not self.rounds or round in self.rounds

    def architecture(self, model: nn.Module) -> nn.Module:
        """Replace the last ``nn.Linear`` of ``model`` (in place) by a :class:`Head`.

        The head's initial weights come from a fixed seed (``seeding.isolated``, which restores
        the global RNG), so every node builds the same module whatever its RNG state.
        """
        if any(isinstance(m, Head) for m in model.modules()):
            raise ValueError("gaussian_head: the model already has a Gaussian head; add it once")
        name, classifier = models.classifier(model, "gaussian_head")
        with seeding.isolated(0, "gaussian_head", self.width, self.activation):
            head = Head(
                classifier.in_features, self.width, classifier.out_features, self.activation
            )
        if not name:  # the model is the classifier itself
            return head
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, head)
        return model

    def __call__(self, params: Params, round: int, rng: torch.Generator) -> tuple[Params, Secrets]:
        """Plant ``scale·ξ`` and a zero bias in the head's first layer (ξ ~ N(0, I) from rng).

        Returns the parameters to send and the secrets ``gaussian_head.xi`` (``ξ``) and
        ``gaussian_head.xi_scale``.
        """
        hidden = _hidden_layer(params)
        weight = params[f"{hidden}.weight"]
        width, features = weight.shape
        if width != self.width:
            raise ValueError(
                f"gaussian_head: the model's head has {width} units but width = {self.width}; "
                "build the model with this modifier's architecture()"
            )
        xi = torch.randn(width, features, generator=rng, dtype=torch.float64).to(weight.device)
        scale = self.scale or (1 if self.activation == "x3x2" else 2) / math.sqrt(features)
        planted = dict(params)
        planted[f"{hidden}.weight"] = (scale * xi).to(weight.dtype)
        planted[f"{hidden}.bias"] = torch.zeros_like(params[f"{hidden}.bias"])
        return planted, {
            "gaussian_head.xi": xi.to(weight.dtype),
            "gaussian_head.xi_scale": torch.tensor(scale, dtype=weight.dtype, device=weight.device),
        }


def _hidden_layer(params: Params) -> str:
    """The name of the head's first layer in a state dict (``<path>.hidden``)."""
    # "<path>.hidden.weight", or "hidden.weight" when the head is the whole model
    prefixes = [k.removesuffix("hidden.weight") for k in params if k.endswith("hidden.weight")]
    heads = [
        f"{p}hidden"
        for p in prefixes
        if p in ("", p.rstrip(".") + ".") and f"{p}out.weight" in params
    ]
    if len(heads) != 1:
        raise ValueError(
            f"gaussian_head: expected one head (<path>.hidden and <path>.out) in the parameters, "
            f"found {len(heads)}; build the model with this modifier's architecture()"
        )
    return heads[0]
