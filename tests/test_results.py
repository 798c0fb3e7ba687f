"""fedleak.results: runs and sweeps as DataFrames; the committed tables regenerate from them."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fedleak import report, results
from fedleak.registry import ConfigError
from fedleak.store import RunStore

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "simulations" / "benchmarks"
COMMITTED = BENCHMARKS / "results"


def _run(root: Path) -> RunStore:
    """A run directory as fedleak run leaves it: two rounds, two attacks, one without labels."""
    store = RunStore(root)
    store.write_text("config.toml", 'name = "tiny"\n')
    store.update_meta(status="done", seconds=1.5, dpsgd={"epsilon": 2.0})
    for r, acc in enumerate([0.1, 0.5, 0.75]):
        store.append_row(
            "utility.csv",
            {"round": r, "test_loss": 2.0 - r, "test_accuracy": acc, "train_loss": math.nan},
        )
    for client, (psnr, label) in enumerate([(10.0, 1.0), (20.0, math.nan)]):
        for index, attack in enumerate(["dlg", "imprint"]):
            store.append_row(
                "results.csv",
                {
                    "round": 1,
                    "client": client,
                    "attack_index": index,
                    "attack": attack,
                    "psnr": psnr + 50 * index,
                    "label_acc": label if index == 0 else math.nan,
                    "seconds": 0.5,
                },
            )
    return store


def test_a_run_loads_typed_with_nan_where_a_metric_does_not_apply(tmp_path):
    _run(tmp_path)
    run = results.load(tmp_path)
    assert run.utility["test_accuracy"].tolist() == [0.1, 0.5, 0.75]
    assert run.utility["round"].dtype.kind == "i" and run.utility["train_loss"].isna().all()
    assert run.results["attack"].tolist() == ["dlg", "imprint", "dlg", "imprint"]
    assert run.meta.loc[0, "status"] == "done" and run.meta.loc[0, "dpsgd.epsilon"] == 2.0
    table = results.summary(run.results, ["psnr", "label_acc"])
    assert table.index.tolist() == ["dlg", "imprint"]  # order of first appearance
    assert table.loc["dlg", "views"] == 2 and table.loc["dlg", "psnr"] == 15.0
    assert table.loc["dlg", "label_acc"] == 1.0  # the NaN of client 1 is skipped, not a zero
    assert math.isnan(table.loc["imprint", "label_acc"])  # no labels at all: NaN


def test_mean_skips_nan_and_is_exact():
    assert math.isnan(results.mean(pd.Series([math.nan, math.nan])))
    assert results.mean(pd.Series([1.0, math.nan, 3.0])) == 2.0
    # 1e16 + 1 - 1e16 loses the 1 in float arithmetic; the exact sum keeps it
    assert results.mean(pd.Series([1e16, 1.0, -1e16])) == pytest.approx(1 / 3)


def test_a_sweep_loads_its_rows_and_every_cells_utility_and_meta(tmp_path):
    (tmp_path / "sweep.toml").write_text('name = "s"\n')
    store = RunStore(tmp_path)
    for cell, strength in [("none-s0", ""), ("noise-1e-05-s0", 1e-05)]:
        store.append_row(
            "results.csv",
            {"cell": cell, "defense": cell.split("-")[0], "strength": strength, "psnr": 9.5},
        )
        _run(tmp_path / "cells" / cell)
    (tmp_path / "cells" / "broken-s0").mkdir()  # a cell that never started: no meta.json
    sweep = results.load(tmp_path)
    assert sweep.results["strength"].tolist() == ["", "1e-05"]  # text, as the sweep writes it
    assert sweep.meta.index.tolist() == ["noise-1e-05-s0", "none-s0"]
    assert sweep.utility.columns[0] == "cell" and len(sweep.utility) == 6
    assert set(sweep.utility["cell"]) == {"none-s0", "noise-1e-05-s0"}


def test_an_interrupted_writer_reads_interrupted(tmp_path):
    store = _run(tmp_path)
    store.update_meta(status="running", pid=2**22 + 12345, host=__import__("socket").gethostname())
    assert results.load(tmp_path).meta.loc[0, "status"] == "interrupted"


def test_missing_files_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"neither a run directory .* nor a sweep directory"):
        results.load(tmp_path)
    (tmp_path / "sweep.toml").write_text("")
    with pytest.raises(ConfigError, match=r"No results.csv at .*results.csv: .*fedleak bench"):
        results.load(tmp_path)
    run = tmp_path / "run"
    RunStore(run).write_text("config.toml", "")
    with pytest.raises(ConfigError, match="fedleak attack RUN_DIR"):
        results.load(run)
    with pytest.raises(ConfigError, match=f"No utility.csv at {run / 'utility.csv'}"):
        results.read(run / "utility.csv")


@pytest.mark.parametrize(("sweep", "drops"), [("digits", []), ("cifar10", [2.0, 5.0, 10.0])])
def test_committed_sweep_reports_regenerate_byte_for_byte(tmp_path, sweep, drops):
    committed = COMMITTED / "privacy_utility" / sweep
    for name in ("results.csv", "sweep.toml"):
        shutil.copy(committed / name, tmp_path / name)
    md, _ = report.render(tmp_path, drops or report.DROPS)
    assert md.read_bytes() == (committed / "report.md").read_bytes()


def _script(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import _bench beside them
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(page: str, start: str, end: str) -> list[str]:
    lines = page.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    return lines[first : next(i for i, line in enumerate(lines) if line.startswith(end))]


def test_committed_vision_tables_regenerate_from_their_runs(tmp_path, monkeypatch):
    """The summary CSV byte for byte, and the page's table and verdict (the rest of the page
    states the machine and the data, which a rerun measures anew)."""
    script = _script("vision_attacks", monkeypatch)
    rows = results.read(COMMITTED / script.RUNS)
    facts = dict.fromkeys(("load", "images", "pool", "breaching", "reference"), "")
    cfg = script.settings(script.DEFAULT_CONFIG, steps=200)
    page = script.write_tables(tmp_path, cfg, rows, facts)
    summary = (tmp_path / script.SUMMARY).read_bytes()
    assert summary == (COMMITTED / script.SUMMARY).read_bytes()
    committed = (COMMITTED / script.PAGE).read_text()
    assert _section(page, "| attack |", "(± the") == _section(committed, "| attack |", "(± the")


def test_literature_verdict_checks_that_settings_targets(monkeypatch, data_root):
    """The literature page judges its own criteria (best attack at B = 1, IG over the mean
    colour), not the train-mode page's 25 dB for IG, and names the cells it did not run."""
    script = _script("vision_attacks", monkeypatch)
    folder = COMMITTED / "vision_literature"
    rows = results.read(folder / script.RUNS)
    cfg = script.settings(script.HERE / "vision_literature.toml", data_root=str(data_root))
    summary = script.summarise(rows, cfg)
    images, _, _ = script.load_images(cfg)
    no_attack = script.no_attack_scores(cfg, images)
    lines = script.verdict(summary, rows, cfg, {b: s["psnr"] for b, s in no_attack.items()})
    assert lines[0].startswith("- best honest optimisation attack at B = 1, untrained: dlg ")
    assert "B = 1: +7.47, B = 4: +3.89 dB (target: >= +5 dB)" in lines[1]
    assert not any("target >= 25" in line for line in lines)
    assert "inverting_gradients (untrained) at B = 16" in script.not_run(summary, cfg)
    page = (folder / script.PAGE).read_text()
    assert all(line in page for line in lines)


def test_committed_robust_pruning_page_regenerates_from_its_runs(tmp_path, monkeypatch):
    """Every table and verdict line of the page from the three runs files (the last line states
    the machine's load when the page was written)."""
    page = _script("robust_pruning/page", monkeypatch)
    committed = COMMITTED / "robust_pruning"
    for runs in committed.glob("*_runs.csv"):
        shutil.copy(runs, tmp_path / runs.name)
    text = page.write_page(tmp_path)
    assert text.splitlines()[:-1] == (committed / "robust_pruning.md").read_text().splitlines()[:-1]
    assert "randomized minus deterministic dev accuracy per seed" in text


def test_committed_text_tables_regenerate_from_their_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    script = _script("text_attacks", monkeypatch)
    cfg = script._bench.load_config(script.DEFAULT_CONFIG)
    rows = results.read(COMMITTED / script.RUNS)
    summary = script.summarise(rows, cfg)
    script._bench.write_csv(tmp_path / "t.csv", summary.to_dict("records"), script.SUMMARY_FIELDS)
    assert (tmp_path / "t.csv").read_bytes() == (COMMITTED / script.SUMMARY).read_bytes()
    verdict = script.verdict(summary, rows, cfg)
    committed = (COMMITTED / script.PAGE).read_text().splitlines()
    assert verdict == [line for line in committed if line.startswith(("- ", "(Differences"))]


def test_a_meta_json_is_flattened(tmp_path):
    _run(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"status": "failed", "versions": {"t": "2"}}))
    meta = results.load(tmp_path).meta
    assert meta.loc[0, "versions.t"] == "2" and meta.loc[0, "status"] == "failed"


def test_spread_is_the_sample_standard_deviation_of_the_finite_values():
    values = pd.Series([1.0, 2.0, float("nan"), 4.0])
    assert results.spread(values) == pytest.approx(1.5275252316519468)
    assert math.isnan(results.spread(pd.Series([3.0, float("nan")])))
