"""Randomized pruning masks: generation, early evaluation, selection over an iterative schedule.

Li, Gao, Lei & Xu, "Breaking through Deterministic Barriers: Randomized Pruning Mask Generation
and Selection", Findings of EMNLP 2023 (arXiv 2310.13183).  Reconstructed from the abstract and
the authors' code (``../shared/notes/pruning.md`` §3); nothing is copied.

* :func:`sample_mask` — per weight matrix (``n`` entries, keep ``k``), ``draws`` independent
  samples of ``k`` indices *without replacement* with ``p_i ∝ |w_i|^α``, and the mask keeps the
  ``k`` indices drawn most often.  Few draws: a noisy mask; many: the magnitude mask.  The number
  of draws is set by the randomness level ``r``: ``draws = max(⌊(n − k) · r⌋, 1)``.  A pure
  function of its arguments and an explicit generator.
* :func:`candidates` — ``N`` candidate masks, candidate ``i`` at level ``ratios[i mod len]``.
* :func:`iterative_prune` — the schedule (e.g. ``[0.54, 0.83, 0.92, 0.9375]``): at every stage
  build the candidates, give each a short training run from the stage's start weights (the early
  mask evaluation pipeline, EMEP), score it on a held-out split carved from the training data,
  keep the best (argmax: the mask-candidate selection), then train the winner fully before the
  next stage.  Training and scoring are callbacks (the loop is model-agnostic).  With one
  deterministic candidate (:func:`magnitude_candidates`) the same loop is iterative magnitude
  pruning with rewinding-free retraining: the IMP baseline the paper compares with.
* :func:`distill` — the short training step the candidates get: knowledge distillation from the
  dense teacher (soft cross-entropy on logits + MSE of hidden states), the mask re-applied after
  every optimiser step.

Departures: sampling without replacement uses the Gumbel-top-k trick (the same distribution as
``torch.multinomial`` without replacement, but exact in log space where ``|w|^α`` underflows);
ties in the vote count are broken by magnitude (so the limit is exactly the magnitude mask); a
candidate's early score is its held-out accuracy after the short run (the code averages its last
ten evaluations); the optimiser state is not carried across stages; the distillation omits the
attention-map term of TinyBERT's loss.

What leaks: on a client the masks are drawn from the client's own generator and selected by its
private held-out data, so the sent mask is a function of both; the federated trainer declares it.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fedleak.pruning.krp import check_sparsity, magnitude_mask

Masks = dict[str, Tensor]  # parameter name -> keep mask (True = kept)


def draws_for(numel: int, keep: int, ratio: float) -> int:
    """The number of draws of randomness level ``ratio``: ``max(⌊(n − k) · r⌋, 1)``."""
    if not ratio > 0:
        raise ValueError(f"randomized masks: the randomness ratio must be > 0, got {ratio}")
    return max(math.floor((numel - keep) * ratio), 1)


def sample_mask(
    weight: Tensor, sparsity: float, draws: int, alpha: float, rng: torch.Generator
) -> Tensor:
    """Keep-mask: the ``k`` entries drawn most often in ``draws`` samples ``∝ |w|^alpha``.

    Each draw takes ``k = numel − round(sparsity · numel)`` distinct indices (Gumbel-top-k of
    ``alpha · log|w|``); votes are tallied and the top-k by votes kept, ties by ``|w|``.
    """
    check_sparsity(sparsity, "randomized masks")
    if draws < 1:
        raise ValueError(f"randomized masks: draws must be >= 1, got {draws}")
    if not alpha >= 0:
        raise ValueError(f"randomized masks: alpha must be >= 0, got {alpha}")
    flat = weight.detach().abs().flatten().double().cpu()
    keep = flat.numel() - round(sparsity * flat.numel())
    # log|w| is -inf for zeros (pruned earlier): drawn last, never before a surviving weight.
    logits = torch.where(flat > 0, alpha * flat.log(), -torch.inf)
    votes = torch.zeros_like(flat)
    for _ in range(draws):
        u = torch.rand(flat.shape, generator=rng, dtype=torch.float64).clamp_min(1e-300)
        gumbel = -(-u.log()).log()
        votes[(logits + gumbel).topk(keep).indices] += 1
    # Votes are integers <= draws; |w| / (max |w| + 1) < 1 breaks ties by magnitude only.
    order = votes + flat / (flat.max() + 1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order.topk(keep).indices] = True
    return mask.view(weight.shape).to(weight.device)


def hamming(a: Masks, b: Masks) -> int:
    """Entries on which two mask sets differ (the code's "variance" of a random mask)."""
    return sum(int((a[k] != b[k]).sum()) for k in a)


def magnitude_candidates(weights: Mapping[str, Tensor], sparsity: float) -> list[Masks]:
    """The one deterministic candidate: the per-matrix magnitude mask (IMP's)."""
    return [{k: magnitude_mask(w, sparsity) for k, w in weights.items()}]


def candidates(
    weights: Mapping[str, Tensor],
    sparsity: float,
    count: int,
    ratios: Sequence[float],
    alpha: float,
    rng: torch.Generator,
) -> list[Masks]:
    """``count`` random candidates; candidate ``i`` at randomness level ``ratios[i % len]``."""
    if count < 1 or not ratios:
        raise ValueError(
            f"randomized masks: need count >= 1 and at least one ratio, got {count}, {ratios}"
        )
    out = []
    for i in range(count):
        ratio = ratios[i % len(ratios)]
        masks = {}
        for name, w in weights.items():
            keep = w.numel() - round(sparsity * w.numel())
            masks[name] = sample_mask(w, sparsity, draws_for(w.numel(), keep, ratio), alpha, rng)
        out.append(masks)
    return out


def check_schedule(schedule: Sequence[float], who: str) -> None:
    """One ValueError unless ``schedule`` is a non-empty increasing list of sparsities in [0, 1)."""
    if not schedule:
        raise ValueError(f"{who}: the sparsity schedule is empty; give e.g. [0.5, 0.7, 0.9]")
    for s in schedule:
        check_sparsity(s, who)
    if any(b <= a for a, b in itertools.pairwise(schedule)):
        raise ValueError(
            f"{who}: the sparsity schedule must increase strictly, got {list(schedule)}"
        )


def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned entries of ``model``'s parameters named in ``masks``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            params[name].mul_(keep.to(params[name].dtype))


@dataclass
class Stage:
    """One stage of the schedule: every candidate's early score and the winner."""

    sparsity: float
    scores: list[float]  # held-out score of each candidate after its short run
    best: int  # index of the selected candidate
    final: float  # held-out score of the winner after its full training
    distance: list[int] = field(default_factory=list)  # Hamming distance to the magnitude mask


# train(model, masks, steps) trains in place, keeping masks; evaluate(model) -> higher is better.
Train = Callable[[nn.Module, Masks, int], None]
Evaluate = Callable[[nn.Module], float]
Generate = Callable[[Mapping[str, Tensor], float], list[Masks]]


def iterative_prune(
    model: nn.Module,
    names: Sequence[str],
    schedule: Sequence[float],
    generate: Generate,
    train: Train,
    evaluate: Evaluate,
    quick_steps: int,
    full_steps: int,
) -> tuple[Masks, list[Stage]]:
    """Prune ``model``'s parameters ``names`` along ``schedule``; the final masks and stages.

    Per stage: ``generate(weights, sparsity)`` gives the candidates; with more than one, each
    is applied to a copy of the stage's start weights, trained ``quick_steps`` and scored with
    ``evaluate``; the argmax is kept (one candidate: no selection).  The winner is applied to
    the start weights and trained ``full_steps``.  The masks only shrink: a stage's candidates
    are drawn from the weights that survived the previous stage (the zeros stay zeros).
    """
    check_schedule(schedule, "iterative pruning")
    if quick_steps < 0 or full_steps < 0:
        raise ValueError(
            f"iterative pruning: steps must be >= 0, got quick {quick_steps}, full {full_steps}"
        )
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"iterative pruning: the model has no parameter {missing[0]!r}")
    stages = []
    masks: Masks = {}
    for sparsity in schedule:
        start = copy.deepcopy(model.state_dict())
        weights = {n: params[n].detach() for n in names}
        pool = generate(weights, sparsity)
        reference = magnitude_candidates(weights, sparsity)[0]
        scores = []
        if len(pool) > 1:
            for candidate in pool:
                apply_masks(model, candidate)
                train(model, candidate, quick_steps)
                scores.append(float(evaluate(model)))
                model.load_state_dict(start)
        best = max(range(len(pool)), key=lambda i: scores[i]) if scores else 0
        masks = pool[best]
        apply_masks(model, masks)
        train(model, masks, full_steps)
        stages.append(
            Stage(
                sparsity,
                scores,
                best,
                float(evaluate(model)),
                [hamming(c, reference) for c in pool],
            )
        )
    return masks, stages


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Tensor],
    masks: Masks,
    steps: int,
    lr: float = 5e-5,
    temperature: float = 1.0,
    hidden: Callable[[nn.Module, Tensor], tuple[Tensor, list[Tensor]]] | None = None,
) -> float:
    """``steps`` AdamW steps of knowledge distillation; the masks re-applied after each step.

    Loss: soft cross-entropy between the student's and the teacher's logits at ``temperature``,
    plus (with ``hidden``, a function returning ``(logits, hidden states)``) the mean squared
    error of every hidden state.  ``batches`` are token-id batches, cycled.  Returns the last
    loss (nan for no steps).
    """
    if steps < 0:
        raise ValueError(f"distill: steps must be >= 0, got {steps}")
    if not batches:
        raise ValueError("distill: needs at least one batch of training inputs")
    forward = hidden or (lambda m, x: (m(x), []))
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    student.train()
    teacher.eval()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        ids = batches[step % len(batches)]
        with torch.no_grad():
            t_logits, t_hidden = forward(teacher, ids)
        s_logits, s_hidden = forward(student, ids)
        soft = torch.softmax(t_logits / temperature, -1)
        loss = -(soft * torch.log_softmax(s_logits / temperature, -1)).sum(-1).mean()
        for s, t in zip(s_hidden, t_hidden, strict=True):
            loss = loss + nn.functional.mse_loss(s, t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        apply_masks(student, masks)
    return float(loss.detach())
