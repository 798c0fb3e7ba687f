"""Approximately shared features: clients are source domains, the server keeps the content.

Zhong, Pan & Lei, "Bridging Domains with Approximately Shared Features", AISTATS 2025 (PMLR
258:559-567; arXiv 2403.06424).  A feature's utility for a new domain is measured by the
*variance across source domains of its correlation with the label*: zero for invariant
features, small for approximately shared ones, large for environmental (domain-specific or
spurious) ones.  Learning the *content* features (invariant plus approximately shared) from the
sources and fine-tuning a head on the target beats both invariant-only features (which throw
away the approximately shared signal) and all features (whose environmental part a few target
examples cannot tame).

Federated reading (the "statistics route"): each client is a source domain. Every round it trains
as usual (FedAvg) and also sends, computed on the global model's features as received, either its
feature-label cross-covariance or its least-squares head (``[features, classes]``; the trainer
``shared_features`` in :mod:`fedleak.training.shared_features`). With ``whiten`` (the trainer's
default) it also sends its features' covariance. The server averages the states, whitens the
statistics with the pooled feature covariance (so each direction is ranked by the correlation of a
unit-variance feature, not by its scale), leaves out the directions no domain's label correlates
with (mean squared statistic below ``min_signal``: dead or pure-noise features, which have zero
variance too but no use), and ranks the rest by the covariance across clients of the statistics
(its eigenvectors, by increasing variance). It keeps the ``content_dims`` lowest-variance
directions (``keep = "invariant"``: the ``invariant_dims`` lowest; ``"all"``: every direction, the
baseline) and broadcasts the projector onto them as the model's ``projector`` buffer
(:mod:`fedleak.models.projected`), which the head reads through. A target client then fine-tunes
only the head on a few labelled examples (:func:`fedleak.training.shared_features.finetune_head`).

What leaks: each client's statistics say which feature directions predict which labels in its own
population (label-conditional feature means, scaled by the label frequencies), which enables
attribute and label-distribution inference on that client; the covariance adds its features' second
moments. The cross-client covariance the server needs is an aggregate; under secure aggregation the
server could get it from sums of the statistics and of their outer products instead.

Departures from the paper: the paper's procedure is stated for known feature classes; here
directions are ranked by the eigen-decomposition of the cross-client covariance of whitened
statistics (so an invertible change of feature coordinates does not matter; the projector is
then oblique in raw coordinates), and the number of directions kept and the signal floor are
options, not estimated.  Without the covariance messages the ranking is in raw feature units,
where features of very different scales are ranked by their scale too.  ProjectionNet, the
paper's practical method, is a training objective
(:class:`fedleak.training.shared_features.ProjectionNet`), not this strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from fedleak.core import Messages, Params, Reply, Setting
from fedleak.server import SERVER_STRATEGIES
from fedleak.server.fedavg import weighted_mean

STATISTICS = ("correlation", "head")  # the message names this strategy reads, in this order
_TOLERANCE = 1e-9  # relative eigenvalue below which a direction is outside a span


def targets(labels: Tensor, classes: int) -> Tensor:
    """Regression targets ``[n, k]``: one-hot for integer labels, a column for real ones."""
    if labels.is_floating_point():
        return labels.reshape(len(labels), -1)
    return torch.nn.functional.one_hot(labels, classes).to(torch.float64)


def correlation(features: Tensor, labels: Tensor, classes: int = 0) -> Tensor:
    """Feature-label cross-covariance ``[features, k]``: ``mean((h - mean h)(y - mean y)^T)``."""
    h = features.to(torch.float64)
    y = targets(labels, classes)
    return (h - h.mean(0)).T @ (y - y.mean(0)) / len(h)


def least_squares_head(features: Tensor, labels: Tensor, classes: int = 0, ridge: float = 1e-3):
    """The ridge least-squares head ``[features, k]`` of the centred targets on the features.

    ``ridge`` is relative to the features' mean variance, so it does not depend on their scale.
    """
    h = features.to(torch.float64)
    h = h - h.mean(0)
    y = targets(labels, classes)
    gram = h.T @ h / len(h)
    scale = ridge * max(float(gram.diagonal().mean()), 1e-12)
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + scale * eye, h.T @ (y - y.mean(0)) / len(h))


def covariance(features: Tensor) -> Tensor:
    """The features' covariance ``[features, features]`` (centred, divided by n)."""
    h = features.to(torch.float64)
    h = h - h.mean(0)
    return h.T @ h / len(h)


@dataclass(frozen=True)
class Whitening:
    """Row-vector maps between features ``h`` and whitened coordinates ``z = h @ to_white``.

    ``from_white`` maps back (``to_white @ from_white`` projects onto the features' support);
    without a covariance both are the identity.
    """

    to_white: Tensor  # [features, rank]
    from_white: Tensor  # [rank, features]

    @classmethod
    def of(cls, cov: Tensor | None, features: int) -> Whitening:
        """The whitening of a covariance (``None``: the identity), on its support."""
        if cov is None:
            eye = torch.eye(features, dtype=torch.float64)
            return cls(eye, eye)
        values, vectors = torch.linalg.eigh(cov.to(torch.float64))
        keep = values > _TOLERANCE * values.max().clamp_min(torch.finfo(values.dtype).tiny)
        values, vectors = values[keep], vectors[:, keep]
        return cls(vectors / values.sqrt(), (vectors * values.sqrt()).T)

    def statistics(self, statistics: Tensor, kind: str) -> Tensor:
        """Clients' statistics ``[clients, features, k]`` in whitened coordinates.

        A cross-covariance maps like a feature (``to_white^T C``), a head like a weight
        (``from_white beta``): both become the correlations of unit-variance directions.
        """
        stats = statistics.to(torch.float64)
        if kind == "head":
            return torch.einsum("rf,mfk->mrk", self.from_white, stats)
        return torch.einsum("fr,mfk->mrk", self.to_white, stats)


def rank_directions(statistics: Tensor, min_signal: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Feature directions ranked by the variance of their label correlation across clients.

    ``statistics`` is ``[clients, features, k]``.  Only directions whose mean squared statistic
    over clients (mean squared plus variance: how much they say about the label in any domain)
    exceeds ``min_signal`` are ranked; the others -- features no domain's label correlates
    with, which have zero variance too but no use -- come last.  Returns the variances
    (ascending; ``inf`` for the unranked directions), the directions as the columns of an
    orthogonal matrix, and the clients' mean statistic.
    """
    if statistics.ndim != 3 or len(statistics) < 2:
        raise ValueError(
            "ranking features needs the statistics of at least 2 clients as [clients, "
            f"features, k], got shape {tuple(statistics.shape)}"
        )
    stats = statistics.to(torch.float64)
    mean = stats.mean(0)
    spread = stats - mean
    cov = torch.einsum("mik,mjk->ij", spread, spread) / len(stats)
    # Directions no client's statistic reaches (dead units, noise) have zero variance too, yet
    # say nothing about the label: rank only inside the statistics' second moment's range
    # above min_signal, and put the rest last.
    moment, basis = torch.linalg.eigh(torch.einsum("mik,mjk->ij", stats, stats) / len(stats))
    floor = _TOLERANCE * moment.abs().max().clamp_min(torch.finfo(moment.dtype).tiny)
    inside = moment > max(float(floor), min_signal)
    support, rest = basis[:, inside], basis[:, ~inside]
    variances, rotation = torch.linalg.eigh(support.T @ cov @ support)
    directions = torch.cat([support @ rotation, rest], 1)
    tail = torch.full((rest.shape[1],), float("inf"), dtype=variances.dtype)
    return torch.cat([variances, tail]), directions, mean


def projector(
    statistics: Tensor,
    dims: int,
    cov: Tensor | None = None,
    kind: str = "correlation",
    min_signal: float = 0.0,
) -> Tensor:
    """The projector onto the ``dims`` lowest-variance directions (row vectors: ``h @ P``).

    Directions are ranked (:func:`rank_directions`) in the coordinates whitened by the pooled
    feature covariance ``cov`` (none: the raw coordinates, and the projector is orthogonal).
    """
    white = Whitening.of(cov, statistics.shape[1])
    _, directions, _ = rank_directions(white.statistics(statistics, kind), min_signal)
    if not 1 <= dims <= directions.shape[1]:
        raise ValueError(
            f"dims must be in 1..{directions.shape[1]} (the features' rank), got {dims}"
        )
    basis = directions[:, :dims]
    return white.to_white @ basis @ basis.T @ white.from_white


def fit_head(
    features: Tensor, labels: Tensor, projection: Tensor, prior: Tensor, ridge: float
) -> Tensor:
    """A least-squares head on projected features, shrunk toward ``prior`` (``[features, k]``).

    ``argmin_b ||y - h P b||^2 + ridge ||b - P prior||^2`` over ``b`` in the projector's range:
    the target client's fine-tuning in the linear setting.  With no examples it is ``P prior``.
    """
    p = projection.to(torch.float64)
    start = p @ prior.to(torch.float64)
    if len(labels) == 0:
        return start
    z = features.to(torch.float64) @ p
    y = targets(labels, prior.shape[1])
    # in the range of P: (P Z^T Z P + ridge I) b = P Z^T y + ridge P prior, b = P b
    system = p @ z.T @ z @ p + ridge * torch.eye(len(p), dtype=p.dtype)
    return p @ torch.linalg.solve(system, p @ z.T @ y + ridge * start)


@SERVER_STRATEGIES.register("shared_features")
@dataclass
class SharedFeatures:
    """FedAvg, then the projector onto the content features from the clients' statistics."""

    sends: ClassVar[dict[str, str]] = {}  # the projector travels in the model state

    keep: Literal["content", "invariant", "all"] = "content"
    content_dims: int = 8  # directions kept: invariant plus approximately shared
    invariant_dims: int = 2  # directions kept with keep = "invariant"
    buffer: str = "projector"  # the model buffer that holds the projector
    # Directions whose mean squared (whitened) label covariance over clients is below this say
    # nothing about the label in any domain: they are never kept.
    min_signal: float = 0.0

    def __post_init__(self) -> None:
        if self.content_dims < 1 or self.invariant_dims < 1:
            raise ValueError(
                f"shared_features: content_dims and invariant_dims must be >= 1, got "
                f"{self.content_dims} and {self.invariant_dims}"
            )
        if self.invariant_dims > self.content_dims:
            raise ValueError(
                f"shared_features: invariant_dims ({self.invariant_dims}) must not exceed "
                f"content_dims ({self.content_dims}): invariant features are part of the content"
            )
        if self.min_signal < 0:
            raise ValueError(f"shared_features: min_signal must be >= 0, got {self.min_signal}")
        if not self.buffer:
            raise ValueError("shared_features: buffer must name the model's projector buffer")

    @property
    def dims(self) -> int:
        """How many directions the projector keeps (``keep = "all"``: every one)."""
        return self.invariant_dims if self.keep == "invariant" else self.content_dims

    def check(self, setting: Setting) -> None:
        """The model holds a square projector buffer; the trainer sends the statistics."""
        buffers = dict(setting.model.named_buffers())
        found = buffers.get(self.buffer)
        if found is None or found.ndim != 2 or found.shape[0] != found.shape[1]:
            raise ValueError(
                f"shared_features: the model has no square buffer {self.buffer!r} to hold the "
                "projector; use model = 'projected_mlp'"
            )
        if self.keep != "all" and self.dims > found.shape[0]:
            raise ValueError(
                f"shared_features: keeping {self.dims} directions of {found.shape[0]} features; "
                f"lower content_dims / invariant_dims to at most {found.shape[0]}"
            )
        if not set(STATISTICS) & set(getattr(setting.trainer, "sends", {})):
            raise ValueError(
                f"shared_features: [training] {setting.trainer.name!r} sends no feature "
                f"statistics ({' or '.join(STATISTICS)}); use training.name = 'shared_features'"
            )

    def instructions(self, round: int, params: Params, rng: torch.Generator) -> Messages:
        """Nothing beyond the model (its projector buffer included)."""
        return {}

    def aggregate(self, round: int, params: Params, replies: list[Reply]) -> Params:
        """Weighted mean of the states, then the projector from this round's statistics.

        With fewer than two clients' statistics the variance across clients is undefined, and
        the projector sent this round is kept.
        """
        state = weighted_mean([r.params for r in replies], [r.num_examples for r in replies])
        current = params[self.buffer]
        carrying = [r for r in replies if any(k in r.messages for k in STATISTICS)]
        if self.keep == "all":
            state[self.buffer] = torch.eye(len(current), dtype=current.dtype)
        elif len(carrying) >= 2:
            kind = next(k for k in STATISTICS if k in carrying[0].messages)
            stats = torch.stack([r.messages[kind] for r in carrying])
            cov = None
            if all("covariance" in r.messages for r in carrying):
                cov = weighted_mean(
                    [{"c": r.messages["covariance"].to(torch.float64)} for r in carrying],
                    [r.num_examples for r in carrying],
                )["c"]
            made = projector(stats, self.dims, cov, kind, self.min_signal)
            state[self.buffer] = made.to(current.dtype)
        else:
            state[self.buffer] = current.clone()
        return state
