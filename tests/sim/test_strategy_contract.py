"""The strategy contract: selectors, trainers that send messages, server strategies.

Test plugins registered here exercise every channel of a federated round: the server's
instructions (and the public seed), a selector's messages, a trainer that sends messages instead
of its model (the server replays them), a server strategy other than FedAvg, and the capture of
all of it in the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedleak import config, federation, pipeline
from fedleak.core import Params, Reply, Selection, TrainResult
from fedleak.registry import ConfigError
from fedleak.selection import SELECTORS
from fedleak.server import SERVER_STRATEGIES
from fedleak.server.fedavg import FedAvg, weighted_mean
from fedleak.training import TRAINERS


@SELECTORS.register("first_half")
@dataclass
class FirstHalf:
    """Trains on the first half of the partition; sends how many examples it holds."""

    sends: ClassVar[dict[str, str]] = {"held": "the size of the client's partition"}

    def select(self, model, data, loss_fn, rng, instructions):
        half = max(len(data) // 2, 1)
        return Selection(torch.arange(half), {"held": torch.tensor(len(data))})


def _direction(state: Params, seed: torch.Tensor) -> Params:
    rng = torch.Generator().manual_seed(int(seed))
    return {k: torch.randn(v.shape, generator=rng) for k, v in state.items()}


@TRAINERS.register("sign_step")
@dataclass
class SignStep:
    """One step of size lr along a shared random direction, downhill; sends only the sign."""

    lr: float = 0.05
    sends: ClassVar[dict[str, str]] = {
        "seed": "the public seed of the direction (no information)",
        "sign": "whether the loss falls along the direction: one bit about the data",
    }
    sends_model: ClassVar[bool] = False

    def fit(self, model, data, loss_fn, rng, defenses=(), instructions=None):
        seed = instructions["seed"]
        params = dict(model.named_parameters())
        direction = _direction({k: p.detach() for k, p in params.items()}, seed)
        with torch.no_grad():
            before = float(loss_fn(model(data.inputs), data.labels))
            for k, p in params.items():
                p.add_(direction[k], alpha=1e-3)
            sign = 1.0 if float(loss_fn(model(data.inputs), data.labels)) < before else -1.0
            for k, p in params.items():
                p.add_(direction[k], alpha=-1e-3 + self.lr * sign)
        return TrainResult(before, 1, len(data), data, {"seed": seed, "sign": torch.tensor(sign)})

    def replay(self, sent, messages, build_model):
        names = dict(build_model().named_parameters())
        direction = _direction({k: sent[k] for k in names}, messages["seed"])
        step = self.lr * float(messages["sign"])
        return {k: v + step * direction[k] if k in names else v for k, v in sent.items()}


@SERVER_STRATEGIES.register("damped")
@dataclass
class Damped:
    """FedAvg moved only ``factor`` of the way; tells clients the factor."""

    factor: float = 0.5
    sends: ClassVar[dict[str, str]] = {"factor": "how far the server moves the model"}

    def instructions(self, round, params, rng):
        return {"factor": torch.tensor(self.factor)}

    def aggregate(self, round, params, replies):
        mean = weighted_mean([r.params for r in replies], [r.num_examples for r in replies])
        return {k: params[k] + self.factor * (mean[k] - params[k]) for k in params}


@SERVER_STRATEGIES.register("flower_fedavg")
@dataclass
class FlowerFedAvg:
    """Flower's own aggregate_arrayrecords: the arithmetic runs used before the plugin kind."""

    sends: ClassVar[dict[str, str]] = {}

    def instructions(self, round, params, rng):
        return {}

    def aggregate(self, round, params, replies):
        records = [
            RecordDict(
                {
                    "arrays": ArrayRecord(r.params),
                    "metrics": MetricRecord({"num-examples": r.num_examples}),
                }
            )
            for r in replies
        ]
        return aggregate_arrayrecords(records, "num-examples").to_torch_state_dict()


def test_fedavg_is_bitwise_flowers_aggregate():
    rng = torch.Generator().manual_seed(0)
    states = [
        {"w": torch.randn(40, 30, generator=rng), "b": torch.randn(30, generator=rng).double()}
        for _ in range(5)
    ]
    counts = [13, 7, 29, 1, 50]
    replies = [Reply(i, s, n, 0.0) for i, (s, n) in enumerate(zip(states, counts, strict=True))]
    records = [
        RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"num-examples": n})})
        for s, n in zip(states, counts, strict=True)
    ]
    flower = aggregate_arrayrecords(records, "num-examples").to_torch_state_dict()
    ours = FedAvg().aggregate(1, states[0], replies)
    assert all(torch.equal(ours[k], flower[k]) for k in flower)


def test_the_default_server_reproduces_flowers_fedavg_run(tmp_path, tiny):
    spec = tiny(model={"name": "convnet", "width": 4}, rounds=2)  # batch norm: integer buffers
    ours = pipeline.run(config.load(spec), tmp_path / "ours")
    spec_flower = {**spec, "server": {"name": "flower_fedavg"}}
    flower = pipeline.run(config.load(spec_flower), tmp_path / "flower")
    assert config.load(ours.root / "config.toml").server.name == "fedavg"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(ours.rows("utility.csv")) == strip(flower.rows("utility.csv"))


def test_every_channel_of_a_round_is_recorded(tmp_path, tiny):
    spec = tiny(
        training={"name": "sign_step", "lr": 0.05},
        selection={"name": "first_half"},
        server={"name": "damped", "factor": 0.5},
        attacks=[],
    )
    exp = config.load(spec)
    store = pipeline.run(exp, tmp_path / "run")
    assert store.meta()["status"] == "done"
    views = list(store.views(exp))
    assert len(views) == 4  # 2 rounds x 2 clients
    for view in views:
        assert set(view.messages) == {"held", "seed", "sign"}
        assert int(view.messages["held"]) == len(exp.client_data(view.client))
        assert view.num_examples == max(len(exp.client_data(view.client)) // 2, 1)
        assert float(view.instructions["factor"]) == 0.5
        # The client sent no model: the server's copy is the replay of its messages, exact.
        assert torch.equal(view.messages["seed"], view.instructions["seed"])
        replayed = exp.trainer.replay(view.sent, view.messages, exp.build_model)
        assert all(torch.equal(view.received[k], replayed[k]) for k in replayed)
        assert not federation.local_update(exp, view.client, view.round, view.sent).params
    seeds = {int(v.instructions["seed"]) for v in views}
    assert len(seeds) == 2  # one public seed per round, shared by its clients


def test_replayed_state_equals_the_clients_own(tiny):
    exp = config.load(tiny(training={"name": "sign_step"}, attacks=[]))
    sent = federation.initial_params(exp)
    orders = federation.instructions(exp, 1, sent)
    model = exp.build_model()
    model.load_state_dict(sent)
    result = exp.trainer.fit(model, exp.client_data(0), exp.loss_fn, None, instructions=orders)
    replayed = exp.trainer.replay(sent, result.messages, exp.build_model)
    assert all(torch.allclose(model.state_dict()[k], replayed[k], atol=1e-6) for k in sent)


@SELECTORS.register("leaky")
@dataclass
class Leaky:
    """Sends a message it did not declare."""

    sends: ClassVar[dict[str, str]] = {}

    def select(self, model, data, loss_fn, rng, instructions):
        return Selection(torch.arange(len(data)), {"labels": data.labels})


def test_an_undeclared_message_is_refused(tiny):
    exp = config.load(tiny(selection={"name": "leaky"}, attacks=[]))
    with pytest.raises(RuntimeError, match=r"\[selection\] 'leaky' sends 'labels'.*`sends`"):
        federation.local_update(exp, 0, 1, federation.initial_params(exp))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"training": {"name": "sign_step"}, "defenses": [{"name": "gaussian_noise"}]},
            r"\[defenses\] 'gaussian_noise' acts on the model update, but \[training\] "
            r"'sign_step' sends no model",
        ),
        (
            {"selection": {"name": "first_half"}, "defenses": [{"name": "secure_aggregation"}]},
            r"'secure_aggregation' sums the clients' states.*\[selection\] 'first_half'",
        ),
        (
            {"server": {"name": "damped"}, "defenses": [{"name": "secure_aggregation"}]},
            r"\[server\] 'damped' needs each client's own",
        ),
        ({"server": {"name": "fedavgg"}}, r"fedavg"),
        ({"server": {"name": "damped", "factr": 1}}, r"factr"),
        ({"selection": {"name": "nope"}}, r"nope"),
    ],
)
def test_bad_strategy_combinations_are_one_config_error(tiny, changes, message):
    with pytest.raises(ConfigError, match=message):
        config.load(tiny(**changes, attacks=[]))
