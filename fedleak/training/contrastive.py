"""Contrastive local training (SimCLR) and its non-negative variant (NCL), as a client objective.

Zhang, Wang, Cui, Pan, Lei, Jegelka & Wang, "Beyond Interpretability: The Gains of Feature
Monosemanticity on Model Robustness" (ICLR 2025), building on Wang et al., "Non-negative
Contrastive Learning" (ICLR 2024) and Chen et al.'s SimCLR (ICML 2020).  Each local step draws
two augmented views of the batch (:func:`augment`, torch ops on the model's device from the
client's generator) and minimises the NT-Xent loss of the projector outputs ``z = embed(x)``
at ``temperature``.  NCL is the same loss on a model whose projector output passes a ReLU
(``[model] name = "contrastive_mlp"``, ``nonnegative = true``) plus the activity term
``-activity * mean_j mean_batch |z_j|`` that keeps dimensions from dying.  The model's
classifier is trained at the same time on the detached features with the task loss (weight
``probe``; solo-learn's online linear probe), so the federation reports a test accuracy and the
contrastive gradient never sees a label.

What leaks: nothing is sent beside the state (``sends`` is empty).  What changes is *what the
state reveals*: NCL features are sparse and class-aligned, so the classifier update is a
non-negative-feature update, the setting in which iDLG's and Yin et al.'s label rules are exact
and a row of the classifier's gradient is one class's feature (measured in
``simulations/benchmarks/training_strategies/monosemantic.py``).

Departures from the paper: an MLP instead of a ResNet-18, Adam or SGD instead of LARS with a
warm-up cosine schedule, and augmentations for small images (random zoom / shift by an affine
resampling, optional flip, brightness-contrast jitter, Gaussian pixel noise) instead of
torchvision's colour pipeline; the activity term is on by default only through the options.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    set_batch_norm,
)
from fedleak.training import TRAINERS, refuse_training_defenses
from fedleak.training.sgd import SGD, _first_use


@TRAINERS.register("contrastive")
@dataclass
class Contrastive(SGD):
    """SimCLR / NCL local steps plus an online classifier on the detached features."""

    defend_with: ClassVar[str] = "update defenses (its steps follow the contrastive loss)"
    sends: ClassVar[dict[str, str]] = {}

    lr: float = 1e-3
    batch_size: int = 128
    optimizer: Literal["adam", "sgd"] = "adam"  # sgd uses the inherited momentum
    temperature: float = 0.2  # NT-Xent temperature (the paper's 0.2)
    activity: float = 0.0  # weight of -mean|z| (NCL: > 0; needs a non-negative model output)
    probe: float = 1.0  # weight of the classifier's task loss on detached features (0: no labels)
    # augmentations (one independent draw per example and view)
    min_scale: float = 0.7  # random zoom: the crop covers this to 1 of the side
    shift: float = 0.1  # extra random translation, as a fraction of the half side
    flip: bool = False  # random horizontal flips (not for digits)
    jitter: float = 0.3  # brightness and contrast factors drawn from 1 +- jitter
    noise: float = 0.1  # std of Gaussian noise added to the (normalised) inputs

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "temperature": (self.temperature > 0, "> 0"),
            "activity": (self.activity >= 0, ">= 0"),
            "probe": (self.probe >= 0, ">= 0"),
            "min_scale": (0 < self.min_scale <= 1, "in (0, 1]"),
            "shift": (0 <= self.shift <= 1, "in [0, 1]"),
            "jitter": (0 <= self.jitter < 1, "in [0, 1)"),
            "noise": (self.noise >= 0, ">= 0"),
        }
        for option, (ok, rule) in checks.items():
            if not ok:
                value = getattr(self, option)
                raise ValueError(f"contrastive: {option} must be {rule}, got {value}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(
                f"contrastive: optimizer {self.optimizer!r} unknown; choose 'adam' or 'sgd'"
            )

    def check(self, setting: Setting) -> None:
        """The model has ``embed(x)``; the activity term needs its output to be non-negative."""
        super().check(setting)
        if not callable(getattr(setting.model, "embed", None)):
            raise ValueError(
                f"contrastive: the model ({type(setting.model).__name__}) has no embed(x) "
                "(projector output) to contrast; use [model] name = 'contrastive_mlp'"
            )
        if self.activity > 0 and not getattr(setting.model, "nonnegative", False):
            raise ValueError(
                f"contrastive: activity = {self.activity} rewards large |z|, which only makes "
                "sense for a non-negative projector output (NCL); set [model] nonnegative = "
                "true or activity = 0"
            )
        if len(setting.task.input_shape) != 3:
            raise ValueError(
                f"contrastive: the augmentations need image inputs (C, H, W), got "
                f"{setting.task.input_shape}"
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
        """Train ``model`` in place for one round of contrastive steps; sends nothing extra."""
        refuse_training_defenses(self, defenses)
        if not len(data):
            raise ValueError("contrastive: the client has no examples to train on")
        if self.optimizer == "adam":
            optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum)
        set_batch_norm(model, self.batch_norm)
        losses, used = [], []
        for batch in self.batches(data, rng):
            optimizer.zero_grad()
            loss = self.loss(model, batch, loss_fn, rng)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            used.append(batch)
        return TrainResult(
            loss=sum(losses) / len(losses),
            steps=len(used),
            batch_size=len(used[0]),
            used=_first_use(used),
        )

    def loss(self, model: nn.Module, batch: Batch, loss_fn: LossFn, rng: torch.Generator):
        """NT-Xent of two augmented views, the activity term, and the online probe's loss."""
        views = torch.cat([self.augment(batch.inputs, rng), self.augment(batch.inputs, rng)])
        z = model.embed(views)
        loss = nt_xent(z, self.temperature)
        if self.activity:
            loss = loss - self.activity * z.abs().mean()
        if self.probe:
            logits = model.head(z.detach())
            loss = loss + self.probe * loss_fn(logits, batch.labels.repeat(2))
        return loss

    def augment(self, images: Tensor, rng: torch.Generator) -> Tensor:
        """One random view of each image with this trainer's augmentation options."""
        return augment(
            images,
            rng,
            min_scale=self.min_scale,
            shift=self.shift,
            flip=self.flip,
            jitter=self.jitter,
            noise=self.noise,
        )


def nt_xent(z: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent loss; rows ``i`` and ``i + n/2`` of ``z`` are the two views of one image."""
    n = len(z) // 2
    z = functional.normalize(z, dim=1)
    similarity = z @ z.T / temperature
    similarity = similarity.masked_fill(
        torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf")
    )
    positives = torch.cat(
        [torch.arange(n, 2 * n, device=z.device), torch.arange(n, device=z.device)]
    )
    return functional.cross_entropy(similarity, positives)


def augment(
    images: Tensor,
    rng: torch.Generator,
    *,
    min_scale: float = 0.7,
    shift: float = 0.1,
    flip: bool = False,
    jitter: float = 0.3,
    noise: float = 0.1,
) -> Tensor:
    """Random zoom / shift / flip by affine resampling, then jitter and Gaussian noise.

    ``images`` is ``[N, C, H, W]``; every random number comes from ``rng`` (drawn on its
    device, CPU by default, then moved to the images').  Zeros pad outside the image: the
    normalised mean, not black.
    """
    n = len(images)
    device = images.device

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=rng).to(device)

    scale = uniform(min_scale, 1.0)
    reach = (1 - scale) + shift  # how far the crop's centre may move (grid units)
    offset = (2 * torch.rand(n, 2, generator=rng).to(device) - 1) * reach[:, None]
    mirror = (
        torch.where(torch.rand(n, generator=rng).to(device) < 0.5, -1.0, 1.0)
        if flip
        else torch.ones(n, device=device)
    )
    theta = torch.zeros(n, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0] = scale * mirror
    theta[:, 1, 1] = scale
    theta[:, :, 2] = offset
    grid = functional.affine_grid(theta, list(images.shape), align_corners=False)
    out = functional.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
    contrast = uniform(1 - jitter, 1 + jitter, 1, 1, 1)
    brightness = uniform(-jitter, jitter, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + brightness
    if noise:
        out = out + noise * torch.randn(out.shape, generator=rng).to(device)
    return out
