import math
import sys

import pytest
import torch

from fedleak import config, federation, seeding
from fedleak.core import Batch
from fedleak.defenses import DEFENSES
from fedleak.defenses import dpsgd as dpsgd_module
from fedleak.registry import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
opacus = pytest.importorskip("opacus")

TINY = {
    "seed": 1,
    "clients": 4,
    "clients_per_round": 2,
    "data": {"name": "synthetic_images", "examples": 64, "test_examples": 8, "classes": 4},
    "model": {"name": "mlp", "hidden": [16]},
    "training": {"name": "sgd", "lr": 0.1, "batch_size": 4, "local_epochs": 1},
    "defenses": [{"name": "dpsgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}],
}


def _update(**changes) -> tuple[federation.Update, dict]:
    exp = config.load({**TINY, **changes})
    sent = federation.initial_params(exp)
    return federation.local_update(exp, 0, 1, sent), sent


def test_private_round_inside_local_update():
    update, sent = _update()
    assert list(update.params) == list(sent)  # no "_module." prefix: the client's own module
    for k, v in sent.items():
        assert update.params[k].shape == v.shape and torch.isfinite(update.params[k]).all()
        assert not torch.equal(update.params[k], v)
    again, _ = _update()
    assert all(torch.equal(again.params[k], update.params[k]) for k in sent)  # seeded
    # Poisson draws: 4 planned steps over the client's 16 examples; the truth is what was drawn.
    assert 1 <= update.result.steps <= 4
    client = config.load(TINY).client_data(0)
    rows = {tuple(x.flatten().tolist()) for x in client.inputs}
    assert {tuple(x.flatten().tolist()) for x in update.truth.inputs} <= rows


def test_the_noise_multiplier_scales_the_noise():
    private, sent = _update()
    loud, _ = _update(defenses=[{"name": "dpsgd", "noise_multiplier": 100.0}])
    norm = {
        name: sum(float((u.params[k] - sent[k]).norm() ** 2) for k in sent) ** 0.5
        for name, u in [("private", private), ("loud", loud)]
    }
    assert norm["loud"] > 10 * norm["private"]


@pytest.mark.parametrize("order", [("dropout", "dpsgd"), ("dpsgd", "dropout")])
def test_combines_with_dropout(order):
    update, sent = _update(defenses=[{"name": name} for name in order])
    assert list(update.params) == list(sent)
    assert all(torch.isfinite(v).all() for v in update.params.values())


def _planned(n: int, batch: int, steps: int) -> tuple[torch.nn.Module, list[Batch], Batch]:
    g = seeding.rng(0, "data")
    data = Batch(torch.randn(n, 3, generator=g), torch.arange(n) % 2)
    with seeding.isolated(0, "model"):
        model = torch.nn.Linear(3, 2)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(steps * batch / n))])
    batches = [
        Batch(data.inputs[order[i : i + batch]], data.labels[order[i : i + batch]])
        for i in range(0, steps * batch, batch)
    ]
    return model, batches, data


def test_empty_poisson_draws_are_skipped():
    # n = 8 at batch 1: q = 1/8, a draw is empty with probability (7/8)^8 = 0.34.
    model, planned, data = _planned(8, 1, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, private_optimizer, batches = DEFENSES["dpsgd"]().wrap(
        model, optimizer, planned, seeding.rng(0), data=data
    )
    assert all(isinstance(b, Batch) and len(b) > 0 for b in batches)
    assert len(batches) < 64  # P(no empty draw in 64) ~ 3e-12
    assert private_optimizer.expected_batch_size == 1
    assert sum(len(b) for b in batches) == pytest.approx(64, abs=4 * 64**0.5)


def test_sample_rate_is_the_one_wrap_uses():
    dpsgd = DEFENSES["dpsgd"]()
    assert dpsgd.sample_rate(16, 4) == 0.25
    assert dpsgd.sample_rate(10, 4) == pytest.approx(1 / 3)  # not 4/10
    assert dpsgd.sample_rate(10, 0) == 1.0  # full-batch FedSGD
    model, planned, data = _planned(10, 4, 300)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, private, batches = dpsgd.wrap(model, optimizer, planned, seeding.rng(0), data=data)
    assert private.expected_batch_size == 3  # int(10 * q)
    # 300 draws of Binomial(10, q): 1000 examples expected at q = 1/3 (1200 at 0.4), sd 26.
    assert sum(len(b) for b in batches) == pytest.approx(1000, abs=100)


def test_fewer_steps_than_an_epoch_sample_the_whole_partition():
    # One planned step of 4 on 100 examples: q = 4/100, drawn from all 100 (not from the 4
    # planned examples, which would make q = 1 and overstate ε).
    model, planned, data = _planned(100, 4, 1)
    dpsgd = DEFENSES["dpsgd"]()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, private, _ = dpsgd.wrap(model, optimizer, planned, seeding.rng(0), data=data)
    assert private.expected_batch_size == 4 == int(100 * dpsgd.sample_rate(100, 4))
    seen = set()
    for seed in range(200):  # many one-draw rounds: every example can be drawn
        model, planned, data = _planned(100, 4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        _, _, drawn = dpsgd.wrap(model, optimizer, planned, seeding.rng(seed), data=data)
        seen |= {tuple(x.tolist()) for b in drawn for x in b.inputs}
    planned_rows = {tuple(x.tolist()) for x in planned[0].inputs}
    assert len(seen - planned_rows) > 50  # P(an example is never drawn in 200) = 0.96^200 ~ 3e-4


def test_inside_a_round_q_is_batch_over_partition():
    spec = {**TINY, "training": {"name": "sgd", "lr": 0.1, "batch_size": 2, "local_steps": 1}}
    exp = config.load(spec)
    sent = federation.initial_params(exp)
    drawn = []
    for r in range(1, 61):  # 16 examples at q = 2/16: Binomial(16, 1/8) examples per draw
        try:
            drawn.append(len(federation.local_update(exp, 0, r, sent).truth))
        except ValueError as err:  # an empty draw: P = (7/8)^16 = 0.12, the client sends nothing
            assert "every Poisson draw of dpsgd was empty" in str(err)
            drawn.append(0)
    assert 1.3 < sum(drawn) / len(drawn) < 2.7  # mean 2 (sd 0.17); the old bug drew all 16
    assert max(drawn) < 16 and drawn.count(0) < 20


def test_accounting_covers_every_client_over_the_run():
    spec = {**TINY, "rounds": 5, "training": {"name": "sgd", "lr": 0.1, "batch_size": 4}}
    exp = config.load(spec)
    report = dpsgd_module.accounting(exp)
    dpsgd = exp.defenses[0]
    taken = {c: 0 for c in range(4)}
    for r in range(1, 6):
        for c in federation.sample_clients(exp, r):
            taken[c] += 1
    assert [c["rounds"] for c in report["clients"]] == list(taken.values())
    assert sum(taken.values()) == 5 * 2
    for row in report["clients"]:
        assert row["examples"] == 16 and row["sample_rate"] == 0.25
        assert row["steps"] == row["rounds"]  # local_steps = 1
        assert row["epsilon"] == pytest.approx(dpsgd.epsilon(row["steps"], 0.25))
    assert report["epsilon"] == max(c["epsilon"] for c in report["clients"]) > 0
    assert dpsgd_module.accounting(config.load({**TINY, "defenses": []})) is None


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_matches_opacus_accountant(accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    dpsgd = DEFENSES["dpsgd"](noise_multiplier=1.1, delta=1e-5, accountant=accountant)
    fresh = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    steps, rate = 120, 0.25  # e.g. 3 rounds of 10 epochs of 4 steps
    for _ in range(steps):
        fresh.step(noise_multiplier=1.1, sample_rate=rate)
    assert dpsgd.epsilon(steps, rate) == pytest.approx(fresh.get_epsilon(delta=1e-5), rel=1e-9)


def test_epsilon_grows_with_the_whole_history():
    dpsgd = DEFENSES["dpsgd"](noise_multiplier=1.1)
    # Three rounds cost more than one: no per-round reset of the accountant.
    assert dpsgd.epsilon(120, 0.25) > dpsgd.epsilon(40, 0.25) > 0


def test_epsilon_edge_cases():
    assert DEFENSES["dpsgd"]().epsilon(0, 0.5) == 0.0
    assert DEFENSES["dpsgd"](noise_multiplier=0.0).epsilon(5, 0.5) == math.inf
    with pytest.raises(ValueError, match="dpsgd: need steps >= 0"):
        DEFENSES["dpsgd"]().epsilon(5, 0.0)


def test_batchnorm_model_gives_a_clear_error():
    spec = {**TINY, "model": {"name": "convnet", "width": 1, "norm": "batch"}}
    exp = config.load(spec)
    with pytest.raises(ValueError, match=r'dpsgd: .*BatchNorm.*norm = "group"'):
        DEFENSES["dpsgd"]().validate(exp.build_model())
    with pytest.raises(ValueError, match="dpsgd: Opacus cannot train this model"):
        federation.local_update(exp, 0, 1, federation.initial_params(exp))
    group = config.load({**TINY, "model": {"name": "convnet", "width": 1, "norm": "group"}})
    DEFENSES["dpsgd"]().validate(group.build_model())  # no error


def test_missing_opacus_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)
    with pytest.raises(ImportError, match=r'pip install "fedleak\[dp\]"'):
        DEFENSES["dpsgd"]().epsilon(1, 0.5)


@pytest.mark.parametrize(
    "bad",
    [
        {"noise_multiplier": -1.0},
        {"noise_multiplier": float("inf")},
        {"max_grad_norm": 0.0},
        {"delta": 1.0},
        {"accountant": "gdp"},
    ],
)
def test_bad_options(bad):
    with pytest.raises(
        ConfigError, match="dpsgd|finite" if "accountant" not in bad else "'rdp', 'prv'"
    ):
        config.load({**TINY, "defenses": [{"name": "dpsgd", **bad}]})


def test_a_run_records_every_clients_epsilon_in_meta(tmp_path):
    from fedleak import pipeline

    exp = config.load({**TINY, "rounds": 2})
    store = pipeline.run(exp, tmp_path / "run")
    recorded = store.meta()["dpsgd"]
    expected = dpsgd_module.accounting(exp)
    assert recorded["epsilon"] == pytest.approx(expected["epsilon"]) and recorded["epsilon"] > 0
    assert [c["steps"] for c in recorded["clients"]] == [c["steps"] for c in expected["clients"]]
    # local_epochs = 1 at batch 4 on 16 examples: 4 steps per round taken, q = 1/4
    assert {c["sample_rate"] for c in recorded["clients"]} == {0.25}
    assert sum(c["steps"] for c in recorded["clients"]) == 2 * 2 * 4
