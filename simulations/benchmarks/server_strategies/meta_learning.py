"""The meta-learning error decomposition (Jeon, Lee, Lei & Van Roy, ICML 2024) against M and T.

Clients are tasks drawn from a shared prior; M clients with T tokens each.  For two conjugate
models (``fedleak.analysis.meta_learning``) the Bayes-optimal log loss per token splits into
irreducible + meta-learning ``I(D; psi) / (MT)`` + intra-task ``I(D; theta | psi) / (MT)``:

* ``gaussian``: linear regression, d = 8, psi ~ N(0, I), theta | psi ~ N(psi, 0.25 I), noise
  variance 0.25, inputs N(0, I): the terms exact given the inputs (log-determinants), averaged
  over 40 input draws; the orthogonal-design closed form beside them; Monte Carlo over whole
  worlds (the realised log losses of the Bayes predictor and of the predictors knowing psi or
  every theta) where M <= 16 and T <= 64.
* ``bernoulli``: psi ~ Beta(1, 1), theta | psi ~ Beta(4 psi, 4 (1 - psi)), Bernoulli tokens:
  irreducible and intra exact (512-node Gauss-Jacobi quadrature over psi), meta as the mean
  KL(posterior || prior) over 300 draws of the counts; the same Monte Carlo check.

Parts: ``terms`` (the grid), ``new_client`` (what more clients remove from a new client's
excess loss vs what only its own tokens remove), ``leakage`` (what each client's sufficient
statistics -- the messages of the ``meta_posterior`` strategy -- reveal about its own theta,
next to the Bayes attack's error).  The page fits the rates: the slope of meta x MT against
ln M at the largest T (theory: dim(psi) / 2) and of intra x T against ln T (dim(theta) / 2).

    nice -n 5 .venv/bin/python simulations/benchmarks/server_strategies/meta_learning.py
    .venv/bin/python simulations/benchmarks/server_strategies/meta_learning.py --quick
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench
import numpy as np
import pandas as pd

from fedleak import seeding
from fedleak.analysis.meta_learning import BernoulliTasks, GaussianTasks

FIELDS = ["part", "model", "clients", "tokens", "quantity", "value", "se"]
RUNS = [*FIELDS, *_bench.STAMP]
MODELS = {"gaussian": GaussianTasks(), "bernoulli": BernoulliTasks()}
DIMS = {"gaussian": (8, 8), "bernoulli": (1, 1)}  # (dim psi, dim theta)


def terms_rows(name: str, m: int, t: int, quick: bool):
    """Exact (or quadrature) terms, closed form, and the Monte Carlo check for one cell."""
    model = MODELS[name]
    rng = seeding.numpy_rng(0, "terms", name, m, t)
    draws = 5 if quick else (40 if name == "gaussian" else 300)
    if name == "gaussian":
        est, se = model.expected_terms(m, t, rng, draws)
        closed = model.closed_form(m, t)
        yield "closed_meta", closed.meta, 0.0
        yield "closed_intra", closed.intra, 0.0
    else:
        est, se = model.terms(m, t, rng, draws)
    yield "irreducible", est.irreducible, se.irreducible
    yield "meta", est.meta, se.meta
    yield "intra", est.intra, se.intra
    if m <= 16 and t <= 64:
        mc, mc_se = model.monte_carlo(m, t, rng, 30 if quick else 1000)
        yield "mc_irreducible", mc.irreducible, mc_se.irreducible
        yield "mc_meta", mc.meta, mc_se.meta
        yield "mc_intra", mc.intra, mc_se.intra


def new_client_rows(name: str, m: int, t: int, quick: bool):
    """A new client's excess loss per token: removable by more clients, and local-only."""
    rng = seeding.numpy_rng(0, "new_client", name, m, t)
    r, r_se, c, c_se = MODELS[name].new_client(m, t, rng, 5 if quick else 200)
    yield "removable_by_clients", r, r_se
    yield "local_only", c, c_se


def leakage_rows(name: str, m: int, t: int, quick: bool):
    """Information in each client's message about its theta, and the Bayes attack's error."""
    model = MODELS[name]
    worlds = 2 if quick else 20
    got: dict[str, list[float]] = {}
    for w in range(worlds):
        rng = seeding.numpy_rng(0, "leakage", name, m, t, w)
        if name == "gaussian":
            _, theta, inputs, targets = model.sample(m, t, rng)
            leak = model.leakage(*model.statistics(inputs, targets))
            values = {
                "info_message": leak.message_only.mean(),
                "info_all_messages": leak.with_others.mean(),
                "info_beyond_population": leak.beyond_population.mean(),
                "attack_mse": ((leak.estimate - theta) ** 2).sum(1).mean(),
                "posterior_mse": leak.posterior_mse.mean(),
                "bound_mse": model.mse_bound(leak.with_others).mean(),
                "prior_mse": model.dim * (model.prior_std**2 + model.task_std**2),
            }
        else:
            _, theta, counts = model.sample(m, t, rng)
            values = {
                "info_message": model.information_about_theta(t),
                "info_beyond_population": model.intra_information(t),
                "attack_mse": ((model.attack(counts, t) - theta) ** 2).mean(),
                "prior_mse": theta.var(),
            }
        for k, v in values.items():
            got.setdefault(k, []).append(float(v))
    for k, v in got.items():
        v = np.array(v)
        yield k, float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


PARTS = {"terms": terms_rows, "new_client": new_client_rows, "leakage": leakage_rows}


def grid(quick: bool) -> list[tuple[str, str, int, int]]:
    """Every (part, model, M, T) cell."""
    ms, ts = ((1, 4, 16), (4, 16)) if quick else ((1, 4, 16, 64, 256), (4, 16, 64, 256))
    cells = [("terms", n, m, t) for n in MODELS for m in ms for t in ts]
    new_ms = (0, 1, 4) if quick else (0, 1, 4, 16, 64, 256)
    cells += [("new_client", n, m, t) for n in MODELS for m in new_ms for t in (2, 8, 32)]
    cells += [("leakage", n, 64, t) for n in MODELS for t in ((4,) if quick else (4, 16, 64))]
    return cells


def wide(runs: pd.DataFrame, part: str, model: str) -> pd.DataFrame:
    """One part's rows for one model: a column per quantity (and its se)."""
    rows = runs[(runs["part"] == part) & (runs["model"] == model)]
    values = rows.pivot_table(index=["clients", "tokens"], columns="quantity", values="value")
    errors = rows.pivot_table(index=["clients", "tokens"], columns="quantity", values="se")
    return values.join(errors, rsuffix="_se").reset_index()


def fits(runs: pd.DataFrame) -> pd.DataFrame:
    """The fitted rates next to the theory's, per model."""
    out = []
    for model, (dim_psi, dim_theta) in DIMS.items():
        table = wide(runs, "terms", model)
        if table.empty:
            continue
        t_max = table["tokens"].max()
        at = table[table["tokens"] == t_max]
        meta_mt = at["meta"] * at["clients"] * at["tokens"]
        slope_m = np.polyfit(np.log(at["clients"]), meta_mt, 1)[0]
        loglog_m = np.polyfit(np.log(at["clients"]), np.log(at["meta"]), 1)[0]
        one = table[table["clients"] == table["clients"].min()]
        intra_t = one["intra"] * one["tokens"]
        big = one["tokens"] >= sorted(one["tokens"])[len(one) // 2]
        slope_t = np.polyfit(np.log(one["tokens"][big]), intra_t[big], 1)[0]
        loglog_t = np.polyfit(np.log(one["tokens"]), np.log(one["intra"]), 1)[0]
        spread = table.groupby("tokens")["intra"].agg(lambda s: s.max() / s.min() - 1).max()
        out += [
            {
                "model": model,
                "fit": f"d(meta·MT)/d ln M at T = {t_max}",
                "measured": slope_m,
                "theory": dim_psi / 2,
            },
            {
                "model": model,
                "fit": f"d ln meta / d ln M at T = {t_max}",
                "measured": loglog_m,
                "theory": -1.0,
            },
            {
                "model": model,
                "fit": "d(intra·T)/d ln T (upper half of T)",
                "measured": slope_t,
                "theory": dim_theta / 2,
            },
            {"model": model, "fit": "d ln intra / d ln T", "measured": loglog_t, "theory": -1.0},
            {
                "model": model,
                "fit": "largest relative change of intra across M",
                "measured": spread,
                "theory": 0.0,
            },
        ]
    return pd.DataFrame(out)


def _cell(value: float, se: float | None = None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if se is None or (isinstance(se, float) and math.isnan(se)) or se == 0:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


def page(runs: pd.DataFrame, rates: pd.DataFrame) -> str:
    """The Markdown page."""
    lines = [
        "# Meta-learning error decomposition against M (clients) and T (tokens per client)",
        "",
        'Jeon, Lee, Lei & Van Roy, "An Information-Theoretic Analysis of In-Context Learning", '
        "ICML 2024. Script: `simulations/benchmarks/server_strategies/meta_learning.py` (its "
        "docstring states the models and draws). Nats per token; ± is one standard error over "
        f"draws. Provenance: {_bench.provenance(runs)}; load average {_bench.load_average()} "
        "when this page was written.",
        "",
        "## Fitted rates vs theory",
        "",
        "![terms against M and T](meta_learning.png)",
        "",
        "| model | fit | measured | theory |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r.model} | {r.fit} | {r.measured:.3f} | {r.theory:g} |" for r in rates.itertuples()
    ]
    lines += [
        "",
        "The theory's meta rate dim(psi)·log(MT)/(MT) is an upper bound; in these conjugate "
        "models meta·MT saturates in T at (dim psi / 2)·ln(1 + M s²/τ²) (Gaussian), so its "
        "growth in ln M at large T is dim(psi)/2, and the log-log slope in M is -1 plus a "
        "log correction. The intra-task term does not depend on M: more clients cannot "
        "remove it.",
        "",
    ]
    for model in MODELS:
        table = wide(runs, "terms", model)
        if table.empty:
            continue
        gauss = model == "gaussian"
        lines += [
            f"## Terms, {model}",
            "",
            "| M | T | irreducible | meta | meta·MT | intra | intra·T | MC meta | MC intra "
            + ("| closed-form meta (orthogonal X) |" if gauss else "|"),
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if gauss else ""),
        ]
        for r in table.itertuples():
            cells = [
                str(int(r.clients)),
                str(int(r.tokens)),
                _cell(r.irreducible),
                _cell(r.meta, r.meta_se),
                f"{r.meta * r.clients * r.tokens:.2f}",
                _cell(r.intra, r.intra_se),
                f"{r.intra * r.tokens:.2f}",
                _cell(getattr(r, "mc_meta", float("nan")), getattr(r, "mc_meta_se", None)),
                _cell(getattr(r, "mc_intra", float("nan")), getattr(r, "mc_intra_se", None)),
            ]
            if gauss:  # an orthogonal design needs T >= d
                cells.append(_cell(r.closed_meta) if r.tokens >= MODELS[model].dim else "")
            lines.append("| " + " | ".join(cells) + " |")
        mc = table.dropna(subset=["mc_meta"]) if "mc_meta" in table else table.iloc[:0]
        if not mc.empty:
            z = pd.concat(
                [
                    (mc["mc_meta"] - mc["meta"]).abs() / np.hypot(mc["mc_meta_se"], mc["meta_se"]),
                    (mc["mc_intra"] - mc["intra"]).abs()
                    / np.hypot(mc["mc_intra_se"], mc["intra_se"])
                    .replace(0, np.nan)
                    .fillna(mc["mc_intra_se"]),
                ]
            )
            lines += [
                "",
                f"Monte Carlo vs exact over {len(mc)} cells: largest gap {z.max():.2f} standard "
                f"errors (median {z.median():.2f}).",
            ]
        lines.append("")
    lines += [
        "## A new client: what more clients can remove vs what only its own data can",
        "",
        "Excess log loss per token of a new client with T tokens after M others: "
        "`I(D_new; psi | D_1:M)/T` (removable by more clients) and `I(D_new; theta | psi)/T` "
        "(local only).",
        "",
        "| model | T | "
        + " | ".join(f"M = {m}" for m in (0, 1, 4, 16, 64, 256))
        + " | local only |",
        "|---|---|" + "---|" * 7,
    ]
    for model in MODELS:
        table = wide(runs, "new_client", model)
        for t, rows in table.groupby("tokens"):
            cells = []
            for m in (0, 1, 4, 16, 64, 256):
                hit = rows[rows["clients"] == m]
                cells.append(_cell(hit["removable_by_clients"].iloc[0]) if len(hit) else "")
            local = rows["local_only"].iloc[0]
            lines.append(f"| {model} | {int(t)} | " + " | ".join(cells) + f" | {local:.4f} |")
    lines += [
        "",
        "## What each client's message reveals about its own theta (M = 64 clients)",
        "",
        "Gaussian messages `(X^T X, X^T y)`, Bernoulli messages the count of ones: sufficient "
        "statistics, so they carry all the client's data says about its theta. Information in "
        "nats (exact given the inputs; Bernoulli by quadrature); the attack is the Bayes "
        "posterior mean under the prior the server learns from the other clients; `bound` is "
        "the least squared error any attacker with that much information can reach "
        "(entropy-power bound on I(all messages; theta)); prior MSE is guessing the prior mean.",
        "",
        "| model | T | I(message; θ) | I(all messages; θ) | I(message; θ \\| ψ) | attack MSE "
        "| posterior MSE | bound | prior MSE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        table = wide(runs, "leakage", model)
        for r in table.itertuples():
            get = lambda k, r=r: getattr(r, k, float("nan"))  # noqa: E731
            lines.append(
                f"| {model} | {int(r.tokens)} | {_cell(get('info_message'), None, 3)} "
                f"| {_cell(get('info_all_messages'), None, 3)} "
                f"| {_cell(get('info_beyond_population'), None, 3)} "
                f"| {_cell(get('attack_mse'), get('attack_mse_se'), 4)} "
                f"| {_cell(get('posterior_mse'), None, 4)} | {_cell(get('bound_mse'), None, 4)} "
                f"| {_cell(get('prior_mse'), None, 4)} |"
            )
    return "\n".join(lines) + "\n"


def plot(runs: pd.DataFrame, path: Path) -> None:
    """meta x MT against M and intra x T against T, per model (log x axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    for row, model in enumerate(MODELS):
        table = wide(runs, "terms", model)
        if table.empty:
            continue
        for t, rows in table.groupby("tokens"):
            axes[row, 0].plot(
                rows["clients"], rows["meta"] * rows["clients"] * t, "o-", label=f"T={t}"
            )
        for m, rows in table.groupby("clients"):
            axes[row, 1].plot(rows["tokens"], rows["intra"] * rows["tokens"], "o-", label=f"M={m}")
        axes[row, 0].set(xscale="log", xlabel="M (clients)", ylabel="meta · MT (nats)", title=model)
        axes[row, 1].set(xscale="log", xlabel="T (tokens)", ylabel="intra · T (nats)", title=model)
        for ax in axes[row]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grid and draws")
    parser.add_argument(
        "--out", type=Path, default=_bench.REPO / "simulations/benchmarks/results/server_strategies"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / "meta_learning_runs.csv"
    done = {
        (r["part"], r["model"], int(r["clients"]), int(r["tokens"]))
        for r in _bench.read_rows(runs_path)
    }
    measured = _bench.commit()
    for part, model, m, t in grid(args.quick):
        if (part, model, m, t) in done:
            continue
        rows = [
            {
                "part": part,
                "model": model,
                "clients": m,
                "tokens": t,
                "quantity": q,
                "value": v,
                "se": s,
            }
            for q, v, s in PARTS[part](model, m, t, args.quick)
        ]
        for row in rows:  # a cell is written whole: resumable by cell
            _bench.append_row(runs_path, _bench.stamp(row, measured), RUNS)
        print(f"{part} {model} M={m} T={t}", flush=True)
    runs = _bench.read_runs(runs_path, RUNS)
    rates = fits(runs)
    text = page(runs, rates)
    _bench.write_summary(
        args.out / "meta_learning.csv",
        rates,
        list(rates.columns),
        args.out / "meta_learning.md",
        text,
    )
    plot(runs, args.out / "meta_learning.png")
    print(text)


if __name__ == "__main__":
    main()
