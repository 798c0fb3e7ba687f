"""Tables and a plot from a sweep's results: privacy against utility, and at equal utility.

``fedleak report DIR`` reads ``DIR/results.csv`` (written by ``fedleak bench``; its columns:
:mod:`fedleak.results`) with pandas and writes ``DIR/report.md`` and
``DIR/privacy_utility.png``:

* one row per defense × strength, averaged over seeds: test accuracy, accuracy drop against
  the undefended run of the same seed, and the strongest attack's privacy scores (per cell the
  maximum over attacks of each metric's mean over the attacked views; then the mean over seeds),
  next to Paper B's MSE lower bound and DP-SGD's ε where they apply;
* the **equal-utility view** of Paper A (Liu et al., "Data Reconstruction Attacks and Defenses:
  A Systematic Evaluation"): every defense scored by its strongest attack at the same accuracy
  drop.  Each defense's curve runs from the undefended run (drop 0) through its strengths in the
  sweep's order (weakest first); at a target drop U the privacy is interpolated linearly (in the
  drop) on the first segment that reaches U.  A curve that is not monotone is still walked in
  strength order, so the weakest setting that costs U is the one scored; a defense that never
  costs U is "not reached".  Lower PSNR at equal drop = better defense;
* a PNG of the strongest attack's PSNR against the accuracy drop, one line per defense.

Drops are in percentage points of test accuracy (1 = one point, e.g. 0.91 -> 0.90).
"""

from __future__ import annotations

import itertools
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedleak import results
from fedleak.registry import ConfigError

DROPS = (1.0, 2.0, 5.0)  # percentage points, Paper A's and the notes' default targets
NONE = "none"
_CELL = ("defense", "strength", "parameter", "test_accuracy", "accuracy_drop")  # per cell


@dataclass(frozen=True)
class AtDrop:
    """A defense interpolated to a target accuracy drop."""

    privacy: float  # interpolated strongest-attack PSNR
    lower: int  # the curve segment used: between points lower and lower + 1
    fraction: float  # where on it, 0..1


def at_drop(curve: Sequence[tuple[float, float]], target: float) -> AtDrop | None:
    """Privacy of a ``(drop, privacy)`` curve at accuracy drop ``target``; None: not reached.

    The curve is in strength order (weakest first, the undefended point first).  The first
    segment ``i, i+1`` with ``drop_i < target <= drop_{i+1}`` is interpolated linearly; a point
    at exactly ``target`` is its own answer; points with a NaN drop are skipped.  None when no
    point reaches ``target``.
    """
    points = [(i, d, p) for i, (d, p) in enumerate(curve) if not math.isnan(d)]
    if not points:
        return None
    if points[0][1] >= target:  # already there at the weakest point
        return AtDrop(points[0][2], points[0][0], 0.0)
    for (i, d0, p0), (_, d1, p1) in itertools.pairwise(points):
        if d0 < target <= d1:
            t = (target - d0) / (d1 - d0)
            return AtDrop(p0 + t * (p1 - p0), i, t)
    return None


def load(directory: str | Path) -> pd.DataFrame:
    """``DIR/results.csv`` (:func:`fedleak.results.read`), refused while it has no rows."""
    path = Path(directory) / "results.csv"
    rows = results.read(path)
    if rows.empty:
        raise ConfigError(f"{path} has no rows yet; no cell of the sweep has finished.")
    return rows


def points(rows: pd.DataFrame, order: Sequence[tuple[str, str]] = ()) -> pd.DataFrame:
    """One row per (defense, strength), in ``order`` (then first appearance), the reference first.

    Columns: defense, strength (as results.csv writes it, "" for the reference), parameter,
    seeds, accuracy, drop (percentage points), psnr, ssim, label_acc (each the maximum over the
    cell's attacks, then the mean over seeds), drop_sd and psnr_sd (their spread over seeds,
    NaN for one seed), strongest (the attack with the highest PSNR in
    most seeds), mse (the strongest attack's), mse_lower_bound and epsilon (NaN where they do
    not apply).  NaN never wins a maximum and means skip it.
    """
    by_cell = rows.groupby("cell", sort=False)
    strongest = rows.loc[rows["psnr"].fillna(-math.inf).groupby(rows["cell"]).idxmax()]
    cells = (
        rows.drop_duplicates("cell")  # what a cell's attack rows share: its first row's
        .set_index("cell")
        # a column results.csv lacks (written before the bound and ε were recorded) reads NaN
        .reindex(columns=[*_CELL, "mse_lower_bound", "epsilon"])
        .assign(
            **by_cell[["psnr", "ssim", "label_acc"]].max(),
            strongest=strongest.set_index("cell")["attack"],
            mse=strongest.set_index("cell")["mse"],
        )
    )
    summary = cells.groupby(["defense", "strength"], sort=False).agg(
        parameter=("parameter", "first"),
        seeds=("psnr", "size"),
        accuracy=("test_accuracy", results.mean),
        drop=("accuracy_drop", results.mean),
        drop_sd=("accuracy_drop", results.spread),
        psnr=("psnr", results.mean),
        psnr_sd=("psnr", results.spread),
        ssim=("ssim", results.mean),
        label_acc=("label_acc", results.mean),
        strongest=("strongest", lambda names: names.value_counts(sort=False).idxmax()),
        mse=("mse", results.mean),
        mse_lower_bound=("mse_lower_bound", results.mean),
        epsilon=("epsilon", results.mean),
    )
    summary[["drop", "drop_sd"]] *= 100
    rank = {key: i for i, key in enumerate(order)}
    keys = [(key[0] != NONE, rank.get(key, len(rank))) for key in summary.index]
    return summary.iloc[sorted(range(len(keys)), key=keys.__getitem__)].reset_index()


def curves(summary: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each defense's points in strength order, the undefended point first."""
    reference = summary[summary.defense == NONE]
    defended = summary[summary.defense != NONE].groupby("defense", sort=False)
    return {name: pd.concat([reference, points]) for name, points in defended}


def equal_utility(
    summary: pd.DataFrame, drops: Sequence[float] = DROPS
) -> dict[str, list[AtDrop | None]]:
    """Each defense's strongest-attack PSNR at each target drop (None: not reached)."""
    return {
        name: [at_drop(list(zip(curve["drop"], curve["psnr"], strict=True)), u) for u in drops]
        for name, curve in curves(summary).items()
    }


def render(directory: str | Path, drops: Sequence[float] = DROPS) -> tuple[Path, Path]:
    """Write ``report.md`` and ``privacy_utility.png`` into ``directory``; return their paths."""
    directory = Path(directory)
    if not drops or any(not math.isfinite(u) for u in drops):
        raise ConfigError(f"drops must be finite numbers of percentage points, got {list(drops)}")
    rows = load(directory)
    sweep = _sweep(directory)
    summary = points(rows, _order(sweep))
    png = plot(summary, directory / "privacy_utility.png", drops)
    md = directory / "report.md"
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(markdown(summary, drops, sweep, png.name))
    tmp.replace(md)
    return md, png


def markdown(summary: pd.DataFrame, drops: Sequence[float], sweep: dict, image: str = "") -> str:
    """The report as Markdown text."""
    lines = [f"# Privacy–utility sweep: {sweep.get('name', '')}".rstrip(": "), ""]
    if sweep.get("description"):
        lines += [sweep["description"], ""]
    base = sweep.get("base", {})
    if base:
        attacks = ", ".join(
            a["name"] + "".join(f" {k}={v}" for k, v in a.items() if k == "steps")
            for a in base.get("attacks", [])
        )
        data, model = base.get("data", {}), base.get("model", {})
        lines += [
            f"Base: {data.get('name', '?')}, {model.get('name', '?')}, "
            f"{base.get('rounds', '?')} rounds of {base.get('clients_per_round', '?')} of "
            f"{base.get('clients', '?')} clients, training {_training(base)}; attacks: {attacks}; "
            f"seeds {sweep.get('seeds', '?')}.",
            "",
        ]
    lines += [
        "## Every setting",
        "",
        "Accuracy and drop (percentage points against the undefended run of the same seed) after "
        "the last round; privacy is the strongest attack's: per run the maximum over attacks of "
        "each metric (its mean over the attacked views), then the mean over seeds; ± is the "
        "standard deviation over seeds. Lower PSNR / SSIM / label accuracy = more private. MSE "
        "is the strongest attack's; the bound is Paper B's lower bound on any attack's MSE "
        "(noise defenses only).",
        "",
        "| defense | strength | seeds | test acc | drop (pp) | PSNR (dB) | SSIM | label acc "
        "| strongest | MSE | MSE bound | ε |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in summary.itertuples():
        strength = f"{p.parameter} = {p.strength}" if p.parameter else "—"
        lines.append(
            f"| {p.defense} | {strength} | {p.seeds} | {p.accuracy:.4f} "
            f"| {p.drop:+.2f}{_sd(p.drop_sd)} | {p.psnr:.2f}{_sd(p.psnr_sd)} | {p.ssim:.3f} "
            f"| {_fmt(p.label_acc, '.2f')} | {p.strongest} "
            f"| {_fmt(p.mse, '.4g')} | {_fmt(p.mse_lower_bound, '.4g')} "
            f"| {_fmt(p.epsilon, '.3g')} |"
        )
    table = equal_utility(summary, drops)
    reference = next(summary[summary.defense == NONE].itertuples(), None)
    lines += [
        "",
        "## At equal utility (Paper A)",
        "",
        "The strongest attack's PSNR (dB) with each defense tuned to cost the same accuracy: "
        "interpolated linearly along the defense's strength curve (from the undefended run, "
        "weakest strength first) at the first crossing of the target drop. Lower = more private; "
        "the best defense at each drop is in bold. *not reached*: the strongest setting swept "
        "costs less accuracy than that.",
        "",
        "| defense | " + " | ".join(f"drop {u:g} pp" for u in drops) + " | largest drop swept |",
        "|---|" + "---|" * (len(drops) + 1),
    ]
    if reference:
        lines.append(
            f"| none (drop {reference.drop:.0f}) | "
            + " | ".join(f"{reference.psnr:.2f}" for _ in drops)
            + " | — |"
        )
    best = [
        min(
            (v[i].privacy for v in table.values() if v[i] is not None),
            default=math.nan,
        )
        for i in range(len(drops))
    ]
    all_curves = curves(summary)
    for name, values in table.items():
        cells = []
        for i, value in enumerate(values):
            if value is None:
                cells.append("not reached")
                continue
            curve = all_curves[name]
            where = curve["strength"].iloc[value.lower] or NONE
            if value.fraction:  # between two swept strengths
                where += f"–{curve['strength'].iloc[value.lower + 1]}"
            text = f"{value.privacy:.2f} ({curve['parameter'].iloc[-1]} {where})"
            cells.append(f"**{text}**" if value.privacy == best[i] else text)
        largest = summary.loc[summary.defense == name, "drop"].max()
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {largest:+.2f} |")
    if image:
        lines += ["", f"![privacy against utility]({image})", ""]
    return "\n".join(lines) + "\n"


def plot(summary: pd.DataFrame, path: Path, drops: Sequence[float] = DROPS) -> Path:
    """The strongest attack's PSNR against accuracy drop, one line per defense (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            'the report plot needs matplotlib: pip install "fedleak[bench]"'
        ) from None
    figure, axes = plt.subplots(figsize=(8, 5.5))
    for name, curve in curves(summary).items():
        (line,) = axes.plot(curve["drop"], curve["psnr"], marker="o", label=name)
        for p in curve.iloc[1:].itertuples():
            axes.annotate(
                p.strength,
                (p.drop, p.psnr),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=line.get_color(),
            )
    reference = next(summary[summary.defense == NONE].itertuples(), None)
    if reference:
        axes.plot(
            [reference.drop],
            [reference.psnr],
            marker="*",
            markersize=14,
            color="black",
            linestyle="none",
            label="none (undefended)",
        )
    for u in drops:
        axes.axvline(u, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("test accuracy drop (percentage points)")
    axes.set_ylabel("strongest attack's PSNR (dB), lower = more private")
    axes.set_title("Privacy against utility")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    tmp.replace(path)
    return path


def _sweep(directory: Path) -> dict:
    path = directory / "sweep.toml"
    return tomllib.loads(path.read_text()) if path.is_file() else {}


def _order(sweep: dict) -> list[tuple[str, str]]:
    """(label, strength as results.csv writes it) in the sweep's order, weakest first."""
    return [
        (axis["label"], str(value)) for axis in sweep.get("defense", []) for value in axis["values"]
    ]


def _training(base: dict) -> str:
    t = base.get("training", {})
    return f"{t.get('name', '?')} lr {t.get('lr', '?')} batch {t.get('batch_size', '?')}"


def _sd(value: float) -> str:
    """`` ± sd`` over seeds, nothing for a single seed."""
    return "" if math.isnan(value) else f" ± {value:.2f}"


def _fmt(value: float, spec: str) -> str:
    return "—" if math.isnan(value) else format(value, spec)
