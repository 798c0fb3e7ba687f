import numpy as np
import pytest
import torch

from fedleak.robust import baselines, groups
from fedleak.robust.epo import epo_weights, non_uniformity


def quadratic(theta, targets, floor=0.05):
    """L_k = |theta - t_k|^2 / 2 + floor and its gradients."""
    diff = theta[None] - targets
    return 0.5 * (diff**2).sum(1) + floor, diff


def run_epo(preference, steps=300, lr=0.05):
    targets = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-0.5, -0.5, -0.5]])
    theta = np.array([1.0, 0.0, 0.0])  # at group 0's optimum: very unbalanced start
    mus, modes = [], []
    for _ in range(steps):
        losses, grads = quadratic(theta, targets)
        step = epo_weights(losses, grads @ grads.T, preference)
        assert step.weights.shape == (4,)
        assert (step.weights >= 0).all() and step.weights.sum() == pytest.approx(1.0)
        mus.append(step.non_uniformity)
        modes.append(step.mode)
        theta = theta - lr * step.weights @ grads
    return quadratic(theta, targets)[0], mus, modes


def test_epo_returns_simplex_weights_and_balances_the_losses():
    losses, mus, modes = run_epo(None)
    assert mus[0] > 0.1
    assert mus[-1] < 0.02 * mus[0]  # c*L driven toward uniform
    assert "balance" in modes and "fallback" not in modes
    assert losses.max() / losses.min() < 1.2


def test_preference_controls_the_balance():
    plain, _, _ = run_epo(None)
    favoured, mus, _ = run_epo((3.0, 1.0, 1.0, 1.0))
    assert mus[-1] < 0.02 * mus[0]
    # c_k L_k equalised: a larger c_0 buys group 0 a smaller loss than it gets without it
    assert favoured[0] < plain[0]
    assert favoured[0] < favoured[1:].min()


def test_balance_step_favours_the_worse_group():
    losses = np.array([2.0, 0.5])
    grads = np.array([[1.0, 0.0], [0.0, 1.0]])
    step = epo_weights(losses, grads @ grads.T)
    assert step.mode == "balance"
    assert step.weights[0] > step.weights[1]


def test_descent_mode_when_balanced_finds_a_common_descent_direction():
    grads = np.array([[1.0, 0.2], [0.3, 1.0], [0.6, 0.6]])
    step = epo_weights(np.ones(3), grads @ grads.T)
    assert step.mode == "descent"
    assert ((grads @ grads.T) @ step.weights >= -1e-9).all()


def test_gram_scale_does_not_change_the_weights():
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(4, 6))
    losses = np.array([0.3, 0.9, 0.5, 1.4])
    a = epo_weights(losses, grads @ grads.T).weights
    b = epo_weights(losses, 1e-9 * grads @ grads.T).weights
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_non_uniformity_is_zero_exactly_when_weighted_losses_are_equal():
    assert non_uniformity(np.array([0.2, 0.4]), np.array([2.0, 1.0])) == pytest.approx(0.0)
    assert non_uniformity(np.array([0.2, 0.4])) > 0


@pytest.mark.parametrize(
    ("losses", "gram", "preference", "match"),
    [
        ([1.0, 0.0], np.eye(2), None, "must be finite and > 0"),
        ([1.0, 1.0], np.eye(3), None, "gram must be 2 x 2"),
        ([1.0, 1.0], np.eye(2), (1.0,), "preference has 1 entries but there are 2 groups"),
        ([1.0, 1.0], np.eye(2), (1.0, -1.0), "preference entries must be finite and > 0"),
        ([1.0, 1.0], np.full((2, 2), np.nan), None, "NaN"),
    ],
)
def test_bad_inputs_are_one_clear_error(losses, gram, preference, match):
    with pytest.raises(ValueError, match=match):
        epo_weights(np.array(losses), gram, preference)


def test_baselines():
    counts = np.array([90.0, 10.0, 0.0])
    np.testing.assert_allclose(baselines.erm(counts), [0.9, 0.1, 0.0])
    np.testing.assert_allclose(baselines.reweighted(counts, 1.0), [0.5, 0.5, 0.0])
    q = baselines.group_dro(np.full(3, 1 / 3), np.array([0.1, 2.0, 0.0]), counts, 0.5)
    assert q[2] == 0 and q[1] > q[0] and q.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="power must be in"):
        baselines.reweighted(counts, 2.0)
    with pytest.raises(ValueError, match="step must be > 0"):
        baselines.group_dro(q, np.zeros(3), counts, 0.0)


def test_group_losses_and_gradients():
    w = torch.tensor([1.0, -1.0], requires_grad=True)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    per_example = x @ w
    g = torch.tensor([0, 1, 0])
    losses, counts = groups.group_losses(per_example, g, 3)
    torch.testing.assert_close(losses, torch.tensor([1.5, -1.0, 0.0]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 1.0, 0.0]))
    grads = groups.group_gradients(losses, [w], counts > 0)
    torch.testing.assert_close(grads, torch.tensor([[1.5, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="set num_groups"):
        groups.group_losses(per_example, torch.tensor([0, 1, 5]), 3)
    acc = groups.group_accuracy(torch.tensor([True, False, True]), g, 3)
    np.testing.assert_allclose(acc[:2], [1.0, 0.0])
    assert np.isnan(acc[2])
