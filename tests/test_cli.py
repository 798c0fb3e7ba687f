"""The fedleak command: list, run (including on the real files of a data root), attack."""

import csv

import pytest

from fedleak.cli import main


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_list_shows_every_kind_with_summaries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind in (
        "attacks:",
        "defenses:",
        "trainers:",
        "selectors:",
        "servers:",
        "modifiers:",
        "datasets:",
        "models:",
        "runners:",
    ):
        assert kind in out
    assert "  dlg " in out and "L-BFGS" in out
    assert main(["list", "models"]) == 0
    assert "lenet" in capsys.readouterr().out


def test_list_shows_what_a_plugin_sends(capsys):
    assert main(["list", "trainers"]) == 0
    out = capsys.readouterr().out
    assert "  mezo " in out and "sends 'seeds': [local_steps] int64" in out


def test_run_then_reattack_keeps_finished_rows(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "simulations/quickstart.toml",
            "--out",
            str(out),
            "-o",
            "rounds=2",
            "-o",
            "attacks.0.steps=3",
            "-o",
            "observe.clients_per_round=1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "utility after round 2: test accuracy" in printed and "dlg" in printed
    first = rows(out / "results.csv")
    assert len(first) == 1
    # re-attacking a run directory skips the rows it already has
    assert main(["attack", str(out)]) == 0
    assert rows(out / "results.csv") == first


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist_dlg", "cifar10_dlg"])
def test_runs_on_the_files_of_the_data_root(tmp_path, capsys, data_root, name):
    out = tmp_path / name
    code = main(
        [
            "run",
            f"simulations/{name}.toml",
            "-o",
            f"data.root={data_root}",
            "--out",
            str(out),
            "-o",
            "rounds=2",
            "-o",
            "attacks.0.steps=20",
        ]
    )
    assert code == 0, capsys.readouterr().err
    results = rows(out / "results.csv")
    assert len(results) == 2 and all(float(r["label_acc"]) == 1.0 for r in results)
    assert len(rows(out / "utility.csv")) == 3
