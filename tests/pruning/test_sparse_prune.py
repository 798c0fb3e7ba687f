"""Client-side unstructured pruning in the federation: the trainer, its masks, the server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedleak import config, pipeline
from fedleak.core import Reply
from fedleak.registry import ConfigError
from fedleak.server.sparse_fedavg import SparseFedAvg
from fedleak.training import TRAINERS
from fedleak.training.sparse_prune import mask_names, pack, unpack

pytest.importorskip("transformers")

QUICKSTART = Path(__file__).resolve().parents[2] / "simulations" / "text_quickstart.toml"
TINY = [
    "model.name=tiny_bert",
    "model.layers=1",
    "model.hidden=32",
    "model.heads=2",
    "model.intermediate=64",
    "rounds=2",
    "clients=4",
    "clients_per_round=2",
    "attacks=[]",
]
PRUNE = ["training.name=sparse_prune", "training.sparsity=0.5", "server.name=sparse_fedavg"]


def _fit(text, method, seed):
    trainer = TRAINERS.build(
        {"name": "sparse_prune", "method": method, "sparsity": 0.5, "lr": 0.01}, "training"
    )
    model = text.model()
    result = trainer.fit(
        model,
        text.batch(range(6)),
        torch.nn.functional.cross_entropy,
        torch.Generator().manual_seed(seed),
    )
    return model, result


@pytest.mark.parametrize("method", ["randomized", "magnitude", "krp", "sparsegpt"])
def test_the_sent_mask_is_the_states_zeros_at_the_sparsity(text, method):
    model, result = _fit(text, method, 0)
    assert set(result.messages) == {"weight_mask"}
    state = model.state_dict()
    masks = unpack(result.messages["weight_mask"], state)
    assert len(masks) == 6  # one block's six linear layers
    for name, keep in masks.items():
        assert torch.equal(state[name] != 0, keep)
        assert int((~keep).sum()) == round(0.5 * keep.numel())


def test_randomized_masks_come_from_the_clients_generator(text):
    a, b, c = (_fit(text, "randomized", s)[1].messages["weight_mask"] for s in (0, 0, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_the_server_averages_each_weight_over_the_clients_that_kept_it():
    state = {
        "bert.encoder.layer.0.output.dense.weight": torch.zeros(2, 2),
        "bert.encoder.layer.0.output.dense.bias": torch.zeros(2),
    }
    name = mask_names(state)[0]
    a = {
        name: torch.tensor([[1.0, 0.0], [3.0, 0.0]]),
        "bert.encoder.layer.0.output.dense.bias": torch.ones(2),
    }
    b = {
        name: torch.tensor([[5.0, 7.0], [0.0, 0.0]]),
        "bert.encoder.layer.0.output.dense.bias": torch.zeros(2),
    }
    masks = [{name: a[name] != 0}, {name: b[name] != 0}]
    replies = [
        Reply(0, a, 1, 0.0, {"weight_mask": pack(masks[0], [name])}),
        Reply(1, b, 3, 0.0, {"weight_mask": pack(masks[1], [name])}),
    ]
    params = {
        name: torch.full((2, 2), -1.0),
        "bert.encoder.layer.0.output.dense.bias": torch.zeros(2),
    }
    out = SparseFedAvg().aggregate(1, params, replies)
    # both kept [0, 0]: (1*1 + 3*5)/4; only b kept [0, 1]; only a kept [1, 0]; nobody [1, 1]
    torch.testing.assert_close(out[name], torch.tensor([[4.0, 7.0], [3.0, -1.0]]))
    torch.testing.assert_close(
        out["bert.encoder.layer.0.output.dense.bias"], torch.full((2,), 0.25)
    )


def test_a_federated_run_records_every_clients_mask(tmp_path):
    exp = config.load(QUICKSTART, [*TINY, *PRUNE])
    store = pipeline.run(exp, tmp_path / "run")
    assert store.meta()["status"] == "done"
    views = list(store.views(exp))
    assert views
    for view in views:
        masks = unpack(view.messages["weight_mask"], view.received)
        for name, keep in masks.items():
            assert torch.equal(view.received[name] != 0, keep)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (["training.name=sparse_prune", "training.sparsity=1.0"], r"sparsity must be in \[0, 1\)"),
        (["training.name=sparse_prune", "training.ratio=0"], r"ratio > 0"),
        (["server.name=sparse_fedavg"], r"does not send 'weight_mask'"),
    ],
)
def test_bad_options_are_one_config_error(changes, message):
    with pytest.raises(ConfigError, match=message):
        config.load(QUICKSTART, [*TINY, *changes]).check()
