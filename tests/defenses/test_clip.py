import math

import pytest
import torch

from fedleak import seeding
from fedleak.defenses import DEFENSES
from fedleak.registry import ConfigError


def _delta(scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = seeding.rng(0, "delta")
    return {
        "conv.weight": scale * torch.randn((4, 3, 3, 3), generator=g),
        "bn.running_var": scale * torch.randn((4,), generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(12345),
        "fc.bias": (scale * torch.randn((10,), generator=g)).half(),
    }


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return math.sqrt(
        sum(float(d.double().pow(2).sum()) for d in delta.values() if d.is_floating_point())
    )


def test_clips_to_bound_and_keeps_direction():
    delta = _delta(scale=10.0)
    assert _norm(delta) > 1.0
    clipped = DEFENSES["clip"](max_norm=1.0)(delta, seeding.rng(0))
    assert _norm(clipped) <= 1.0 + 1e-3  # the half-precision bias rounds
    assert _norm(clipped) == pytest.approx(1.0, rel=1e-3)
    ratio = float(clipped["conv.weight"].flatten()[0] / delta["conv.weight"].flatten()[0])
    for name, d in delta.items():
        if d.is_floating_point():
            torch.testing.assert_close(clipped[name], (d.double() * ratio).to(d.dtype))


def test_no_change_below_bound():
    delta = _delta(scale=0.01)
    assert _norm(delta) < 1.0
    clipped = DEFENSES["clip"](max_norm=1.0)(delta, seeding.rng(0))
    assert all(torch.equal(clipped[k], delta[k]) for k in delta)


def test_keys_shapes_dtypes_kept_and_integers_untouched():
    delta = _delta(scale=10.0)
    clipped = DEFENSES["clip"](max_norm=0.5)(delta, seeding.rng(0))
    assert list(clipped) == list(delta)
    for name, d in delta.items():
        assert clipped[name].shape == d.shape and clipped[name].dtype == d.dtype
    assert torch.equal(clipped["bn.num_batches_tracked"], torch.tensor(12345))


def test_zero_update_stays_zero():
    delta = {"w": torch.zeros(3)}
    assert torch.equal(DEFENSES["clip"]()(delta, seeding.rng(0))["w"], torch.zeros(3))


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan")])
def test_bad_max_norm_raises(max_norm):
    with pytest.raises(ValueError, match="clip: max_norm must be > 0"):
        DEFENSES["clip"](max_norm=max_norm)
    with pytest.raises(ConfigError, match="max_norm"):
        DEFENSES.build({"name": "clip", "max_norm": max_norm})


def test_coordinate_clip_bounds_every_coordinate_and_keeps_the_rest():
    delta = _delta(scale=0.02)
    clipped = DEFENSES["coordinate_clip"](bound=0.01)(delta, seeding.rng(0))
    for name, d in delta.items():
        if not d.is_floating_point():
            assert torch.equal(clipped[name], d)
            continue
        bound = torch.tensor(0.01, dtype=d.dtype)  # the bound as the tensor's dtype rounds it
        assert clipped[name].abs().max() <= bound
        inside = d.abs() <= bound
        assert inside.any() and (~inside).any()
        assert torch.equal(clipped[name][inside], d[inside])
        assert torch.equal(clipped[name][~inside], bound * d[~inside].sign())


def test_coordinate_clip_large_bound_is_identity():
    delta = _delta()
    clipped = DEFENSES["coordinate_clip"](bound=1e6)(delta, seeding.rng(0))
    assert all(torch.equal(clipped[k], delta[k]) for k in delta)


@pytest.mark.parametrize("bound", [0.0, -1.0, float("nan")])
def test_bad_bound_raises(bound):
    with pytest.raises(ValueError, match="coordinate_clip: bound must be > 0"):
        DEFENSES["coordinate_clip"](bound=bound)
    with pytest.raises(ConfigError, match="bound"):
        DEFENSES.build({"name": "coordinate_clip", "bound": bound})
