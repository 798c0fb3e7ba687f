"""Sketchy moment matching (SkMM): a client fine-tunes on the examples that match its moments.

Dong, Phan, Pan & Lei, "Sketchy Moment Matching: Toward Fast and Provable Data Selection for
Finetuning", NeurIPS 2024 (arXiv 2407.06120).  With fine-tuning linearised at the current
model, selecting ``n`` of ``N`` examples is choosing rows of the gradient matrix ``G``.  In
high dimension (``r > N``) the excess risk has a *bias* (what a low-rank fit on ``n`` rows cannot
represent) and a *variance* term; classical V-optimal design controls only the variance and
over-samples high-variance clusters.  SkMM controls the bias with a Gaussian gradient sketch
(``G~ = G Gamma``, ``m`` columns: the sketch's range holds a low-bias subspace) and the variance
by matching the selected second moment to the full one on that subspace; the paper proves the
fast rate ``O(m / n)``, independent of ``r``.

Two selection algorithms, plain functions on the sketched gradients ``x = G~`` ([N, m]):

* :func:`skmm_v2` (the authors' SkMMv2): a randomly pivoted partial Cholesky start of ``m``
  rows, then blocks of ``block`` rows, a candidate ``x`` scored by
  ``||R M^-1 x||^2 / (1 + x^T M^-1 x)`` with ``M = x_S^T x_S`` and ``R^T R = x^T x`` (the
  target moment): by Sherman-Morrison exactly the decrease of the sketched variance
  ``tr(x^T x M^-1)`` when ``x`` joins.  Samplers: ``linear`` (proportional to the score),
  ``exp`` (softmax of score / sum of scores / temperature) and ``greedy`` (the best).
* :func:`moment_matching_weights` (the paper's continuous relaxation): weights ``w`` in
  ``[0, 1]`` summing to ``n`` and multipliers ``gamma_j >= ratio`` minimise
  ``sum_j (v_j^T Sigma_w v_j / lambda_j - gamma_j)^2`` over the eigenpairs of the full sketched
  moment (Adam, then the exact projection); ``n`` rows are then sampled in proportion to ``w``
  or the top ``n`` taken (:func:`round_weights`).

Federated reading (the plugin ``skmm``): before its local training, each sampled client
computes the random-target gradients of the fine-tuned layers at the global model as received,
sketches them with the public per-round seed (every client draws the same ``Gamma``) and
trains only on the selected examples.  Nothing beyond the model leaves the client, but the
update is now a function of a coreset that over-represents rare clusters.  With
``moments = "global"`` (server-assisted moment matching, with the server strategy
``skmm_global``) each client also sends its sketched moment ``x^T x`` (``m x m``) and its
partition size: the sketch preserves inner products (Johnson-Lindenstrauss), so this matrix is
the Gram structure of the client's gradients up to a random rotation, a new leakage surface
recorded with every captured view.  The server sums the moments and the next round's clients
match their coresets to the global moment (one round stale) instead of their own.

Departures from the paper and the authors' code (the published tree lacks its SkMMv2 module;
the reference survives in the synthetic notebook):

* SkMMv2 recomputes ``M``'s (pseudo-)inverse at each block instead of updating it (small
  ``m``; stable, and exact when duplicated examples leave ``M`` singular).
* As in the authors' code the sketch is cut to ``max(n - 20, n // 2)`` columns when
  ``n - m < 20`` (:func:`sketch_dims`); here the leading columns of the shared sketch, so a
  client's cut moment is the leading block of the full one.
* The relaxation's residuals are relative (divided by ``lambda_j``, directions with
  ``lambda_j`` below 1e-12 of the largest dropped) and the weights are scaled by ``n`` (so the
  learning rate does not depend on ``N``); as in the notebook they start on a uniformly random
  ``n``-subset and the sparsity term is off by default (``sparsity``: the weights' effective
  support, the notebook's ``||s||_1^2 / ||s||_2^2`` over ``n``); the projection onto the capped
  simplex is exact (bisection), where the authors clamp and renormalise.  Measured on the
  synthetic mixture, the relaxation is far behind SkMMv2 at small budgets: with ``ratio <= 1``
  the uniform weights already match every moment, so it only improves on its random start.
* Selection runs on the CPU in float64 (``N x m`` matrices), whatever the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from fedleak.core import Batch, LossFn, Messages, Selection, Setting
from fedleak.selection import SELECTORS
from fedleak.selection.gradients import GradientOptions

SAMPLERS = ("linear", "exp", "greedy")
_TOLERANCE = 1e-12  # relative eigenvalue below which a direction counts as outside the span


def sketch_dims(m: int, n: int) -> int:
    """Sketch columns used for a budget of ``n``: the authors' rule, at most ``m``."""
    return m if n - m >= 20 else max(1, min(m, max(n - 20, n // 2)))


def psd_root(moment: Tensor) -> Tensor:
    """``R`` with ``R^T R = moment`` for a symmetric positive semi-definite ``moment``."""
    values, vectors = torch.linalg.eigh(moment)
    return values.clamp_min(0).sqrt()[:, None] * vectors.T


def psd_pinv(moment: Tensor) -> Tensor:
    """The pseudo-inverse of a PSD matrix, eigenvalues below 1e-12 of the largest dropped."""
    values, vectors = torch.linalg.eigh(moment)
    keep = values > _TOLERANCE * values.max().clamp_min(torch.finfo(values.dtype).tiny)
    inverse = torch.where(keep, 1 / values.where(keep, torch.ones_like(values)), 0)
    return (vectors * inverse) @ vectors.T


def sketched_variance(x: Tensor, chosen: Tensor, target: Tensor | None = None) -> float:
    """``tr(target M^+)`` with ``M = x_S^T x_S``: the variance term SkMMv2 decreases."""
    target = x.T @ x if target is None else target
    picked = x[chosen]
    return float(torch.trace(target @ psd_pinv(picked.T @ picked)))


def rp_cholesky(x: Tensor, k: int, rng: torch.Generator) -> Tensor:
    """Randomly pivoted partial Cholesky of ``x x^T``: up to ``k`` rows, in pivot order.

    Each pivot is drawn in proportion to its row's residual squared norm; fewer than ``k`` rows
    when the residual vanishes first (duplicates, low rank).
    """
    residual = (x * x).sum(1)
    floor = _TOLERANCE * float(residual.sum())
    basis = x.new_zeros(x.shape[1], 0)
    chosen: list[int] = []
    for _ in range(min(k, len(x))):
        if float(residual.sum()) <= floor:
            break
        j = int(torch.multinomial(residual, 1, generator=rng))
        v = x[j] - basis @ (basis.T @ x[j])
        v = v / v.norm()
        basis = torch.cat([basis, v[:, None]], 1)
        residual = (residual - (x @ v) ** 2).clamp_min(0)
        chosen.append(j)
        residual[chosen] = 0
    return torch.tensor(chosen, dtype=torch.int64)


def variance_decrease(x: Tensor, chosen: Tensor, root: Tensor) -> Tensor:
    """SkMMv2's scores of the rows of ``x`` outside the boolean mask ``chosen``.

    ``||root M^+ x||^2 / (1 + x^T M^+ x)`` with ``M = x_S^T x_S``: how much adding the row
    lowers the sketched variance ``tr(root^T root M^+)`` (Sherman-Morrison, when ``M`` is
    invertible).
    """
    picked = x[chosen]
    z = x[~chosen] @ psd_pinv(picked.T @ picked)
    leverage = (z * x[~chosen]).sum(1)
    return ((z @ root.T) ** 2).sum(1) / (1 + leverage)


def _draw(scores: Tensor, b: int, sampler: str, temperature: float, rng: torch.Generator):
    """``b`` distinct positions of ``scores`` chosen by ``sampler``."""
    if sampler == "greedy":
        return torch.topk(scores, b).indices
    if sampler == "exp":
        weights = torch.softmax(scores / scores.sum().clamp_min(1e-300) / temperature, 0)
    else:
        weights = scores.clamp_min(0)
    # Without replacement multinomial needs b positive weights: a floor far below any score
    # keeps candidates with zero score drawable only once the others are exhausted.
    weights = weights + 1e-12 * float(weights.max().clamp_min(1e-300))
    return torch.multinomial(weights, b, replacement=False, generator=rng)


def skmm_v2(
    x: Tensor,
    n: int,
    rng: torch.Generator,
    *,
    block: int = 1,
    sampler: str = "linear",
    temperature: float = 0.1,
    target: Tensor | None = None,
) -> Tensor:
    """SkMMv2: ``n`` distinct rows of the sketched gradients ``x`` ([N, m]), in selection order.

    ``target`` is the moment to match (``m x m``; default ``x^T x``, the client's own); with the
    sketch cut by :func:`sketch_dims` its leading block is used.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not 0 < n <= len(x):
        raise ValueError(f"cannot select {n} of {len(x)} examples")
    dims = sketch_dims(x.shape[1], n)
    x = x[:, :dims].double()
    target = x.T @ x if target is None else target[:dims, :dims].to(x)
    root = psd_root(target)
    chosen = torch.zeros(len(x), dtype=torch.bool)
    order = [rp_cholesky(x, min(dims, n), rng)]
    chosen[order[0]] = True
    taken = len(order[0])
    while taken < n:
        candidates = (~chosen).nonzero().squeeze(1)
        scores = variance_decrease(x, chosen, root)
        b = min(block, n - taken)
        new = candidates[_draw(scores, b, sampler, temperature, rng)]
        chosen[new] = True
        order.append(new)
        taken += b
    return torch.cat(order)


def capped_simplex(v: Tensor, total: float) -> Tensor:
    """The Euclidean projection of ``v`` onto ``{w : 0 <= w <= 1, sum(w) = total}``."""
    lo, hi = float(v.min()) - 1, float(v.max())
    for _ in range(100):  # sum(clip(v - tau, 0, 1)) falls with tau: bisect for tau
        tau = (lo + hi) / 2
        if float((v - tau).clamp(0, 1).sum()) > total:
            lo = tau
        else:
            hi = tau
    return (v - (lo + hi) / 2).clamp(0, 1)


def moment_matching_weights(
    x: Tensor,
    n: int,
    rng: torch.Generator,
    *,
    ratio: float = 0.5,
    sparsity: float = 0.0,
    steps: int = 500,
    lr: float = 0.01,
    target: Tensor | None = None,
) -> Tensor:
    """The continuous relaxation: weights in ``[0, 1]`` summing to ``n``, one per row of ``x``.

    Minimises ``sum_j (v_j^T Sigma_w v_j / lambda_j - gamma_j)^2 + sparsity * n / ||w||^2``
    subject to ``gamma_j >= ratio``, where ``Sigma_w = x^T diag(w) x / n`` and
    ``(lambda_j, v_j)`` are the eigenpairs of the target moment normalised to a mean (default
    ``x^T x / N``; pass the ``target`` already divided by its example count).  The last term is
    the weights' effective support over ``n`` (1 when ``n``-sparse): without it the uniform
    weights match every moment exactly.  Starts from a uniformly random ``n``-subset drawn
    from ``rng``.
    """
    if not 0 < n <= len(x):
        raise ValueError(f"cannot select {n} of {len(x)} examples")
    x = x.double()
    target = x.T @ x / len(x) if target is None else target.to(x)
    values, vectors = torch.linalg.eigh(target)
    keep = values > _TOLERANCE * values.max().clamp_min(torch.finfo(values.dtype).tiny)
    values, vectors = values[keep], vectors[:, keep]
    energy = (x @ vectors) ** 2 / values  # [N, k]: row i's share of each direction
    start = torch.zeros(len(x), dtype=x.dtype)
    start[torch.randperm(len(x), generator=rng)[:n]] = 1
    weights = start.requires_grad_()
    gamma = torch.ones(len(values), dtype=x.dtype, requires_grad=True)
    optimiser = torch.optim.Adam([weights, gamma], lr=lr)
    best, best_loss = weights.detach().clone(), float("inf")
    for _ in range(steps):
        optimiser.zero_grad()
        loss = ((weights @ energy / n - gamma) ** 2).sum() + sparsity * n / (weights**2).sum()
        if loss.item() < best_loss:
            best, best_loss = weights.detach().clone(), loss.item()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            weights.copy_(capped_simplex(weights, n))
            gamma.clamp_(min=ratio)
    return best


def round_weights(weights: Tensor, n: int, how: str, rng: torch.Generator) -> Tensor:
    """``n`` distinct rows from relaxation weights: sampled in proportion, or the top ``n``."""
    if how == "top":
        return torch.topk(weights, n).indices
    return _draw(weights, n, "linear", 1.0, rng)


@SELECTORS.register("skmm")
@dataclass
class SkMM(GradientOptions):
    """Sketchy moment matching (Dong et al., NeurIPS 2024): moment-matched gradient coresets.

    The selected examples' sketched gradient moment matches the partition's (or, with
    ``moments = "global"``, the federation's).
    """

    sketch_dim: int = 64  # m: sketch columns (the paper: slightly above the intrinsic dim)
    method: Literal["v2", "relaxation"] = "v2"
    # SkMMv2
    block: int = 1  # rows added per step (1 for small budgets; 5-10 is faster)
    sampler: Literal["linear", "exp", "greedy"] = "linear"
    temperature: float = 0.1  # exp sampler: softmax(score / sum(score) / temperature)
    # the continuous relaxation
    ratio: float = 0.5  # gamma_j >= ratio: the coreset moment dominates ratio x the full one
    sparsity: float = 0.0  # weight of the effective-support term (pushes toward n examples)
    steps: int = 500
    lr: float = 0.01
    rounding: Literal["sample", "top"] = "sample"
    # "global": send the sketched moment, match the server's sum (server "skmm_global")
    moments: Literal["local", "global"] = "local"

    sends: ClassVar[dict[str, str]] = {
        "skmm_moment": "moments = 'global' only: the m x m sketched second moment of the "
        "client's random-target gradients (their Gram structure up to a random rotation)",
        "skmm_count": "moments = 'global' only: the size of the client's partition",
        "skmm_seed": "moments = 'global' only: the seed of the sketch used (public)",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.moments == "local":  # this instance sends nothing beyond the model
            self.sends = {}
        if self.sketch_dim < 1:
            raise ValueError(f"skmm: sketch_dim must be >= 1, got {self.sketch_dim}")
        if self.block < 1:
            raise ValueError(f"skmm: block must be >= 1, got {self.block}")
        if not self.temperature > 0:
            raise ValueError(f"skmm: temperature must be > 0, got {self.temperature}")
        if not self.ratio > 0:
            raise ValueError(f"skmm: ratio must be > 0 (e.g. 0.5), got {self.ratio}")
        if self.sparsity < 0:
            raise ValueError(f"skmm: sparsity must be >= 0, got {self.sparsity}")
        if self.steps < 1:
            raise ValueError(f"skmm: steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"skmm: lr must be > 0, got {self.lr}")

    def check(self, setting: Setting) -> None:
        """Refuse global moments without the server strategy that sums them."""
        super().check(setting)
        server = getattr(setting.server, "name", "fedavg")
        if self.moments == "global" and server != "skmm_global":
            raise ValueError(
                f"skmm: moments = 'global' sends the clients' sketched moments, but [server] "
                f"{server!r} does not sum them; set [server] name = 'skmm_global', or "
                "moments = 'local'"
            )

    def select(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        instructions: Messages,
    ) -> Selection:
        """The coreset of this round, and (global moments) what the server sums."""
        glob = self.moments == "global"
        # A global moment was computed under the sketch it names: keep using that sketch.
        key = "skmm_seed" if glob and "skmm_seed" in (instructions or {}) else "seed"
        x = self.features(model, data, loss_fn, rng, instructions, seed_key=key)
        n = self.size(len(data))
        target = None
        if glob and "skmm_global_moment" in instructions:
            target = instructions["skmm_global_moment"].cpu().double()
        if self.method == "v2":
            chosen = skmm_v2(
                x,
                n,
                rng,
                block=self.block,
                sampler=self.sampler,
                temperature=self.temperature,
                target=target,
            )
        else:
            if target is not None:
                target = target / float(instructions["skmm_global_count"])
            weights = moment_matching_weights(
                x,
                n,
                rng,
                ratio=self.ratio,
                sparsity=self.sparsity,
                steps=self.steps,
                lr=self.lr,
                target=target,
            )
            chosen = round_weights(weights, n, self.rounding, rng)
        messages = {}
        if glob:
            messages = {
                "skmm_moment": x.T @ x,
                "skmm_count": torch.tensor(len(data), dtype=torch.int64),
                "skmm_seed": torch.tensor(int(instructions[key]), dtype=torch.int64),
            }
        return Selection(chosen, messages)
