"""Divergence is a result, not a silent NaN; a run's status can be trusted after a kill."""

import csv
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from fedleak import cli, config, federation, pipeline
from fedleak.defenses import DEFENSES
from fedleak.store import RunStore


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@dataclass
class NanSome:
    """Test defense: replaces the update by NaN with probability ``p`` (a broken defense)."""

    p: float = 1.0

    def __call__(self, delta, rng):
        if torch.rand((), generator=rng) < self.p:
            return {k: torch.full_like(v, float("nan")) for k, v in delta.items()}
        return delta


@pytest.fixture
def nan_defense(monkeypatch):
    """``nan_some`` registered for one test (the client rebuilds the experiment by name)."""
    NanSome.name = "nan_some"
    monkeypatch.setitem(DEFENSES._classes, "nan_some", NanSome)
    return lambda p: [{"name": "nan_some", "p": p}]


def test_a_client_whose_update_is_not_finite_raises_diverged(tiny, nan_defense):
    exp = config.load(tiny(defenses=nan_defense(1.0)))
    with pytest.raises(federation.Diverged, match=r"client 0, round 1: its update is not finite"):
        federation.local_update(exp, 0, 1, federation.initial_params(exp))


def test_non_finite_clients_are_failed_clients_and_the_run_goes_on(
    tmp_path, tiny, nan_defense, caplog
):
    exp = config.load(tiny(clients=6, clients_per_round=6, defenses=nan_defense(0.5)))
    store = pipeline.run(exp, tmp_path / "run")
    utility = read(store.root / "utility.csv")
    failures = [int(r["failures"]) for r in utility[1:]]
    assert sum(failures) > 0 and all(f < 6 for f in failures)
    assert all(torch.isfinite(torch.tensor(float(r["test_loss"]))) for r in utility)
    assert "update is not finite (diverged), left out of the average" in caplog.text
    assert store.meta()["status"] == "done"


def test_every_client_diverging_ends_the_run_as_diverged(tmp_path, tiny, nan_defense, capsys):
    path = tmp_path / "exp.toml"
    path.write_text(config.load(tiny(defenses=nan_defense(1.0))).toml())
    code = cli.main(["run", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "fedleak: diverged: round 1: every sampled client's update is not finite" in err
    meta = RunStore(tmp_path / "run").meta()
    assert meta["status"] == "diverged" and meta["server"] == "diverged"
    assert not (tmp_path / "run" / "results.csv").exists()  # nothing scored


def test_a_diverging_learning_rate_stops_the_run_with_a_clear_message(tmp_path, tiny, capsys):
    path = tmp_path / "exp.toml"
    path.write_text(config.load(tiny(training={"name": "sgd", "lr": 1e30})).toml())
    code = cli.main(["run", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "fedleak: diverged: round 1: the global test loss is" in err
    assert "divergence_ratio" in err
    assert RunStore(tmp_path / "run").meta()["status"] == "diverged"
    # the diverged round's measurement is kept: it is what happened
    assert [r["round"] for r in read(tmp_path / "run" / "utility.csv")] == ["0", "1"]


def test_divergence_ratio_zero_stops_only_on_nan(tmp_path, tiny):
    exp = config.load(tiny(divergence_ratio=0.0, training={"name": "sgd", "lr": 1e30}))
    store = pipeline.run(exp, tmp_path / "run")
    assert store.meta()["status"] == "done"
    assert float(read(store.root / "utility.csv")[-1]["test_loss"]) > 1e6


def test_a_non_finite_stored_view_is_not_attacked(tmp_path, tiny, caplog):
    store = pipeline.run(config.load(tiny()), tmp_path / "run")
    (round_, client), *_ = store.observed()
    stored = torch.load(store.root / "views" / f"r{round_:04d}_c{client:04d}.pt")
    received = {k: torch.full_like(v, float("nan")) for k, v in stored.pop("received").items()}
    store.write_view(round_, client, received, stored, stored.pop("messages"))
    (store.root / "results.csv").unlink()
    pipeline.resume(config.load(store.root / "config.toml"), store)
    attacked = {(int(r["round"]), int(r["client"])) for r in read(store.root / "results.csv")}
    assert (round_, client) not in attacked and len(attacked) == len(store.observed()) - 1
    assert "the stored update is not finite" in caplog.text


def test_a_killed_run_reads_interrupted_and_attack_finishes_it(tmp_path, tiny, capsys):
    store = pipeline.run(config.load(tiny()), tmp_path / "run")
    rows = read(store.root / "results.csv")
    # What SIGKILL leaves behind: status "running", written by a process that is gone.
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    store.mark_running()
    store.update_meta(pid=victim.pid)
    assert store.status() == "running"
    victim.send_signal(signal.SIGKILL)
    victim.wait()  # reaped: a zombie would still count as alive
    assert store.meta()["status"] == "running" and store.status() == "interrupted"
    keep = rows[:1]
    with (store.root / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)
    assert cli.main(["attack", str(store.root)]) == 0
    assert "status: done" in capsys.readouterr().out
    assert store.meta()["status"] == "done" and store.meta()["pid"] == os.getpid()
    assert len(read(store.root / "results.csv")) == len(rows)


def test_attack_refuses_a_run_that_is_still_being_written(tmp_path, tiny, capsys):
    store = pipeline.run(config.load(tiny()), tmp_path / "run")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store.mark_running()
        store.update_meta(pid=writer.pid)
        assert cli.main(["attack", str(store.root)]) == 2
        assert f"being written by process {writer.pid}" in capsys.readouterr().err
    finally:
        writer.kill()
        writer.wait()


def test_report_names_the_cells_it_leaves_out(tmp_path, tiny, capsys):
    import tomli_w

    sweep = {
        "name": "tiny",
        "base": tiny(rounds=1, observe={"rounds": [1], "clients_per_round": 1}),
        "defense": [{"name": "gaussian_noise", "vary": "std", "values": [0.1]}],
    }
    path = tmp_path / "sweep.toml"
    path.write_text(tomli_w.dumps(sweep))
    out = tmp_path / "out"
    assert cli.main(["bench", str(path), "--out", str(out)]) == 0
    cell = RunStore(out / "cells" / "gaussian_noise-0.1-s0")
    cell.mark_running()
    cell.update_meta(pid=999999999)  # a writer that is gone
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    assert "not in the report: gaussian_noise-0.1-s0 (interrupted)" in capsys.readouterr().err
