"""The benchmark scripts run end to end in --quick mode, write parseable tables, and resume."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "simulations" / "benchmarks"


def run(script: str, out: Path, *options: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``script --quick --out out [options]`` in a subprocess; fails the test if it fails."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out), *options],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def table_rows(markdown: str, first_column: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header starts with ``first_column``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_overhead_quick(tmp_path):
    done = run("overhead.py", tmp_path)
    rows = read(tmp_path / "overhead.csv")
    # one warm-up and one repeat of each of a, b, a'
    assert len(rows) == 6
    assert sorted(r["variant"] for r in rows) == ["a", "a", "a'", "a'", "b", "b"]
    for row in rows:
        assert int(row["rounds"]) == 10
        assert float(row["seconds"]) > 0
        assert float(row["ms_per_round"]) > 0
        assert 0 <= float(row["test_accuracy"]) <= 1
    page = (tmp_path / "overhead.md").read_text()
    assert "Verdict, capture of every update of every round: a / b = " in page
    assert "Verdict, the experiment as configured (capture of round 1): a' / b = " in page
    assert "cores" in page
    summary = table_rows(page, "variant")
    assert [r[0] for r in summary] == ["a", "a'", "b"]
    for row in summary:
        seconds, ms, ratio, accuracy = map(float, row[3:7])
        assert seconds > 0 and ms > 0 and ratio > 0 and 0 <= accuracy <= 1
    assert float(summary[2][5]) == 1.0  # b against itself
    assert "| variant | what |" in done.stdout


@pytest.mark.slow
def test_scale_quick(tmp_path):
    done = run("scale.py", tmp_path)
    rows = read(tmp_path / "scale.csv")
    assert [int(r["clients"]) for r in rows] == [10, 100]
    for row in rows:
        assert row["status"] == "ok"
        assert int(row["sampled_per_round"]) == 10 and int(row["rounds"]) == 3
        assert float(row["wall_s"]) > 0
        assert 0 < float(row["peak_tree_rss_gib"]) < 24
        assert float(row["driver_rss_mib"]) > 0
        assert int(row["processes"]) >= 1
        assert 0 <= float(row["test_accuracy"]) <= 1
    page = (tmp_path / "scale.md").read_text()
    table = table_rows(page, "clients")
    assert [r[0] for r in table] == ["10", "100"]
    for row in table:
        assert all(float(cell) >= 0 for cell in row[3:8])
    assert "Verdict: 10,000 clients fit in 24 GiB: n/a" in page
    assert "| clients |" in done.stdout


@pytest.mark.slow
def test_vision_attacks_quick_and_resumable(tmp_path, data_root):
    def bench() -> subprocess.CompletedProcess:
        return run("vision_attacks.py", tmp_path, "--data-root", str(data_root), timeout=900)

    bench()
    runs = read(tmp_path / "vision_attacks_runs.csv")
    attacks = ["dlg", "idlg", "inverting_gradients", "feature_reconstruction", "imprint"]
    attacks += ["feature_reconstruction_honest"]
    # --quick: B = 1, 2; one batch per cell; both model states
    assert len(runs) == len(attacks) * 2 * 2
    assert {r["attack"] for r in runs} == set(attacks)
    for row in runs:
        assert row["status"] == "ok" and float(row["seconds"]) > 0
        assert float(row["psnr"]) > 0
        assert row["lpips"] == "nan"  # no LPIPS backbone weights on a test machine
        assert row["commit"] and row["finished"]  # each row's provenance
        assert row["device"] == "cpu" and int(row["threads"]) >= 1  # and where it ran
    features = [r for r in runs if r["attack"].startswith("feature_reconstruction")]
    assert all(0 <= float(r["feature_cos"]) <= 1 for r in features)
    summary = read(tmp_path / "vision_attacks.csv")
    assert len(summary) == len(runs)  # one batch per cell
    page = (tmp_path / "vision_attacks.md").read_text()
    table = table_rows(page, "attack")
    assert len(table) == len(summary) and all(r[10] == "not computed" for r in table)
    assert "; rows finished 20" in page and " at commit " in page
    assert "breaching side by side:" in page
    assert "- inverting_gradients at B = 1, untrained: " in page and "(target >= 25 dB: " in page
    gap = "- feature_reconstruction - inverting_gradients, mean PSNR, trained: B = 2: "
    assert gap in page and "(partial)" not in page  # --quick asks for one batch per cell
    mean_colour = page.split("Reference, no attack: ", 1)[1].split("\n", 1)[0]
    assert "scores PSNR " in mean_colour and "at B = 1 / 2" in mean_colour
    assert (tmp_path / "vision_attacks_grid.png").stat().st_size > 0
    trained = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert trained
    # fewer cells attack fewer images, but the trained model stays the same
    options = ["--data-root", str(data_root), "--batch-sizes", "1", "--attacks", "imprint"]
    run("vision_attacks.py", tmp_path / "b1", *options)
    assert sorted(p.name for p in (tmp_path / "b1" / "checkpoints").glob("*.pt")) == trained
    # rows written before the stamp columns existed: --report only rewrites the tables, and a
    # later run rewrites the file with the new columns, the old rows left blank in them
    older = tmp_path / "b1" / "vision_attacks_runs.csv"
    rows = read(older)
    with older.open("w", newline="") as f:
        stamp = ("commit", "finished", "device", "threads")
        writer = csv.DictWriter(f, [k for k in rows[0] if k not in stamp], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    report = run("vision_attacks.py", tmp_path / "b1", *options, "--report")
    assert "to run" not in report.stdout and "rows not stamped" in report.stdout
    # ... but not of rows run at another budget than the page would state
    script = [sys.executable, str(BENCHMARKS / "vision_attacks.py"), "--quick", "--report"]
    refused = subprocess.run(
        [*script, "--out", str(tmp_path), "--data-root", str(data_root), "--steps", "5"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "run at [4] steps, not 5" in refused.stderr
    run("vision_attacks.py", tmp_path / "b1", *options, "--batches", "2")
    grown = read(older)
    assert len(grown) == 2 * len(rows) and list(grown[0]) == list(rows[0])
    assert [bool(r["finished"]) for r in grown] == [False] * len(rows) + [True] * len(rows)
    page = (tmp_path / "b1" / "vision_attacks.md").read_text()
    assert f"({len(rows)} earlier rows unstamped)" in page
    # a parallel run's rows merge in once: those b1 lacks (batch 2), not its copies of b1's
    run("vision_attacks.py", tmp_path / "b3", *options, "--batches", "3")
    for added in (len(rows), 0):  # merging the same folder again adds nothing
        merged = run(
            "vision_attacks.py", tmp_path / "b1", *options, "--merge", str(tmp_path / "b3")
        )
        assert f"merged {added} rows into" in merged.stdout and "to run" not in merged.stdout
    whole = read(older)
    assert [int(r["batch"]) for r in whole] == [0] * len(rows) + [1] * len(rows) + [2] * len(rows)
    assert whole[: 2 * len(rows)] == grown  # the rows b1 held keep their place and values
    assert "| imprint | untrained | 1 | 3 |" in (tmp_path / "b1" / "vision_attacks.md").read_text()
    # a rerun finds every row done, runs nothing and keeps the rows
    again = bench()
    assert f"{len(runs)} rows already in" in again.stdout and "0 to run" in again.stdout
    assert read(tmp_path / "vision_attacks_runs.csv") == runs


@pytest.mark.slow
def test_text_attacks_quick_and_resumable(tmp_path, data_root):
    pytest.importorskip("transformers")
    labels = ["TAG", "LAMP", "Pooler-SELU", "Pooler-x3x2", "Pooler-honest"]

    def bench() -> subprocess.CompletedProcess:
        return run("text_attacks.py", tmp_path, "--data-root", str(data_root))

    bench()
    runs = read(tmp_path / "text_attacks_runs.csv")
    assert len(runs) == len(labels) * 2  # --quick: CoLA, B = 1, 2, one batch per cell
    assert {r["attack"] for r in runs} == set(labels)
    for row in runs:
        assert 0 <= float(row["rouge1_lamp"]) <= 1 and 0 <= float(row["rouge1"]) <= 1
        assert float(row["seconds"]) > 0 and row["steps"] == "10"
        assert row["commit"] and row["finished"]
        pooler = row["attack"].startswith("Pooler")
        assert (row["feature_cos"] != "nan") == pooler
        if pooler:
            assert 0 <= float(row["feature_cos"]) <= 1
    summary = read(tmp_path / "text_attacks.csv")
    assert len(summary) == len(runs)
    page = (tmp_path / "text_attacks.md").read_text()
    assert "| cola | LAMP | 1 | 1 |" in page and "84.8 / 46.2 / 73.1" in page  # published
    line = next(x for x in page.splitlines() if x.startswith("- cola, R-1 (lamp) mean over"))
    assert "mean over B = 2 (1 batch): LAMP " in line  # B = 4 not run
    assert "(LAMP - TAG " in line and " ± " not in line  # no standard error from one batch
    assert "Reference, no attack beyond the bag: " in page and "scores R-1 (lamp) cola " in page
    again = bench()
    assert f"{len(runs)} rows already in" in again.stdout and "0 to run" in again.stdout
    assert read(tmp_path / "text_attacks_runs.csv") == runs
    report = run("text_attacks.py", tmp_path, "--data-root", str(data_root), "--report")
    assert "to run" not in report.stdout and "; rows finished 20" in report.stdout
    # merged into an empty folder, the rows make the same page
    merged = run(
        "text_attacks.py", tmp_path / "m", "--data-root", str(data_root), "--merge", str(tmp_path)
    )
    assert f"merged {len(runs)} rows into" in merged.stdout
    assert read(tmp_path / "m" / "text_attacks_runs.csv") == runs
    assert read(tmp_path / "m" / "text_attacks.csv") == summary
    # a folder without a runs file is refused by name, before anything is written
    script = [sys.executable, str(BENCHMARKS / "text_attacks.py"), "--quick"]
    options = ["--merge", str(tmp_path / "none"), "--out", str(tmp_path / "m2")]
    refused = subprocess.run(
        [*script, *options, "--data-root", str(data_root)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert (
        refused.returncode != 0
        and f"--merge {tmp_path / 'none'}: no text_attacks_runs.csv there" in refused.stderr
    )
    assert not (tmp_path / "m2" / "text_attacks_runs.csv").exists()


def test_vision_ablation_config_extends_the_benchmark(tmp_path, data_root):
    done = run(
        "vision_attacks.py", tmp_path, "--config", str(BENCHMARKS / "vision_ablation.toml"),
        "--data-root", str(data_root), "--report",
    )  # fmt: skip
    attacks = done.stdout.split("Attacks: ", 1)[1].split("\n", 1)[0]
    names = [part.split("`")[1] for part in attacks.split("; ")]
    assert names == [
        "inverting_gradients",
        "feature_reconstruction_prior",
        "feature_reconstruction_pixels",
        "feature_reconstruction",
    ]
    assert '"prior": "none"' in attacks and '"features": "none"' in attacks  # its own rows
    assert "model: {'name': 'convnet'" in done.stdout  # the base's model


def test_text_ablation_config_adds_oracle_rows_beside_the_benchmarks(tmp_path, data_root):
    done = run(
        "text_attacks.py", tmp_path, "--config", str(BENCHMARKS / "text_ablation.toml"),
        "--data-root", str(data_root), "--report",
    )  # fmt: skip
    attacks = done.stdout.split("Attacks: ", 1)[1].split("; extra options", 1)[0]
    specs = dict(part.split(" = ", 1) for part in attacks.split("; "))
    assert list(specs) == [
        "LAMP", "Pooler-SELU", "Pooler-x3x2", "Pooler-SELU-oracle", "Pooler-x3x2-oracle",
    ]  # fmt: skip
    base = run("text_attacks.py", tmp_path / "base", "--data-root", str(data_root), "--report")
    for label, spec in specs.items():  # the base's rows are the base's, the oracle rows new
        assert (f"{label} = {spec}" in base.stdout) == ("oracle" not in label)
    assert "'oracle': True" in specs["Pooler-x3x2-oracle"]


@pytest.mark.slow
def test_text_ablation_reproduces_the_benchmarks_rows(tmp_path, data_root):
    pytest.importorskip("transformers")
    picked = ("--data-root", str(data_root), "--batch-sizes", "2")
    run("text_attacks.py", tmp_path / "base", *picked, "--attacks", "Pooler-SELU")
    config = ("--config", str(BENCHMARKS / "text_ablation.toml"))
    attacks = ("--attacks", "Pooler-SELU", "Pooler-SELU-oracle")
    run("text_attacks.py", tmp_path / "ablation", *config, *picked, *attacks)
    base = read(tmp_path / "base" / "text_attacks_runs.csv")
    ablation = {r["attack"]: r for r in read(tmp_path / "ablation" / "text_attacks_runs.csv")}
    same = ("rouge1_lamp", "rouge2_lamp", "token_acc", "feature_cos")
    assert [base[0][f] for f in same] == [ablation["Pooler-SELU"][f] for f in same]
    assert ablation["Pooler-SELU-oracle"]["rouge1_lamp"] not in ("", "nan")  # ran with the truth


def test_text_verdict_pairs_a_partial_cell_with_its_own_batches(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports _bench beside it
    spec = importlib.util.spec_from_file_location("text_attacks", BENCHMARKS / "text_attacks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    r1 = {"LAMP": [0.5, 0.6, 0.9, 0.9], "Pooler-SELU": [0.6, 0.8]}  # the pooler cell: 2 batches
    rows = [
        {"dataset": "cola", "B": "2", "batch": str(k), "attack": attack, "seconds": "1",
         **dict.fromkeys(script.SCORES, str(value))}
        for attack, values in r1.items()
        for k, value in enumerate(values)
    ]  # fmt: skip
    cfg = {
        "datasets": {"cola": {}},
        "attacks": [{"label": "TAG"}, {"label": "LAMP"}, {"label": "Pooler-SELU"}],
        "batch_sizes": [2],
    }
    numbers = {"B": int, "batch": int, "seconds": float, **dict.fromkeys(script.SCORES, float)}
    rows = pd.DataFrame(rows).astype(numbers)
    line = script.verdict(script.summarise(rows, cfg), rows, cfg)[0]
    # +10 and +20 on batches 0 and 1 (unpaired, 70.0 - 72.5 would say -2.5); no TAG rows
    assert "LAMP 72.5; pooler attacks vs LAMP: Pooler-SELU +15.0 ± 5.0 " in line, line
