import pytest
import torch

from fedleak import seeding
from fedleak.defenses import DEFENSES
from fedleak.registry import ConfigError


def _delta() -> dict[str, torch.Tensor]:
    g = seeding.rng(0, "delta")
    return {
        "conv.weight": torch.randn((4, 3, 3, 3), generator=g),
        "bn.running_mean": torch.randn((5,), generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.bias": 0.01 * torch.randn((10,), generator=g) + 0.02,  # all positive
    }


@pytest.mark.parametrize("grid", ["minmax", "symmetric"])
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("bits", [2, 4])
def test_values_lie_on_the_grid(grid, stochastic, bits):
    defense = DEFENSES["quantization"](bits=bits, stochastic=stochastic, grid=grid)
    delta = _delta()
    out = defense(delta, seeding.rng(0))
    for k, d in delta.items():
        if not d.is_floating_point():
            continue
        low, step, steps = defense.grid_of(d)
        levels = (out[k].double() - low) / step
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
        assert levels.min() > -1e-4 and levels.max() < steps + 1e-4
        assert len(out[k].unique()) <= 2**bits
        error = (out[k].double() - d.double()).abs().max()
        assert error <= (1 if stochastic else 0.5) * step * (1 + 1e-5)


def test_grids():
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0])
    minmax = DEFENSES["quantization"](bits=2, grid="minmax")
    assert minmax.grid_of(x) == pytest.approx((-1.0, 4 / 3, 3))
    symmetric = DEFENSES["quantization"](bits=2, grid="symmetric", stochastic=False)
    assert symmetric.grid_of(x) == pytest.approx((-3.0, 3.0, 2))
    assert symmetric({"x": x}, seeding.rng(0))["x"].tolist() == [0.0, 0.0, 0.0, 3.0]


@pytest.mark.parametrize("grid", ["minmax", "symmetric"])
def test_stochastic_rounding_is_unbiased(grid):
    # 4000 copies of one row share the row's grid (same min and max); average over the copies.
    x = torch.linspace(-1, 1, 41, dtype=torch.float64)
    draws = 4000
    defense = DEFENSES["quantization"](bits=2, grid=grid)
    _, step, _ = defense.grid_of(x)
    mean = defense({"w": x.repeat(draws, 1)}, seeding.rng(0))["w"].mean(0)
    # Each draw errs by at most one step (variance <= step²/4): 5 standard errors of the mean.
    tolerance = 5 * step / 2 / draws**0.5
    assert (mean - x).abs().max() <= tolerance
    nearest = DEFENSES["quantization"](bits=2, grid=grid, stochastic=False)
    biased = nearest({"w": x.repeat(draws, 1)}, seeding.rng(0))["w"].mean(0)
    assert (biased - x).abs().max() > 5 * tolerance  # the check has the power to see a bias


def test_sixteen_bits_is_close_to_identity():
    delta = _delta()
    out = DEFENSES["quantization"](bits=16)(delta, seeding.rng(0))
    for k, d in delta.items():
        if d.is_floating_point():
            span = float(d.max() - d.min())
            assert (out[k].double() - d.double()).abs().max() <= span / (2**16 - 1) * 1.001


def test_constant_and_zero_tensors_unchanged():
    delta = {"zero": torch.zeros(5), "constant": torch.full((3,), 0.25), "one": torch.tensor(2.0)}
    for grid in ("minmax", "symmetric"):
        out = DEFENSES["quantization"](grid=grid)(delta, seeding.rng(0))
        assert all(torch.equal(out[k], delta[k]) for k in delta)


def test_deterministic_rounding_uses_no_randomness():
    defense = DEFENSES["quantization"](bits=3, stochastic=False)
    a, b = defense(_delta(), seeding.rng(1)), defense(_delta(), seeding.rng(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    stochastic = DEFENSES["quantization"](bits=3)
    a, b = stochastic(_delta(), seeding.rng(1)), stochastic(_delta(), seeding.rng(2))
    assert not torch.equal(a["conv.weight"], b["conv.weight"])


@pytest.mark.parametrize("bits", [1, 17, 0])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match=r"quantization: bits must be in 2\.\.16"):
        DEFENSES["quantization"](bits=bits)
    with pytest.raises(ConfigError, match="bits"):
        DEFENSES.build({"name": "quantization", "bits": bits})


def test_bad_grid_raises():
    with pytest.raises(ValueError, match="quantization: grid must be"):
        DEFENSES["quantization"](grid="log")
    with pytest.raises(ConfigError, match="'minmax', 'symmetric'"):
        DEFENSES.build({"name": "quantization", "grid": "log"})
