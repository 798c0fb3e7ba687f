"""The CPT benchmarks run end to end in --quick mode, write their pages, and resume."""

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
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_cpt_groups_quick_and_resume(tmp_path):
    run("cpt.py", tmp_path)
    runs = pd.read_csv(tmp_path / "cpt_runs.csv")
    assert len(runs) == 7 and runs["test_worst"].between(0, 1).all()
    assert "## Verdicts" in (tmp_path / "cpt.md").read_text()
    assert (tmp_path / "cpt.png").is_file()
    run("cpt.py", tmp_path)  # a rerun skips the finished rows
    assert len(pd.read_csv(tmp_path / "cpt_runs.csv")) == 7


@pytest.mark.slow
def test_cpt_clients_quick(tmp_path):
    run("cpt_clients.py", tmp_path)
    leaks = pd.read_csv(tmp_path / "cpt_clients_leakage.csv")
    assert len(leaks) == 8  # one row per client of the round-1 CPT replies
    # the group-mix inference beats guessing the pool's mix
    assert leaks["l1"].mean() < leaks["prior_l1"].mean()
    assert "worst client" in (tmp_path / "cpt_clients.md").read_text()
