"""The EPO linear program of Controllable Prompt Tuning: which mix of group gradients to follow.

Phan, Wilson & Lei, "Controllable Prompt Tuning for Balancing Group Distributional
Robustness", ICML 2024, adapt Exact Pareto Optimal search (Mahapatra & Rajan, "Multi-Task
Learning with User Preferences: Gradient Descent with Controlled Ascent in Pareto
Optimization", ICML 2020) to groups.  With group losses ``L`` (all > 0), a preference vector
``c`` (all > 0) and the Gram matrix ``C = G G^T`` of the group gradients:

* ``l_hat = c*L / sum(c*L)`` and the non-uniformity ``mu = sum l_hat log(K l_hat)`` (the KL
  divergence of ``l_hat`` from uniform; 0 exactly when ``c_k L_k`` is the same for all k);
* the adjustment ``a = c * (log(K l_hat) - mu)``: positive for groups whose weighted loss is
  above its share;
* **balance** (``mu > eps``): maximise ``alpha^T C a`` over the simplex, subject to
  ``(C alpha)_j >= (C a)_j`` for the groups with ``(C a)_j <= 0`` and ``(C alpha)_j* >= 0`` for
  the group ``j*`` of largest ``c_j L_j`` (its loss must not rise); when no ``(C a)_j`` is
  positive every group gets ``(C alpha)_j >= 0``;
* **descent** (``mu <= eps``): maximise ``1^T C alpha`` subject to ``C alpha >= 0`` (a direction
  that lowers every loss) and, unless relaxed, ``alpha^T C a >= min(max_j (C a)_j, 0)``;
* the update descends along ``d = sum_k alpha_k g_k``, i.e. on ``sum_k alpha_k L_k``.

At a fixed point ``c_k L_k`` is equal across groups, so a larger ``c_k`` buys group k a smaller
loss: that is the control.  The programs are solved with HiGHS through
``scipy.optimize.linprog`` (the authors used cvxpy with GLPK).  Departures: ``C`` is divided by
its largest diagonal entry before solving (the optimum ``alpha`` is unchanged by a positive
scale, and HiGHS's absolute tolerances then mean the same at every gradient scale); when a
program is infeasible the weights fall back to ``c / sum(c)``, as in the authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import linprog


@dataclass(frozen=True)
class EpoStep:
    """One solve: the group weights and why they are what they are."""

    weights: np.ndarray  # alpha, on the simplex
    mode: Literal["balance", "descent", "fallback"]
    non_uniformity: float  # mu of c*L before the step


def preference_vector(preference: tuple[float, ...] | np.ndarray | None, k: int) -> np.ndarray:
    """``c`` as a float64 array of length ``k`` (uniform when None or empty), checked."""
    if preference is None or len(preference) == 0:
        return np.ones(k)
    c = np.asarray(preference, dtype=np.float64)
    if c.shape != (k,):
        raise ValueError(
            f"preference has {c.size} entries but there are {k} groups; give one positive "
            "number per group (or none for uniform)"
        )
    if not (np.isfinite(c).all() and (c > 0).all()):
        raise ValueError(f"preference entries must be finite and > 0, got {c.tolist()}")
    return c


def non_uniformity(losses: np.ndarray, preference: np.ndarray | None = None) -> float:
    """``mu``: the KL divergence of ``c*L / sum(c*L)`` from uniform (0 when balanced)."""
    losses = np.asarray(losses, dtype=np.float64)
    c = preference_vector(preference, len(losses))
    share = c * losses / np.sum(c * losses)
    share = share[share > 0]  # 0 log 0 = 0
    return float(np.sum(share * np.log(len(losses) * share)))


def epo_weights(
    losses: np.ndarray,
    gram: np.ndarray,
    preference: tuple[float, ...] | np.ndarray | None = None,
    eps: float = 1e-4,
    relax: bool = False,
) -> EpoStep:
    """The EPO group weights for losses ``L`` [K] and gradient Gram matrix ``C`` [K, K]."""
    losses = np.asarray(losses, dtype=np.float64)
    gram = np.asarray(gram, dtype=np.float64)
    k = len(losses)
    if losses.ndim != 1 or k < 1:
        raise ValueError(f"losses must be a vector of K >= 1 group losses, got {losses.shape}")
    if gram.shape != (k, k):
        raise ValueError(f"gram must be {k} x {k} (one row per group loss), got {gram.shape}")
    if not (np.isfinite(losses).all() and (losses > 0).all()):
        raise ValueError(
            f"group losses must be finite and > 0 (the program balances their ratios), got "
            f"{losses.tolist()}; leave out groups without examples"
        )
    if not np.isfinite(gram).all():
        raise ValueError("gram holds a NaN or an infinity; the group gradients diverged")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    c = preference_vector(preference, k)
    scale = np.max(np.diag(gram))
    if not scale > 0:  # every gradient is zero: nothing to balance, any mix is a step of 0
        return EpoStep(c / c.sum(), "fallback", non_uniformity(losses, c))
    gram = gram / scale
    weighted = c * losses
    share = weighted / weighted.sum()
    mu = float(np.sum(share * np.log(k * share)))
    ca = gram @ (c * (np.log(k * share) - mu))
    if mu > eps:
        mode = "balance"
        objective = -ca
        if (ca > 0).any():
            rows = ca <= 0
            rhs = np.where(rows, ca, 0.0)
            worst = weighted == weighted.max()
            rows |= worst
            rhs[worst] = 0.0
        else:
            rows, rhs = np.ones(k, dtype=bool), np.zeros(k)
        a_ub, b_ub = -gram[rows], -rhs[rows]
    else:
        mode = "descent"
        objective = -gram.sum(axis=0)
        a_ub, b_ub = -gram, np.zeros(k)
        if not relax:
            a_ub = np.vstack([a_ub, -ca])
            b_ub = np.append(b_ub, -min(ca.max(), 0.0))
    result = linprog(
        objective,
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=np.ones((1, k)),
        b_eq=[1.0],
        bounds=(0, None),
        method="highs",
    )
    if result.status != 0:
        return EpoStep(c / c.sum(), "fallback", mu)
    weights = np.clip(result.x, 0, None)
    return EpoStep(weights / weights.sum(), mode, mu)
