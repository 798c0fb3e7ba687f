"""The server strategy zo_newton and its client zo_query (Yu et al., NeurIPS 2024, federated)."""

import pytest
import torch

from fedleak import config, federation
from fedleak.core import Reply
from fedleak.server.zo_newton import ZONewton

TUNED = ["1.bias"]  # the bias of logistic regression (mlp with no hidden layer) on digits


def experiment(**server):
    options = {"name": "zo_newton", "parameters": TUNED, "budget": 3000, "strong_convexity": 0.05}
    return config.load(
        {
            "data": {"name": "digits"},
            "model": {"name": "mlp", "hidden": []},
            "clients": 4,
            "clients_per_round": 2,
            "training": {"name": "zo_query", "parameters": TUNED},
            "server": {**options, **server},
        }
    )


def test_the_strategy_reaches_the_optimum_of_a_quadratic_through_replies():
    x_star = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
    strategy = ZONewton(
        parameters=("w",),
        budget=20_000,
        rho=0.1,
        strong_convexity=1.0,
        noise_std=0.01,
        queries_per_round=3000,
    )
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    noise = torch.Generator().manual_seed(0)
    rounds = 0
    while len(points := strategy.instructions(rounds + 1, params, None)["points"]):
        rounds += 1
        again = strategy.instructions(rounds, params, None)["points"]
        assert torch.equal(points, again)  # asked twice in a round: the same points
        values = 0.5 * (points - x_star).pow(2).sum(1)
        values = values + 0.01 * torch.randn(len(points), generator=noise, dtype=values.dtype)
        reply = Reply(
            client=0, params=params, num_examples=5, loss=0.0, messages={"losses": values}
        )
        params = strategy.aggregate(rounds, params, [reply])
    assert rounds == strategy.rounds_needed(3)
    assert float((params["w"] - x_star).norm()) < 0.02


def test_a_federation_of_query_clients_lowers_the_loss_and_sends_only_losses():
    exp = experiment()
    exp.check()
    params = federation.initial_params(exp)
    data = exp.dataset().train

    def loss(state):
        model = exp.build_model()
        model.load_state_dict(state)
        with torch.no_grad():
            return float(exp.loss_fn(model(data.inputs), data.labels))

    start = loss(params)
    rounds = 0
    while len((orders := federation.instructions(exp, rounds + 1, params))["points"]):
        rounds += 1
        replies = []
        for client in federation.sample_clients(exp, rounds):
            update = federation.local_update(exp, client, rounds, params, orders)
            assert update.params == {} and set(update.messages) == {"losses"}
            assert update.messages["losses"].shape == (len(orders["points"]),)
            replies.append(federation.reply(exp, client, params, update))
            assert all(torch.equal(replies[-1].params[k], params[k]) for k in params)
        new = exp.server.aggregate(rounds, params, replies)
        assert torch.equal(new["1.weight"], params["1.weight"])  # only the bias is tuned
        params = new
    assert rounds == exp.server.rounds_needed(10)
    assert loss(params) < start


@pytest.mark.parametrize(
    ("server", "training", "match"),
    [
        ({"parameters": []}, {}, "name the parameters to tune"),
        ({"queries_per_round": 0}, {}, "queries_per_round must be >= 1"),
        ({"rho": -1.0}, {}, "rho, strong_convexity and noise_std must be > 0"),
        ({"budget": 500}, {}, "use a budget of at least"),
        ({"parameters": ["nope"]}, {}, "has no tensor 'nope'"),
        ({}, {"name": "sgd"}, "use training.name = 'zo_query'"),
        ({}, {"parameters": ["1.weight"]}, "must equal server.parameters"),
        ({}, {"noise_std": -1.0}, "batch_size and noise_std must be >= 0"),
    ],
)
def test_bad_options_are_one_clear_error(server, training, match):
    raw = {
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": []},
        "training": {"name": "zo_query", "parameters": TUNED, **training},
        "server": {"name": "zo_newton", "parameters": TUNED, "budget": 3000, **server},
    }
    if raw["training"]["name"] == "sgd":
        raw["training"] = {"name": "sgd"}
    with pytest.raises(ValueError, match=match):
        config.load(raw).check()


def test_zo_query_needs_the_servers_points():
    exp = experiment()
    model = exp.build_model()
    with pytest.raises(ValueError, match="no points to evaluate"):
        exp.trainer.fit(model, exp.client_data(0), exp.loss_fn, torch.Generator(), instructions={})


def test_a_federated_run_records_the_points_and_the_losses(tmp_path, tiny):
    from fedleak import pipeline

    spec = tiny(
        training={"name": "zo_query", "parameters": ["3.bias"]},
        server={"name": "zo_newton", "parameters": ["3.bias"], "budget": 1000},
        attacks=[{"name": "zo_labels"}],
    )
    exp = config.load(spec)
    store = pipeline.run(exp, tmp_path / "run")
    assert store.meta()["status"] == "done"
    views = list(store.views(exp))
    assert len(views) == 4
    for view in views:
        points = view.instructions["points"]
        assert points.shape[1] == 4 and view.messages["losses"].shape == (len(points),)
        assert all(torch.equal(view.received[k], view.sent[k]) for k in view.sent)
    rows = store.rows("results.csv")
    assert len(rows) == 4 and all(0 <= float(r["label_acc"]) <= 1 for r in rows)
