import pytest
import torch

from fedleak import seeding
from fedleak.defenses import DEFENSES
from fedleak.registry import ConfigError


def _delta() -> dict[str, torch.Tensor]:
    g = seeding.rng(0, "delta")
    return {
        "conv.weight": torch.randn((4, 3, 3, 3), generator=g),
        "bn.running_mean": torch.randn((4,), generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.bias": torch.randn((10,), generator=g).half(),
    }


def test_empirical_std_matches():
    delta = {"w": torch.zeros(200_000)}
    noisy = DEFENSES["gaussian_noise"](std=0.05)(delta, seeding.rng(0))
    assert noisy["w"].std().item() == pytest.approx(0.05, rel=0.02)
    assert noisy["w"].mean().item() == pytest.approx(0, abs=0.05 * 0.02)


def test_keys_shapes_dtypes_kept_and_integers_untouched():
    delta = _delta()
    noisy = DEFENSES["gaussian_noise"](std=0.1)(delta, seeding.rng(0))
    assert list(noisy) == list(delta)
    for name, d in delta.items():
        assert noisy[name].shape == d.shape and noisy[name].dtype == d.dtype
    assert torch.equal(noisy["bn.num_batches_tracked"], delta["bn.num_batches_tracked"])
    assert not torch.equal(noisy["conv.weight"], delta["conv.weight"])


def test_zero_std_is_identity():
    delta = _delta()
    noisy = DEFENSES["gaussian_noise"](std=0.0)(delta, seeding.rng(0))
    assert all(torch.equal(noisy[k], delta[k]) for k in delta)


def test_deterministic_for_the_same_rng():
    defense = DEFENSES["gaussian_noise"](std=0.1)
    a, b = defense(_delta(), seeding.rng(3)), defense(_delta(), seeding.rng(3))
    c = defense(_delta(), seeding.rng(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv.weight"], c["conv.weight"])


def test_input_not_modified():
    delta = _delta()
    before = {k: v.clone() for k, v in delta.items()}
    DEFENSES["gaussian_noise"](std=1.0)(delta, seeding.rng(0))
    assert all(torch.equal(delta[k], before[k]) for k in delta)


@pytest.mark.parametrize("std", [-1.0, float("nan")])
def test_bad_std_raises(std):
    with pytest.raises(ValueError, match="gaussian_noise: std must be >= 0"):
        DEFENSES["gaussian_noise"](std=std)
    with pytest.raises(ConfigError, match="std"):
        DEFENSES.build({"name": "gaussian_noise", "std": std})


def test_laplacian_empirical_std_and_mean_absolute_deviation():
    delta = {"w": torch.zeros(200_000)}
    noisy = DEFENSES["laplacian_noise"](scale=0.05)(delta, seeding.rng(0))["w"]
    assert noisy.std().item() == pytest.approx(2**0.5 * 0.05, rel=0.02)
    assert noisy.mean().item() == pytest.approx(0, abs=0.05 * 0.02)
    # E|X| = b for Laplace(0, b); a Gaussian of the same std would give 1.128·b.
    assert noisy.abs().mean().item() == pytest.approx(0.05, rel=0.02)


def test_laplacian_zero_scale_is_identity_and_deterministic():
    delta = _delta()
    same = DEFENSES["laplacian_noise"](scale=0.0)(delta, seeding.rng(0))
    assert all(torch.equal(same[k], delta[k]) for k in delta)
    defense = DEFENSES["laplacian_noise"](scale=0.1)
    a, b = defense(_delta(), seeding.rng(3)), defense(_delta(), seeding.rng(3))
    c = defense(_delta(), seeding.rng(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv.weight"], c["conv.weight"])


@pytest.mark.parametrize("scale", [-1.0, float("nan")])
def test_bad_laplacian_scale_raises(scale):
    with pytest.raises(ValueError, match="laplacian_noise: scale must be >= 0"):
        DEFENSES["laplacian_noise"](scale=scale)
    with pytest.raises(ConfigError, match="scale"):
        DEFENSES.build({"name": "laplacian_noise", "scale": scale})
