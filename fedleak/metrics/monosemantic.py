"""Feature monosemanticity: a top-k sparse autoencoder, its metrics, and noisy linear probing.

Zhang, Wang, Cui, Pan, Lei, Jegelka & Wang, "Beyond Interpretability: The Gains of Feature
Monosemanticity on Model Robustness" (ICLR 2025).  Monosemantic features come either from the
training objective (non-negative contrastive learning, :mod:`fedleak.training.contrastive`) or
post hoc from a top-k sparse autoencoder trained on frozen features (:class:`TopKSAE`, as in
Gao et al., "Scaling and evaluating sparse autoencoders", 2024: a learned pre-bias subtracted,
a linear encoder with a latent bias, the k largest latents kept through a ReLU, a linear
decoder, and the normalised reconstruction loss ``||x̂ - x||² / ||x||²``).  In a federation the
server trains it on features it can compute (e.g. of public data) with the global encoder.

Metrics (as the paper's code logs them, re-implemented):

* :func:`semantic_consistency` — per dimension, the share of the most frequent label among the
  samples on which it is active (> ``threshold``), averaged over dimensions active anywhere;
* :func:`active_dimensions` and :func:`zero_fraction` — dimensions ever active, share of zeros;
* :func:`effective_rank` — ``exp`` of the entropy of the normalised singular values (Roy &
  Vetterli 2007).

Robustness: :func:`linear_probe` fits a logistic-regression probe (scikit-learn, ``C = 1`` by
default; the CPU prototype in the notes found the sign of the label-noise gain depends on this
regularisation, so it is an option and reported) on labels corrupted by
:func:`symmetric_label_noise` (each label replaced, with probability ``rate``, by a uniformly
drawn *different* class).  Input noise is added to the images before the features are taken
(:func:`fedleak.training.contrastive.augment` is not used for it: the paper's Gaussian input
noise is plain additive noise at train and test time).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


class TopKSAE(nn.Module):
    """``decode(topk_relu(encode(x - b_pre))) + b_pre``; exactly ``k`` latents per example."""

    def __init__(self, dim: int, latents: int, k: int, generator: torch.Generator) -> None:
        super().__init__()
        if not 1 <= k <= latents:
            raise ValueError(f"TopKSAE: k must be in [1, latents = {latents}], got {k}")
        if dim < 1:
            raise ValueError(f"TopKSAE: dim must be >= 1, got {dim}")
        self.k = k
        self.pre_bias = nn.Parameter(torch.zeros(dim))
        self.latent_bias = nn.Parameter(torch.zeros(latents))
        # decoder columns of unit norm, the encoder initialised as its transpose (Gao et al.)
        decoder = torch.randn(dim, latents, generator=generator)
        decoder = decoder / decoder.norm(dim=0, keepdim=True)
        self.decoder = nn.Parameter(decoder)
        self.encoder = nn.Parameter(decoder.T.clone())

    def encode(self, x: Tensor) -> Tensor:
        """The sparse code: the top-``k`` pre-activations, ReLU'd, the others zero.

        Ties are broken by ``topk``; a kept latent whose pre-activation is <= 0 becomes 0, so
        ``k`` is the number of *kept* latents (:func:`sparsity` counts the non-zeros).
        """
        pre = (x - self.pre_bias) @ self.encoder.T + self.latent_bias
        values, indices = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter(1, indices, torch.relu(values))

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of ``x``."""
        return self.encode(x) @ self.decoder.T + self.pre_bias


def train_sae(
    features: Tensor,
    latents: int,
    k: int,
    generator: torch.Generator,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
) -> TopKSAE:
    """A :class:`TopKSAE` fitted to frozen ``features`` ``[N, dim]`` with Adam.

    The pre-bias starts at the feature mean; mini-batches are drawn from ``generator``.
    """
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"train_sae: features must be [N >= 2, dim], got {tuple(features.shape)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_sae: steps and batch_size must be >= 1, got {steps}, {batch_size}")
    features = features.detach()
    sae = TopKSAE(features.shape[1], latents, k, generator).to(features.device)
    with torch.no_grad():
        sae.pre_bias.copy_(features.mean(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(steps):
        size = (min(batch_size, len(features)),)
        x = features[torch.randint(len(features), size, generator=generator).to(features.device)]
        loss = ((sae(x) - x).pow(2).sum(1) / x.pow(2).sum(1).clamp_min(1e-12)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # unit-norm decoder columns: the code carries the scale
            sae.decoder /= sae.decoder.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return sae


def reconstruction_error(sae: TopKSAE, features: Tensor) -> float:
    """Mean normalised squared error ``||x̂ - x||² / ||x||²`` of ``sae`` on ``features``."""
    with torch.no_grad():
        x = features.detach()
        return float(((sae(x) - x).pow(2).sum(1) / x.pow(2).sum(1).clamp_min(1e-12)).mean())


def semantic_consistency(features: Tensor, labels: Tensor, threshold: float = 0.0) -> float:
    """Mean over dimensions active somewhere of the majority label's share among its actives."""
    active = (features > threshold).double()  # [N, d]
    classes = int(labels.max()) + 1
    onehot = nn.functional.one_hot(labels.long(), classes).double()  # [N, C]
    counts = active.T @ onehot  # [d, C]: per dimension, active samples of each class
    total = counts.sum(1)
    alive = total > 0
    if not alive.any():
        return float("nan")
    return float((counts[alive].max(1).values / total[alive]).mean())


def active_dimensions(features: Tensor, threshold: float = 0.0) -> int:
    """Dimensions whose magnitude exceeds ``threshold`` on at least one sample."""
    return int((features.abs() > threshold).any(0).sum())


def zero_fraction(features: Tensor, threshold: float = 0.0) -> float:
    """Share of feature entries whose magnitude is at most ``threshold``."""
    return float((features.abs() <= threshold).double().mean())


def effective_rank(features: Tensor) -> float:
    """``exp(H(σ / Σσ))`` of the singular values of the (uncentred) feature matrix."""
    sigma = torch.linalg.svdvals(features.detach().double())
    p = sigma / sigma.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def symmetric_label_noise(
    labels: np.ndarray, rate: float, classes: int, rng: np.random.Generator
) -> np.ndarray:
    """``labels`` with each replaced, with probability ``rate``, by a different uniform class."""
    if not 0 <= rate <= 1:
        raise ValueError(f"symmetric_label_noise: rate must be in [0, 1], got {rate}")
    if classes < 2:
        raise ValueError(f"symmetric_label_noise: needs >= 2 classes, got {classes}")
    labels = np.asarray(labels)
    flip = rng.random(len(labels)) < rate
    other = (labels + rng.integers(1, classes, len(labels))) % classes  # never the same class
    return np.where(flip, other, labels)


def linear_probe(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    c: float = 1.0,
    max_iter: int = 2000,
) -> float:
    """Test accuracy of a logistic-regression probe fitted on ``train`` (features, labels).

    Features are divided by one global scale (the mean row norm of the training features), so
    ``c`` means the same for representations of different magnitudes, and per-dimension
    sparsity is untouched (no per-feature standardisation).
    """
    from sklearn.linear_model import LogisticRegression  # here: importing sklearn is slow

    if not c > 0:
        raise ValueError(f"linear_probe: c must be > 0, got {c}")
    (x, y), (xt, yt) = train, test
    scale = float(np.linalg.norm(x, axis=1).mean()) or 1.0
    probe = LogisticRegression(C=c, max_iter=max_iter)
    probe.fit(x / scale, y)
    return float((probe.predict(xt / scale) == yt).mean())
