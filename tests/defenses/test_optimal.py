import math

import pytest
import torch
from torch import nn

from fedleak import config, federation, seeding
from fedleak.core import Batch, GradientDefense
from fedleak.defenses import DEFENSES, _sensitivity
from fedleak.defenses.optimal import EPS, MAX_RATIO, score
from fedleak.registry import ConfigError

CE = nn.functional.cross_entropy


def _setup(hidden=4, inputs=8, batch=2, seed=0):
    """A tiny sigmoid MLP, a batch and its gradient (sigmoid: no exactly-zero gradients)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inputs, hidden), nn.Sigmoid(), nn.Linear(hidden, 3))
    g = seeding.rng(seed, "batch")
    data = Batch(torch.randn((batch, inputs), generator=g), torch.tensor([0, 2, 1, 0][:batch]))
    loss = CE(model(data.inputs), data.labels)
    names, params = zip(*model.named_parameters(), strict=True)
    grads = dict(zip(names, torch.autograd.grad(loss, params), strict=True))
    return model, data, grads


def _ratio(norms, grads):
    return {n: norms[n] / grads[n].abs().clamp_min(EPS) for n in grads}


@pytest.mark.parametrize(
    ("samples", "rtol"),
    [
        # measured worst relative error over 5 seeds: 0.05 (K = 2000), 0.08 (K = 600); the
        # expected error per entry is ~1/√(2K)
        pytest.param(2000, 0.1, marks=pytest.mark.slow),
        (60, 0.5),
    ],
)
def test_sketch_matches_the_exact_jacobian_row_norms(samples, rtol):
    model, data, grads = _setup()
    exact = _sensitivity.exact_row_norms(model, data, CE, grads)
    sketch = _sensitivity.row_norms(model, data, CE, grads, samples, seeding.rng(0))
    for n in grads:
        assert sketch[n].shape == grads[n].shape and sketch[n].dtype == grads[n].dtype
        assert torch.allclose(sketch[n], exact[n], rtol=rtol, atol=1e-7), n
    total_sketch = sum(float(s.square().sum()) for s in sketch.values())
    total_exact = sum(float(e.square().sum()) for e in exact.values())
    assert total_sketch == pytest.approx(total_exact, rel=rtol / 3)


def test_sketch_is_deterministic_and_leaves_running_stats_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2))
    model.train()
    data = Batch(torch.randn(4, 6), torch.tensor([0, 1, 1, 0]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    a = _sensitivity.row_norms(model, data, CE, names, 3, seeding.rng(1))
    b = _sensitivity.row_norms(model, data, CE, names, 3, seeding.rng(1))
    assert all(torch.equal(a[n], b[n]) for n in names)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model[1].track_running_stats


def _big_setup():
    """An MLP with ~2k coordinates: enough for the RMS of the noise to be close to its std."""
    return _setup(hidden=64, inputs=24, batch=4, seed=1)


def test_optimal_noise_has_rms_std_and_follows_the_ratio():
    model, data, grads = _big_setup()
    defense = DEFENSES["optimal_noise"](std=0.05, samples=4)
    assert isinstance(defense, GradientDefense)
    out = defense.gradients(model, data, CE, grads, seeding.rng(3))
    noise = torch.cat([(out[n] - grads[n]).flatten() for n in grads])
    assert noise.numel() > 1500
    # The effective stds: the directions come first from the rng, so redraw them the same way.
    rng = seeding.rng(3)
    norms = _sensitivity.row_norms(model, data, CE, grads, 4, rng)
    ratio = torch.cat([r.flatten() for r in _ratio(norms, grads).values()]).clamp_max(MAX_RATIO)
    std = ratio.sqrt() * 0.05 / ratio.mean().sqrt()
    assert std.square().mean().sqrt() == pytest.approx(0.05, rel=1e-5)
    unit = torch.cat([torch.randn(grads[k].shape, generator=rng).flatten() for k in grads])
    assert torch.allclose(noise, unit * std, rtol=1e-4, atol=1e-9)
    # The realised power Σ σ_j² z_j² has relative sd √(2 Σ σ_j⁴) / Σ σ_j² (a few large σ_j
    # dominate it); allow 4 sd on the power, i.e. about 2 on the RMS.
    spread = math.sqrt(2 * float(std.pow(4).sum())) / float(std.square().sum())
    assert noise.square().mean().sqrt() == pytest.approx(0.05, rel=2 * spread + 1e-3)
    # More sensitive coordinates (per unit of gradient) get more noise, on average.
    high = ratio >= ratio.median()
    assert noise[high].square().mean() > 4 * noise[~high].square().mean()


def test_optimal_noise_layerwise_uses_one_std_per_tensor():
    model, data, grads = _big_setup()
    defense = DEFENSES["optimal_noise"](std=0.05, samples=4, layerwise=True)
    out = defense.gradients(model, data, CE, grads, seeding.rng(3))
    rng = seeding.rng(3)
    norms = _sensitivity.row_norms(model, data, CE, grads, 4, rng)
    shape = {k: math.sqrt(norms[k].norm().item() / grads[k].norm().item()) for k in grads}
    total = sum(grads[k].numel() for k in grads)
    rms = math.sqrt(sum(shape[k] ** 2 * grads[k].numel() for k in grads) / total)
    for k in grads:
        unit = torch.randn(grads[k].shape, generator=rng)
        expected = grads[k] + unit * 0.05 * shape[k] / rms
        assert torch.allclose(out[k], expected, rtol=1e-4, atol=1e-8), k
    assert len({round(s, 6) for s in shape.values()}) > 1


def test_optimal_pruning_zeroes_exactly_the_top_ratio():
    model, data, grads = _big_setup()
    total = sum(g.numel() for g in grads.values())
    for amount in (0.1, 0.5, 0.9):
        out = DEFENSES["optimal_pruning"](amount=amount, samples=3).gradients(
            model, data, CE, grads, seeding.rng(7)
        )
        norms = _sensitivity.row_norms(model, data, CE, grads, 3, seeding.rng(7))
        zeroed = {k: out[k] == 0 for k in grads}
        assert sum(int(z.sum()) for z in zeroed.values()) == round(amount * total)
        ratio = _ratio(norms, grads)
        pruned = torch.cat([ratio[k][z] for k, z in zeroed.items()])
        kept = torch.cat([ratio[k][~z] for k, z in zeroed.items()])
        assert pruned.min() >= kept.max()
        assert all(torch.equal(out[k][~z], grads[k][~z]) for k, z in zeroed.items())


def test_optimal_pruning_layer_scope_prunes_every_tensor():
    model, data, grads = _big_setup()
    out = DEFENSES["optimal_pruning"](amount=0.3, samples=3, scope="layer").gradients(
        model, data, CE, grads, seeding.rng(7)
    )
    norms = _sensitivity.row_norms(model, data, CE, grads, 3, seeding.rng(7))
    ratio = _ratio(norms, grads)
    for k, g in grads.items():
        zeroed = out[k] == 0
        assert int(zeroed.sum()) == round(0.3 * g.numel())
        if zeroed.any():
            assert ratio[k][zeroed].min() >= ratio[k][~zeroed].max()


def test_pruning_score_puts_zero_gradients_first_and_ties_by_position():
    s = score(torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.5, 0.0, 1.0, -0.5]))
    assert s.tolist() == [2.0, math.inf, 2.0, 2.0]
    model, data, grads = _setup()
    grads["0.weight"] = torch.zeros_like(grads["0.weight"])  # 32 of 51 coordinates
    out = DEFENSES["optimal_pruning"](amount=0.8, samples=2).gradients(
        model, data, CE, grads, seeding.rng(0)
    )
    total = sum(g.numel() for g in grads.values())
    assert sum(int((o == 0).sum()) for o in out.values()) == round(0.8 * total)


@pytest.mark.parametrize(
    ("name", "options"),
    [("optimal_noise", {"std": 0.0}), ("optimal_pruning", {"amount": 0.0})],
)
def test_zero_strength_is_identity_and_draws_nothing(name, options):
    model, data, grads = _setup()
    rng = seeding.rng(0)
    state = rng.get_state()
    out = DEFENSES[name](**options).gradients(model, data, CE, grads, rng)
    assert list(out) == list(grads) and all(torch.equal(out[k], grads[k]) for k in grads)
    assert torch.equal(rng.get_state(), state)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("optimal_noise", {"std": 0.1, "samples": 2}),
        ("optimal_noise", {"std": 0.1, "samples": 2, "layerwise": True}),
        ("optimal_pruning", {"amount": 0.4, "samples": 2}),
        ("optimal_pruning", {"amount": 0.4, "samples": 2, "scope": "layer"}),
    ],
)
def test_keys_shapes_dtypes_kept_and_deterministic(name, options):
    model, data, grads = _setup()
    before = {k: v.clone() for k, v in grads.items()}
    defense = DEFENSES[name](**options)
    a = defense.gradients(model, data, CE, grads, seeding.rng(5))
    b = defense.gradients(model, data, CE, grads, seeding.rng(5))
    assert list(a) == list(grads)
    for k, g in grads.items():
        assert a[k].shape == g.shape and a[k].dtype == g.dtype
        assert torch.isfinite(a[k]).all() and torch.equal(a[k], b[k])
        assert torch.equal(g, before[k])  # the input is not modified
    assert not all(torch.equal(a[k], grads[k]) for k in grads)


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("optimal_noise", {"std": -1.0}, "std must be >= 0"),
        ("optimal_noise", {"std": float("nan")}, "std must be >= 0"),
        ("optimal_noise", {"samples": 0}, "samples must be"),
        ("optimal_pruning", {"amount": 1.0}, r"amount must be in \[0, 1\)"),
        ("optimal_pruning", {"samples": 0}, "samples must be"),
        ("optimal_pruning", {"scope": "tensor"}, "scope must be"),
        ("optimal_noise", {"refresh": 0}, "refresh must be an integer >= 1"),
        ("optimal_pruning", {"refresh": -2}, "refresh must be an integer >= 1"),
    ],
)
def test_bad_options_raise_naming_the_defense(name, bad, message):
    with pytest.raises(ValueError, match=f"{name}: {message}"):
        DEFENSES[name](**bad)
    # The registry checks Literal options itself and names the option, not the defense.
    with pytest.raises(ConfigError, match="scope" if "scope" in bad else name):
        config.load(_experiment({"name": name, **bad}))


def _experiment(defense: dict) -> dict:
    return {
        "data": {"name": "synthetic_images"},
        "model": {"name": "mlp", "hidden": [16], "activation": "sigmoid"},
        "training": {"name": "sgd", "batch_size": 4},
        "defenses": [defense],
    }


@pytest.mark.parametrize(
    "defense",
    [{"name": "optimal_noise", "std": 0.01}, {"name": "optimal_pruning", "amount": 0.5}],
)
def test_local_update_runs_with_the_defense(defense):
    exp = config.load(_experiment({**defense, "samples": 2}))
    assert config.stage(exp.defenses[0]) == "training"
    assert exp.training_defenses == (exp.defenses[0],)
    model = exp.build_model()
    sent = {k: v.detach().clone() for k, v in model.state_dict().items()}
    update = federation.local_update(exp, 0, 0, sent)
    assert list(update.params) == list(sent)
    assert all(torch.isfinite(v).all() for v in update.params.values())
    assert any(not torch.equal(update.params[k], sent[k]) for k in sent)
    again = federation.local_update(exp, 0, 0, sent)
    assert all(torch.equal(update.params[k], again.params[k]) for k in sent)


@pytest.mark.parametrize(
    "defense",
    [{"name": "optimal_noise", "std": 0.01}, {"name": "optimal_pruning", "amount": 0.5}],
)
def test_refresh_amortises_the_estimate_over_a_rounds_steps(defense, monkeypatch):
    # refresh = 3 over 7 local steps: estimated at steps 1, 4 and 7, reused in between; a new
    # round (a new model object) estimates afresh.
    calls = []
    real = _sensitivity.row_norms

    def counted(model, *args):
        calls.append(model)
        return real(model, *args)

    monkeypatch.setattr(_sensitivity, "row_norms", counted)
    exp = config.load(
        _experiment({**defense, "samples": 2, "refresh": 3})
        | {"training": {"name": "sgd", "batch_size": 2, "local_steps": 7}}
    )
    sent = federation.initial_params(exp)
    federation.local_update(exp, 0, 1, sent)
    assert len(calls) == 3 and len({id(m) for m in calls}) == 1
    federation.local_update(exp, 0, 2, sent)
    assert len(calls) == 6 and calls[3] is not calls[0]
    # refresh = 1 is the method itself: a fresh estimate at every step
    calls.clear()
    exp = config.load(
        _experiment({**defense, "samples": 2})
        | {"training": {"name": "sgd", "batch_size": 2, "local_steps": 7}}
    )
    federation.local_update(exp, 0, 1, sent)
    assert len(calls) == 7
