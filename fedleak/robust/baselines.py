"""The baselines CPT is measured against, as group-weight rules: ERM, reweighting, GroupDRO.

* **ERM**: every example counts once, so group k weighs ``n_k / n``.
* **Group reweighting** (importance weighting to balanced groups): group k weighs
  ``n_k (n / n_k)^power``, normalised; ``power = 1`` gives every present group the same weight,
  ``power = 0`` is ERM.  The CPT authors' loaders sample with these weights (``--alpha``).
* **GroupDRO** (Sagawa, Koh, Hashimoto & Liang, "Distributionally Robust Neural Networks for
  Group Shifts", ICLR 2020, Algorithm 1): the weights ``q`` follow an exponentiated-gradient
  ascent on the group losses, ``q_k <- q_k exp(step * L_k)``, normalised.  The CPT authors'
  default step is 0.01.  The paper's group adjustments (``C / sqrt(n_k)``) are left out.

Groups without examples weigh 0 in every rule.
"""

from __future__ import annotations

import numpy as np


def _counts(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or (counts < 0).any() or not counts.sum() > 0:
        raise ValueError(f"group counts must be >= 0 with at least one example, got {counts}")
    return counts


def reweighted(counts: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Group weights ``n_k (n / n_k)^power``, normalised (power 0: ERM; 1: balanced groups)."""
    counts = _counts(counts)
    if not 0 <= power <= 1:
        raise ValueError(f"power must be in [0, 1] (0 = ERM, 1 = balanced), got {power}")
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts[present] ** (1 - power)
    return weights / weights.sum()


def erm(counts: np.ndarray) -> np.ndarray:
    """Group weights ``n_k / n``: the mean loss over examples."""
    return reweighted(counts, 0.0)


def group_dro(q: np.ndarray, losses: np.ndarray, counts: np.ndarray, step: float) -> np.ndarray:
    """GroupDRO's next weights: ``q * exp(step * L)`` over the present groups, normalised."""
    counts = _counts(counts)
    if not step > 0:
        raise ValueError(f"GroupDRO step must be > 0, got {step}")
    present = counts > 0
    losses = np.where(present, np.asarray(losses, dtype=np.float64), 0.0)
    logits = np.log(np.where(present, q, 1.0)) + step * losses
    logits -= logits[present].max()  # exp of the largest is 1: no overflow
    weights = np.where(present, np.exp(logits), 0.0)
    return weights / weights.sum()
