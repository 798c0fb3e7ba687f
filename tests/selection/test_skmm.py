"""SkMM (Dong, Phan, Pan & Lei, NeurIPS 2024): the algorithms, the selector, global moments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedleak import config, federation, pipeline
from fedleak.core import Batch
from fedleak.registry import ConfigError
from fedleak.selection import SELECTORS, gmm
from fedleak.selection.baselines import uniform
from fedleak.selection.gradients import gaussian_sketch, per_example_gradients
from fedleak.selection.skmm import (
    capped_simplex,
    moment_matching_weights,
    psd_root,
    rp_cholesky,
    sketched_variance,
    skmm_v2,
    variance_decrease,
)

CE = nn.functional.cross_entropy
EPOCH = {"name": "sgd", "lr": 0.1, "batch_size": 2, "local_epochs": 1}  # trains on all selected


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 5))
    data = Batch(torch.randn(60, 1, 4, 4), torch.randint(5, (60,)))
    return model, data


@pytest.mark.parametrize("method", ["v2", "relaxation"])
@pytest.mark.parametrize(("budget", "expected"), [({"count": 13}, 13), ({"fraction": 0.25}, 15)])
def test_skmm_selects_exactly_the_budget_and_is_deterministic(method, budget, expected):
    model, data = small_problem()
    selector = SELECTORS["skmm"](sketch_dim=8, method=method, steps=50, **budget)
    orders = {"seed": torch.tensor(11)}
    a = selector.select(model, data, CE, gen(1), orders).indices
    b = selector.select(model, data, CE, gen(1), orders).indices
    assert len(a) == expected and len(set(a.tolist())) == expected
    assert a.dtype == torch.int64 and int(a.min()) >= 0 and int(a.max()) < len(data)
    assert torch.equal(a, b)
    other = selector.select(model, data, CE, gen(2), {"seed": torch.tensor(12)}).indices
    assert not torch.equal(a, other)


def test_a_budget_above_the_partition_takes_all_of_it():
    model, data = small_problem()
    chosen = SELECTORS["skmm"](count=500).select(model, data, CE, gen(0), {"seed": torch.tensor(0)})
    assert sorted(chosen.indices.tolist()) == list(range(len(data)))


def test_scores_are_the_exact_decrease_of_the_sketched_variance():
    x = torch.randn(40, 6, generator=gen(0), dtype=torch.float64)
    chosen = torch.zeros(40, dtype=torch.bool)
    chosen[:8] = True
    target = x.T @ x
    scores = variance_decrease(x, chosen, psd_root(target))
    before = sketched_variance(x, torch.arange(8), target)
    for k, i in enumerate(range(8, 40)):
        after = sketched_variance(x, torch.tensor([*range(8), i]), target)
        assert scores[k].item() == pytest.approx(before - after, rel=1e-8)


def test_greedy_takes_the_largest_decrease():
    x = torch.randn(50, 4, generator=gen(3), dtype=torch.float64)
    order = skmm_v2(x, 25, gen(0), sampler="greedy")  # sketch cut to 5 -> 4 columns used
    start = order[:4]
    chosen = torch.zeros(50, dtype=torch.bool)
    chosen[start] = True
    decrease = variance_decrease(x, chosen, psd_root(x.T @ x))
    assert int(order[4]) == int((~chosen).nonzero().squeeze(1)[decrease.argmax()])


def test_rp_cholesky_stops_at_the_rank():
    basis = torch.randn(3, 10, generator=gen(0), dtype=torch.float64)
    x = torch.randn(30, 3, generator=gen(1), dtype=torch.float64) @ basis  # rank 3
    assert len(rp_cholesky(x, 8, gen(2))) == 3


def test_the_projection_is_onto_the_capped_simplex_and_nearest():
    v = torch.randn(30, generator=gen(0), dtype=torch.float64) * 2
    p = capped_simplex(v, 7.0)
    assert p.sum().item() == pytest.approx(7.0, abs=1e-9) and p.min() >= 0 and p.max() <= 1
    for seed in range(20):  # no other feasible point is closer
        w = capped_simplex(torch.randn(30, generator=gen(seed + 1), dtype=torch.float64), 7.0)
        assert (v - p).norm() <= (v - w).norm() + 1e-9


def test_relaxation_weights_are_feasible():
    x = torch.randn(40, 5, generator=gen(0), dtype=torch.float64)
    w = moment_matching_weights(x, 10, gen(1), steps=30)
    assert w.sum().item() == pytest.approx(10, abs=1e-6) and w.min() >= 0 and w.max() <= 1


def test_on_duplicated_clusters_skmm_covers_them_and_beats_uniform():
    """Near-duplicates in 12 clusters of random sizes: the answer is one point per cluster."""
    risk = {"skmm": [], "uniform": []}
    covered = {"skmm": [], "uniform": []}
    for seed in range(4):
        mix = gmm.gaussian_mixture(300, 320, 12, np.random.default_rng(seed), std_max=1e-3)
        sketched = torch.from_numpy(mix.features) @ gaussian_sketch(320, 48, seed)
        n = 36  # three per cluster
        chosen = {
            "skmm": skmm_v2(sketched, n, gen(seed)).numpy(),
            "uniform": uniform(300, n, gen(seed)).numpy(),
        }
        for name, coreset in chosen.items():
            risk[name].append(gmm.ridge_risk(mix, coreset, np.random.default_rng(seed))[0])
            covered[name].append(len(set(mix.cluster[coreset])))
    assert covered["skmm"] == [12] * 4
    assert min(covered["uniform"]) < 12
    assert np.mean(risk["skmm"]) < 0.1 * np.mean(risk["uniform"])


def test_gradients_are_the_per_example_autograd_gradients_and_sketch_linearly():
    model, data = small_problem()
    targets = torch.randint(5, (len(data),), generator=gen(0))
    grads = per_example_gradients(model, data, targets, CE, layers=1)
    assert grads.shape == (60, 8 * 5 + 5)
    model.zero_grad()
    CE(model(data.inputs[7:8]), targets[7:8]).backward()
    last = model[3]
    expected = torch.cat([last.weight.grad.reshape(-1), last.bias.grad])
    torch.testing.assert_close(grads[7].float(), expected, rtol=1e-5, atol=1e-6)
    sketch = gaussian_sketch(45, 6, 4)
    sketched = per_example_gradients(model, data, targets, CE, layers=1, sketch=sketch)
    torch.testing.assert_close(sketched, grads @ sketch)
    assert torch.equal(sketch, gaussian_sketch(45, 6, 4))  # the seed fixes it
    assert per_example_gradients(model, data, targets, CE, layers=2).shape == (60, 45 + 16 * 8 + 8)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\], got 0.0"),
        ({"fraction": 1.5}, r"fraction must be in \(0, 1\], got 1.5"),
        ({"count": -2}, r"count must be >= 0 \(0 = use fraction\), got -2"),
        ({"layers": 0}, r"layers must be >= 1 \(the last layer\), got 0"),
        ({"sketch_dim": 0}, r"sketch_dim must be >= 1, got 0"),
        ({"block": 0}, r"block must be >= 1, got 0"),
        ({"temperature": 0.0}, r"temperature must be > 0, got 0.0"),
        ({"ratio": -1.0}, r"ratio must be > 0 \(e.g. 0.5\), got -1.0"),
        ({"sparsity": -1.0}, r"sparsity must be >= 0, got -1.0"),
        ({"steps": 0}, r"steps must be >= 1, got 0"),
        ({"lr": 0.0}, r"lr must be > 0, got 0.0"),
        ({"sampler": "softmax"}, r"sampler must be one of 'linear', 'exp', 'greedy'"),
        ({"method": "v3"}, r"method must be one of 'v2', 'relaxation'"),
        ({"moments": "both"}, r"moments must be one of 'local', 'global'"),
    ],
)
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(ConfigError, match=message):
        SELECTORS.build({"name": "skmm", **options})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"selection": {"name": "skmm", "layers": 5}}, r"layers = 5: the model has 2 layers"),
        ({"selection": {"name": "herding", "layers": 3}}, r"layers = 3: the model has 2 layers"),
        (
            {"selection": {"name": "skmm", "sketch_dim": 10**6}},
            r"sketch_dim = 1000000 is wider than the 68 gradient entries of the last 1 layer",
        ),
        (
            {"selection": {"name": "skmm", "moments": "global"}},
            r"\[selection\] skmm: .*set \[server\] name = 'skmm_global'",
        ),
        ({"server": {"name": "skmm_global"}}, r"\[server\] skmm_global sums the moments"),
    ],
)
def test_settings_the_selector_cannot_work_in_are_refused_before_training(tiny, changes, message):
    with pytest.raises(ConfigError, match=message):
        config.load(tiny(**changes, attacks=[])).check()


def test_a_sketch_without_the_public_seed_is_a_clear_error():
    model, data = small_problem()
    with pytest.raises(ValueError, match=r"needs the server's public seed"):
        SELECTORS["skmm"]().select(model, data, CE, gen(0), {})


def test_a_client_trains_on_its_coreset_only(tiny):
    selection = {"name": "skmm", "count": 5, "sketch_dim": 4}
    exp = config.load(tiny(selection=selection, training=EPOCH, attacks=[]))
    update = federation.local_update(exp, 0, 1, federation.initial_params(exp))
    assert len(update.truth) == 5 and not update.messages
    held = exp.client_data(0)
    rows = {tuple(r.flatten().tolist()) for r in held.inputs}
    assert all(tuple(r.flatten().tolist()) in rows for r in update.truth.inputs)


def test_global_moments_are_sent_recorded_and_matched(tmp_path, tiny):
    spec = tiny(
        selection={"name": "skmm", "count": 6, "sketch_dim": 4, "moments": "global"},
        server={"name": "skmm_global"},
        training=EPOCH,
        attacks=[],
    )
    exp = config.load(spec)
    store = pipeline.run(exp, tmp_path / "run")
    assert store.meta()["status"] == "done"
    views = sorted(store.views(exp), key=lambda v: (v.round, v.client))
    assert {v.round for v in views} == {1, 2}
    for view in views:
        assert set(view.messages) == {"skmm_moment", "skmm_count", "skmm_seed"}
        assert view.messages["skmm_moment"].shape == (4, 4)
        assert int(view.messages["skmm_count"]) == len(exp.client_data(view.client))
        assert view.num_examples == 6
    first = [v for v in views if v.round == 1]
    second = [v for v in views if v.round == 2]
    assert all("skmm_global_moment" not in v.instructions for v in first)
    summed = sum(v.messages["skmm_moment"] for v in first)  # every round-1 client is watched
    for view in second:
        torch.testing.assert_close(view.instructions["skmm_global_moment"], summed)
        # round 2 keeps round 1's sketch, so the moments share coordinates
        assert int(view.messages["skmm_seed"]) == int(first[0].instructions["seed"])


def test_only_global_moments_declare_messages():
    assert SELECTORS["skmm"]().sends == {}
    assert set(SELECTORS["skmm"](moments="global").sends) == {
        "skmm_moment",
        "skmm_count",
        "skmm_seed",
    }
    assert "skmm_moment" in SELECTORS["skmm"].sends  # what `fedleak list` shows
