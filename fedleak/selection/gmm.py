"""The synthetic setting of the SkMM paper: ridge regression on a Gaussian mixture.

Dong, Phan, Pan & Lei, "Sketchy Moment Matching", NeurIPS 2024, synthetic experiment (their
notebook ``synthetic/toy.ipynb``): ``N`` points in ``R^r`` (``r > N``: high dimension) drawn
from ``k`` clusters of random sizes; cluster ``c`` is centred on coordinate axis ``c`` at an
integer norm (a multiple of ``k``, up to ``k^2``), with a random within-cluster standard
deviation below ``std_max``; every point of a cluster has the same, noise-free label, a random
linear function of its centre.  A coreset is scored by fitting ridge regression on it (the
ridge chosen by 2-fold cross-validation on the coreset) and measuring the mean squared error on
all ``N`` points: the excess risk, since the full data's labels are exactly linear.  A coreset
that misses a cluster pays that cluster's whole squared label: bias.

Plain functions on numpy arrays, so the benchmark and the tests need no federation.
Departures: the notebook chose the ridge on 100 values by scikit-learn's unshuffled 2-fold
split; here 21 values in ``10^-5 .. 10^5`` and a shuffled split from the caller's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHAS = np.logspace(-5, 5, 21)


@dataclass(frozen=True)
class Mixture:
    """A drawn Gaussian-mixture regression problem."""

    features: np.ndarray  # [N, r]
    labels: np.ndarray  # [N]
    cluster: np.ndarray  # [N] the cluster of each point

    @property
    def clusters(self) -> int:
        """How many clusters the mixture has."""
        return int(self.cluster.max()) + 1


def gaussian_mixture(
    n: int, dim: int, clusters: int, rng: np.random.Generator, std_max: float = 0.1
) -> Mixture:
    """``n`` points in ``R^dim`` from ``clusters`` clusters of random (non-empty) sizes."""
    if not 1 <= clusters <= min(n, dim):
        raise ValueError(f"clusters must be in 1..min(n, dim) = {min(n, dim)}, got {clusters}")
    cuts = np.sort(rng.choice(np.arange(1, n), clusters - 1, replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [n]]))
    norms = rng.integers(1, clusters + 1, clusters) * clusters
    centres = np.zeros((clusters, dim))
    centres[np.arange(clusters), np.arange(clusters)] = norms
    spread = std_max * rng.random(clusters)
    truth = rng.standard_normal(clusters)  # the label is truth . (centre's first k coordinates)
    cluster = np.repeat(np.arange(clusters), sizes)
    features = centres[cluster] + rng.standard_normal((n, dim)) * spread[cluster, None]
    return Mixture(features, (norms * truth)[cluster], cluster)


def ridge_fit(features: np.ndarray, labels: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Ridge solutions without intercept, one row per ``alpha``: ``[len(alphas), r]``."""
    u, s, vt = np.linalg.svd(features, full_matrices=False)
    shrink = s / (s**2 + alphas[:, None])  # [A, rank]
    return (shrink * (u.T @ labels)) @ vt


def ridge_risk(
    mixture: Mixture,
    coreset: np.ndarray,
    rng: np.random.Generator,
    alphas: np.ndarray = ALPHAS,
) -> tuple[float, float]:
    """(mean squared error on all points, the ridge chosen) of ridge fitted on ``coreset``.

    The ridge minimises the 2-fold cross-validated error on the coreset (shuffled halves).
    """
    x, y = mixture.features[coreset], mixture.labels[coreset]
    order = rng.permutation(len(coreset))
    halves = np.array_split(order, 2)
    error = np.zeros(len(alphas))
    for fit, held in (halves, halves[::-1]):
        if len(fit) and len(held):
            error += ((x[held] @ ridge_fit(x[fit], y[fit], alphas).T - y[held, None]) ** 2).mean(0)
    alpha = alphas[int(np.argmin(error))]
    theta = ridge_fit(x, y, np.array([alpha]))[0]
    return float(((mixture.features @ theta - mixture.labels) ** 2).mean()), float(alpha)
