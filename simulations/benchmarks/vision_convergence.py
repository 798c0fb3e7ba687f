"""Convergence curves of the vision attacks: mean PSNR against the iteration budget.

Each optimisation attack of a vision-benchmark config is run at every budget of ``--budgets``
(a separate run per budget: the step-size schedules depend on the budget, so a longer run is
not a shorter run continued) on the first ``--batches`` batches of each batch size, exactly as
``vision_attacks.py`` runs a cell (same views, same random draws).  The benchmark's iteration
budget is chosen from these curves: the budget past which the mean PSNR stops rising.

Outputs in ``--out`` (rows written as they finish; a rerun skips finished rows):

* ``convergence_runs.csv``  one row per (attack, state, B, batch, budget);
* ``convergence.md``        mean PSNR and matching distance per (attack, B, budget);
* ``convergence.png``       mean PSNR against the budget, one line per (attack, B).

    .venv/bin/python simulations/benchmarks/vision_convergence.py \\
        --config simulations/benchmarks/vision_literature.toml --budgets 100 300 1000 \\
        --batch-sizes 1 --batches 2 --out simulations/benchmarks/results/vision_literature/curve
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import _bench  # first: keeps Flower offline
import pandas as pd
import torch
import vision_attacks as va

RUNS = "convergence_runs.csv"
FIELDS = ["attack", "state", "B", "batch", "budget", "psnr", "ssim", "label_acc", "seconds"]


def main(argv: list[str] | None = None) -> None:
    """Run every missing (attack, state, B, batch, budget), then write the table and plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=va.HERE / "vision_literature.toml")
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--attacks", nargs="+", help="rows of the config (default: all)")
    parser.add_argument("--data-root")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    _bench.add_device_option(parser)
    parser.add_argument("--report", action="store_true", help="only rewrite the table and plot")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.budgets) or args.batches < 1:
        raise SystemExit("vision_convergence: budgets and --batches must be >= 1")
    torch.set_num_threads(args.threads)
    cfg = va.settings(
        args.config,
        attacks=args.attacks,
        data_root=args.data_root,
        batch_sizes=args.batch_sizes,
        batches=args.batches,
    )
    cfg["attacks"] = {k: v for k, v in cfg["attacks"].items() if not va._analytic(v)}
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        run(cfg, args.budgets, args.out, args.device)
    print(write(cfg, args.out, args.device))


def run(cfg: dict, budgets: list[int], out: Path, device: torch.device | str = "cpu") -> None:
    """Every missing row, appended as soon as it is measured (attacked on ``device``)."""
    images, pool, _ = va.load_images(cfg)
    models = va.base_models(cfg, pool, out)
    done = {_key(r) for r in _bench.read_rows(out / RUNS)}
    for budget in budgets:
        at = {**cfg, "steps": budget}
        for name, state, size, k in va.cells(cfg):
            row_key = (name, state, str(size), str(k), str(budget))
            if row_key in done:
                continue
            start = time.perf_counter()
            row = va.run_one(at, name, state, size, k, models[state], images, out, device)
            row = {**{f: row[f] for f in FIELDS if f in row}, "budget": budget}
            _bench.append_row(out / RUNS, {f: row[f] for f in FIELDS}, FIELDS)
            print(
                f"{name} {state} B={size} batch {k} budget {budget}: PSNR {row['psnr']:.2f} dB "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )


def _key(row: dict) -> tuple:
    return tuple(str(row[f]) for f in ("attack", "state", "B", "batch", "budget"))


def write(cfg: dict, out: Path, device: torch.device | str = "cpu") -> str:
    """convergence.md and convergence.png from the rows in ``out``, run on ``device``."""
    runs = pd.read_csv(out / RUNS)
    curve = (
        runs.groupby(["attack", "state", "B", "budget"])
        .agg(batches=("psnr", "size"), psnr=("psnr", "mean"), seconds=("seconds", "mean"))
        .reset_index()
    )
    lines = [
        "# Convergence of the vision attacks",
        "",
        f"Config: {cfg['model']}, batch norm in {va.BATCH_NORM[cfg['batch_norm']]}; "
        f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"on {device}. "
        "Mean PSNR over the batches at each iteration budget (a separate run per budget); "
        "seconds per batch.",
        "",
        "| attack | state | B | budget | batches | psnr mean | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.attack} | {r.state} | {r.B} | {r.budget} | {r.batches} | {r.psnr:.2f} "
        f"| {r.seconds:.1f} |"
        for r in curve.itertuples()
    ]
    page = "\n".join(lines) + "\n"
    _bench.atomic(out / "convergence.md", page)
    plot(curve, out / "convergence.png")
    return page


def plot(curve: pd.DataFrame, path: Path) -> None:
    """Mean PSNR against the budget (log scale), one line per (attack, state, B)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for (name, state, size), group in curve.groupby(["attack", "state", "B"]):
        axes.plot(group["budget"], group["psnr"], marker="o", label=f"{name} ({state}, B={size})")
    axes.set_xscale("log")
    axes.set_xlabel("iteration budget")
    axes.set_ylabel("mean PSNR (dB)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
