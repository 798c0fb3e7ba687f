"""Tables and a plot from a sweep's results: privacy against utility, and at equal utility.

``fedleak report DIR`` reads ``DIR/results.csv`` (written by ``fedleak bench``, see
:mod:`fedleak.bench`) and writes ``DIR/report.md`` and ``DIR/privacy_utility.png``:

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

import csv
import itertools
import math
import statistics
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedleak.registry import ConfigError

DROPS = (1.0, 2.0, 5.0)  # percentage points, Paper A's and the notes' default targets
NONE = "none"


@dataclass(frozen=True)
class Point:
    """One defense at one strength, averaged over its seeds."""

    defense: str  # the sweep's label ("none" for the reference)
    parameter: str
    strength: str  # as written in results.csv ("" for the reference)
    seeds: int
    accuracy: float
    drop: float  # percentage points
    psnr: float  # strongest attack (max over attacks), dB
    ssim: float
    label_acc: float
    strongest: str  # the attack with the highest PSNR most often
    mse: float  # the strongest attack's MSE (its mean over views)
    mse_lower_bound: float  # Paper B's bound (NaN when it does not apply)
    epsilon: float  # DP-SGD's ε (NaN without DP-SGD)


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


def load(directory: str | Path) -> list[dict[str, str]]:
    """The rows of ``DIR/results.csv``."""
    path = Path(directory) / "results.csv"
    if not path.is_file():
        raise ConfigError(
            f"No results at {path}; run `fedleak bench SWEEP.toml --out {directory}`."
        )
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError(f"{path} has no rows yet; no cell of the sweep has finished.")
    return rows


def points(rows: Sequence[dict[str, str]], order: Sequence[tuple[str, str]] = ()) -> list[Point]:
    """One :class:`Point` per (defense, strength), in ``order`` (then first appearance)."""
    cells: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        cells.setdefault(row["cell"], []).append(row)
    groups: dict[tuple[str, str], list[list[dict[str, str]]]] = {}
    for attack_rows in cells.values():
        first = attack_rows[0]
        groups.setdefault((first["defense"], first["strength"]), []).append(attack_rows)
    rank = {key: i for i, key in enumerate(order)}
    keys = sorted(groups, key=lambda k: (k[0] != NONE, rank.get(k, len(rank))))
    out = []
    for key in keys:
        runs = groups[key]
        strongest = [max(r, key=lambda x: _key(_float(x["psnr"]))) for r in runs]
        names = [s["attack"] for s in strongest]
        out.append(
            Point(
                defense=key[0],
                parameter=runs[0][0]["parameter"],
                strength=key[1],
                seeds=len(runs),
                accuracy=_mean(_float(r[0]["test_accuracy"]) for r in runs),
                drop=100 * _mean(_float(r[0]["accuracy_drop"]) for r in runs),
                psnr=_mean(_best(r, "psnr") for r in runs),
                ssim=_mean(_best(r, "ssim") for r in runs),
                label_acc=_mean(_best(r, "label_acc") for r in runs),
                strongest=max(set(names), key=names.count),
                mse=_mean(_float(s["mse"]) for s in strongest),
                mse_lower_bound=_mean(_float(r[0].get("mse_lower_bound", "")) for r in runs),
                epsilon=_mean(_float(r[0].get("epsilon", "")) for r in runs),
            )
        )
    return out


def curves(summary: Sequence[Point]) -> dict[str, list[Point]]:
    """Each defense's points in strength order, the undefended point first."""
    reference = [p for p in summary if p.defense == NONE]
    out: dict[str, list[Point]] = {}
    for p in summary:
        if p.defense != NONE:
            out.setdefault(p.defense, list(reference)).append(p)
    return out


def equal_utility(
    summary: Sequence[Point], drops: Sequence[float] = DROPS
) -> dict[str, list[AtDrop | None]]:
    """Each defense's strongest-attack PSNR at each target drop (None: not reached)."""
    return {
        name: [at_drop([(p.drop, p.psnr) for p in curve], u) for u in drops]
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


def markdown(summary: Sequence[Point], drops: Sequence[float], sweep: dict, image: str = "") -> str:
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
        "each metric (its mean over the attacked views), then the mean over seeds. Lower PSNR / "
        "SSIM / label accuracy = more private. MSE is the strongest attack's; the bound is Paper "
        "B's lower bound on any attack's MSE (noise defenses only).",
        "",
        "| defense | strength | seeds | test acc | drop (pp) | PSNR (dB) | SSIM | label acc "
        "| strongest | MSE | MSE bound | ε |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in summary:
        strength = f"{p.parameter} = {p.strength}" if p.parameter else "—"
        lines.append(
            f"| {p.defense} | {strength} | {p.seeds} | {p.accuracy:.4f} | {p.drop:+.2f} "
            f"| {p.psnr:.2f} | {p.ssim:.3f} | {_fmt(p.label_acc, '.2f')} | {p.strongest} "
            f"| {_fmt(p.mse, '.4g')} | {_fmt(p.mse_lower_bound, '.4g')} "
            f"| {_fmt(p.epsilon, '.3g')} |"
        )
    table = equal_utility(summary, drops)
    reference = next((p for p in summary if p.defense == NONE), None)
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
            where = curve[value.lower].strength or NONE
            if value.fraction:  # between two swept strengths
                where += f"–{curve[value.lower + 1].strength}"
            text = f"{value.privacy:.2f} ({curve[-1].parameter} {where})"
            cells.append(f"**{text}**" if value.privacy == best[i] else text)
        largest = max(p.drop for p in all_curves[name][1:])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {largest:+.2f} |")
    if image:
        lines += ["", f"![privacy against utility]({image})", ""]
    return "\n".join(lines) + "\n"


def plot(summary: Sequence[Point], path: Path, drops: Sequence[float] = DROPS) -> Path:
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
        xs, ys = [p.drop for p in curve], [p.psnr for p in curve]
        (line,) = axes.plot(xs, ys, marker="o", label=name)
        for p in curve[1:]:
            axes.annotate(
                p.strength,
                (p.drop, p.psnr),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=line.get_color(),
            )
    reference = next((p for p in summary if p.defense == NONE), None)
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


def _best(rows: Sequence[dict[str, str]], metric: str) -> float:
    return max((_float(r[metric]) for r in rows), key=_key)


def _key(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _mean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


def _fmt(value: float, spec: str) -> str:
    return "—" if math.isnan(value) else format(value, spec)
