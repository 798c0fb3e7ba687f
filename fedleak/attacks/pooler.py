"""The pooler-input attack of Li, Liu & Lei (FL@FM-NeurIPS 2023, arXiv:2312.05720).

"Beyond Gradient and Priors in Privacy Attacks: Leveraging Pooler Layer Inputs of Language
Models in Federated Learning".

Two stages, on a model the server widened with :mod:`fedleak.modifiers.pooler`:

1. **Features.**  The extra pooler units are a two-layer network with a known Gaussian first
   layer, so the tensor method of Wang, Lee & Lei (:func:`fedleak.attacks._tensor.
   recover_features`) recovers the *directions* of each sentence's pooler input ``h_i[:rd]``
   (the final ``[CLS]`` state) from the update of those units: the first-layer rows and the
   classifier's columns.  The moment order is chosen per activation (x³+x² needs order 3: its
   fourth derivative vanishes, so the official code's 4th-order tensor carries no signal).
2. **Text.**  LAMP (:class:`fedleak.attacks.lamp.LAMP`, same options and defaults) with one more
   term in the continuous objective, ``α_feat (1 − mean_i cos²(h̃_i[:rd], x̂_π(i)))``, where
   ``h̃_i`` is the candidate sentence's pooler input and ``π`` pairs candidates with recovered
   directions.

**No oracle.**  The official code pairs recovered directions with sentences, and stops pushing
a pair once it matches as well as the recovered direction matches the truth, both by looking at
the true pooler inputs.  Here ``π`` is the Hungarian assignment on ``|cos|`` between the current
candidates' features and the recovered directions, recomputed every ``assign_every`` steps
(``assignment = "hungarian"``), or there is none: each recovered direction is credited to the
candidate closest to it (``assignment = "max"``).  ``oracle = true`` reproduces the official
code (pairing and margins from the truth) for parity checks only: it needs the truth passed to
the call (``attack(view, rng, truth=batch)``), which ``fedleak run`` never does, and results say
``info["oracle"] = 1``.

Honest ablation: with the modifier's ``hd = 0`` the pooler is the pretrained one, and stage 1
treats its rows as if they were Gaussian (tanh, all input coordinates, per-unit classifier
weights divided out for two classes), like the official code's unmodified branch.

Threat model: malicious server (it changed the architecture it sent), FedSGD; with FedAvg the
stage-1 moments come from the averaged update and are approximate.  Outputs: token ids, the
labels, and ``features`` = the recovered directions ``[B, rd]`` of the inputs of the module
``feature_layer`` (the pooler's dense layer), for the feature-cosine metric.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from fedleak.attacks import ATTACKS, _tensor
from fedleak.attacks.lamp import LAMP, Problem
from fedleak.core import Batch, Reconstruction, ServerView
from fedleak.metrics import features
from fedleak.modifiers.pooler import NAMES, TAP

ASSIGNMENTS = ("hungarian", "max")
SOURCES = ("both", "first", "second")


@dataclass(frozen=True)
class Geometry:
    """What stage 1 knows about the pooler the server sent."""

    xi: Tensor  # [m, d] first-layer rows, unscaled (N(0, I) when planted)
    rows: slice  # the units of the pooler's dense layer they are
    columns: int  # d: leading input coordinates they read
    activation: str
    divide: Tensor | None  # per-unit weights to divide the first-layer rows by (honest pooler)
    honest: bool
    layer: str  # the module whose input is the recovered feature (h[:rd] or h)


def geometry(view: ServerView, model: nn.Module, who: str = "pooler") -> Geometry:
    """The planted (or, honest ablation, the pretrained) pooler units stage 1 reads."""
    secrets = view.secrets
    if "pooler.hd" not in secrets:
        raise ValueError(
            f"{who}: the view has no secrets of the pooler modifier; add a [[modifiers]] table "
            "with name = 'pooler' (hd = 0 for the honest ablation), or in Python use "
            "MODIFIERS['pooler'](...).install(model, rng) and pass its secrets to the view"
        )
    if int(secrets["pooler.hd"]):
        xi = secrets["pooler.xi"]
        width = int(secrets["pooler.width"])
        return Geometry(
            xi=xi,
            rows=slice(width, width + len(xi)),
            columns=xi.shape[1],
            activation=NAMES[int(secrets["pooler.activation"])],
            divide=None,
            honest=False,
            layer=f"{model.pooler_layer}.{TAP}",
        )
    weight = view.sent[f"{model.pooler_layer}.weight"].detach()
    head = view.sent[f"{model.classifier_layer}.weight"].detach()
    if head.shape[0] != 2:
        raise ValueError(
            f"{who}: the honest-pooler ablation needs two classes (a per-unit classifier weight "
            f"a_j enters as a_j1 - a_j0), got {head.shape[0]}"
        )
    # Rows taken as if Gaussian: unit variance overall (their scale only changes the
    # effective activation).  β_i a_jᵀ r_i = (a_j1 − a_j0) r_i1 for two classes: divided out.
    return Geometry(
        xi=weight / weight.std(),
        rows=slice(0, weight.shape[0]),
        columns=weight.shape[1],
        activation="tanh",
        divide=head[1] - head[0],
        honest=True,
        layer=model.pooler_layer,
    )


def recover(
    view: ServerView,
    count: int,
    rng: torch.Generator,
    *,
    sources: str = "both",
    order: int = 0,
) -> tuple[_tensor.FeatureRecovery, Geometry]:
    """Stage 1: ``count`` directions of the pooler inputs ``h_i[:rd]`` from the view's update."""
    model = view.model()
    geo = geometry(view, model)
    gradient = view.gradient()
    first = gradient[f"{model.pooler_layer}.weight"][geo.rows, : geo.columns].detach()
    if geo.divide is not None:
        # Units with a near-equal classifier column carry (almost) no signal: dropped.
        keep = geo.divide.abs() > 1e-3 * geo.divide.abs().max()
        first = first[keep] / geo.divide[keep, None]
        xi = geo.xi[keep]
    else:
        keep, xi = slice(None), geo.xi
    head = gradient[f"{model.classifier_layer}.weight"][:, geo.rows].detach()[:, keep]
    # One output unit's column suffices (for two classes the rows are opposite); the one with
    # the most energy is the least noisy.
    second = head[int(head.norm(dim=1).argmax())]
    recovery = _tensor.recover_features(
        xi.double(),
        count,
        first=first.double() if sources in ("both", "first") else None,
        second=second.double() if sources in ("both", "second") else None,
        activation=geo.activation,
        rng=rng,
        order=order,
    )
    return recovery, geo


@ATTACKS.register("pooler")
@dataclass
class PoolerAttack(LAMP):
    """Stage 1: pooler-input directions by the tensor method; stage 2: LAMP + feature matching."""

    requires: ClassVar[tuple[str, ...]] = ("pooler",)  # the modifier it needs the server to run
    feature_weight: float = 0.1  # α_feat of the feature term (official sweeps: 0.05)
    assignment: str = "hungarian"  # candidates <-> recovered directions: hungarian or max
    assign_every: int = 1  # steps between Hungarian re-assignments
    sources: str = "both"  # stage-1 moments: first layer, second (classifier), or both
    order: int = 0  # stage-1 moment order (3 or 4); 0 = chosen per activation
    swap_features: bool = False  # also score discrete steps by the feature term (official:
    # --pooler_match_for_swap, off in the published sweeps)
    oracle: bool = False  # reproduce the official code: truth-based pairing (labelled in info)
    margin: float = 0.0  # oracle only: stop pushing pairs within margin of the truth's cosine

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.name  # type: ignore[attr-defined]
        if self.feature_weight < 0:
            raise ValueError(f"{name}: feature_weight must be >= 0, got {self.feature_weight}")
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(
                f"{name}: assignment {self.assignment!r} unknown; choose one of "
                f"{', '.join(ASSIGNMENTS)}"
            )
        if self.assign_every < 1:
            raise ValueError(f"{name}: assign_every must be >= 1, got {self.assign_every}")
        if self.sources not in SOURCES:
            raise ValueError(
                f"{name}: sources {self.sources!r} unknown; choose one of {', '.join(SOURCES)}"
            )
        if self.order not in (0, 3, 4):
            raise ValueError(f"{name}: order must be 0 (auto), 3 or 4, got {self.order}")
        if self.margin and not self.oracle:
            raise ValueError(f"{name}: margin uses the truth; it needs oracle = true")

    def __call__(
        self, view: ServerView, rng: torch.Generator, *, truth: Batch | None = None
    ) -> Reconstruction:
        """Reconstruct the client's sentences (and their pooler-input directions).

        ``truth`` is read only with ``oracle = true`` (parity with the official code).
        ``info`` adds to LAMP's: ``stage1_seconds``, ``stage1_confidence`` (split-half
        agreement of stage 1, in [0, 1]), ``stage1_eigengap``, ``feature_fit`` (mean cos² of
        the final candidates' features with the recovered directions: no truth involved),
        ``honest``, ``oracle``.
        """
        name = self.name  # type: ignore[attr-defined]
        if self.oracle and truth is None:
            raise ValueError(
                f"{name}: oracle = true reads the true sentences, which fedleak run never gives "
                "an attack; call attack(view, rng, truth=batch) from Python, or set oracle = false"
            )
        return self._run(view, rng, truth if self.oracle else None)

    # -- LAMP hooks ---------------------------------------------------------------------------

    def _setup(self, problem: Problem, rng: torch.Generator, truth: Batch | None) -> None:
        start = time.perf_counter()
        count = len(problem.labels)
        recovery, geo = recover(problem.view, count, rng, sources=self.sources, order=self.order)
        problem.state.update(
            directions=recovery.directions.float(),  # [B, d]
            layer=geo.layer,
            pairing=torch.arange(count, device=recovery.directions.device),
            targets=None,
        )
        problem.info.update(
            stage1_seconds=time.perf_counter() - start,
            stage1_confidence=recovery.confidence,
            stage1_eigengap=recovery.eigengap,
            honest=float(geo.honest),
            oracle=float(self.oracle),
        )
        # Every prediction of the update runs the model; the pooler's input is captured there
        # (with the candidate's parameters), at no extra forward pass.
        problem.model.get_submodule(geo.layer).register_forward_pre_hook(
            lambda module, args: problem.captured.append(args[0])
        )
        if truth is not None:  # oracle: the official code's pairing and thresholds
            _oracle(problem, truth)

    def _extra(self, problem: Problem, free: Tensor, step: int) -> Tensor | None:
        if not self.feature_weight or not problem.captured:
            return None
        cos = _cosines(_batch_features(problem), problem.state["directions"])
        if not self.oracle and self.assignment == "hungarian" and step % self.assign_every == 0:
            problem.state["pairing"] = _hungarian(cos)
        return self._feature_term(problem, cos)

    def _feature_term(self, problem: Problem, cos: Tensor) -> Tensor:
        """``α_feat (1 − mean fit²)`` of cosines ``[..., candidates, directions]``."""
        state = problem.state
        if self.assignment == "max" and not self.oracle:
            # Assignment-free: each recovered direction is credited to its closest candidate.
            return self.feature_weight * (1 - cos.square().max(-2).values.mean(-1))
        fit = cos[..., torch.arange(cos.shape[-2], device=cos.device), state["pairing"]]
        if self.oracle:
            # The official margin: a pair that matches within ``margin`` of how well its
            # recovered direction matches the truth is no longer pushed.
            fit = fit.abs()
            done = fit.detach() + self.margin >= state["targets"]
            fit = torch.where(done, torch.ones_like(fit), fit)
        return self.feature_weight * (1 - fit.square().mean(-1))

    def _candidate_extra(
        self, problem: Problem, free: Tensor, row: int, words: Tensor
    ) -> Tensor | None:
        if not (self.swap_features and self.feature_weight):
            return None
        # Two forwards without gradients give the pooler inputs of the current batch and of
        # the K candidate sentences.
        n, length = words.shape[1], int(problem.lengths[row])
        embeds = problem.assemble(free)[row : row + 1, :length].repeat(len(words), 1, 1)
        embeds[:, 1 : n + 1] = words
        problem.captured.clear()
        with torch.no_grad():
            problem.update.logits(problem.pack(problem.assemble(free)))
            problem.update.logits(
                torch.cat([embeds, torch.ones(len(words), length, 1, device=embeds.device)], -1)
            )
        current, candidates = problem.captured
        problem.captured.clear()
        batch = current.repeat(len(words), 1, 1)  # [K, B, d]
        batch[:, row] = candidates
        return self._feature_term(problem, _cosines(batch, problem.state["directions"]))

    def _outputs(self, problem: Problem, best: Tensor) -> dict[str, Any]:
        # How well the final candidates fit the recovered directions (no truth involved).
        problem.captured.clear()
        with torch.no_grad():
            problem.update.logits(problem.pack(problem.assemble(best)))
        cos = _cosines(_batch_features(problem), problem.state["directions"])
        fit = cos[torch.arange(len(cos), device=cos.device), _hungarian(cos)]
        problem.info["feature_fit"] = float(fit.square().mean())
        return {
            "features": problem.state["directions"],
            "feature_layer": problem.state["layer"],
        }


def _cosines(features: Tensor, directions: Tensor) -> Tensor:
    """Cosines ``[..., B, B]`` of candidates' pooler inputs with the recovered directions."""
    return nn.functional.normalize(features, dim=-1) @ directions.T


def _hungarian(cos: Tensor) -> Tensor:
    """The pairing of candidates (rows) with directions (columns) of highest total |cos|."""
    _, cols = linear_sum_assignment(-cos.detach().abs().double().cpu().numpy())
    return torch.as_tensor(np.asarray(cols), dtype=torch.long, device=cos.device)


def _oracle(problem: Problem, truth: Batch) -> None:
    """Official ``find_highest_indices``: greedy |cos| of recovered to true features."""
    true = features.true_features(problem.view, truth, problem.state["layer"]).float()
    directions = problem.state["directions"]
    cos = (nn.functional.normalize(true, dim=1) @ directions.T).abs()  # [B, B]
    pairing = torch.full((len(true),), -1, device=cos.device)
    free = cos.clone()
    for _ in range(len(true)):  # the highest remaining pair first
        row, col = divmod(int(free.argmax()), free.shape[1])
        pairing[row] = col
        free[row, :] = -1
        free[:, col] = -1
    problem.state.update(
        pairing=pairing, targets=cos[torch.arange(len(true), device=cos.device), pairing]
    )
    # The candidates' slots follow the truth's order (known labels and lengths, as there).
    problem.labels = truth.labels.clone()
    problem.lengths = (truth.inputs != problem.special.pad).sum(1)
    problem.lengths_known = True
    problem.width = int(problem.lengths.max())


def _batch_features(problem: Problem) -> Tensor:
    """The pooler inputs of the whole candidate batch from the last prediction's forwards."""
    rows, total = [], len(problem.labels)
    for chunk in problem.captured:  # FedAvg: one chunk per local step; the first epoch covers all
        rows.append(chunk)
        if sum(len(r) for r in rows) >= total:
            break
    return torch.cat(rows)[:total]
