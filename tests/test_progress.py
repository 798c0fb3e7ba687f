"""What fedleak run prints: one line per phase and the summary; every round goes to run.log."""

import pytest

from fedleak import cli, config, progress
from fedleak.store import RunStore


@pytest.fixture
def experiment(tmp_path, tiny):
    path = tmp_path / "exp.toml"
    path.write_text(config.load(tiny(rounds=3, observe={"rounds": [1, 2]})).toml())
    return path


def test_plain_output_is_one_line_per_phase_then_the_summary(experiment, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", str(experiment), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.err + captured.out
    assert "\x1b" not in text and "\r" not in text  # not a terminal: no escape codes, no redraws
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) <= 25, text
    assert lines[0].startswith("federation: 3 of 3 rounds of 2 of 4 clients (local runner) in ")
    assert lines[1].startswith("attacks: 1 on 4 captured updates, 4 reconstructions scored in ")
    assert captured.out.splitlines()[-1] == f"run directory: {out}"
    assert any(line.startswith("dlg ") for line in captured.out.splitlines())  # the table
    assert "round 1: test accuracy" not in text  # per-round lines only with --verbose
    assert "fraction_evaluate" not in text  # Flower's warning, silenced at its source


def test_every_round_and_attack_goes_to_run_log(experiment, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["run", str(experiment), "--out", str(out)]) == 0
    log = (out / "run.log").read_text()
    for r in range(4):  # round 0 is the initial model
        assert f"round {r}: test accuracy" in log
    assert log.count(" dlg: psnr ") == 4
    assert len(RunStore(out).rows("utility.csv")) == 4


def test_verbose_prints_every_round(experiment, tmp_path, capsys):
    assert cli.main(["run", str(experiment), "--out", str(tmp_path / "run"), "--verbose"]) == 0
    err = capsys.readouterr().err
    assert all(f"round {r}: test accuracy" in err for r in range(4))


def test_the_live_display_follows_the_run_and_ends_with_the_phase_lines(experiment, tmp_path):
    # Forced on (no terminal under pytest): the rich display must not disturb the run.
    from fedleak import pipeline

    said = []
    exp, out = config.load(experiment), tmp_path / "run"
    with progress.Watch(exp, out, live=True, say=said.append):
        pipeline.run(exp, out)
    assert len(said) == 2
    assert said[0].startswith("federation: 3 of 3 rounds") and said[1].startswith("attacks: 1 on")


def test_a_failed_run_prints_no_phase_line(experiment, tmp_path):
    from fedleak import pipeline

    said = []
    exp, out = config.load(experiment), tmp_path / "run"
    (out / "x").mkdir(parents=True)  # not empty: refused before anything runs
    with pytest.raises(FileExistsError), progress.Watch(exp, out, say=said.append):
        pipeline.run(exp, out)
    assert said == []
