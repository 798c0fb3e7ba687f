"""End-to-end runs on the in-process grid: capture, attack, reproducibility, failures, truth."""

import csv
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import pytest
import torch

from fedleak import config, federation, pipeline
from fedleak.attacks import ATTACKS
from fedleak.core import Reconstruction
from fedleak.store import RunStore


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_run_writes_the_whole_run_directory(tmp_path, tiny):
    store = pipeline.run(config.load(tiny()), tmp_path / "run")
    root = store.root
    assert (root / "config.toml").is_file() and store.meta()["status"] == "done"
    utility = read(root / "utility.csv")
    assert [int(r["round"]) for r in utility] == [0, 1, 2]
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in utility)
    results = read(root / "results.csv")
    assert len(results) == 2 * 2  # 2 observed rounds x 2 clients x 1 attack
    assert {"psnr", "ssim", "label_acc", "mse", "seconds"} <= set(results[0])
    assert len(list((root / "images").glob("*.png"))) == 4
    # the trained model: it scores what the last utility row says
    exp = config.load(tiny())
    final = federation.evaluate(exp, store.model())
    assert final["test_accuracy"] == float(utility[-1]["test_accuracy"])
    # the resolved config reloads to the same experiment
    assert config.load(root / "config.toml").resolved == config.load(tiny()).resolved


def test_same_config_and_seed_give_identical_results(tmp_path, tiny):
    a = pipeline.run(config.load(tiny()), tmp_path / "a").root
    b = pipeline.run(config.load(tiny()), tmp_path / "b").root
    for name in ("utility.csv", "results.csv"):
        assert without_timing(read(a / name)) == without_timing(read(b / name))
    for view in (a / "views").iterdir():
        x, y = torch.load(view), torch.load(b / "views" / view.name)
        assert all(torch.equal(x["received"][k], y["received"][k]) for k in x["received"])
    c = pipeline.run(config.load(tiny(seed=4)), tmp_path / "c").root
    assert without_timing(read(a / "utility.csv")) != without_timing(read(c / "utility.csv"))


def test_a_failing_client_is_logged_and_the_run_completes(tmp_path, caplog, monkeypatch, tiny):
    real = federation.local_update

    def flaky(exp, client, round, sent, orders):
        if client == 1:
            raise RuntimeError("disk on fire")
        return real(exp, client, round, sent, orders)

    monkeypatch.setattr(federation, "local_update", flaky)
    store = pipeline.run(config.load(tiny(clients_per_round=4)), tmp_path / "run")
    utility = read(store.root / "utility.csv")
    assert [int(r["failures"]) for r in utility[1:]] == [1, 1]
    assert [int(r["clients"]) for r in utility[1:]] == [4, 4]
    assert "client 1 failed: RuntimeError: disk on fire" in caplog.text
    assert sorted(c for _, c in store.observed()) == [0, 0, 2, 2, 3, 3]
    assert store.meta()["status"] == "done"


def test_a_round_where_every_client_fails_stops_the_run(tmp_path, monkeypatch, tiny):
    def broken(exp, client, round, sent, orders):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(federation, "local_update", broken)
    with pytest.raises(RuntimeError, match=r"round 1: all 2 sampled clients failed.*out of memory"):
        pipeline.run(config.load(tiny()), tmp_path / "run")
    assert RunStore(tmp_path / "run").meta()["status"] == "failed"
    assert (tmp_path / "run" / "utility.csv").is_file()  # round 0 was kept


SEEN = []


@ATTACKS.register("spy")
@dataclass
class Spy:
    """Records every view it is given (for the truth-channel test)."""

    modality: ClassVar[str] = "image"

    def __call__(self, view, rng):
        SEEN.append(view)
        return Reconstruction(torch.zeros(view.num_examples, *view.task.input_shape))


def test_attacks_never_see_the_truth(tmp_path, tiny):
    SEEN.clear()
    store = pipeline.run(config.load(tiny(attacks=[{"name": "spy"}])), tmp_path / "run")
    assert len(SEEN) == 4
    for view in SEEN:
        truth = store.truth(view.round, view.client)
        reachable = [getattr(view, f.name) for f in fields(view)]
        tensors = [
            t
            for v in reachable
            if isinstance(v, dict)
            for t in v.values()
            if isinstance(t, torch.Tensor)
        ]
        tensors += [v for v in reachable if isinstance(v, torch.Tensor)]
        assert not any(
            t.shape == truth.inputs.shape and torch.equal(t, truth.inputs) for t in tensors
        )
        assert "fedleak.truth" not in view.received and not view.secrets
    for path in (store.root / "views").iterdir():
        stored = torch.load(path)
        assert set(stored) == {
            "received",
            "messages",
            "num_examples",
            "loss",
            "local_steps",
            "batch_size",
        }


def test_federation_pieces_are_deterministic_and_defended(tiny):
    exp = config.load(tiny(defenses=[{"name": "clip", "max_norm": 0.01}]))
    assert federation.sample_clients(exp, 1) == federation.sample_clients(exp, 1)
    assert len({tuple(federation.sample_clients(exp, r)) for r in range(1, 8)}) > 1
    sent = federation.initial_params(exp)
    a = federation.local_update(exp, 0, 1, sent)
    b = federation.local_update(exp, 0, 1, sent)
    assert all(torch.equal(a.params[k], b.params[k]) for k in sent)
    norm = torch.sqrt(sum(((a.params[k] - sent[k]) ** 2).sum() for k in sent))
    assert norm <= 0.01 + 1e-6
    assert len(a.truth) == 2


def test_a_non_empty_output_directory_is_refused(tmp_path, tiny):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        pipeline.run(config.load(tiny()), tmp_path)


def test_server_modifiers_shape_what_is_sent_and_captured(tmp_path, tiny):
    spec = tiny(modifiers=[{"name": "prune_global", "amount": 0.5}], attacks=[])
    store = pipeline.run(config.load(spec), tmp_path / "run")
    sent = torch.load(store.root / "sent" / "r0001.pt")["params"]
    weights = torch.cat(
        [v.flatten() for k, v in sent.items() if k.endswith("weight") and v.ndim > 1]
    )
    assert (weights == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    view = next(iter(store.views(config.load(spec))))
    assert all(torch.equal(view.sent[k], sent[k]) for k in sent)


def test_secure_aggregation_capture_sees_no_individual_update(tmp_path, tiny):
    spec = tiny(defenses=[{"name": "secure_aggregation"}], rounds=1, observe={"rounds": [1]})
    exp = config.load(spec)
    store = pipeline.run(exp, tmp_path / "run")
    assert store.observed() == [(1, -1)]  # one aggregate view, no per-client view
    view = next(iter(store.views(exp)))
    sent = federation.initial_params(exp)
    clients = federation.sample_clients(exp, 1)
    updates = [federation.local_update(exp, c, 1, sent) for c in clients]
    counts = [len(u.truth) for u in updates]
    for k in sent:
        if sent[k].is_floating_point():
            mean = sum(u.params[k] * n for u, n in zip(updates, counts, strict=True)) / sum(counts)
            torch.testing.assert_close(view.received[k], mean)
    for update in updates:  # and it is none of the individual updates
        assert any(not torch.allclose(view.received[k], update.params[k]) for k in sent)
    assert view.num_examples == sum(counts) and len(store.truth(1, -1)) == sum(counts)
    assert len(store.rows("results.csv")) == 1


def test_flower_secaggplus_server_sees_only_masked_vectors_and_their_sum(
    tmp_path, tiny, monkeypatch
):
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from fedleak.sim.grid import LocalGrid

    replies = []  # every message the server pulls: its whole view of the traffic
    pull = LocalGrid.pull_messages

    def tapped(self, ids):
        pulled = list(pull(self, ids))
        replies.extend(pulled)
        return pulled

    monkeypatch.setattr(LocalGrid, "pull_messages", tapped)
    secure = {"name": "secure_aggregation", "protocol": "secaggplus"}
    spec = tiny(defenses=[secure], clients_per_round=3, rounds=2, observe={"rounds": [1]})
    exp = config.load(spec)
    store = pipeline.run(exp, tmp_path / "run")
    assert store.observed() == [(1, -1)]
    sent = federation.initial_params(exp)
    updates = [federation.local_update(exp, c, 1, sent) for c in federation.sample_clients(exp, 1)]
    counts = [len(u.truth) for u in updates]
    view = next(iter(store.views(exp)))
    # The unmasked sum is FedAvg's mean, up to SecAgg+'s quantisation of each weighted model.
    step = 2 * 8.0 / 2**22 * max(map(len, exp.partitions())) / min(counts)
    for k in sent:
        mean = sum(u.params[k] * n for u, n in zip(updates, counts, strict=True)) / sum(counts)
        torch.testing.assert_close(view.received[k], mean, atol=len(counts) * step, rtol=0)
    assert view.num_examples == sum(counts) and len(store.truth(1, -1)) == sum(counts)
    # On the wire: no reply carries an array, and round 1's masked vectors look like noise.
    assert all(not len(rec) for m in replies for rec in m.content.array_records.values())
    masked = [
        np.concatenate([bytes_to_ndarray(b).ravel() for b in cfg[Key.MASKED_PARAMETERS]])
        for m in replies
        if Key.MASKED_PARAMETERS in (cfg := m.content.config_records[RECORD_KEY_CONFIGS])
    ]
    assert len(masked) == 3 * 2  # 3 clients x 2 rounds
    flat = [torch.cat([u.params[k].flatten() for k in sent]).numpy() for u in updates]
    for vector in masked[:3]:
        assert vector.size == flat[0].size + 1  # + SecAgg+'s weight factor
        for update in flat:
            assert abs(np.corrcoef(vector[: update.size].astype(float), update)[0, 1]) < 0.2
    # and the federation learns as under the ideal functionality
    spec["defenses"] = [{"name": "secure_aggregation"}]
    ideal = pipeline.run(config.load(spec), tmp_path / "ideal")
    losses = [float(r["test_loss"]) for r in read(store.root / "utility.csv")]
    ideal_losses = [float(r["test_loss"]) for r in read(ideal.root / "utility.csv")]
    assert losses == pytest.approx(ideal_losses, abs=1e-3) and losses[0] != losses[-1]


def test_secaggplus_refuses_bad_protocols_and_rounds_it_would_skip(tiny):
    secure = {"name": "secure_aggregation", "protocol": "secaggplus"}
    with pytest.raises(config.ConfigError, match="at least 2 clients per round"):
        config.load(tiny(defenses=[secure], clients_per_round=1)).check()
    with pytest.raises(config.ConfigError, match="max_weight=4"):
        config.load(tiny(defenses=[{**secure, "max_weight": 4}])).check()
    with pytest.raises(config.ConfigError, match="'secagg'"):
        config.load(tiny(defenses=[{**secure, "protocol": "secagg"}]))
    for option, value, message in [
        ("num_shares", 0, "num_shares must be > 0, got 0"),
        ("quantization_range", 1, "quantization_range must be >= 2, got 1"),
        ("max_weight", -1, "max_weight must be >= 0"),
    ]:
        with pytest.raises(config.ConfigError, match=message):
            config.load(tiny(defenses=[{**secure, option: value}]))


def test_the_first_round_waits_for_nodes_that_register_late(tmp_path, tiny, monkeypatch):
    """Ray's nodes register while the server starts: placing clients waits for them."""
    from fedleak.sim import server

    class LateGrid:
        calls = 0

        def get_node_ids(self):
            self.calls += 1
            return [] if self.calls < 3 else [11, 12, 13]

    observed = server.Observed(None, config.load(tiny()), RunStore(tmp_path), discover=False)
    assert observed._place([2, 0], LateGrid()) == {11: 2, 12: 0}
    monkeypatch.setattr(server, "NODE_WAIT", 0.3)
    with pytest.raises(RuntimeError, match="0 nodes are connected after 0 s"):
        observed._place([2, 0], type("Empty", (), {"get_node_ids": lambda self: []})())
