"""Text attacks from TOML: a federated run with the wide-pooler server, then TAG, LAMP and the
pooler attack on the captured round-1 update."""

import dataclasses
from pathlib import Path

import pytest
import torch

from fedleak import config, metrics, pipeline, seeding

pytest.importorskip("transformers")

EXPERIMENT = Path(__file__).resolve().parents[2] / "simulations" / "text_pooler.toml"
SHRINK = [
    "model.name=tiny_bert",
    "model.layers=1",
    "model.hidden=32",
    "model.heads=2",
    "model.intermediate=64",
    "rounds=2",
    "clients=4",
    "clients_per_round=2",
    "modifiers.0.hd=512",
    "modifiers.0.rd=16",
    *(f"attacks.{i}.steps=3" for i in range(3)),
    *(f"attacks.{i}.{k}" for i in (1, 2) for k in ("init_candidates=2", "swap_candidates=3")),
]


def test_the_shipped_experiment_loads_with_its_modifier_and_attacks():
    exp = config.load(EXPERIMENT)
    assert [m.name for m in exp.modifiers] == ["pooler"]
    assert [a.name for a in exp.attacks] == ["tag", "lamp", "pooler"]
    assert exp.modifiers[0].hd == 8192 and exp.attacks[2].oracle is False


def test_attacks_run_on_the_captured_update_of_a_federated_text_run(tmp_path):
    exp = config.load(EXPERIMENT, SHRINK)
    exp.check()
    # Federate with the malicious server (the attacks are run below, on what it captured).
    federated = dataclasses.replace(exp, attacks=())
    store = pipeline.run(federated, tmp_path / "run")
    assert store.meta()["status"] == "done"
    (view,) = list(store.views(exp))
    assert int(view.secrets["pooler.hd"]) == 512 and view.secrets["pooler.xi"].shape == (512, 16)
    assert view.sent["hf.bert.pooler.dense.weight"].shape == (32 + 512, 32)
    truth = store.truth(view.round, view.client)
    for index, attack in enumerate(exp.attacks):
        result = attack(view, seeding.rng(exp.seed, "attack", index, view.round, view.client))
        assert result.inputs.shape == truth.inputs.shape and result.inputs.dtype == torch.long
        scores = metrics.score(result, truth, view.task, view=view)
        assert 0 <= scores["rouge1"] <= 1
        if attack.name == "pooler":
            assert result.info["oracle"] == 0 and 0 <= scores["feature_cos"] <= 1
