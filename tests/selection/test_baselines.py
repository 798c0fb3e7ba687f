"""The selection baselines: uniform, herding, k-center, ridge leverage scores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedleak.core import Batch
from fedleak.registry import ConfigError
from fedleak.selection import SELECTORS
from fedleak.selection.baselines import herding, k_center, ridge_leverage


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def clusters(k: int = 5, per: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` tight, far-apart clusters: rows and their cluster ids."""
    centres = torch.eye(k, 8, dtype=torch.float64) * 10
    ids = torch.arange(k).repeat_interleave(per)
    return centres[ids] + 0.01 * torch.randn(k * per, 8, generator=gen(0), dtype=torch.float64), ids


def test_k_center_puts_its_first_centres_in_distinct_clusters():
    x, ids = clusters()
    for seed in range(3):
        assert len(set(ids[k_center(x, 5, gen(seed))].tolist())) == 5


def test_herding_tracks_the_mean_and_is_deterministic():
    x, _ = clusters()
    chosen = herding(x, 10)
    assert torch.equal(chosen, herding(x, 10)) and len(set(chosen.tolist())) == 10
    gap = (x[chosen].mean(0) - x.mean(0)).norm()
    random = (x[torch.randperm(100, generator=gen(1))[:10]].mean(0) - x.mean(0)).norm()
    assert gap < 0.2 * random


def test_ridge_leverage_is_its_definition():
    x = torch.randn(30, 12, generator=gen(0), dtype=torch.float64)
    alpha = 0.5 * float((x * x).sum()) / 30
    direct = torch.einsum("ij,jk,ik->i", x, torch.linalg.inv(x.T @ x + alpha * torch.eye(12)), x)
    torch.testing.assert_close(ridge_leverage(x, 0.5), direct)


@pytest.mark.parametrize("name", ["uniform", "herding", "k_center", "leverage"])
def test_each_baseline_selects_exactly_the_budget(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    data = Batch(torch.randn(40, 1, 4, 4), torch.randint(3, (40,)))
    selector = SELECTORS[name](count=9)
    chosen = selector.select(model, data, nn.functional.cross_entropy, gen(0), {}).indices
    assert len(set(chosen.tolist())) == len(chosen) == 9
    again = selector.select(model, data, nn.functional.cross_entropy, gen(0), {}).indices
    assert torch.equal(chosen, again)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "uniform", "fraction": 2.0}, r"uniform: fraction must be in \(0, 1\], got 2.0"),
        ({"name": "herding", "sketch_dim": -1}, r"herding: sketch_dim must be >= 0"),
        ({"name": "k_center", "layers": 0}, r"k_center: layers must be >= 1"),
        ({"name": "leverage", "ridge": -0.1}, r"leverage: ridge must be >= 0, got -0.1"),
    ],
)
def test_bad_options_are_one_clear_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        SELECTORS.build(spec)
