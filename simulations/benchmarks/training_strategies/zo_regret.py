"""Simple regret of the two-stage zeroth-order algorithm against T and d, beside ZO-SGD.

Yu, Wang, Huang, Lei & Lee (NeurIPS 2024) prove that Algorithm 4 (``fedleak.optim.zeroth_order
.two_stage``) reaches a simple regret ``Theta(d rho^(2/3) M^-1 T^(-2/3))`` on M-strongly convex
functions with a rho-Lipschitz Hessian under unit-variance noise; earlier methods pay
``d^2`` or ``d^(5/3)`` (their Table 1).  The paper has no experiments; this benchmark measures
the rate on

    f(x) = x^T A x / 2 + sum_{j <= 2d} log cosh(b_j^T x - t_j),

``A``'s eigenvalues spread over [1, 4] (M = 1) and the ``b_j`` scaled so that rho = 1 exactly
(``logcosh_problem``; only d changes between rows), each query observed with N(0, 1) noise,
from x0 = 0.  One random function per repetition (seed = repetition).  Regret is
``f(x_T) - f*`` with ``f*`` from Newton's method.  The baseline is two-point spherical ZO-SGD
(step 1/(Mt), radius t^(-1/6), T/2 iterations, last iterate).

The slope is the least-squares fit of log10(mean regret) on log10(queries used) per d; the
theory says -2/3.  The d column divides each d's mean regret by that of d = 2 at the same T;
the theory says d/2 for the two-stage algorithm.

    nice -n 5 .venv/bin/python simulations/benchmarks/training_strategies/zo_regret.py
    ... --quick   # T <= 1e4, 4 repetitions: a smoke run into a temporary folder

Resumable: rows are appended to ``zo_regret_runs.csv`` as they finish; a rerun skips them.
"""

from __future__ import annotations

import argparse
import math
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
from fedleak.optim import zeroth_order as zo

OUT = _bench.REPO / "simulations/benchmarks/results/training_strategies"
FIELDS = ["algorithm", "d", "budget", "rep", "queries", "regret", "seconds", *_bench.STAMP]
DIMS = (2, 4, 8, 16)
BUDGETS = {"two_stage": (10**4, 10**4.5, 10**5, 10**5.5, 10**6), "zo_sgd": (10**4, 10**5)}
REPS = {"two_stage": 20, "zo_sgd": 8}


def run_one(algorithm: str, d: int, budget: int, rep: int) -> dict:
    f = zo.logcosh_problem(d, seeding.rng(rep, "zo_regret", "function", d))
    _, f_star = f.minimum()
    rng = seeding.rng(rep, "zo_regret", algorithm, d, budget)
    x0 = torch.zeros(d, dtype=zo.DTYPE)
    if algorithm == "two_stage":
        gen = zo.two_stage(x0, budget, rho=f.rho, strong_convexity=f.strong_convexity, rng=rng)
    else:
        gen = zo.zo_sgd(x0, budget, strong_convexity=f.strong_convexity, rng=rng)
    start = time.perf_counter()
    x, used = zo.drive(gen, zo.noisy(f, 1.0, rng))
    return {
        "algorithm": algorithm,
        "d": d,
        "budget": budget,
        "rep": rep,
        "queries": used,
        "regret": float(f(x[None])[0]) - f_star,
        "seconds": time.perf_counter() - start,
    }


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    groups = runs.groupby(["algorithm", "d", "budget"])
    out = groups.agg(
        reps=("regret", "size"),
        queries=("queries", "mean"),
        regret=("regret", "mean"),
        sd=("regret", "std"),
    ).reset_index()
    out["se"] = out["sd"] / np.sqrt(out["reps"])
    base = out[out["d"] == DIMS[0]].set_index(["algorithm", "budget"])["regret"]
    out["vs_d2"] = [
        r.regret / base.get((r.algorithm, r.budget), math.nan) for r in out.itertuples()
    ]
    return out.drop(columns="sd")


def slopes(summary: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (algorithm, d), part in summary.groupby(["algorithm", "d"]):
        if len(part) >= 2:
            fit = np.polyfit(np.log10(part["queries"]), np.log10(part["regret"]), 1)
            rows.append({"algorithm": algorithm, "d": d, "points": len(part), "slope": fit[0]})
    return pd.DataFrame(rows)


def d_exponents(summary: pd.DataFrame) -> pd.DataFrame:
    """The exponent of d in the regret at each budget: slope of log regret on log d."""
    rows = []
    for (algorithm, budget), part in summary.groupby(["algorithm", "budget"]):
        if len(part) >= 2:
            fit = np.polyfit(np.log10(part["d"]), np.log10(part["regret"]), 1)
            rows.append({"algorithm": algorithm, "budget": budget, "exponent": fit[0]})
    return pd.DataFrame(rows)


def page(summary: pd.DataFrame, fits: pd.DataFrame, runs: pd.DataFrame, quick: bool) -> str:
    lines = [
        "# Zeroth-order simple regret: two-stage (Algorithm 4) vs ZO-SGD",
        "",
        "Yu, Wang, Huang, Lei & Lee, NeurIPS 2024: regret Theta(d rho^(2/3) M^-1 T^(-2/3)). "
        "Written by `simulations/benchmarks/training_strategies/zo_regret.py` (its docstring "
        "has the setting: log-cosh + quadratic, M = 1, rho = 1, N(0, 1) noise, x0 = 0).",
        "",
        f"Sizes: d in {list(DIMS)}; two-stage T in 1e4..1e6 (5 values, half-decades), "
        f"{REPS['two_stage']} repetitions; ZO-SGD T in 1e4, 1e5, {REPS['zo_sgd']} "
        "repetitions" + (" (QUICK RUN: smaller)" if quick else "") + ".",
        f"Provenance: {_bench.provenance(runs)}.",
        "",
        "## Mean regret (± standard error) by queries",
        "",
        "| algorithm | d | budget T | queries used | regret | s.e. | / regret at d = 2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary.itertuples():
        lines.append(
            f"| {r.algorithm} | {r.d} | {r.budget:.3g} | {r.queries:.0f} | {r.regret:.3g} | "
            f"{r.se:.2g} | {r.vs_d2:.2f} |"
        )
    lines += [
        "",
        "## Fitted slope of log10 regret on log10 queries (theory: -0.667)",
        "",
        "| algorithm | d | points | slope |",
        "|---|---|---|---|",
    ]
    for r in fits.itertuples():
        lines.append(f"| {r.algorithm} | {r.d} | {r.points} | {r.slope:.3f} |")
    lines += [
        "",
        "## Exponent of d at each budget (slope of log regret on log d over d = "
        f"{', '.join(map(str, DIMS))}; theory: 1 for two-stage, 2 or 5/3 for earlier methods)",
        "",
        "| algorithm | budget T | exponent of d |",
        "|---|---|---|",
    ]
    for r in d_exponents(summary).itertuples():
        lines.append(f"| {r.algorithm} | {r.budget:.3g} | {r.exponent:.2f} |")
    two = fits[fits["algorithm"] == "two_stage"]
    exps = d_exponents(summary)
    exps = exps[exps["algorithm"] == "two_stage"]
    if len(two) and len(exps):
        lines += [
            "",
            "## Reading",
            "",
            f"Two-stage slopes in T: {two['slope'].min():.2f} to {two['slope'].max():.2f} "
            f"(theory -0.67). Its regret grows like d^{exps['exponent'].min():.2f} to "
            f"d^{exps['exponent'].max():.2f} at fixed T: above the theory's d^1 at these sizes "
            "(the bound is asymptotic, and the sample sizes' floors leave larger d fewer of "
            "its T queries, see the queries column: at (T_used ratio)^(-2/3) that accounts "
            "for about 0.1 of the exponent), far below ZO-SGD's, which is unstable for "
            "d >= 8 at these budgets with the step 1/(Mt).",
        ]
    lines += ["", "![regret vs queries](zo_regret.png)", ""]
    return "\n".join(lines)


def plot(summary: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for (algorithm, d), part in summary.groupby(["algorithm", "d"]):
        style = "-o" if algorithm == "two_stage" else "--x"
        label = f"{algorithm} d={d}"
        ax.errorbar(part["queries"], part["regret"], part["se"], fmt=style, label=label)
    q = np.array([1e4, 1e6])
    ax.plot(q, 5e-3 * (q / 1e4) ** (-2 / 3), ":k", label="slope -2/3")
    ax.set(xscale="log", yscale="log", xlabel="queries", ylabel="simple regret")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T <= 1e4, 4 repetitions")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "zo_regret_runs.csv"
    done = {
        (r["algorithm"], int(r["d"]), int(r["budget"]), int(r["rep"]))
        for r in _bench.read_rows(runs_path)
    }
    measured = _bench.commit()
    for algorithm, budgets in BUDGETS.items():
        for budget in budgets:
            budget = round(budget)
            if args.quick and budget > 10**4:
                continue
            for d in DIMS:
                for rep in range(4 if args.quick else REPS[algorithm]):
                    if (algorithm, d, budget, rep) in done:
                        continue
                    row = run_one(algorithm, d, budget, rep)
                    _bench.append_row(runs_path, _bench.stamp(row, measured), FIELDS)
                print(f"{algorithm} d={d} T={budget} done", flush=True)
    runs = pd.read_csv(runs_path, keep_default_na=False, na_values=["nan"])
    summary = summarise(runs)
    fits = slopes(summary[summary["algorithm"] == "two_stage"])
    fits = pd.concat([fits, slopes(summary[summary["algorithm"] == "zo_sgd"])])
    _bench.write_csv(out / "zo_regret.csv", summary.to_dict("records"), list(summary.columns))
    plot(summary, out / "zo_regret.png")
    text = page(summary, fits, runs, args.quick)
    _bench.atomic(out / "zo_regret.md", text)
    print(text)


if __name__ == "__main__":
    main()
