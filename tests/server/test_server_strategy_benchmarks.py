"""The server-strategy benchmarks run end to end in --quick mode, write their pages, and resume."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "simulations" / "benchmarks" / "server_strategies"


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
def test_meta_learning_quick_and_resume(tmp_path):
    run("meta_learning.py", tmp_path)
    runs = pd.read_csv(tmp_path / "meta_learning_runs.csv")
    assert {"terms", "new_client", "leakage"} <= set(runs["part"])
    page = (tmp_path / "meta_learning.md").read_text()
    assert "Fitted rates vs theory" in page and "Monte Carlo vs exact" in page
    again = run("meta_learning.py", tmp_path)  # every cell is done: nothing recomputed
    assert "terms gaussian" not in again
    assert len(pd.read_csv(tmp_path / "meta_learning_runs.csv")) == len(runs)


@pytest.mark.slow
def test_shared_features_quick(tmp_path):
    run("shared_features.py", tmp_path)
    runs = pd.read_csv(tmp_path / "shared_features_runs.csv")
    assert set(runs["part"]) == {"planted", "digits"}
    planted = runs[runs["part"] == "planted"]
    assert set(planted["method"]) == {"erm", "invariant", "content", "all"}
    assert (runs.loc[runs["part"] == "digits", "value"].between(0, 1)).all()
    assert "## planted" in (tmp_path / "shared_features.md").read_text()
