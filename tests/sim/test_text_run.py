"""Text experiments end to end: config checks, and a federated run on the in-process grid."""

import csv
from pathlib import Path

import pytest
import torch

from fedleak import config, pipeline
from fedleak.registry import ConfigError

pytest.importorskip("transformers")

QUICKSTART = Path(__file__).resolve().parents[2] / "simulations" / "text_quickstart.toml"
TINY_MODEL = [
    "model.name=tiny_bert",
    "model.layers=1",
    "model.hidden=32",
    "model.heads=2",
    "model.intermediate=64",
]


def tiny_text(**top):
    """The text quickstart, shrunk: a tiny BERT, 4 clients, 2 rounds."""
    overrides = [*TINY_MODEL, "rounds=2", "clients=4", "clients_per_round=2"]
    overrides += [f"{k}={v}" for k, v in top.items()]
    return config.load(QUICKSTART, overrides)


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_text_quickstart_loads_and_passes_its_checks():
    exp = config.load(QUICKSTART)
    assert exp.data.name == "demo_text" and exp.model.name == "bert"
    assert [a.name for a in exp.attacks] == ["lamp"]
    exp.check()  # builds the pretrained MiniLM and runs it on a client's sentences


def test_a_federated_text_run_captures_token_ids_and_the_exact_gradient(tmp_path):
    exp = tiny_text()
    store = pipeline.run(exp, tmp_path / "run")
    assert store.meta()["status"] == "done"
    utility = read(store.root / "utility.csv")
    assert [int(r["round"]) for r in utility] == [0, 1, 2]
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in utility)
    assert (store.root / "config.toml").is_file()

    (view,) = list(store.views(exp))  # one client observed in round 1
    assert view.round == 1 and view.task.modality == "text"
    truth = store.truth(view.round, view.client)
    assert truth.inputs.dtype == torch.long and truth.inputs.shape == (4, 16)
    pool = exp.client_data(view.client)  # the truth rows are the client's own sentences
    assert all((pool.inputs == row).all(1).any() for row in truth.inputs)
    # FedSGD: the stored update is exactly lr x the gradient on the captured sentences
    model = view.model()
    loss = view.loss_fn(model(truth.inputs), truth.labels)
    names, params = zip(*model.named_parameters(), strict=True)
    grads = dict(zip(names, torch.autograd.grad(loss, params), strict=True))
    recovered = view.gradient()
    for name in ("hf.classifier.weight", "hf.bert.pooler.dense.weight"):
        assert torch.allclose(recovered[name], grads[name], atol=1e-5), name
    rows = recovered["hf.bert.embeddings.word_embeddings.weight"].abs().sum(1).nonzero()
    assert {int(i) for i in rows} == set(truth.inputs.flatten().tolist()) - {0}


def test_text_runs_are_reproducible(tmp_path):
    a = pipeline.run(tiny_text(), tmp_path / "a").root
    b = pipeline.run(tiny_text(), tmp_path / "b").root
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read(a / "utility.csv")) == strip(read(b / "utility.csv"))


DIGITS_ON_BERT = {"data": {"name": "digits"}, "model": {"name": "bert"}}


@pytest.mark.parametrize(
    ("source", "overrides", "message"),
    [
        (
            QUICKSTART,
            ["model.name=lenet"],
            r"'lenet' takes image data, but \[data\] 'demo_text' is",
        ),
        (DIGITS_ON_BERT, [], r"'bert' takes text data, but \[data\] 'digits' is image data"),
        (
            QUICKSTART,
            [*TINY_MODEL, "model.vocab=1000"],
            r"30522 tokens, but \[model\] 'tiny_bert' embeds only 1000",
        ),
    ],
)
def test_mismatched_data_and_models_fail_the_check_in_one_line(source, overrides, message):
    exp = config.load(source, overrides)
    with pytest.raises(ConfigError, match=message) as caught:
        exp.check()
    assert "\n" not in str(caught.value)
