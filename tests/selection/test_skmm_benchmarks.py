"""The SkMM benchmark scripts run end to end in --quick mode, write their tables, and resume."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "simulations/benchmarks/training_strategies"


def run(script: str, out: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_skmm_gmm_quick_runs_and_resumes(tmp_path):
    run("skmm_gmm.py", tmp_path)
    runs = pd.read_csv(tmp_path / "skmm_gmm_runs.csv")
    assert len(runs) == 1 + 8  # the full-data reference and 8 methods at n = 48, one seed
    assert set(runs["covered"]) <= set(range(1, 21))
    skmm = runs.set_index("method").loc["skmm_linear"]
    assert skmm["covered"] == 20 and skmm["risk"] < runs.set_index("method").loc["uniform", "risk"]
    run("skmm_gmm.py", tmp_path)  # resumed: nothing recomputed
    assert len(pd.read_csv(tmp_path / "skmm_gmm_runs.csv")) == len(runs)
    assert "| 48 |" in (tmp_path / "skmm_gmm.md").read_text()


@pytest.mark.slow
def test_skmm_digits_quick_runs_every_method_through_the_pipeline(tmp_path):
    run("skmm_digits.py", tmp_path)
    runs = pd.read_csv(tmp_path / "skmm_digits_runs.csv")
    repeated = runs[runs["scenario"] == "repeated"]
    assert set(repeated["method"]) == {
        "all",
        "uniform",
        "skmm",
        "skmm_global",
        "herding",
        "k_center",
    }
    sent = repeated.set_index("method")["message_bytes"]
    assert sent["skmm_global"] == 32 * 32 * 8 + 8 + 8 and sent.drop("skmm_global").eq(0).all()
    assert runs["accuracy"].between(0, 1).all()
    assert "| one_shot | 32 | skmm |" in (tmp_path / "skmm_digits.md").read_text()
