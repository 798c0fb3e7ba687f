import pytest
import torch
from torch import nn

from fedleak import seeding
from fedleak.core import ModelModifier
from fedleak.modifiers import MODIFIERS
from fedleak.registry import ConfigError


def _model() -> nn.Module:
    with seeding.isolated(0, "model"):
        return nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.Flatten(),
            nn.Linear(8 * 6 * 6, 10),
        )


def _params() -> dict[str, torch.Tensor]:
    params = {k: v.clone() for k, v in _model().state_dict().items()}
    params["3.weight"] *= 10  # layers of different scales, so global and per-layer differ
    return params


PRUNABLE = ("0.weight", "3.weight")


def _zero_fraction(params, names):
    total = sum(params[n].numel() for n in names)
    return sum(int((params[n] == 0).sum()) for n in names) / total


def test_is_a_benign_modifier():
    modifier = MODIFIERS["prune_global"]()
    assert isinstance(modifier, ModelModifier)
    assert modifier.adversarial is False
    model = _model()
    assert modifier.architecture(model) is model


def test_global_prunes_the_fraction_with_one_threshold():
    params = _params()
    pruned, secrets = MODIFIERS["prune_global"](amount=0.3)(params, 1, seeding.rng(0))
    assert secrets == {}
    assert _zero_fraction(pruned, PRUNABLE) == pytest.approx(0.3, abs=1e-3)
    # One threshold: every kept weight is at least as large as every pruned one.
    kept = torch.cat([pruned[n][pruned[n] != 0].abs() for n in PRUNABLE])
    removed = torch.cat([params[n][pruned[n] == 0].abs() for n in PRUNABLE])
    assert kept.min() >= removed.max()
    # The small-scale conv layer takes more than its share.
    assert _zero_fraction(pruned, ["0.weight"]) > 0.3 > _zero_fraction(pruned, ["3.weight"])


def test_layer_prunes_the_fraction_in_every_layer():
    pruned, _ = MODIFIERS["prune_global"](amount=0.5, scope="layer")(_params(), 1, seeding.rng(0))
    for name in PRUNABLE:
        assert _zero_fraction(pruned, [name]) == pytest.approx(0.5, abs=1e-2)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_other_tensors_untouched_and_keys_shapes_dtypes_kept(scope):
    params = _params()
    pruned, _ = MODIFIERS["prune_global"](amount=0.9, scope=scope)(params, 1, seeding.rng(0))
    assert list(pruned) == list(params)
    for name, p in params.items():
        assert pruned[name].shape == p.shape and pruned[name].dtype == p.dtype
        if name not in PRUNABLE:  # biases, BatchNorm affine and buffers, num_batches_tracked
            assert torch.equal(pruned[name], p)
        else:
            # Surviving weights keep their values.
            assert torch.equal(pruned[name][pruned[name] != 0], p[pruned[name] != 0])


def test_input_not_modified():
    params = _params()
    before = {k: v.clone() for k, v in params.items()}
    MODIFIERS["prune_global"](amount=0.5)(params, 1, seeding.rng(0))
    assert all(torch.equal(params[k], before[k]) for k in params)


def test_amount_zero_is_identity():
    params = _params()
    pruned, _ = MODIFIERS["prune_global"](amount=0.0)(params, 1, seeding.rng(0))
    assert all(torch.equal(pruned[k], params[k]) for k in params)


def test_exact_count_among_ties():
    params = {"w.weight": torch.zeros(4, 5)}
    pruned, _ = MODIFIERS["prune_global"](amount=0.5)(params, 1, seeding.rng(0))
    assert torch.equal(pruned["w.weight"], torch.zeros(4, 5))
    params = {"w.weight": torch.ones(4, 5)}
    pruned, _ = MODIFIERS["prune_global"](amount=0.25)(params, 1, seeding.rng(0))
    assert int((pruned["w.weight"] == 0).sum()) == 5


def test_applies_to_honours_rounds():
    every = MODIFIERS["prune_global"]()
    assert all(every.applies_to(r) for r in (1, 2, 50))
    some = MODIFIERS.build({"name": "prune_global", "rounds": [1, 3]})
    assert some.rounds == (1, 3)
    assert [r for r in range(1, 6) if some.applies_to(r)] == [1, 3]


@pytest.mark.parametrize(
    ("option", "value"),
    [("amount", 1.0), ("amount", -0.1), ("scope", "block"), ("rounds", [0, 2])],
)
def test_bad_options_raise(option, value):
    with pytest.raises(ConfigError, match=option):
        MODIFIERS.build({"name": "prune_global", option: value})
    with pytest.raises(ValueError, match=f"prune_global: {option}"):
        MODIFIERS["prune_global"](**{option: tuple(value) if option == "rounds" else value})
