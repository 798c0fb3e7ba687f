"""SkMM on the paper's synthetic setting: excess risk of ridge regression vs coreset size.

Dong, Phan, Pan & Lei, "Sketchy Moment Matching", NeurIPS 2024, synthetic experiment: a
Gaussian mixture in high dimension (``r > N``) whose clusters have random sizes and norms and
noise-free labels (``fedleak.selection.gmm``); a coreset of ``n`` points is scored by the mean
squared error on all ``N`` points of ridge regression fitted on it (ridge by 2-fold CV).  The
paper's claim: SkMM's risk stays near the full data's from small ``n`` on, where uniform
sampling misses small clusters (bias) and variance-only or covering baselines fall behind.

Sizes (the notebook's at a quarter scale, as in the notes' prototype): N = 1,000 points in
r = 1,050 dimensions, 20 clusters, sketch m = 80 (4 x clusters, the notebook's choice),
n in {48, 64, 80, 120, 200, 400}, 8 seeds (seed = mixture, sketch and sampling).  SkMMv2 runs
on the sketched features with block 1 and each sampler (exp at the notebook's temperature
1e-3: at the plugin's default 0.1 the exp sampler is nearly uniform for N = 1,000); the
relaxation 500 Adam steps, sampled rounding; herding, k-center and ridge leverage (ridge 1 x
the mean squared row norm) on the raw features, as in the notebook.

    nice -n 5 .venv/bin/python simulations/benchmarks/training_strategies/skmm_gmm.py
    ... --quick   # 1 seed, n = 48, into a temporary folder

Resumable: rows are appended to ``skmm_gmm_runs.csv`` as they finish; a rerun skips them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from fedleak import seeding
from fedleak.selection import baselines, gmm, skmm
from fedleak.selection.gradients import gaussian_sketch

OUT = _bench.REPO / "simulations/benchmarks/results/training_strategies"
FIELDS = ["method", "n", "seed", "risk", "alpha", "covered", "seconds", *_bench.STAMP]
N, DIM, CLUSTERS, SKETCH = 1000, 1050, 20, 80
SIZES = (48, 64, 80, 120, 200, 400)
SEEDS = 8
METHODS = (
    "uniform",
    "skmm_linear",
    "skmm_exp",
    "skmm_greedy",
    "skmm_relaxation",
    "herding",
    "k_center",
    "leverage",
)


def coreset(method: str, mix: gmm.Mixture, sketched: torch.Tensor, n: int, seed: int):
    """The ``n`` indices ``method`` selects (its randomness from the seed's own stream)."""
    rng = seeding.rng(seed, "skmm_gmm", method, n)
    x = torch.from_numpy(mix.features)
    if method == "uniform":
        return baselines.uniform(len(x), n, rng)
    if method.startswith("skmm_") and method != "skmm_relaxation":
        sampler = method.removeprefix("skmm_")
        return skmm.skmm_v2(sketched, n, rng, sampler=sampler, temperature=1e-3)
    if method == "skmm_relaxation":
        weights = skmm.moment_matching_weights(sketched, n, rng)
        return skmm.round_weights(weights, n, "sample", rng)
    if method == "herding":
        return baselines.herding(x, n)
    if method == "k_center":
        return baselines.k_center(x, n, rng)
    return baselines.leverage(x, n, rng)


def run_one(method: str, n: int, seed: int, mix: gmm.Mixture, sketched: torch.Tensor) -> dict:
    start = time.perf_counter()
    chosen = np.arange(N) if method == "full" else coreset(method, mix, sketched, n, seed).numpy()
    risk, alpha = gmm.ridge_risk(mix, chosen, seeding.numpy_rng(seed, "skmm_gmm", "cv", n))
    return {
        "method": method,
        "n": n,
        "seed": seed,
        "risk": risk,
        "alpha": alpha,
        "covered": len(np.unique(mix.cluster[chosen])),
        "seconds": time.perf_counter() - start,
    }


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    groups = runs.groupby(["method", "n"])
    out = groups.agg(
        seeds=("risk", "size"),
        risk=("risk", "mean"),
        sd=("risk", "std"),
        median=("risk", "median"),
        covered=("covered", "mean"),
        seconds=("seconds", "mean"),
    ).reset_index()
    return out


def _spread(seeds: pd.DataFrame) -> str:
    """'k' or 'k to K': how many seeds the cells hold."""
    if seeds.empty:
        return "0"
    low, high = int(seeds.min().min()), int(seeds.max().max())
    return str(low) if low == high else f"{low} to {high}"


def page(summary: pd.DataFrame, runs: pd.DataFrame, quick: bool) -> str:
    full = summary[summary["method"] == "full"]
    full_risk = float(full["risk"].iloc[0]) if len(full) else float("nan")
    rest = summary[summary["method"] != "full"]
    mean = rest.pivot(index="n", columns="method", values="risk")
    median = rest.pivot(index="n", columns="method", values="median")
    sd = rest.pivot(index="n", columns="method", values="sd")
    covered = rest.pivot(index="n", columns="method", values="covered")
    seeds = rest.pivot(index="n", columns="method", values="seeds")
    methods = [m for m in METHODS if m in mean.columns]
    head = "| n | " + " | ".join(methods) + " |"
    rule = "|---|" + "---|" * len(methods)
    lines = [
        "# SkMM on the Gaussian-mixture ridge regression (the paper's synthetic setting)",
        "",
        "Dong, Phan, Pan & Lei, NeurIPS 2024. Written by "
        "`simulations/benchmarks/training_strategies/skmm_gmm.py` (its docstring has the "
        "setting). Risk = mean squared error of ridge regression fitted on the coreset, over "
        "all N points (labels are noise-free, so this is the excess risk).",
        "",
        f"Sizes: N = {N}, r = {DIM}, {CLUSTERS} clusters, sketch m = {SKETCH}; "
        f"{_spread(seeds)} seeds per cell"
        + (" (QUICK RUN)" if quick else "")
        + f". Full-data ridge risk (mean over seeds): {full_risk:.3g}.",
        f"Provenance: {_bench.provenance(runs)}.",
        "",
        "## Mean risk over seeds (± standard deviation)",
        "",
        head,
        rule,
    ]
    for n in mean.index:
        cells = [f"{mean.loc[n, m]:.3g} ± {sd.loc[n, m]:.2g}" for m in methods]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "## Median risk over seeds", "", head, rule]
    for n in median.index:
        lines.append(f"| {n} | " + " | ".join(f"{median.loc[n, m]:.3g}" for m in methods) + " |")
    lines += [
        "",
        f"## Clusters covered (mean over seeds, of {CLUSTERS})",
        "",
        head,
        rule,
    ]
    for n in covered.index:
        lines.append(f"| {n} | " + " | ".join(f"{covered.loc[n, m]:.1f}" for m in methods) + " |")
    if "skmm_linear" in mean.columns and "uniform" in mean.columns:
        best = {n: min(methods, key=lambda m, n=n: median.loc[n, m]) for n in median.index}
        samplers = [m for m in methods if m.startswith("skmm_") and m != "skmm_relaxation"]
        others = [m for m in ("uniform", "herding", "skmm_relaxation", "leverage") if m in methods]
        beats = [
            n for n in median.index if median.loc[n, samplers].max() < median.loc[n, others].min()
        ]
        kcenter = [
            n
            for n in median.index
            if "k_center" in methods and median.loc[n, "k_center"] < median.loc[n, "skmm_linear"]
        ]
        lines += [
            "",
            "## Reading",
            "",
            "Median risk of uniform over SkMMv2 (linear sampler): "
            + ", ".join(
                f"{median.loc[n, 'uniform'] / median.loc[n, 'skmm_linear']:.3g}x at n = {n}"
                for n in median.index
            )
            + ". SkMMv2 covers all "
            + f"{CLUSTERS} clusters at every n and seed"
            + ("" if (covered["skmm_linear"] == CLUSTERS).all() else " except some")
            + "; uniform misses small clusters (whose whole squared label is then bias) until "
            "n is in the hundreds. Lowest median risk per n: "
            + ", ".join(f"n = {n}: {m}" for n, m in best.items())
            + ". n at which every SkMMv2 sampler's median risk is below those of uniform, "
            "herding, the relaxation and ridge leverage: "
            + (", ".join(map(str, beats)) or "none")
            + "; n at which k-center greedy (which also covers every cluster of this "
            "well-separated mixture) has a lower median than SkMMv2-linear: "
            + (", ".join(map(str, kcenter)) or "none")
            + f". Ridge on the full data (same cross-validation) reaches {full_risk:.2g}; "
            "SkMMv2-linear's median stays within "
            + f"{(median['skmm_linear'] / full_risk).max():.3g}x of it at every n (the "
            "notebook's full-data ridge risk was 0.285 at N = 4,000"
            "). The continuous relaxation (ratio 0.5, 500 steps, "
            "sampled rounding) is far behind: with ratio <= 1 uniform weights already match "
            "every moment, so its sampled coresets "
            "miss small clusters like uniform sampling does.",
        ]
    lines += ["", "![risk vs coreset size](skmm_gmm.png)", ""]
    return "\n".join(lines)


def plot(summary: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in METHODS:
        part = summary[summary["method"] == method]
        if len(part):
            style = "-o" if method.startswith("skmm") else "--x"
            ax.plot(part["n"], part["median"], style, label=method)
    full = summary[summary["method"] == "full"]
    if len(full):
        ax.axhline(float(full["risk"].iloc[0]), color="k", ls=":", label="full data")
    ax.set(xscale="log", yscale="log", xlabel="coreset size n", ylabel="median risk over seeds")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, n = 48")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "skmm_gmm_runs.csv"
    done = {(r["method"], int(r["n"]), int(r["seed"])) for r in _bench.read_rows(runs_path)}
    measured = _bench.commit()
    sizes = SIZES[:1] if args.quick else SIZES
    for seed in range(1 if args.quick else SEEDS):
        mix = gmm.gaussian_mixture(N, DIM, CLUSTERS, seeding.numpy_rng(seed, "skmm_gmm", "data"))
        sketch = gaussian_sketch(DIM, SKETCH, seeding.derive(seed, "skmm_gmm", "sketch"))
        sketched = torch.from_numpy(mix.features) @ sketch
        cells = [("full", N)] + [(m, n) for n in sizes for m in METHODS]
        for method, n in cells:
            if (method, n, seed) in done:
                continue
            row = run_one(method, n, seed, mix, sketched)
            _bench.append_row(runs_path, _bench.stamp(row, measured), FIELDS)
        print(f"seed {seed} done", flush=True)
    runs = pd.read_csv(runs_path, keep_default_na=False, na_values=["nan"])
    summary = summarise(runs)
    _bench.write_csv(out / "skmm_gmm.csv", summary.to_dict("records"), list(summary.columns))
    plot(summary, out / "skmm_gmm.png")
    text = page(summary, runs, args.quick)
    _bench.atomic(out / "skmm_gmm.md", text)
    print(text)


if __name__ == "__main__":
    main()
