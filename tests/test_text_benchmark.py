"""The text-attack benchmark runs end to end in --quick mode, writes its tables, and resumes."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).resolve().parents[1] / "simulations" / "benchmarks"
LABELS = ["TAG", "LAMP", "Pooler-SELU", "Pooler-x3x2", "Pooler-honest"]


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_text_attacks_quick_and_resumable(tmp_path, data_root):
    command = [sys.executable, str(BENCHMARKS / "text_attacks.py"), "--quick"]
    command += ["--out", str(tmp_path), "--data-root", str(data_root)]

    def bench() -> subprocess.CompletedProcess:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=600, env=dict(os.environ), check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    bench()
    runs = read(tmp_path / "text_attacks_runs.csv")
    assert len(runs) == len(LABELS) * 2  # --quick: CoLA, B = 1, 2, one batch per cell
    assert {r["attack"] for r in runs} == set(LABELS)
    for row in runs:
        assert 0 <= float(row["rouge1_lamp"]) <= 1 and 0 <= float(row["rouge1"]) <= 1
        assert float(row["seconds"]) > 0 and row["steps"] == "10"
        pooler = row["attack"].startswith("Pooler")
        assert (row["feature_cos"] != "nan") == pooler
        if pooler:
            assert 0 <= float(row["feature_cos"]) <= 1
    summary = read(tmp_path / "text_attacks.csv")
    assert len(summary) == len(runs)
    page = (tmp_path / "text_attacks.md").read_text()
    assert "| cola | LAMP | 1 | 1 |" in page and "84.8 / 46.2 / 73.1" in page  # published
    assert "mean over B = 2, 4" in page
    again = bench()
    assert f"{len(runs)} rows already in" in again.stdout and "0 to run" in again.stdout
    assert read(tmp_path / "text_attacks_runs.csv") == runs
