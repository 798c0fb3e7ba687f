"""Randomized masks: the generator, the candidates, the selection loop over a schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedleak.pruning import randomized
from fedleak.pruning.krp import magnitude_mask


def _weight(seed: int = 0, shape=(20, 30)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _mask(w, draws, seed, sparsity=0.7, alpha=5.0):
    return randomized.sample_mask(w, sparsity, draws, alpha, torch.Generator().manual_seed(seed))


def test_the_mask_is_deterministic_for_a_seed_and_keeps_exactly_k():
    w = _weight()
    a, b, c = _mask(w, 4, 1), _mask(w, 4, 1), _mask(w, 4, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # another generator, another mask (few draws: noisy)
    assert int(a.sum()) == w.numel() - round(0.7 * w.numel())


def test_the_mask_converges_to_the_magnitude_mask_as_draws_grow():
    w = _weight()
    reference = magnitude_mask(w, 0.7)
    distance = {
        d: sum(int((_mask(w, d, s) != reference).sum()) for s in range(4)) / 4
        for d in (1, 16, 256, 4096)
    }
    # measured: 1 draw ~55 entries off, 16 ~10, 256 ~3, 4096 0-1
    assert distance[1] > distance[16] > distance[256] >= distance[4096]
    assert distance[4096] <= 1


def test_pruned_weights_stay_pruned_and_the_draw_count_follows_the_ratio():
    w = _weight()
    w[:, :10] = 0  # a previous stage's zeros
    mask = _mask(w, 3, 0, sparsity=0.5)
    assert not mask[:, :10].any()
    assert randomized.draws_for(1000, 100, 1e-3) == 1  # floor(900e-3) = 0 -> at least one
    assert randomized.draws_for(100_000, 10_000, 1e-3) == 90


def test_candidates_cycle_the_randomness_levels():
    weights = {"a": _weight(0, (40, 40)), "b": _weight(1, (40, 40))}
    rng = torch.Generator().manual_seed(0)
    pool = randomized.candidates(weights, 0.9, 4, (1e-4, 1.0), 5.0, rng)
    reference = randomized.magnitude_candidates(weights, 0.9)[0]
    far, near = randomized.hamming(pool[0], reference), randomized.hamming(pool[1], reference)
    assert far > near  # 1 draw per matrix against 1,440
    assert len(pool) == 4 and all(set(c) == {"a", "b"} for c in pool)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)


def test_the_loop_keeps_the_best_candidate_and_nested_masks():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Toy()
    rng = torch.Generator().manual_seed(0)
    trained = []

    def generate(weights, sparsity):
        return randomized.candidates(weights, sparsity, 3, (1e-3,), 5.0, rng)

    def train(model, masks, steps):
        trained.append(steps)
        with torch.no_grad():  # "training" that moves every surviving weight
            model.lin.weight.add_(0.01 * masks["lin.weight"])

    score = iter(range(100))  # a score per call: later candidates score higher

    def evaluate(model):
        return float(next(score))

    masks, stages = randomized.iterative_prune(
        model, ["lin.weight"], [0.5, 0.8], generate, train, evaluate, 2, 5
    )
    assert [s.best for s in stages] == [2, 2]  # the argmax of the early scores
    assert trained == [2, 2, 2, 5, 2, 2, 2, 5]
    assert [len(s.scores) for s in stages] == [3, 3]
    kept = masks["lin.weight"]
    assert int(kept.sum()) == 256 - round(0.8 * 256)
    assert torch.equal(model.lin.weight != 0, kept)


def test_one_deterministic_candidate_is_imp_without_selection():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Toy()
    w = model.lin.weight.detach().clone()
    masks, stages = randomized.iterative_prune(
        model,
        ["lin.weight"],
        [0.5],
        randomized.magnitude_candidates,
        lambda m, k, s: None,
        lambda m: 0.0,
        3,
        3,
    )
    assert stages[0].scores == [] and stages[0].distance == [0]
    assert torch.equal(masks["lin.weight"], magnitude_mask(w, 0.5))


def test_distillation_keeps_the_mask_and_moves_toward_the_teacher():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher, student = nn.Linear(8, 3), nn.Linear(8, 3)
    masks = {"weight": magnitude_mask(student.weight.detach(), 0.5)}
    randomized.apply_masks(student, masks)
    batches = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    first = randomized.distill(student, teacher, batches, masks, 1, lr=1e-2)
    last = randomized.distill(student, teacher, batches, masks, 200, lr=1e-2)
    assert last < first
    assert not student.weight[~masks["weight"]].any()


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ([], r"schedule is empty"),
        ([0.5, 0.5], r"must increase strictly, got \[0.5, 0.5\]"),
        ([0.5, 1.0], r"sparsity must be in \[0, 1\).*got 1.0"),
    ],
)
def test_bad_schedules_are_one_clear_error(schedule, message):
    with pytest.raises(ValueError, match=message):
        randomized.iterative_prune(
            _Toy(), ["lin.weight"], schedule, randomized.magnitude_candidates, None, None, 1, 1
        )


def test_bad_generator_options_are_one_clear_error():
    w = _weight()
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\).*got 1.5"):
        _mask(w, 1, 0, sparsity=1.5)
    with pytest.raises(ValueError, match="draws must be >= 1"):
        _mask(w, 0, 0)
    with pytest.raises(ValueError, match="ratio must be > 0"):
        randomized.draws_for(10, 5, 0.0)
    with pytest.raises(ValueError, match="no parameter 'nope'"):
        randomized.iterative_prune(
            _Toy(), ["nope"], [0.5], randomized.magnitude_candidates, None, None, 1, 1
        )
