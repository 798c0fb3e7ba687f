"""per_example_clip: every example's gradient within the bound, averaged; inf = identity."""

import math

import pytest
import torch
from torch import nn

from fedleak import config, federation, seeding
from fedleak.core import Batch
from fedleak.defenses import DEFENSES
from fedleak.defenses.clip import per_example_gradients
from fedleak.registry import ConfigError

LOSS = nn.functional.cross_entropy


def _setup(batch: int = 6) -> tuple[nn.Module, Batch, dict[str, torch.Tensor]]:
    with seeding.isolated(0, "model"):
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(12, 4)
        )
    g = seeding.rng(0, "data")
    data = Batch(3 * torch.randn(batch, 1, 4, 4, generator=g), torch.arange(batch) % 4)
    model.zero_grad()
    LOSS(model(data.inputs), data.labels).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return model, data, grads


def _norms(per_example: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(g.double().flatten(1).square().sum(1) for g in per_example.values()).sqrt()


def test_per_example_gradients_are_the_single_example_gradients():
    model, data, grads = _setup()
    per_example = per_example_gradients(model, data, LOSS, list(grads))
    for i in (0, 4):
        model.zero_grad()
        LOSS(model(data.inputs[i : i + 1]), data.labels[i : i + 1]).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(per_example[n][i], p.grad)
    for n, g in grads.items():  # mean-reduced loss: the batch gradient is their mean
        torch.testing.assert_close(per_example[n].mean(0), g)


@pytest.mark.parametrize("bound", [1e-3, 0.05, 2.0])
def test_every_example_within_the_bound_and_small_ones_untouched(bound):
    model, data, grads = _setup()
    defense = DEFENSES["per_example_clip"](max_norm=bound)
    raw = _norms(per_example_gradients(model, data, LOSS, list(grads)))
    assert raw.min() < 2.0 < raw.max() or bound != 2.0  # the largest bound clips only some
    clipped = defense.clipped(model, data, LOSS, list(grads))
    norms = _norms(clipped)
    assert (norms <= bound * (1 + 1e-6)).all()
    # examples already within the bound keep their norm; the others land on it
    expected = torch.minimum(raw, torch.tensor(bound, dtype=torch.float64))
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=0)
    out = defense.gradients(model, data, LOSS, grads, seeding.rng(0))
    assert list(out) == list(grads)
    for n, g in grads.items():
        assert out[n].shape == g.shape and out[n].dtype == g.dtype
        torch.testing.assert_close(out[n], clipped[n].mean(0))
    # the mean of vectors of norm <= bound has norm <= bound
    assert _norms({n: o.unsqueeze(0) for n, o in out.items()}).item() <= bound * (1 + 1e-6)


def test_infinite_or_loose_bound_is_the_identity():
    model, data, grads = _setup()
    same = DEFENSES["per_example_clip"](max_norm=math.inf).gradients(
        model, data, LOSS, grads, seeding.rng(0)
    )
    assert all(torch.equal(same[n], grads[n]) for n in grads)
    loose = DEFENSES["per_example_clip"](max_norm=1e6).gradients(
        model, data, LOSS, grads, seeding.rng(0)
    )
    for n in grads:
        torch.testing.assert_close(loose[n], grads[n])


def test_differs_from_clipping_the_batch_gradient():
    # Clipping per example is not clipping the mean: the direction changes.
    model, data, grads = _setup()
    out = DEFENSES["per_example_clip"](max_norm=0.05).gradients(
        model, data, LOSS, grads, seeding.rng(0)
    )
    flat_out = torch.cat([o.flatten() for o in out.values()])
    flat_in = torch.cat([g.flatten() for g in grads.values()])
    cosine = torch.nn.functional.cosine_similarity(flat_out, flat_in, dim=0)
    assert cosine < 0.999


def test_runs_in_a_local_update_and_refuses_batchnorm():
    spec = {
        "seed": 1,
        "clients": 2,
        "data": {"name": "synthetic_images", "examples": 32, "test_examples": 8, "classes": 4},
        "model": {"name": "mlp", "hidden": [8]},
        "training": {"name": "sgd", "lr": 0.1, "batch_size": 4, "local_steps": 2},
        "defenses": [{"name": "per_example_clip", "max_norm": 0.01}],
    }
    exp = config.load(spec)
    sent = federation.initial_params(exp)
    update = federation.local_update(exp, 0, 1, sent)
    weights = [k for k in sent if k.endswith("weight")]
    moved = sum(float((update.params[k] - sent[k]).norm() ** 2) for k in sent) ** 0.5
    # two steps of lr 0.1 on gradients of norm <= 0.01 move at most 0.002 (biases included)
    assert 0 < moved <= 2 * 0.1 * 0.01 * (1 + 1e-5) and weights
    bn = config.load({**spec, "model": {"name": "convnet", "width": 1, "norm": "batch"}})
    with pytest.raises(ConfigError, match=r"per_example_clip: BatchNorm.*group"):
        bn.check()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_bound(bad):
    with pytest.raises(ConfigError, match=r"per_example_clip'?: max_norm must be (> 0|a finite)"):
        DEFENSES.build({"name": "per_example_clip", "max_norm": bad})
