"""Approximately shared features (Zhong, Pan & Lei, AISTATS 2025): projector, strategy, trainer."""

import numpy as np
import pytest
import torch

from fedleak import config, federation
from fedleak.core import Reply
from fedleak.data.domains import Blocks, DigitDomains, PlantedDomains
from fedleak.models.projected import ProjectionNet
from fedleak.registry import ConfigError
from fedleak.server import shared_features as sf
from fedleak.training.shared_features import (
    SharedFeaturesTrainer,
    finetune_head,
    projectionnet_loss,
)


def planted_heads(model, sources=120, per_source=2000, seed=0):
    rng = np.random.default_rng(seed)
    world = model.world(rng)
    heads = []
    for _ in range(sources):
        x, y = model.sample(model.coefficients(world, rng), per_source, rng)
        heads.append(np.linalg.lstsq(x, y, rcond=None)[0])
    return world, torch.tensor(np.array(heads))[:, :, None]


def distance(p, basis):
    truth = torch.tensor(basis)
    return float(torch.linalg.norm(p - truth @ truth.T) / (2 * truth.shape[1]) ** 0.5)


def test_content_projector_recovers_the_planted_shared_directions():
    model = PlantedDomains()
    world, heads = planted_heads(model)
    content = sf.projector(heads, 8, kind="head")
    invariant = sf.projector(heads, 3, kind="head")
    assert distance(content, model.basis(world, "content")) < 0.1
    assert distance(invariant, model.basis(world, "invariant")) < 0.2
    # a wrong count mixes in environmental directions: far from the planted subspace
    assert distance(sf.projector(heads, 8, kind="head"), model.basis(world, "invariant")) > 0.5


def test_whitened_ranking_ignores_an_invertible_change_of_feature_coordinates():
    gen = torch.Generator().manual_seed(0)
    domains = [(torch.randn(300, 6, generator=gen), torch.randint(0, 3, (300,), generator=gen))]
    domains += [
        (torch.randn(300, 6, generator=gen) * 3, torch.randint(0, 3, (300,), generator=gen))
    ]
    domains += [
        (torch.randn(300, 6, generator=gen) + 1, torch.randint(0, 3, (300,), generator=gen))
    ]
    mix = torch.randn(6, 6, generator=gen, dtype=torch.float64) + 3 * torch.eye(
        6, dtype=torch.float64
    )

    def build(transform):
        feats = [transform(h.double()) for h, _ in domains]
        pairs = zip(feats, domains, strict=True)
        stats = torch.stack([sf.correlation(f, y, 3) for f, (_, y) in pairs])
        cov = torch.stack([sf.covariance(f) for f in feats]).mean(0)
        return feats, sf.projector(stats, 2, cov)

    plain, p = build(lambda h: h)
    mixed, q = build(lambda h: h @ mix)
    # projecting then mixing == mixing then projecting with the mixed features' projector
    assert torch.allclose(plain[0] @ p @ mix, mixed[0] @ q, atol=1e-8)
    assert torch.allclose(p @ p, p, atol=1e-10)  # a projector (oblique in raw coordinates)


def test_directions_no_label_reaches_are_ranked_last():
    gen = torch.Generator().manual_seed(1)
    stats = torch.randn(5, 4, 2, generator=gen, dtype=torch.float64)
    stats[:, 3] = 0  # a dead feature: zero variance, but no signal either
    variances, directions, _ = sf.rank_directions(stats)
    assert torch.isinf(variances[-1]) and torch.isfinite(variances[:-1]).all()
    assert abs(float(directions[3, -1])) == pytest.approx(1.0)
    weak = stats.clone()
    weak[:, 2] *= 1e-3
    assert torch.isinf(sf.rank_directions(weak, min_signal=1e-4)[0][-2:]).all()


def test_fit_head_without_target_examples_is_the_projected_prior():
    p = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    prior = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    empty = torch.zeros(0, 3, dtype=torch.float64)
    assert torch.equal(
        sf.fit_head(empty, torch.zeros(0, dtype=torch.float64), p, prior, 1.0), p @ prior
    )


def test_finetune_head_moves_toward_the_target_labels():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 5, generator=gen)
    y = (x[:, 0] > 0).long()
    w, b = finetune_head(x, y, torch.zeros(2, 5), torch.zeros(2), ridge=0.01)
    assert ((x @ w.T + b).argmax(1) == y).float().mean() > 0.9
    same = finetune_head(x[:0], y[:0], w, b)
    assert torch.equal(same[0], w) and torch.equal(same[1], b)


def test_projectionnet_orthogonality_terms_are_in_the_loss():
    torch.manual_seed(0)
    net = ProjectionNet(torch.nn.Flatten(), 4, 3, 2)
    x, y, d = torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.randint(0, 2, (8,))
    with_terms = projectionnet_loss(net, x, y, d, orthogonality=True)
    without = projectionnet_loss(net, x, y, d, orthogonality=False)
    w = {k: m.weight for k, m in net.project.items()}
    expected = (w["label"] @ w["shared"].T).pow(2).sum() + 10 * (w["label"] @ w["env"].T).pow(
        2
    ).sum()
    assert float((with_terms - without).detach()) == pytest.approx(
        float(expected.detach()), rel=1e-5
    )


SETUP = {
    "clients": 4,
    "clients_per_round": 4,
    "data": {"name": "digit_domains", "domains": 4, "examples_per_domain": 30},
    "partition": {"name": "blocks"},
    "model": {"name": "projected_mlp", "hidden": [16]},
    "training": {"name": "shared_features", "lr": 0.1, "local_steps": 2, "batch_size": 10},
    "server": {"name": "shared_features", "content_dims": 6, "invariant_dims": 2},
}


def test_a_round_sends_the_statistics_and_installs_the_projector():
    exp = config.load(SETUP)
    exp.check()
    sent = federation.initial_params(exp)
    updates = [federation.local_update(exp, c, 1, sent) for c in range(4)]
    for update in updates:
        assert set(update.messages) == {"correlation", "covariance"}
        assert update.messages["correlation"].shape == (16, 10)
    replies = [federation.reply(exp, c, sent, u) for c, u in enumerate(updates)]
    state = exp.server.aggregate(1, sent, replies)
    projector = state["projector"]
    assert torch.allclose(projector @ projector, projector, atol=1e-4)
    assert torch.linalg.matrix_rank(projector.double(), atol=1e-4) == 6
    # every client's partition is one domain: blocks of 30 in pool order
    assert torch.equal(exp.partitions()[2], torch.arange(60, 90))
    # the baseline keeps every feature; one client's statistics leave the projector unchanged
    assert torch.equal(
        sf.SharedFeatures(keep="all").aggregate(1, sent, replies)["projector"], torch.eye(16)
    )
    lonely = sf.SharedFeatures().aggregate(1, state, replies[:1])
    assert torch.equal(lonely["projector"], projector)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model": {"name": "mlp"}}, "use model = 'projected_mlp'"),
        ({"training": {"name": "sgd"}}, "sends no feature statistics"),
        ({"server": {"name": "shared_features", "content_dims": 17}}, "at most 16"),
        ({"server": {"name": "shared_features", "invariant_dims": 9}}, "must not exceed"),
        ({"server": {"name": "shared_features", "min_signal": -1}}, "min_signal"),
        ({"training": {"name": "shared_features", "ridge": 0}}, "ridge must be > 0"),
        ({"data": {"name": "digit_domains", "env_strength": 2}}, "env_strength"),
        ({"clients": 7, "clients_per_round": 7}, "equal blocks"),
    ],
)
def test_bad_options_are_one_clear_error(change, match):
    with pytest.raises(ConfigError, match=match):
        exp = config.load({**SETUP, **change})
        exp.check()


def test_plain_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 clients"):
        sf.rank_directions(torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match=r"dims must be in 1\.\.3"):
        sf.projector(torch.randn(4, 3, 1), 4)
    with pytest.raises(ValueError, match="feature counts"):
        PlantedDomains(invariant=-1)
    with pytest.raises(ValueError, match="equal blocks"):
        Blocks()(np.zeros(10), 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="ridge"):
        SharedFeaturesTrainer(ridge=-1.0)
    with pytest.raises(ValueError, match="noise"):
        DigitDomains(noise=-0.1)


def test_reply_without_statistics_is_left_out():
    exp = config.load(SETUP)
    sent = federation.initial_params(exp)
    replies = [Reply(c, sent, 10, 0.0, {}) for c in range(3)]
    assert torch.equal(exp.server.aggregate(1, sent, replies)["projector"], sent["projector"])


PROJECTIONNET = {
    **SETUP,
    "model": {"name": "projectionnet", "hidden": [16], "domains": 4},
    "training": {"name": "projectionnet", "lr": 0.1, "local_steps": 3, "batch_size": 10},
    "server": {"name": "fedavg"},
}


def test_federated_projectionnet_learns_each_clients_domain_from_the_data():
    """Client k trains the domain head on domain id k (digit_domains' group ids)."""
    exp = config.load(PROJECTIONNET)
    exp.check()
    assert torch.equal(exp.client_data(2).groups, torch.full((30,), 2))
    sent = federation.initial_params(exp)
    for client in range(4):
        update = federation.local_update(exp, client, 1, sent)
        step = update.params["domain_head.bias"] - sent["domain_head.bias"]
        # the domain cross-entropy raises the client's own domain logit: the update names it
        assert int(step.argmax()) == client


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model": {"name": "projected_mlp"}}, "use \\[model\\] name = 'projectionnet'"),
        ({"data": {"name": "digits"}, "partition": {"name": "iid"}}, "source-domain id"),
        ({"model": {"name": "projectionnet", "domains": 2}}, "set \\[model\\] domains"),
        ({"training": {"name": "projectionnet", "env_weight": -1}}, "env_weight must be >= 0"),
        ({"defenses": [{"name": "dpsgd"}]}, "protect it with update defenses"),
    ],
)
def test_projectionnet_bad_settings_are_one_clear_error(change, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        exp = config.load({**PROJECTIONNET, **change})
        exp.check()
        federation.local_update(exp, 3, 1, federation.initial_params(exp))  # domain 3
