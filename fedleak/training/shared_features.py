"""The client side of approximately shared features: source statistics, target head, ProjectionNet.

Zhong, Pan & Lei, "Bridging Domains with Approximately Shared Features", AISTATS 2025 (arXiv
2403.06424); the server side is :mod:`fedleak.server.shared_features`.

* The trainer ``shared_features`` (a source domain): before its local SGD, it computes on the
  global model's features, as received, either the feature-label cross-covariance
  (``correlation``) or its ridge least-squares head (``head``), ``[features, classes]``, and
  sends it beside its state.  What leaks: which feature directions predict which labels in
  this client's population (its label-conditional feature means), see the server module.
* :func:`finetune_head` (a target domain): multinomial logistic regression on the projected
  features of a few labelled examples, shrunk toward the sources' head; the encoder and the
  projector stay frozen.
* The trainer ``projectionnet`` with :func:`projectionnet_loss`: the paper's practical method
  on the model :class:`fedleak.models.projected.ProjectionNet`, three learned linear
  projections of the features -- label-specific ``P_y``, shared ``P_s``, environmental
  ``P_e`` -- with a label head on ``[P_y h, P_s h]`` and a domain head on ``[P_e h, P_s h]``,
  trained with both cross-entropies and a penalty keeping each projection near-orthonormal.
  ``orthogonality = True`` also adds the pairwise terms ``||P_y P_s^T||^2`` and
  ``||P_y P_e^T||^2`` (weights 1 and 10 as in the authors' config), which the authors' code
  computes but leaves out of the loss.  The paper trains on pooled sources; federated, each
  client is a source domain that knows its own domain id (the data's group ids, as
  ``digit_domains`` gives them) and the server averages (FedAvg).  What leaks, beyond the
  update: nothing is sent, but the domain head's update names the client's domain (its
  cross-entropy pushes up one row of it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional

from fedleak.core import (
    Batch,
    GradientDefense,
    LossFn,
    Messages,
    Setting,
    TrainingDefense,
    TrainResult,
)
from fedleak.server.shared_features import correlation, covariance, least_squares_head
from fedleak.training import TRAINERS, refuse_training_defenses
from fedleak.training.sgd import SGD


@TRAINERS.register("shared_features")
@dataclass
class SharedFeaturesTrainer(SGD):
    """Local SGD, plus the client's feature-label statistics on the global model's features."""

    sends: ClassVar[dict[str, str]] = {
        "correlation": "[features, classes] cross-covariance of the client's features (global "
        "model as received) with its one-hot labels: its label-conditional feature means, "
        "weighted by its label frequencies (sent when message = 'correlation')",
        "head": "[features, classes] ridge least-squares head of the client's one-hot labels on "
        "those features: which feature directions predict which label in its population (sent "
        "when message = 'head')",
        "covariance": "[features, features] covariance of the client's features (sent when "
        "whiten = true): the second moments of its data's representation",
    }

    message: Literal["correlation", "head"] = "correlation"
    ridge: float = 1e-3  # for message = "head", relative to the features' mean variance
    # Also send the features' covariance, so the server ranks unit-variance directions: raw
    # units rank weak (small-scale) directions as invariant merely for being small.
    whiten: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ridge > 0:
            raise ValueError(f"shared_features: ridge must be > 0, got {self.ridge}")

    def check(self, setting: Setting) -> None:
        """The model exposes ``features(x)``, the encoder's output the statistics are taken on."""
        super().check(setting)
        if not callable(getattr(setting.model, "features", None)):
            raise ValueError(
                f"shared_features: the model ({type(setting.model).__name__}) has no "
                "features(x) method to take statistics on; use model = 'projected_mlp'"
            )

    def fit(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        defenses: tuple[TrainingDefense | GradientDefense, ...] = (),
        instructions: Messages | None = None,
    ) -> TrainResult:
        """Take the statistics on the received model, then train it with local SGD."""
        classes = model.head.out_features
        was_training = model.training
        model.eval()
        with torch.no_grad():
            feats = model.features(data.inputs)
        model.train(was_training)
        if self.message == "correlation":
            stat = correlation(feats, data.labels, classes)
        else:
            stat = least_squares_head(feats, data.labels, classes, self.ridge)
        messages = {self.message: stat.to(feats.dtype)}
        if self.whiten:
            messages["covariance"] = covariance(feats).to(feats.dtype)
        result = super().fit(model, data, loss_fn, rng, defenses, instructions)
        return replace(result, messages=messages)


def finetune_head(
    features: Tensor,
    labels: Tensor,
    weight: Tensor,
    bias: Tensor,
    ridge: float = 1.0,
    steps: int = 100,
) -> tuple[Tensor, Tensor]:
    """A target client's head: logistic regression on few examples, shrunk toward a prior head.

    Minimises ``CE(features W^T + b) + ridge / 2 (||W - weight||^2 + ||b - bias||^2)`` by
    L-BFGS from the prior (``weight [classes, features]``, ``bias [classes]``), with full
    batches, so it is deterministic.  The bias is shrunk too: free, it would follow the label
    mix of a handful of examples.  With no examples the prior comes back unchanged.
    """
    if not ridge > 0:
        raise ValueError(f"finetune_head: ridge must be > 0, got {ridge}")
    if len(labels) == 0:
        return weight.detach().clone(), bias.detach().clone()
    w0, b0 = weight.detach(), bias.detach()
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    x = features.detach()
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = functional.cross_entropy(x @ w.T + b, labels)
        loss = loss + ridge / 2 * ((w - w0).pow(2).sum() + (b - b0).pow(2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


@TRAINERS.register("projectionnet")
@dataclass
class ProjectionNetTrainer(SGD):
    """Local SGD on ProjectionNet's loss: labels, the client's domain id and orthogonality."""

    defend_with: ClassVar[str] = "update defenses (its loss has domain and projection terms)"

    orthogonality: bool = True  # add the pairwise terms the authors' code leaves out
    shared_weight: float = 1.0  # weight of ||P_y P_s^T||^2
    env_weight: float = 10.0  # weight of ||P_y P_e^T||^2

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("shared_weight", "env_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"projectionnet: {name} must be >= 0, got {getattr(self, name)}")

    def check(self, setting: Setting) -> None:
        """The model is a ProjectionNet."""
        super().check(setting)
        if not hasattr(setting.model, "domain_head"):
            raise ValueError(
                f"projectionnet: the model ({type(setting.model).__name__}) has no domain head "
                "and projections; use [model] name = 'projectionnet'"
            )

    def fit(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        defenses: tuple[TrainingDefense | GradientDefense, ...] = (),
        instructions: Messages | None = None,
    ) -> TrainResult:
        """Train ``model`` in place for one round; the data's group ids are the domain ids."""
        refuse_training_defenses(self, defenses)
        domains = model.domain_head.out_features
        if data.groups is None:
            raise ValueError(
                "projectionnet: needs each example's source-domain id (Batch.groups), which "
                "this data source does not give; use data with domains (e.g. digit_domains)"
            )
        if len(data) and not bool(((data.groups >= 0) & (data.groups < domains)).all()):
            raise ValueError(
                f"projectionnet: domain ids {int(data.groups.min())}..{int(data.groups.max())} "
                f"do not fit the model's {domains} domains; set [model] domains to the data's"
            )
        return super().fit(model, data, loss_fn, rng, defenses, instructions)

    def objective(self, model: nn.Module, batch: Batch, loss_fn: LossFn) -> Tensor:
        """ProjectionNet's source loss; the batch's group ids are its domain ids."""
        return projectionnet_loss(
            model,
            batch.inputs,
            batch.labels,
            batch.groups,
            self.orthogonality,
            self.shared_weight,
            self.env_weight,
        )


def projectionnet_loss(
    net: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    domains: Tensor,
    orthogonality: bool = True,
    shared_weight: float = 1.0,
    env_weight: float = 10.0,
) -> Tensor:
    """ProjectionNet's source loss on one batch.

    Label and domain cross-entropies, near-orthonormal projections, and (optionally) the
    pairwise orthogonality of the label projection to the shared and environmental ones.
    """
    parts = net.parts(inputs)
    label = functional.cross_entropy(
        net.label_head(torch.cat([parts["label"], parts["shared"]], 1)), labels
    )
    domain = functional.cross_entropy(
        net.domain_head(torch.cat([parts["env"], parts["shared"]], 1)), domains
    )
    weights = {part: proj.weight for part, proj in net.project.items()}
    eye = torch.eye(next(iter(weights.values())).shape[0], device=inputs.device)
    loss = label + domain + sum((w @ w.T - eye).pow(2).sum() for w in weights.values())
    if orthogonality:
        loss = loss + shared_weight * (weights["label"] @ weights["shared"].T).pow(2).sum()
        loss = loss + env_weight * (weights["label"] @ weights["env"].T).pow(2).sum()
    return loss
