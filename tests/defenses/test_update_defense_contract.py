"""The contract every update defense keeps, checked for each one registered, with its defaults."""

import pytest
import torch

from fedleak import config, seeding
from fedleak.core import UpdateDefense
from fedleak.defenses import DEFENSES
from fedleak.registry import ConfigError

UPDATE_DEFENSES = [n for n in DEFENSES.names() if config.stage(DEFENSES[n]) == "update"]

# One out-of-range value per defense of the classic families (others: an unknown option only).
BAD_OPTIONS = {
    "gaussian_noise": {"std": -1.0},
    "laplacian_noise": {"scale": -1.0},
    "clip": {"max_norm": 0.0},
    "coordinate_clip": {"bound": 0.0},
    "gradient_pruning": {"amount": 1.0},
    "quantization": {"bits": 1},
    "dropout": {"p": 1.0},
    "dpsgd": {"delta": 0.0},
}


def _delta() -> dict[str, torch.Tensor]:
    g = seeding.rng(0, "delta")
    return {
        "conv.weight": torch.randn((4, 3, 3, 3), generator=g),
        "bn.running_mean": torch.randn((4,), generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(12345),
        "fc.bias": torch.randn((10,), generator=g).half(),
        "scale": torch.tensor(0.5),  # a 0-dim floating tensor
        "ids": torch.arange(6, dtype=torch.int32).reshape(2, 3),
    }


def test_the_classic_defenses_are_registered():
    assert set(BAD_OPTIONS) <= set(DEFENSES.names())
    assert {"dropout", "dpsgd"}.isdisjoint(UPDATE_DEFENSES)


@pytest.mark.parametrize("name", UPDATE_DEFENSES)
def test_keys_shapes_dtypes_kept_and_integers_untouched(name):
    defense = DEFENSES[name]()
    assert isinstance(defense, UpdateDefense)
    delta = _delta()
    before = {k: v.clone() for k, v in delta.items()}
    out = defense(delta, seeding.rng(0))
    assert list(out) == list(delta)
    for key, d in delta.items():
        assert out[key].shape == d.shape and out[key].dtype == d.dtype, key
        assert torch.isfinite(out[key].double()).all(), key
        if not d.is_floating_point():
            assert torch.equal(out[key], d), key
    assert all(torch.equal(delta[k], before[k]) for k in delta), "the input was modified"


@pytest.mark.parametrize("name", UPDATE_DEFENSES)
def test_deterministic_for_the_same_rng(name):
    defense = DEFENSES[name]()
    a, b = defense(_delta(), seeding.rng(5)), defense(_delta(), seeding.rng(5))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", UPDATE_DEFENSES)
def test_no_floating_tensors_is_fine(name):
    defense = DEFENSES[name]()
    assert defense({}, seeding.rng(0)) == {}
    counter = {"n": torch.tensor(3)}
    assert torch.equal(defense(counter, seeding.rng(0))["n"], torch.tensor(3))


def _experiment(defense: dict) -> dict:
    return {
        "data": {"name": "synthetic_images"},
        "model": {"name": "mlp"},
        "defenses": [defense],
    }


@pytest.mark.parametrize("name", DEFENSES.names())
def test_loads_through_config_and_bad_options_name_the_defense(name):
    exp = config.load(_experiment({"name": name}))
    assert [d.name for d in exp.defenses] == [name]
    by_stage = (*exp.training_defenses, *exp.update_defenses, exp.secure_aggregation)
    assert by_stage[0] is exp.defenses[0]
    with pytest.raises(ConfigError, match=name):
        config.load(_experiment({"name": name, "no_such_option": 1}))
    if name in BAD_OPTIONS:
        with pytest.raises(ConfigError, match=f"{name}: "):
            config.load(_experiment({"name": name, **BAD_OPTIONS[name]}))
