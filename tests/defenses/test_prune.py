import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from fedleak import seeding
from fedleak.defenses import DEFENSES
from fedleak.registry import ConfigError


def _delta() -> dict[str, torch.Tensor]:
    g = seeding.rng(0, "delta")
    return {
        "conv.weight": torch.randn((4, 3, 3, 3), generator=g),  # 108
        "bn.running_mean": torch.randn((5,), generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.weight": 10 * torch.randn((10, 7), generator=g),  # larger: pruned less globally
        "fc.bias": torch.randn((10,), generator=g).half(),
    }


def _floating(delta):
    return {k: v for k, v in delta.items() if v.is_floating_point()}


@pytest.mark.parametrize("amount", [0.1, 0.25, 0.5, 0.9])
def test_global_zeroes_exactly_the_smallest_fraction(amount):
    delta = _delta()
    pruned = DEFENSES["gradient_pruning"](amount=amount)(delta, seeding.rng(0))
    total = sum(d.numel() for d in _floating(delta).values())
    zeroed = {k: pruned[k] == 0 for k in _floating(delta)}
    assert sum(int(z.sum()) for z in zeroed.values()) == round(amount * total)
    dropped = torch.cat([delta[k][z].double().abs() for k, z in zeroed.items()])
    kept = torch.cat([delta[k][~z].double().abs() for k, z in zeroed.items()])
    assert dropped.max() <= kept.min()
    for k, z in zeroed.items():
        assert torch.equal(pruned[k][~z], delta[k][~z])  # survivors are sent exactly
    assert int(zeroed["fc.weight"].sum()) < round(amount * 70)  # one threshold, not per layer


@pytest.mark.parametrize("amount", [0.1, 0.25, 0.5, 0.9])
def test_layer_zeroes_the_fraction_of_every_tensor(amount):
    delta = _delta()
    pruned = DEFENSES["gradient_pruning"](amount=amount, scope="layer")(delta, seeding.rng(0))
    for k, d in _floating(delta).items():
        zeroed = pruned[k] == 0
        assert int(zeroed.sum()) == round(amount * d.numel())
        assert torch.equal(pruned[k][~zeroed], d[~zeroed])
        if zeroed.any():
            assert d[zeroed].abs().max() <= d[~zeroed].abs().min()


def test_masks_match_torch_prune():
    delta = {k: v for k, v in _floating(_delta()).items() if v.dtype == torch.float32}
    modules = {k: nn.Module() for k in delta}
    for k, module in modules.items():
        module.w = nn.Parameter(delta[k].clone())
    prune.global_unstructured(
        [(m, "w") for m in modules.values()], pruning_method=prune.L1Unstructured, amount=0.3
    )
    ours = DEFENSES["gradient_pruning"](amount=0.3)(delta, seeding.rng(0))
    for k, module in modules.items():
        assert torch.equal(ours[k] != 0, module.w_mask.bool())
    for k, d in delta.items():
        layer = nn.Module()
        layer.w = nn.Parameter(d.clone())
        prune.l1_unstructured(layer, "w", amount=0.3)
        ours = DEFENSES["gradient_pruning"](amount=0.3, scope="layer")({k: d}, seeding.rng(0))
        assert torch.equal(ours[k] != 0, layer.w_mask.bool())


def test_ties_are_broken_by_position():
    delta = {"a": torch.ones(4), "b": -torch.ones(4)}
    pruned = DEFENSES["gradient_pruning"](amount=0.75)(delta, seeding.rng(0))
    assert pruned["a"].tolist() == [0, 0, 0, 0] and pruned["b"].tolist() == [0, 0, -1, -1]
    pruned = DEFENSES["gradient_pruning"](amount=0.5, scope="layer")(delta, seeding.rng(0))
    assert pruned["a"].tolist() == [0, 0, 1, 1] and pruned["b"].tolist() == [0, 0, -1, -1]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_zero_amount_is_identity(scope):
    delta = _delta()
    pruned = DEFENSES["gradient_pruning"](amount=0.0, scope=scope)(delta, seeding.rng(0))
    assert all(torch.equal(pruned[k], delta[k]) for k in delta)


@pytest.mark.parametrize("amount", [1.0, -0.1, float("nan")])
def test_bad_amount_raises(amount):
    with pytest.raises(ValueError, match=r"gradient_pruning: amount must be in \[0, 1\)"):
        DEFENSES["gradient_pruning"](amount=amount)
    with pytest.raises(ConfigError, match="amount"):
        DEFENSES.build({"name": "gradient_pruning", "amount": amount})


def test_bad_scope_raises():
    with pytest.raises(ValueError, match="gradient_pruning: scope must be"):
        DEFENSES["gradient_pruning"](scope="tensor")
    with pytest.raises(ConfigError, match="'global', 'layer'"):
        DEFENSES.build({"name": "gradient_pruning", "scope": "tensor"})
