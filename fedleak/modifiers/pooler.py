"""The malicious wide pooler of Li, Liu & Lei (FL@FM-NeurIPS 2023, arXiv:2312.05720).

"Beyond Gradient and Priors in Privacy Attacks: Leveraging Pooler Layer Inputs of Language
Models in Federated Learning".

The server widens the BERT pooler's dense layer from ``H`` to ``H + hd`` units before sending
the model.  The first ``H`` units are the original pooler, untouched.  Each extra unit ``j``
reads only the first ``rd`` coordinates of the pooler input (the final ``[CLS]`` state ``h``)
through a Gaussian row ``s·ξ_j``, ``ξ_j ~ N(0, I_rd)``, with zero bias and its own activation
``σ`` (SELU, x³+x², tanh or ReLU), and feeds the classifier with the same weight vector ``a``
(``a_c = (c + 1)/hd``, as in the official code).  The extra units are then a two-layer network
``Σ_j a σ(s ξ_jᵀ h[:rd])`` with a known Gaussian first layer, whose gradient reveals the
directions of every sentence's ``h[:rd]`` (the tensor method, :mod:`fedleak.attacks._tensor`;
the attack is :mod:`fedleak.attacks.pooler`).

The original units' outputs are unchanged; the logits move by ``a · Σ_j σ(s ξ_jᵀ h[:rd])``, as
in the paper.  ``s`` defaults to ``1/√rd`` (the official code uses 1), so that pre-activations
stay O(1) for LayerNorm-scaled states: with ``s = 1``, x³+x² on MiniLM's ``[CLS]`` states
(``‖h[:100]‖ ≈ 6``) would shift the logits by ~40 and saturate the softmax.

* ``architecture`` replaces the pooler's dense layer, its activation and the classifier by
  wider ones whose extra weights are zero: deterministic, no randomness, the same on every node.
* ``__call__`` plants ``s·ξ`` and ``a`` into the weights to send (fresh ``ξ`` each round it acts
  in, from the round's ``rng``) and returns ``ξ`` and the geometry as secrets (``pooler.*``).
* ``hd = 0`` is the honest ablation: nothing changes, and the secrets say so, so the pooler
  attack runs stage 1 on the pretrained pooler as if it were Gaussian (the paper's unmodified
  tanh branch).

Threat model: a malicious server that changes the architecture it sends (visibly: a reviewer's
objection to the paper).  The clients train the widened model as usual.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from fedleak.attacks._tensor import ACTIVATIONS
from fedleak.core import Params, Secrets, Setting
from fedleak.modifiers import MODIFIERS

NAMES = tuple(sorted(ACTIVATIONS))  # the secret "pooler.activation" indexes this tuple
TAP = "tap"  # WidePoolerDense's submodule whose input is h[:rd]: the attack's feature layer


class WidePoolerDense(nn.Linear):
    """The widened dense layer of the pooler (an ``nn.Linear``: same parameters, same names).

    Its parameter-free ``tap`` submodule is called on the ``rd`` input coordinates the extra
    units read, so that hooks and the feature metric can name exactly those features.
    """

    def __init__(self, in_features: int, out_features: int, rd: int, device=None) -> None:
        super().__init__(in_features, out_features, device=device)
        self.rd = rd
        self.tap = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """The pooler's pre-activations; ``tap`` sees ``x[..., :rd]`` on the way."""
        self.tap(x[..., : self.rd])  # called for its hooks only
        return super().forward(x)


class WidePoolerActivation(nn.Module):
    """The original activation on the first ``width`` units, ``activation`` on the others."""

    def __init__(self, original: nn.Module, width: int, activation: str) -> None:
        super().__init__()
        self.original = original
        self.width = width
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        """Activations ``[..., width + extra]`` of the widened pooler's pre-activations."""
        extra = ACTIVATIONS[self.activation](x[..., self.width :])
        return torch.cat([self.original(x[..., : self.width]), extra], dim=-1)


@MODIFIERS.register("pooler")
@dataclass
class Pooler:
    """Widen the BERT pooler with Gaussian units whose gradient reveals the [CLS] states."""

    adversarial: ClassVar[bool] = True
    hd: int = 4096  # extra pooler units (paper: 30,000 - 768); 0 = honest ablation, no change
    rd: int = 100  # leading input coordinates the extra units read (paper: 100)
    activation: str = "selu"  # of the extra units: selu, x3x2 (x³+x²), tanh, relu
    scale: float = 0.0  # s: rows are s·ξ; 0 = 1/√rd
    rounds: tuple[int, ...] = ()  # server rounds (1-based) to plant in; empty = every round

    def __post_init__(self) -> None:
        if self.hd < 0:
            raise ValueError(f"pooler: hd must be >= 0 (0 = honest ablation), got {self.hd}")
        if self.rd < 1:
            raise ValueError(f"pooler: rd must be >= 1, got {self.rd}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"pooler: activation {self.activation!r} unknown; choose one of {', '.join(NAMES)}"
            )
        if self.scale < 0:
            raise ValueError(f"pooler: scale must be >= 0 (0 = 1/sqrt(rd)), got {self.scale}")
        if any(r < 1 for r in self.rounds):
            raise ValueError(f"pooler: rounds must all be >= 1, got {self.rounds}")

    @property
    def row_scale(self) -> float:
        """``s``: the extra rows are ``s·ξ``."""
        return self.scale or self.rd**-0.5

    def applies_to(self, round: int) -> bool:
        """Whether the server plants fresh Gaussian rows before ``round``."""
        return not self.rounds or round in self.rounds

    def check(self, setting: Setting) -> None:
        """Refuse, when the experiment loads, a model without a widenable BERT-style pooler."""
        if self.hd:
            self._widenable(setting.model)

    def _widenable(self, model: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Module]:
        """The pooler's dense layer, the classifier and the pooler, if they can be widened."""
        dense, classifier = _layers(model)
        if self.rd > dense.in_features:
            raise ValueError(
                f"pooler: rd={self.rd} exceeds the pooler's input width {dense.in_features}; "
                f"use rd <= {dense.in_features}"
            )
        if classifier.in_features != dense.out_features:
            raise ValueError(
                f"pooler: the classifier reads {classifier.in_features} features but the pooler "
                f"has {dense.out_features} units; is the model already widened?"
            )
        parent = model.get_submodule(model.pooler_layer.rpartition(".")[0])
        if not isinstance(getattr(parent, "activation", None), nn.Module):
            raise ValueError(
                f"pooler: {type(parent).__name__} has no 'activation' module after its dense "
                "layer; the wide pooler needs a BERT-style pooler (dense, then activation)"
            )
        return dense, classifier, parent

    def architecture(self, model: nn.Module) -> nn.Module:
        """``model`` with the pooler and classifier widened by ``hd`` units (zero weights)."""
        if not self.hd:
            return model
        dense, classifier, parent = self._widenable(model)
        width = dense.out_features
        wide = WidePoolerDense(dense.in_features, width + self.hd, self.rd, device="meta")
        head = nn.Linear(width + self.hd, classifier.out_features, device="meta")
        # Built on the meta device and filled explicitly: the global RNG is not touched, and
        # every node gets the same zeros for the extra weights (__call__ plants the real ones).
        wide = wide.to_empty(device=dense.weight.device)
        head = head.to_empty(device=classifier.weight.device)
        with torch.no_grad():
            wide.weight.zero_()[:width] = dense.weight
            wide.bias.zero_()[:width] = dense.bias
            head.weight.zero_()[:, :width] = classifier.weight
            head.bias.copy_(classifier.bias)
        model.set_submodule(model.pooler_layer, wide)
        model.set_submodule(model.classifier_layer, head)
        parent.activation = WidePoolerActivation(parent.activation, width, self.activation)
        return model

    def __call__(self, params: Params, round: int, rng: torch.Generator) -> tuple[Params, Secrets]:
        """The weights to send with fresh Gaussian rows planted, and the secrets.

        Secrets: ``pooler.hd`` (0 for the honest ablation, then nothing else), ``pooler.xi``
        ``[hd, rd]`` (``ξ``, unscaled), ``pooler.scale`` (``s``), ``pooler.width`` (original
        units ``H``), ``pooler.activation`` (index into :data:`NAMES`), ``pooler.head`` (``a``).
        """
        if not self.hd:
            return params, {"pooler.hd": torch.tensor(0)}
        dense, classifier = _parameter_names(params, self.hd)
        weight, bias = params[f"{dense}.weight"].clone(), params[f"{dense}.bias"].clone()
        head = params[f"{classifier}.weight"].clone()
        width = weight.shape[0] - self.hd
        xi = torch.randn(self.hd, self.rd, generator=rng, dtype=torch.float64).to(weight.device)
        xi = xi.to(weight.dtype)
        weight[width:] = 0
        weight[width:, : self.rd] = self.row_scale * xi
        bias[width:] = 0
        classes = head.shape[0]
        a = (
            torch.arange(1, classes + 1, dtype=head.dtype, device=head.device) / self.hd
        )  # a_c = (c + 1) / hd
        head[:, width:] = a[:, None]
        sent = {
            **params,
            f"{dense}.weight": weight,
            f"{dense}.bias": bias,
            f"{classifier}.weight": head,
        }
        secrets = {
            "pooler.hd": torch.tensor(self.hd, device=xi.device),
            "pooler.xi": xi,
            "pooler.scale": torch.tensor(self.row_scale, dtype=torch.float64, device=xi.device),
            "pooler.width": torch.tensor(width, device=xi.device),
            "pooler.activation": torch.tensor(NAMES.index(self.activation), device=xi.device),
            "pooler.head": a,
        }
        return sent, secrets

    def install(self, model: nn.Module, rng: torch.Generator) -> tuple[nn.Module, Secrets]:
        """A copy of ``model`` as the server would send it, and the secrets (for the Python API).

        ``view = dataclasses.replace(ServerView.from_local_step(wide, batch, task),
        secrets=secrets)`` is then the view of one FedSGD step on the modified model.
        """
        wide = self.architecture(copy.deepcopy(model))
        params, secrets = self(dict(wide.state_dict()), 1, rng)
        wide.load_state_dict(params)
        return wide, secrets


def _layers(model: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The pooler's dense layer and the classifier of a fedleak text model."""
    names = (getattr(model, "pooler_layer", ""), getattr(model, "classifier_layer", ""))
    if not all(names):
        raise ValueError(
            f"pooler: {type(model).__name__} names no pooler or classifier layer; the wide "
            "pooler needs a BERT-family model with a pooler (model 'bert' or 'tiny_bert')"
        )
    dense, classifier = (model.get_submodule(n) for n in names)
    if not isinstance(dense, nn.Linear) or not isinstance(classifier, nn.Linear):
        raise ValueError("pooler: the pooler's dense layer and the classifier must be nn.Linear")
    return dense, classifier


def _parameter_names(params: Params, hd: int) -> tuple[str, str]:
    """The widened pooler and classifier in ``params``, by their names and shapes.

    The pooler's weight is ``*pooler.dense.weight`` ``[H + hd, H_in]``; the classifier is the
    one weight that reads its ``H + hd`` outputs.
    """
    poolers = [k for k in params if k.endswith("pooler.dense.weight")]
    if len(poolers) != 1:
        raise ValueError(
            f"pooler: expected one '*pooler.dense.weight' in the model, found {poolers or 'none'}"
        )
    dense = poolers[0].removesuffix(".weight")
    width = params[poolers[0]].shape[0]
    heads = [
        k.removesuffix(".weight")
        for k, v in params.items()
        if k.endswith(".weight") and v.ndim == 2 and v.shape[1] == width and k != poolers[0]
    ]
    if width <= hd or len(heads) != 1:
        raise ValueError(
            f"pooler: the model's pooler has {width} units, not widened by hd={hd}; apply the "
            "modifier's architecture first (fedleak does so for [[modifiers]] tables)"
        )
    return dense, heads[0]
