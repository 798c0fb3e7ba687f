"""fedleak bench / report: a tiny real sweep, resuming, up-front errors, the equal-utility maths."""

import csv
import math
import os
import tomllib

import pytest
import tomli_w

from fedleak import bench, pipeline, report
from fedleak.cli import main
from fedleak.report import at_drop

# The tiny style of tests/conftest.py, on digits: 4 clients, 2 rounds, one observed update.
BASE = {
    "name": "tiny-bench",
    "seed": 0,
    "rounds": 2,
    "clients": 4,
    "clients_per_round": 2,
    "data": {"name": "digits"},
    "model": {"name": "mlp", "hidden": [16], "activation": "sigmoid"},
    "training": {"name": "sgd", "lr": 0.5, "batch_size": 4},
    "observe": {"rounds": [1], "clients_per_round": 1},
    "attacks": [{"name": "dlg", "steps": 2, "max_iter": 2}],
}
SWEEP = {
    "name": "tiny",
    "seeds": [0],
    "base": BASE,
    "defense": [
        {"name": "gaussian_noise", "vary": "std", "values": [0.001, 0.1]},
        {"name": "gradient_pruning", "vary": "amount", "values": [0.5, 0.9]},
    ],
}


def _write(tmp_path, sweep=SWEEP, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(tomli_w.dumps(sweep))
    return path


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def runs(monkeypatch):
    """Counts pipeline.run calls (cells federated from scratch), passing them through."""
    calls = []
    real = pipeline.run

    def counted(exp, out=None):
        calls.append(exp.federation.name)
        return real(exp, out)

    monkeypatch.setattr(pipeline, "run", counted)
    return calls


def test_smallest_sweep_runs_then_skips_its_finished_cells(tmp_path, runs, capsys):
    small = {**SWEEP, "defense": [SWEEP["defense"][0] | {"values": [0.1]}]}
    sweep, out = _write(tmp_path, small), tmp_path / "out"
    out.mkdir()
    (out / "bench.lock").write_text(str(os.getpid()))  # another live sweep holds the directory
    assert main(["bench", str(sweep), "--out", str(out), "-o", "rounds=1"]) == 2
    assert "being written by another fedleak bench" in capsys.readouterr().err and runs == []
    (out / "bench.lock").write_text("999999999")  # left by a process that died: taken over
    assert main(["bench", str(sweep), "--out", str(out), "-o", "rounds=1"]) == 0
    assert not (out / "bench.lock").exists()
    assert runs == ["none-s0", "gaussian_noise-0.1-s0"]
    rows = _rows(out / "results.csv")
    assert [r["cell"] for r in rows] == runs and rows[1]["mse_lower_bound"] != ""
    assert float(rows[1]["accuracy_drop"]) == pytest.approx(
        float(rows[0]["test_accuracy"]) - float(rows[1]["test_accuracy"]), abs=1e-6
    )
    assert (out / "report.md").is_file() and (out / "privacy_utility.png").is_file()
    stamp = (out / "results.csv").stat().st_mtime_ns
    assert main(["bench", str(sweep), "--out", str(out), "-o", "rounds=1"]) == 0
    assert len(runs) == 2 and (out / "results.csv").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_tiny_sweep_rows_report_and_resume(tmp_path, runs, capsys):
    sweep, out = _write(tmp_path), tmp_path / "out"
    assert main(["bench", str(sweep), "--out", str(out)]) == 0, capsys.readouterr().err
    ids = ["none-s0", "gaussian_noise-0.001-s0", "gaussian_noise-0.1-s0"]
    ids += ["gradient_pruning-0.5-s0", "gradient_pruning-0.9-s0"]
    assert runs == ids  # the reference first, then axis by axis in the file's order
    rows = _rows(out / "results.csv")
    assert [r["cell"] for r in rows] == ids  # one attack: one row per cell
    reference = float(rows[0]["test_accuracy"])
    for row in rows:
        assert row["attack"] == "dlg" and row["views"] == "1" and row["seed"] == "0"
        assert float(row["reference_accuracy"]) == reference
        drop = float(row["accuracy_drop"])
        assert drop == pytest.approx(reference - float(row["test_accuracy"]), abs=1e-6)
        assert float(row["max_psnr"]) == float(row["psnr"])  # one attack: it is the strongest
        assert float(row["mse"]) >= 0 and math.isfinite(float(row["psnr"]))
        meta = (out / "cells" / row["cell"] / "meta.json").read_text()
        assert '"status": "done"' in meta
    assert rows[0]["defense"] == "none" and rows[0]["strength"] == "" and rows[0]["parameter"] == ""
    assert [r["strength"] for r in rows[1:]] == ["0.001", "0.1", "0.5", "0.9"]
    # Paper B's bound exists for the noise cells only, and grows with the noise
    bounds = [r["mse_lower_bound"] for r in rows]
    assert bounds[0] == bounds[3] == bounds[4] == ""
    assert 0 < float(bounds[1]) < float(bounds[2])
    assert float(bounds[2]) <= float(rows[2]["mse"]) * 1.0001  # the attack cannot beat it (B=4)
    text = (out / "report.md").read_text()
    assert "| gaussian_noise | std = 0.1 |" in text and "At equal utility" in text
    assert (out / "privacy_utility.png").read_bytes()[:4] == b"\x89PNG"

    # Again: every cell is finished, nothing is federated or attacked again.
    before = (out / "results.csv").read_text()
    assert main(["bench", str(sweep), "--out", str(out)]) == 0
    assert len(runs) == 5 and (out / "results.csv").read_text() == before

    # A cell killed during its federation is restarted; one killed while attacking is resumed.
    _forget(out, "gaussian_noise-0.1-s0", status="running", server_done=False)
    _forget(out, "gradient_pruning-0.5-s0", status="failed", server_done=True)
    assert main(["bench", str(sweep), "--out", str(out)]) == 0
    assert runs[5:] == ["gaussian_noise-0.1-s0"]
    again = _rows(out / "results.csv")
    assert sorted(r["cell"] for r in again) == sorted(ids)
    pruned = next(r for r in again if r["cell"] == "gradient_pruning-0.5-s0")
    assert pruned["psnr"] == next(r for r in rows if r["cell"] == pruned["cell"])["psnr"]

    # An attack appended to the base runs on the stored views only.
    grown = {**SWEEP, "base": {**BASE, "attacks": [*BASE["attacks"], {"name": "dlg", "steps": 1}]}}
    assert main(["bench", str(_write(tmp_path, grown)), "--out", str(out)]) == 0
    assert len(runs) == 6
    final = _rows(out / "results.csv")
    assert len(final) == 10 and sorted({r["cell"] for r in final}) == sorted(ids)
    for cell in ids:
        mine = [r for r in final if r["cell"] == cell]
        assert [r["attack_index"] for r in mine] == ["0", "1"]
        best = max(float(r["psnr"]) for r in mine)
        assert all(float(r["max_psnr"]) == best for r in mine)

    # A sweep stored before a table existed (here [server]) resumes: the table's default holds.
    stored = tomllib.loads((out / "sweep.toml").read_text())
    del stored["base"]["server"]
    (out / "sweep.toml").write_text(tomli_w.dumps(stored))
    assert main(["bench", str(_write(tmp_path, grown)), "--out", str(out)]) == 0
    assert len(runs) == 6

    # A changed base is refused instead of mixed into the old results.
    changed = {**SWEEP, "base": {**BASE, "rounds": 3}}
    assert main(["bench", str(_write(tmp_path, changed)), "--out", str(out)]) == 2
    assert "differs in 'rounds'" in capsys.readouterr().err


def _forget(out, cell, status, server_done):
    """Make ``cell`` look interrupted: status not done, its rows gone from results.csv."""
    import json

    meta_path = out / "cells" / cell / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["status"] = status
    if not server_done:
        meta.pop("server", None)
    else:  # the federation finished, the attack did not
        (out / "cells" / cell / "results.csv").unlink()
    meta_path.write_text(json.dumps(meta))
    rows = [r for r in _rows(out / "results.csv") if r["cell"] != cell]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _axis(**changes):
    return {"name": "gaussian_noise", "vary": "std", "values": [0.01], **changes}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"defense": [_axis(name="gausian_noise")]}, "Did you mean 'gaussian_noise'"),
        ({"defense": [_axis(vary="sdt")]}, "vary = 'sdt'.*Did you mean 'std'"),
        ({"defense": [_axis(values=[0.01, -1.0])]}, r"std must be >= 0.*values\[1\] = -1.0"),
        ({"defense": [_axis(values=[])]}, "values must be a non-empty array"),
        ({"defense": [_axis(), _axis(values=[0.1])]}, "label 'gaussian_noise' is taken"),
        ({"defense": [_axis(name="none")]}, "reference is part of every sweep"),
        ({"defense": [_axis(options={"std": 1.0})]}, "options sets 'std'"),
        ({"defense": [_axis(option={"x": 1})]}, "no key 'option'.*Did you mean 'options'"),
        ({"defense": []}, "no \\[\\[defense\\]\\] tables"),
        ({"seed": [0]}, "Unknown sweep key 'seed'.*Did you mean 'seeds'"),
        ({"seeds": [0, 0]}, "repeat a seed"),
        ({"base": {**BASE, "attacks": []}}, "no \\[\\[attacks\\]\\]"),
        ({"base": {**BASE, "rounds": 0}}, r"\[base\].*rounds must be >= 1"),
        ({"base": "missing.toml"}, "no file"),
        (
            {
                "base": {**BASE, "model": {"name": "convnet", "width": 1, "norm": "batch"}},
                "defense": [{"name": "dpsgd", "vary": "noise_multiplier", "values": [1.0]}],
            },
            r"cell dpsgd-1-s0: \[defenses.0\] dpsgd: .*BatchNorm",
        ),
    ],
)
def test_bad_sweeps_fail_before_any_training(tmp_path, runs, change, message):
    sweep = _write(tmp_path, {**SWEEP, **change})
    with pytest.raises(Exception, match=message) as err:
        bench.load(sweep)
    assert type(err.value).__name__ == "ConfigError"
    assert main(["bench", str(sweep), "--out", str(tmp_path / "out")]) == 2
    assert runs == [] and not (tmp_path / "out").exists()


def test_overrides_reach_the_base_and_the_grid(tmp_path):
    sweep = bench.load(
        _write(tmp_path),
        ["rounds=1", "attacks.0.steps=1", "seeds=[3, 4]", "defense.1.values=[0.2]"],
    )
    assert sweep.seeds == (3, 4)
    cells = [c.id for c in sweep.cells()]
    assert cells[:2] == ["none-s3", "none-s4"] and "gradient_pruning-0.2-s4" in cells
    assert len(cells) == 2 + 2 * 2 + 1 * 2
    exp = sweep.experiments["gaussian_noise-0.1-s4"]
    assert exp.federation.rounds == 1 and exp.seed == 4 and exp.attacks[0].steps == 1
    assert [d.name for d in exp.defenses] == ["gaussian_noise"] and exp.defenses[0].std == 0.1


def test_dry_run_lists_the_cells(tmp_path, runs, capsys):
    assert main(["bench", str(_write(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 cells, all checked" in out and "gradient_pruning-0.9-s0" in out and runs == []


# -- the equal-utility interpolation, on hand-made curves ------------------------------------


def test_interpolates_on_the_first_segment_reaching_the_drop():
    curve = [(0.0, 40.0), (0.5, 30.0), (3.0, 10.0), (8.0, 5.0)]
    one = at_drop(curve, 1.0)
    assert (one.lower, one.fraction) == (1, pytest.approx(0.2))
    assert one.privacy == pytest.approx(30 - 0.2 * 20)
    assert at_drop(curve, 3.0).privacy == pytest.approx(10.0)  # exactly on a point
    assert at_drop(curve, 5.0).privacy == pytest.approx(10 - 0.4 * 5)
    assert at_drop(curve, 8.5) is None  # never costs that much: not reached


def test_non_monotone_curves_use_the_weakest_setting_that_costs_the_drop():
    # The drop rises, falls back (seed noise), rises again.
    curve = [(0.0, 40.0), (2.5, 20.0), (1.0, 25.0), (6.0, 8.0)]
    assert at_drop(curve, 2.0).privacy == pytest.approx(40 - 0.8 * 20)  # first crossing
    # 4 pp: not between 2.5 and 1.0 (falling), but between 1.0 and 6.0
    four = at_drop(curve, 4.0)
    assert four.lower == 2 and four.privacy == pytest.approx(25 - 0.6 * 17)
    # a drop below zero (defense helped) before the crossing is fine
    assert at_drop([(0.0, 40.0), (-1.0, 35.0), (1.0, 15.0)], 0.5).privacy == pytest.approx(20.0)


def test_nan_points_are_skipped_and_empty_curves_never_reach():
    assert at_drop([(0.0, 40.0), (math.nan, 1.0), (2.0, 20.0)], 1.0).privacy == pytest.approx(30)
    assert at_drop([], 1.0) is None
    assert at_drop([(0.0, 40.0)], 1.0) is None


def _row(cell, defense, strength, seed, attack, acc, drop, psnr, ssim, label=1.0, **extra):
    return {
        "cell": cell,
        "defense": defense,
        "parameter": "" if defense == "none" else "std",
        "strength": strength,
        "seed": str(seed),
        "attack": attack,
        "test_accuracy": str(acc),
        "accuracy_drop": str(drop),
        "psnr": str(psnr),
        "ssim": str(ssim),
        "label_acc": str(label),
        "mse": str(10 ** (-psnr / 10)),
        **extra,
    }


def test_points_take_the_strongest_attack_per_run_then_the_mean_over_seeds(tmp_path):
    rows = [
        _row("none-s0", "none", "", 0, "a", 0.90, 0.0, 40, 0.9),
        _row("none-s0", "none", "", 0, "b", 0.90, 0.0, 30, 0.95),
        _row("none-s1", "none", "", 1, "a", 0.92, 0.0, 50, 0.8),
        _row("none-s1", "none", "", 1, "b", 0.92, 0.0, 20, 0.7),
        _row("n-0.1-s0", "n", "0.1", 0, "a", 0.88, 0.02, 10, 0.2, mse_lower_bound="0.01"),
        _row("n-0.1-s0", "n", "0.1", 0, "b", 0.88, 0.02, 12, 0.1, mse_lower_bound="0.01"),
        _row("n-0.1-s1", "n", "0.1", 1, "a", 0.88, 0.04, 14, 0.3, mse_lower_bound="0.03"),
        _row("n-0.1-s1", "n", "0.1", 1, "b", 0.88, 0.04, 8, 0.1, mse_lower_bound="0.03"),
        _row("n-1-s0", "n", "1", 0, "a", 0.80, 0.10, 5, 0.05),
    ]
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, [*rows[0], "mse_lower_bound"], restval="")
        writer.writeheader()
        writer.writerows(rows)
    summary = report.points(report.load(tmp_path), order=[("n", "0.1"), ("n", "1")])
    none, weak, strong = summary.itertuples()
    assert none.defense == "none" and none.seeds == 2
    assert none.psnr == pytest.approx((40 + 50) / 2)  # per run max over attacks, then mean
    assert none.ssim == pytest.approx((0.95 + 0.8) / 2)  # each metric's own max
    assert weak.drop == pytest.approx(3.0) and weak.psnr == pytest.approx((12 + 14) / 2)
    assert weak.mse_lower_bound == pytest.approx(0.02) and math.isnan(weak.epsilon)
    assert strong.seeds == 1 and strong.drop == pytest.approx(10.0)
    table = report.equal_utility(summary, [1.0, 2.0, 20.0])
    assert table["n"][0].privacy == pytest.approx(45 - (1 / 3) * (45 - 13))
    assert table["n"][2] is None
    text = report.markdown(summary, [1.0, 2.0, 20.0], {"name": "hand"})
    assert "not reached" in text and "| n | std = 0.1 | 2 |" in text

    # render works from the CSV alone (no sweep.toml), and names a missing one clearly
    md, png = report.render(tmp_path, [1.0, 2.0])
    assert md.read_text().count("| n |") == 3 and png.stat().st_size > 1000  # 2 settings + 1
    assert main(["report", str(tmp_path / "nowhere")]) == 2
