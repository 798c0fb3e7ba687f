import numpy as np
import pytest
import torch

from fedleak import config, federation, pipeline
from fedleak.core import Reply
from fedleak.registry import ConfigError
from fedleak.server import SERVER_STRATEGIES
from fedleak.server.fedavg import weighted_mean


def replies(params, deltas, losses):
    return [
        Reply(i, {k: params[k] + d[k] for k in params}, 10 * (i + 1), loss)
        for i, (d, loss) in enumerate(zip(deltas, losses, strict=True))
    ]


def test_mix_moves_the_block_along_the_epo_mix_and_averages_the_rest():
    params = {"head": torch.zeros(2), "body": torch.ones(3)}
    deltas = [
        {"head": torch.tensor([-1.0, 0.0]), "body": torch.full((3,), 0.5)},
        {"head": torch.tensor([0.0, -1.0]), "body": torch.full((3,), -0.5)},
    ]
    got = replies(params, deltas, [2.0, 0.5])  # client 0 is far worse off
    new, step = SERVER_STRATEGIES["cpt"](block=("head",)).mix(params, got)
    assert step.mode == "balance" and step.weights.sum() == pytest.approx(1.0)
    assert step.weights[0] > step.weights[1]  # the worse client's update counts more
    expected = step.weights[0] * deltas[0]["head"] + step.weights[1] * deltas[1]["head"]
    torch.testing.assert_close(new["head"], expected.float())
    fedavg = weighted_mean([r.params for r in got], [r.num_examples for r in got])
    torch.testing.assert_close(new["body"], fedavg["body"])


def test_preference_is_per_client_id():
    params = {"head": torch.zeros(2)}
    deltas = [{"head": torch.tensor([-1.0, 0.0])}, {"head": torch.tensor([0.0, -1.0])}]
    got = replies(params, deltas, [1.0, 1.0])  # equal losses: c alone decides who is served
    one = SERVER_STRATEGIES["cpt"](preference=(1.0, 4.0)).mix(params, got)[1].weights
    zero = SERVER_STRATEGIES["cpt"](preference=(4.0, 1.0)).mix(params, got)[1].weights
    assert one[1] > one[0] and zero[0] > zero[1]
    with pytest.raises(ValueError, match="give one entry per client"):
        SERVER_STRATEGIES["cpt"](preference=(1.0,)).mix(params, got)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"preference": [1.0, 0.0]}, "preference entries"),
        ({"server_lr": 0.0}, "server_lr must be > 0"),
        ({"eps": -1.0}, "eps must be >= 0"),
        ({"block": ["nope."]}, "block prefix 'nope.' matches no parameter"),
    ],
)
def test_bad_options_are_one_clear_error(tiny, options, match):
    with pytest.raises(ConfigError, match=match):
        config.load(tiny(server={"name": "cpt", **options}, attacks=[])).check()


def test_cpt_needs_each_clients_update(tiny):
    spec = tiny(server={"name": "cpt"}, defenses=[{"name": "secure_aggregation"}], attacks=[])
    with pytest.raises(ConfigError, match="needs each client's own"):
        config.load(spec)


WATERBIRDS = {
    "data": {"name": "waterbirds_lite", "size": 8},
    "model": {"name": "mlp", "hidden": [32]},
    "partition": {"name": "dirichlet", "alpha": 0.3},
    "attacks": [],
}


def test_a_federated_run_with_both_readings_records_what_each_client_sent(tmp_path, tiny):
    spec = tiny(
        **WATERBIRDS,
        training={
            "name": "cpt",
            "groups": "labels",
            "lr": 0.1,
            "local_steps": 2,
            "block": ["1.bias", "3."],
        },
        server={"name": "cpt", "block": ["1.bias", "3."], "preference": [1.0, 2.0, 1.0, 1.0]},
    )
    exp = config.load(spec)
    store = pipeline.run(exp, tmp_path / "run")
    assert store.meta()["status"] == "done"
    views = list(store.views(exp))
    assert len(views) == 4  # 2 rounds x 2 clients
    for view in views:
        assert set(view.messages) == {"group_losses", "group_weights"}
        labels = exp.client_data(view.client).labels
        held = torch.bincount(labels, minlength=2) > 0
        # a zero group loss marks a class the client does not hold
        assert torch.equal(view.messages["group_losses"] > 0, held)
        delta = view.delta()
        assert torch.equal(delta["1.weight"], torch.zeros_like(delta["1.weight"]))  # frozen
    rows = store.rows("utility.csv")
    assert np.isfinite(float(rows[-1]["test_accuracy"]))


def test_fedsgd_clients_give_the_server_exact_gradients(tiny):
    spec = tiny(**WATERBIRDS, training={"name": "sgd", "lr": 0.5}, server={"name": "cpt"})
    exp = config.load(spec)
    sent = federation.initial_params(exp)
    got = [federation.reply(exp, c, sent, federation.local_update(exp, c, 1, sent)) for c in (0, 1)]
    new, step = exp.server.mix(sent, got)
    assert set(new) == set(sent)
    # one full-batch step: each block delta is -lr * the client's gradient at the sent model
    model = exp.build_model()
    model.load_state_dict(sent)
    data = exp.client_data(0)
    loss = exp.loss_fn(model(data.inputs), data.labels)
    grad = torch.autograd.grad(loss, model[3].bias)[0]
    torch.testing.assert_close(got[0].params["3.bias"] - sent["3.bias"], -0.5 * grad)
    assert got[0].loss == pytest.approx(loss.item(), rel=1e-5)
    assert step.weights.shape == (2,)
