"""SkMM in a federation: test accuracy of a linear head at a fixed per-client budget vs uniform.

Dong, Phan, Pan & Lei, "Sketchy Moment Matching", NeurIPS 2024, claim that SkMM is best in the
low-data regime of fine-tuning and robust to class imbalance.  Here each sampled client of a
FedAvg federation trains only on ``count`` examples per round, chosen at the global model as
received; the base experiment is ``simulations/skmm_digits.toml`` (digits, 20 label-skewed
clients (Dirichlet 0.3), 10 per round, logistic regression on the 64 pixels, 5 full-batch SGD
steps per round on the selected examples, sketch m = 32).  Every run goes through
``fedleak.pipeline.run`` on the local runner: the same code path as ``fedleak run``.

Methods: ``all`` (no selection: the whole partition every round), ``uniform``, ``skmm``
(SkMMv2, linear sampler), ``skmm_global`` (server-assisted global moments: the clients also send
their 32 x 32 sketched moments), ``herding`` and ``k_center`` on the head's random-target
gradients.  Reported: the final test accuracy and the mean over the last 5 rounds, per seed
(seed = partition, model, sampling), and what a client sends beyond its model (bytes, from
the captured round-1 views).

    nice -n 5 .venv/bin/python simulations/benchmarks/training_strategies/skmm_digits.py
    ... --quick   # 1 seed, 5 rounds, into a temporary folder

Resumable: rows are appended to ``skmm_digits_runs.csv`` as they finish; a rerun skips them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench
import pandas as pd
import torch

from fedleak import config, pipeline

OUT = _bench.REPO / "simulations/benchmarks/results/training_strategies"
BASE = _bench.REPO / "simulations/skmm_digits.toml"
FIELDS = [
    "method",
    "seed",
    "rounds",
    "count",
    "final_accuracy",
    "last5_accuracy",
    "message_bytes",
    "seconds",
    *_bench.STAMP,
]
METHODS = ("all", "uniform", "skmm", "skmm_global", "herding", "k_center")
SEEDS = (0, 1, 2)


def experiment(method: str, seed: int, rounds: int) -> dict:
    """The base experiment with ``method``'s selection (and server) at ``seed``."""
    spec = _bench.load_config(BASE)
    spec.update(seed=seed, rounds=rounds)
    count = spec["selection"]["count"]
    if method == "all":
        spec.pop("selection")
    elif method == "skmm_global":
        spec["selection"] = {**spec["selection"], "moments": "global"}
        spec["server"] = {"name": "skmm_global"}
    elif method != "skmm":
        spec["selection"] = {"name": method, "count": count}
    return spec


def run_one(method: str, seed: int, rounds: int, scratch: Path) -> dict:
    spec = experiment(method, seed, rounds)
    exp = config.load(spec)
    folder = scratch / f"{method}-s{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    store = pipeline.run(exp, folder)
    seconds = time.perf_counter() - start
    utility = pd.read_csv(store.root / "utility.csv")
    sent = [
        sum(t.numel() * t.element_size() for t in view.messages.values())
        for view in store.views(exp)
    ]
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "method": method,
        "seed": seed,
        "rounds": rounds,
        "count": spec.get("selection", {}).get("count", 0),
        "final_accuracy": float(utility["test_accuracy"].iloc[-1]),
        "last5_accuracy": float(utility["test_accuracy"].iloc[-5:].mean()),
        "message_bytes": max(sent, default=0),
        "seconds": seconds,
    }


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    out = (
        runs.groupby("method")
        .agg(
            seeds=("seed", "size"),
            final=("final_accuracy", "mean"),
            final_sd=("final_accuracy", "std"),
            last5=("last5_accuracy", "mean"),
            last5_sd=("last5_accuracy", "std"),
            message_bytes=("message_bytes", "max"),
            seconds=("seconds", "mean"),
        )
        .reindex([m for m in METHODS if m in set(runs["method"])])
        .reset_index()
    )
    uniform = runs[runs["method"] == "uniform"].set_index("seed")["last5_accuracy"]
    gaps = []
    for method in out["method"]:
        mine = runs[runs["method"] == method].set_index("seed")["last5_accuracy"]
        both = mine.index.intersection(uniform.index)
        gaps.append(float((mine[both] - uniform[both]).mean()) if len(both) else float("nan"))
    out["vs_uniform"] = gaps
    return out


def page(summary: pd.DataFrame, runs: pd.DataFrame, quick: bool) -> str:
    spec = _bench.load_config(BASE)
    rounds = int(runs["rounds"].max()) if len(runs) else 0
    lines = [
        "# SkMM in a federation: digits, linear head, fixed per-client budget",
        "",
        "Dong, Phan, Pan & Lei, NeurIPS 2024. Written by "
        "`simulations/benchmarks/training_strategies/skmm_digits.py` (its docstring has the "
        "setting); base experiment `simulations/skmm_digits.toml`, run with `fedleak.pipeline."
        "run` on the local runner.",
        "",
        f"Sizes: {spec['clients']} clients (Dirichlet {spec['partition']['alpha']}), "
        f"{spec['clients_per_round']} per round, {rounds} rounds, "
        f"{spec['selection']['count']} examples per client per round (about "
        f"{spec['selection']['count'] / (1437 / spec['clients']):.0%} of a mean partition), "
        f"sketch m = {spec['selection']['sketch_dim']}, {runs['seed'].nunique()} seeds"
        + (" (QUICK RUN)" if quick else "")
        + ".",
        f"Provenance: {_bench.provenance(runs)}.",
        "",
        "| method | seeds | final accuracy | mean of last 5 rounds | vs uniform (paired, "
        "points) | bytes sent beyond the model | seconds per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary.itertuples():
        lines.append(
            f"| {r.method} | {r.seeds} | {r.final:.4f} ± {r.final_sd:.3f} | "
            f"{r.last5:.4f} ± {r.last5_sd:.3f} | {100 * r.vs_uniform:+.2f} | "
            f"{int(r.message_bytes)} | {r.seconds:.0f} |"
        )
    lines += [
        "",
        "± is the standard deviation over seeds; 'vs uniform' is the mean over seeds of the "
        "paired difference in the last-5-rounds accuracy. 'all' trains on the whole partition "
        "every round (the budget's ceiling).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 rounds")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "skmm_digits_runs.csv"
    rounds = 5 if args.quick else int(_bench.load_config(BASE)["rounds"])
    done = {(r["method"], int(r["seed"]), int(r["rounds"])) for r in _bench.read_rows(runs_path)}
    measured = _bench.commit()
    scratch = Path(tempfile.mkdtemp(prefix="skmm_digits_"))
    for seed in SEEDS[:1] if args.quick else SEEDS:
        for method in args.methods:
            if (method, seed, rounds) in done:
                continue
            row = run_one(method, seed, rounds, scratch)
            _bench.append_row(runs_path, _bench.stamp(row, measured), FIELDS)
            print(f"{method} seed {seed}: {row['last5_accuracy']:.4f}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    runs = pd.read_csv(runs_path, keep_default_na=False, na_values=["nan"])
    summary = summarise(runs)
    _bench.write_csv(out / "skmm_digits.csv", summary.to_dict("records"), list(summary.columns))
    text = page(summary, runs, args.quick)
    _bench.atomic(out / "skmm_digits.md", text)
    print(text)


if __name__ == "__main__":
    main()
