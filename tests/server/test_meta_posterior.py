"""The meta_posterior strategy and its sufficient_statistics trainer (clients as tasks)."""

import numpy as np
import pytest
import torch

from fedleak import config, federation
from fedleak.analysis.meta_learning import BernoulliTasks, GaussianTasks
from fedleak.core import Reply
from fedleak.registry import ConfigError
from fedleak.server.meta_posterior import MetaPosterior


def setup(model):
    return {
        "clients": 6,
        "clients_per_round": 3,
        "data": {"name": "digits"},
        "partition": {"name": "dirichlet", "alpha": 0.5},
        "model": {"name": "mlp", "hidden": [8]},
        "training": {"name": "sufficient_statistics", "model": model},
        "server": {"name": "meta_posterior", "model": model},
    }


def test_clients_send_sufficient_statistics_of_their_own_data():
    exp = config.load(setup("bernoulli"))
    update = federation.local_update(exp, 2, 1, federation.initial_params(exp))
    labels = exp.client_data(2).labels
    assert float(update.messages["count"]) == float((labels == 0).sum())
    assert float(update.messages["tokens"]) == len(labels)
    exp = config.load(setup("gaussian"))
    update = federation.local_update(exp, 2, 1, federation.initial_params(exp))
    assert torch.equal(update.messages["gram"], len(labels) * torch.eye(8, dtype=torch.float64))
    assert update.messages["moment"].shape == (8,)


def test_gaussian_posterior_is_the_analysis_posterior_and_counts_each_client_once():
    strategy = MetaPosterior(model="gaussian")
    gen = np.random.default_rng(0)
    grams = [n * np.eye(3) for n in (5, 9, 7)]
    moments = [gen.standard_normal(3) * n for n in (5, 9, 7)]
    replies = [
        Reply(c, {}, 1, 0.0, {"gram": torch.tensor(g), "moment": torch.tensor(m)})
        for c, (g, m) in enumerate(zip(grams, moments, strict=True))
    ]
    strategy.aggregate(1, {"w": torch.zeros(1)}, [*replies])
    strategy.aggregate(2, {"w": torch.zeros(1)}, replies[:1])  # client 0 again
    told = strategy.instructions(3, {}, torch.Generator().manual_seed(0))
    mean, precision = GaussianTasks(3).posterior(np.stack(grams), np.stack(moments))
    assert int(told["clients_seen"]) == 3
    assert np.allclose(told["psi_mean"].numpy(), mean)
    assert np.allclose(told["psi_sd"].numpy() ** 2, np.diag(np.linalg.inv(precision)))
    model = GaussianTasks(3)
    assert float(told["local_only"]) == pytest.approx(
        model.intra_information(7 * np.eye(3)[None])[0] / 21
    )


def test_bernoulli_split_falls_as_clients_are_seen():
    strategy = MetaPosterior(model="bernoulli", draws=400)
    model = BernoulliTasks()
    first = strategy.instructions(1, {}, torch.Generator().manual_seed(0))
    gen = np.random.default_rng(1)
    _, _, counts = model.sample(60, 20, gen)
    replies = [
        Reply(c, {}, 1, 0.0, {"count": torch.tensor(float(n)), "tokens": torch.tensor(20.0)})
        for c, n in enumerate(counts)
    ]
    strategy.aggregate(1, {"w": torch.zeros(1)}, replies)
    later = strategy.instructions(2, {}, torch.Generator().manual_seed(0))
    assert float(later["removable_by_clients"]) < float(first["removable_by_clients"]) / 5
    assert float(later["local_only"]) == pytest.approx(model.intra_information(20) / 20)
    psi, w = model.grid
    post = w * np.exp(model.log_count_probs(20, psi)[:, counts].sum(1) - 0)
    assert float(later["psi_mean"]) == pytest.approx(float(post @ psi / post.sum()), rel=1e-9)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"training": {"name": "sgd"}}, "needs the clients' count and tokens"),
        (
            {"training": {"name": "sufficient_statistics", "model": "gaussian"}},
            "model = 'bernoulli'",
        ),
        ({"server": {"name": "meta_posterior", "draws": 0}}, "draws"),
        ({"server": {"name": "meta_posterior", "concentration": -1}}, "concentration"),
        ({"server": {"name": "meta_posterior", "model": "gaussian", "noise_std": 0}}, "noise_std"),
        ({"training": {"name": "sufficient_statistics", "positive_class": 10}}, "10 classes"),
        ({"training": {"name": "sufficient_statistics", "dim": 0}}, "dim must be >= 1"),
    ],
)
def test_bad_options_are_one_clear_error(change, match):
    with pytest.raises(ConfigError, match=match):
        config.load({**setup("bernoulli"), **change}).check()
