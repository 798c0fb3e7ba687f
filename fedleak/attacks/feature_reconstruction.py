"""Feature reconstruction: Inverting Gradients + a deep image prior + feature matching.

Liu, Wang, Chen & Lei, "Data Reconstruction Attacks and Defenses: A Systematic Evaluation"
(AISTATS 2025; Paper A of notes/vision-attacks-and-defenses.md).

The objective is Inverting Gradients' (cosine gradient matching, optionally layer-weighted, plus
total variation), optimised over the weights ``ω`` of an untrained U-Net ``x̂ = G_ω(ζ)`` instead
of the pixels, plus a feature-matching term

    λ_f · mean_i [1 − cos²(f(x̂_i), ẑ_i)]

where ``f(x̂)`` is the input of a fully connected layer of the model (read by a forward pre-hook
during the same forward pass that predicts the update) and ``ẑ_i`` are that layer's inputs
recovered from the client's update *before* the optimisation starts:

* ``features = "analytic"``: for ``u = W z + b``, ``∂L/∂W_c = Σ_i (∂L/∂u_ic) z_iᵀ`` and
  ``∂L/∂b_c = Σ_i ∂L/∂u_ic``, so row ``c`` of ``∂W / ∂b`` is ``z`` exactly for one example and,
  for a batch with distinct labels, approximately the feature of the example labelled ``c`` (its
  residual dominates that row).  Read at the classifier, for the recovered labels.
* ``features = "tensor"``: the tensor method of Wang, Lee & Lei (AISTATS 2023,
  :mod:`fedleak.attacks._tensor`) on a two-layer head ``Linear → σ → Linear``: with the
  ``gaussian_head`` modifier's secret Gaussian first layer ``ξ`` when the view carries it (the
  paper's set-up, a malicious or architecture-choosing server), otherwise on the model's own last
  two linear layers with their sent weights standing in for ``ξ`` (the honest variant, which
  only approximates the method's Gaussian assumption).
* ``features = "auto"``: analytic for one example (exact there), the tensor method when the
  gaussian_head secrets are in the view, analytic otherwise.
* ``features = "none"``: no feature term.

Which recovered feature belongs to which batch slot is unknown (no ground truth is used):
analytic features are bound to the slot trained with the same label; tensor features are
re-assigned to the slots by maximum total cos² (Hungarian) every ``rematch`` steps, or each
claims its best-matching slot (``assign = "max"``, assignment-free).  The paper sums the term
over the batch; here it is a mean, so one ``λ_f`` fits every batch size.

Each ingredient switches off independently, so the ablation "IG alone, + prior, + features" is
one sweep over ``prior`` and ``features``; with both off this *is* Inverting Gradients (same
loop, same random draws, same result).  The optimisation loop is
:class:`~fedleak.attacks.inverting_gradients.InvertingGradients`'; this class only supplies the
parametrisation and the extra term.

Threat model: honest-but-curious server in FedSGD (FedAvg with the local steps unrolled, the
features then being those of the first local pass), except that ``features = "tensor"`` with the
gaussian_head modifier assumes a server that chose the model's head (Paper A's inserted linear
layer; notes §2.2).  Paper A's U-Net depth, λ's and budgets are not published in what was read;
the defaults here were tuned on CIFAR-10 with the ConvNet (simulations/benchmarks/vision_attacks).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from fedleak.attacks import ATTACKS, _prior, _tensor
from fedleak.attacks._matching import Update
from fedleak.attacks.inverting_gradients import InvertingGradients, Term
from fedleak.core import Reconstruction, ServerView, Setting
from fedleak.models import classifier
from fedleak.modifiers import gaussian_head

PRIORS = ("dip", "none")
FEATURES = ("auto", "analytic", "tensor", "none")
ASSIGNMENTS = ("auto", "labels", "hungarian", "max")
# Activation modules the tensor method knows, by the name _tensor.ACTIVATIONS uses.
_ACTIVATIONS: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.SELU: "selu", nn.Tanh: "tanh"}
SECRET = "gaussian_head.xi"  # the gaussian_head modifier's secret first-layer rows ξ


@ATTACKS.register("feature_reconstruction")
@dataclass
class FeatureReconstruction(InvertingGradients):
    """IG + deep image prior + feature matching to features recovered from the update."""

    modality: ClassVar[str] = "image"
    prior: str = "dip"  # "dip": optimise an untrained U-Net's weights; "none": the pixels
    prior_width: int = 32  # channels of the U-Net's first block
    prior_lr: float = 0.01  # Adam step size of the U-Net's weights (lr stays the pixels')
    features: str = "auto"  # "auto", "analytic", "tensor" or "none" (no feature term)
    feature_weight: float = 1.0  # λ_f, the weight of the feature-matching term
    assign: str = "auto"  # "labels", "hungarian", "max"; auto: labels (analytic), else hungarian
    rematch: int = 1  # steps between Hungarian re-assignments of features to slots

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.name  # type: ignore[attr-defined]  # set by ATTACKS.register
        for option, allowed in (
            ("prior", PRIORS),
            ("features", FEATURES),
            ("assign", ASSIGNMENTS),
        ):
            if getattr(self, option) not in allowed:
                raise ValueError(
                    f"{name}: {option} {getattr(self, option)!r} unknown; "
                    f"choose one of {', '.join(allowed)}"
                )
        checks = {
            "prior_width": (self.prior_width >= 1, ">= 1"),
            "prior_lr": (self.prior_lr > 0, "> 0"),
            "feature_weight": (self.feature_weight >= 0, ">= 0"),
            "rematch": (self.rematch >= 1, ">= 1"),
        }
        for option, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"{name}: {option} must be {rule}, got {getattr(self, option)}")
        self._recovered: _Recovered | None = None

    def check(self, setting: Setting) -> None:
        """Refuse, when the experiment loads, a feature source the model cannot give.

        Tensor features need a two-layer head (the gaussian_head modifier plants one); analytic
        features (also what "auto" falls back to) need a classifier with a bias.
        """
        if self.features == "tensor" and not setting.has_modifier("gaussian_head"):
            two_layer_head(setting.model)
        if self.features in ("analytic", "auto"):
            biased_classifier(setting.model)

    def __call__(self, view: ServerView, rng: torch.Generator) -> Reconstruction:
        """Reconstruct the client's batch; ``features``/``feature_layer`` hold the recovered ẑ.

        ``info`` adds ``feature_seconds`` (recovering ẑ) and, for the tensor method,
        ``feature_confidence`` (1 − relative CP residual) to Inverting Gradients' keys.
        Randomness comes from ``rng`` only.
        """
        self._recovered = None
        reconstruction = super().__call__(view, rng)
        recovered, self._recovered = self._recovered, None
        if recovered is None:
            return reconstruction
        return dataclasses.replace(
            reconstruction,
            features=recovered.features.detach().clone(),
            feature_layer=recovered.layer,
            info={**reconstruction.info, **recovered.info},
        )

    def _parametrise(
        self, view: ServerView, size: int, rng: torch.Generator
    ) -> tuple[list[Tensor], Callable[[], Tensor]]:
        """Pixels (``prior = "none"``), or the weights of a fresh U-Net prior."""
        if self.prior == "none":
            return super()._parametrise(view, size, rng)
        # The engine runs one Adam with step ``lr`` for every leaf; scaling the U-Net's weights
        # by prior_lr / lr gives them an effective step of prior_lr without a second optimiser.
        return _prior.deep_image_prior(
            view.task,
            size,
            rng,
            width=self.prior_width,
            scale=self.prior_lr / self.lr,
            device=view.device,
        )

    def _terms(
        self, view: ServerView, update: Update, labels: Tensor, rng: torch.Generator
    ) -> list[Term]:
        """The feature-matching term, after recovering the features from the update."""
        kind = self._kind(view, len(labels))
        if kind == "none":
            return []
        start = time.perf_counter()
        if kind == "analytic":
            recovered = analytic_features(view, labels)
        else:
            recovered = tensor_features(view, len(labels), labels, rng)
        recovered.info["feature_seconds"] = time.perf_counter() - start
        self._recovered = recovered
        if not self.feature_weight:
            return []
        assign = self.assign
        if assign == "auto":
            # Label binding is right only while the slots keep the labels they were given: the
            # engine permutes them between restarts of an unrolled (FedAvg) attack.
            assign = "labels" if kind == "analytic" and not update.unrolled else "hungarian"
        if assign == "labels" and kind != "analytic":
            raise ValueError(
                f"{self.name}: assign 'labels' binds analytic features to slots by label; "
                "tensor features carry no label: use 'hungarian' or 'max'"
            )
        module = update.model.get_submodule(recovered.layer)
        return [_FeatureTerm(module, recovered.features, self.feature_weight, assign, self.rematch)]

    def _kind(self, view: ServerView, size: int) -> str:
        if self.features != "auto":
            return self.features
        if size == 1:
            return "analytic"  # exact for one example
        return "tensor" if _secret_xi(view) is not None else "analytic"


@dataclass(frozen=True)
class _Recovered:
    features: Tensor  # [K, d]: one target per slot (analytic) or per recovered feature (tensor)
    layer: str  # the module whose input they are
    info: dict[str, float]


def analytic_features(view: ServerView, labels: Tensor) -> _Recovered:
    """Rows ``∂W_c / ∂b_c`` of the classifier for each slot's label ``c`` (``[B, d]``).

    Exact (up to floating point) for one example; for a batch, row ``c`` mixes every example's
    feature weighted by its residual on class ``c``, dominated by the examples labelled ``c``.
    """
    name = biased_classifier(view.model())
    gradient = view.gradient()
    weight, bias = gradient[f"{name}.weight"].detach(), gradient[f"{name}.bias"].detach()
    rows = weight[labels] / _nonzero(bias[labels])[:, None]
    return _Recovered(rows, name, {})


def biased_classifier(model: nn.Module) -> str:
    """The classifier's name; a ValueError if it has no bias (analytic features divide by it)."""
    name, layer = classifier(model, "the analytic feature recovery")
    if layer.bias is None:
        raise ValueError(
            f"features 'analytic' (and 'auto', which falls back to them) divide the classifier's "
            f"weight gradient by its bias gradient, but {name!r} has no bias; use features = "
            "'tensor' (with the gaussian_head modifier) or 'none'"
        )
    return name


def tensor_features(
    view: ServerView, count: int, labels: Tensor, rng: torch.Generator
) -> _Recovered:
    """``count`` input directions of the model's two-layer head, by the tensor method.

    The head is the gaussian_head modifier's (its first layer's rows are the secret ``ξ``) when
    the view carries its secrets; otherwise (honest server) the model's last two ``nn.Linear``
    layers with one activation between them, the sent rows, standardised, standing in for ``ξ``.
    """
    model = view.model()
    xi = _secret_xi(view)
    honest = xi is None
    if honest:
        first, second, activation = two_layer_head(model)
        w1 = view.sent[f"{first}.weight"].detach()
        xi = w1 / w1.std().clamp_min(1e-12)  # the method wants ξ; a scale only bends σ
    else:
        head = gaussian_head.locate(model)
        first, second, activation = head.hidden, head.out, head.activation
    gradient = view.gradient()
    g1 = gradient[f"{first}.weight"].detach().double()  # [m, d], rows G_j
    g2 = gradient[f"{second}.weight"].detach().double()  # [C, m]
    a = view.sent[f"{second}.weight"].detach().double()  # [C, m], the head's output weights
    # G_j = Σ_i (Σ_c a_cj r_ic) σ'(ξ_jᵀz_i) z_i mixes the classes through a_cj.  Weighting the
    # rows by a_cj of one class c present in the batch isolates that class's residuals (the
    # cross terms a_cj a_c'j average out over random units); one weighting per recovered class,
    # stacked, measured best (fedleak.modifiers.gaussian_head).  Output unit c's own gradient,
    # g_cj = Σ_i r_ic σ(ξ_jᵀz_i), has the method's form for any head.
    classes = labels.unique()
    found = _tensor.recover_features(
        xi.double(),
        count,
        first=a[classes][:, :, None] * g1[None],
        second=g2[classes],
        activation=activation,
        rng=rng,
    )
    info = {"feature_confidence": float(found.confidence), "feature_honest": float(honest)}
    return _Recovered(found.directions.float(), first, info)


def two_layer_head(model: nn.Module) -> tuple[str, str, str]:
    """Names of the last two ``nn.Linear`` layers and the activation between them."""
    modules = list(model.named_modules())
    linear = [i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Linear)]
    if len(linear) < 2:
        raise ValueError(
            f"features 'tensor' need a two-layer head (Linear, activation, Linear) at the end of "
            f"the model, but {type(model).__name__} has {len(linear)} nn.Linear layer(s); add "
            "the gaussian_head modifier, or use features = 'analytic'"
        )
    i, j = linear[-2], linear[-1]
    between = [
        (name, _ACTIVATIONS.get(type(m)) or getattr(m, "activation", None))
        for name, m in modules[i + 1 : j]
        if not isinstance(m, nn.Sequential | nn.Flatten | nn.Dropout | nn.Identity)
    ]
    known = [a for _, a in between if a in _tensor.ACTIVATIONS]
    if len(between) != 1 or not known:
        found = ", ".join(f"{n} ({type(dict(modules)[n]).__name__})" for n, _ in between) or (
            "nothing"
        )
        raise ValueError(
            f"features 'tensor' need exactly one activation among "
            f"{', '.join(sorted(_tensor.ACTIVATIONS))} between {modules[i][0]!r} and "
            f"{modules[j][0]!r}; found {found}"
        )
    return modules[i][0], modules[j][0], known[0]


def _secret_xi(view: ServerView) -> Tensor | None:
    """The gaussian_head modifier's Gaussian first-layer rows ``ξ``, if the server planted them."""
    return view.secrets.get(SECRET)


def _nonzero(values: Tensor, floor: float = 1e-12) -> Tensor:
    """``values`` with entries of magnitude below ``floor`` pushed to ``±floor`` (sign kept)."""
    sign = torch.where(values < 0, -1.0, 1.0).to(values.dtype)
    return sign * values.abs().clamp_min(floor)


class _FeatureTerm:
    """``λ · mean [1 − cos²(f(x̂), ẑ)]``, reading ``f(x̂)`` from the forward the update ran.

    A forward pre-hook on the module records its inputs on every call; the term is evaluated
    after the engine predicted the update, so the records of this iteration are exactly the
    candidate's features (one per local step when the update is unrolled: the first pass over
    the batch's chunks covers every slot once, in order).
    """

    def __init__(
        self, module: nn.Module, targets: Tensor, weight: float, assign: str, rematch: int
    ) -> None:
        self.targets = nn.functional.normalize(targets.flatten(1).float(), dim=1)
        self.weight, self.assign, self.rematch = weight, assign, rematch
        self.captured: list[Tensor] = []
        self.calls = 0
        self.pairs: tuple[np.ndarray, np.ndarray] | None = None
        module.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.captured.append(args[0])

    def __call__(self, x: Tensor) -> Tensor:
        if not self.captured:
            raise RuntimeError(
                "feature term: the hooked layer saw no input; the model's forward skipped it"
            )
        features = torch.cat(self.captured)[: len(x)].flatten(1)
        self.captured.clear()
        cos2 = (nn.functional.normalize(features, dim=1) @ self.targets.T.to(features.dtype)) ** 2
        if self.assign == "labels":  # one target per slot, in slot order
            matched = cos2.diagonal()
        elif self.assign == "max":  # each recovered feature claims its best slot
            matched = cos2.max(0).values
        else:
            if self.pairs is None or self.calls % self.rematch == 0:
                self.pairs = linear_sum_assignment(cos2.detach().cpu().numpy(), maximize=True)
            rows, cols = self.pairs
            device = cos2.device
            matched = cos2[
                torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)
            ]
        self.calls += 1
        return self.weight * (1 - matched).mean()
