"""Paper B's reconstruction lower bound: the formula, its monotonicity, where it applies."""

import itertools
import math

import pytest
import torch
from torch import nn

from fedleak import seeding
from fedleak.core import Batch, ServerView, Task
from fedleak.defenses import DEFENSES, _sensitivity
from fedleak.metrics.bound import mse_lower_bound, pixel_variance

TASK = Task("image", (1, 4, 4), 3, mean=(0.3,), std=(0.5,))
LR = 0.5
PRIOR = 0.08


def _view(local_steps: int = 1, model: nn.Module | None = None) -> tuple[ServerView, Batch]:
    with seeding.isolated(0, "model"):
        model = model or nn.Sequential(
            nn.Flatten(), nn.Linear(16, 6), nn.Sigmoid(), nn.Linear(6, 3)
        )
    g = seeding.rng(0, "data")
    batch = Batch(torch.randn(2, 1, 4, 4, generator=g), torch.tensor([0, 2]))
    view = ServerView.from_local_step(model, batch, TASK, lr=LR)
    if local_steps != 1:
        view = ServerView(**{**view.__dict__, "local_steps": local_steps})
    return view, batch


def _bound(defense, view=None, truth=None, samples=64, seed=0):
    if view is None:
        view, truth = _view()
    return mse_lower_bound(
        view, truth, [defense], prior_var=PRIOR, samples=samples, rng=seeding.rng(seed)
    )


def test_gaussian_bound_is_the_formula_with_the_exact_jacobian():
    view, truth = _view()
    model = view.model()
    model.train()
    names = [n for n, _ in model.named_parameters()]
    exact = _sensitivity.exact_row_norms(model, truth, view.loss_fn, names)
    # pixels = x * 0.5 + 0.3: a pixel moves the input 1/0.5 as far, so ‖∂g/∂p‖ = ‖∂g/∂x‖ / 0.5
    frobenius = sum(float(v.double().square().sum()) for v in exact.values()) / 0.5**2
    sigma = 0.01
    fisher = frobenius * (LR / sigma) ** 2 / truth.inputs.numel()
    bound = _bound(DEFENSES["gaussian_noise"](std=sigma), view, truth, samples=400)
    assert bound.reason == "" and bound.prior_var == PRIOR
    assert bound.fisher == pytest.approx(fisher, rel=0.1)
    assert bound.mse == pytest.approx(1 / (fisher + 1 / PRIOR), rel=0.1)


def test_more_noise_forces_more_error_up_to_the_prior_variance():
    stds = [0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 100.0]
    bounds = [_bound(DEFENSES["gaussian_noise"](std=s)).mse for s in stds]
    assert bounds[0] == 0.0  # no noise: nothing forbids a perfect reconstruction
    assert all(a < b for a, b in itertools.pairwise(bounds))  # strictly increasing
    assert all(b <= PRIOR for b in bounds)
    assert bounds[-1] == pytest.approx(PRIOR, rel=1e-3)  # no information: the prior's error
    # Fisher information scales as 1/σ² (same sketch: same rng)
    f1, f2 = (_bound(DEFENSES["gaussian_noise"](std=s)).fisher for s in (0.01, 0.02))
    assert f1 == pytest.approx(4 * f2, rel=1e-9)


def test_laplace_scale_b_counts_as_gaussian_std_b():
    gauss = _bound(DEFENSES["gaussian_noise"](std=0.03))
    laplace = _bound(DEFENSES["laplacian_noise"](scale=0.03))
    assert laplace.mse == pytest.approx(gauss.mse, rel=1e-12)


def test_optimal_noise_bound_scales_with_its_std():
    view, truth = _view()
    small = _bound(DEFENSES["optimal_noise"](std=0.02, samples=8), view, truth)
    large = _bound(DEFENSES["optimal_noise"](std=0.04, samples=8), view, truth)
    assert 0 < small.mse < large.mse < PRIOR
    assert small.fisher == pytest.approx(4 * large.fisher, rel=1e-9)
    assert _bound(DEFENSES["optimal_noise"](std=0.0), view, truth).mse == 0.0


@pytest.mark.parametrize(
    "case, reason",
    [
        ("clip_then_noise", "exactly one noise defense"),
        ("pruning", "exactly one noise defense"),
        ("two_steps", "one local step"),
        ("batchnorm", "floating buffers"),
    ],
)
def test_not_applicable_is_nan_with_the_reason(case, reason):
    noise = DEFENSES["gaussian_noise"](std=0.01)
    defenses, view, truth = [noise], *_view()
    if case == "clip_then_noise":
        defenses = [DEFENSES["clip"](), noise]
    elif case == "pruning":
        defenses = [DEFENSES["gradient_pruning"]()]
    elif case == "two_steps":
        view, truth = _view(local_steps=2)
    else:
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
        view, truth = _view(model=model)
    bound = mse_lower_bound(view, truth, defenses, prior_var=PRIOR, rng=seeding.rng(0))
    assert math.isnan(bound.mse) and reason in bound.reason


def test_pixel_variance_and_bad_prior():
    x = torch.tensor([[[[0.0]]], [[[2.0]]]])  # pixels 0.3 and 1.3 -> clamped to 1.0
    assert pixel_variance(x, Task("image", (1, 1, 1), 2, mean=(0.3,), std=(0.5,))) == (
        pytest.approx(((1.0 - 0.3) ** 2) / 2)
    )
    view, truth = _view()
    with pytest.raises(ValueError, match="prior_var must be > 0"):
        mse_lower_bound(view, truth, [], prior_var=0.0, rng=seeding.rng(0))


def test_coordinates_independent_of_the_data_carry_no_information():
    # A ReLU unit that is dead on this batch: its incoming weights have ‖J_j‖ = 0 and g_j = 0,
    # so optimal_noise gives them std 0; they must count 0, not 0/0.
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].bias[0] = -1e3  # unit 0 never fires
    view, truth = _view(model=model)
    bound = _bound(DEFENSES["optimal_noise"](std=0.02, samples=8), view, truth)
    assert math.isfinite(bound.mse) and 0 < bound.mse < PRIOR
