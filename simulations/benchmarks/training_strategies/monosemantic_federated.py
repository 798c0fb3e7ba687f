"""NCL vs plain contrastive clients in a federation: utility, feature monosemanticity, leakage.

Zhang, Wang, Cui, Pan, Lei, Jegelka & Wang, "Beyond Interpretability" (ICLR 2025); the client
objective is fedleak's ``contrastive`` trainer.  Base experiment ``simulations/ncl_digits.toml``
(digits, 10 IID clients, 5 per round, 20 rounds of 2 local epochs, ``contrastive_mlp``), run
through ``fedleak.pipeline.run`` (the code path of ``fedleak run``, local runner) once with NCL
(``nonnegative = true``, activity 0.1) and once with plain CL (``nonnegative = false``,
activity 0).  Reported per method: the online probe's test accuracy (last round, mean of the
last 5), what a client sends beside its model (the trainer declares nothing), monosemanticity
of the global model's test features in the last round, and the server's label recovery from
each observed client's classifier update (bias-corrected rule with the client's reported
count; order-free overlap with the labels it trained on — a multi-step Adam update, so the
rule is a heuristic here).

    nice -n 5 .venv/bin/python simulations/benchmarks/training_strategies/monosemantic_federated.py

Resumable: a finished run directory under ``.monosemantic_federated/`` beside the results is
reused; rows are appended to ``monosemantic_federated_runs.csv``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench
import numpy as np
import pandas as pd
import torch

from fedleak import config, pipeline
from fedleak.attacks import _labels
from fedleak.metrics import monosemantic as mono
from fedleak.store import RunStore

OUT = _bench.REPO / "simulations/benchmarks/results/training_strategies"
BASE = _bench.REPO / "simulations/ncl_digits.toml"
METHODS = {"ncl": {}, "cl": {"model": {"nonnegative": False}, "training": {"activity": 0.0}}}
FIELDS = [
    "method",
    "rounds",
    "accuracy",
    "last5_accuracy",
    "message_bytes",
    "consistency",
    "zero_fraction",
    "active_dims",
    "effective_rank",
    "label_recovery",
    "views",
    "seconds",
    "started",
    *_bench.STAMP,
]


def run_one(method: str, scratch: Path) -> dict:
    spec = _bench.merge_config(_bench.load_config(BASE), METHODS[method])
    exp = config.load(spec)
    folder = scratch / method
    store = RunStore(folder)
    start = time.perf_counter()
    if store.status() != "done":
        store = pipeline.run(exp, folder)
    seconds = float(store.meta().get("seconds", time.perf_counter() - start))
    utility = pd.read_csv(folder / "utility.csv")
    trained = utility[utility["round"] >= 1]["test_accuracy"]
    views = list(store.views(exp))
    last = max(v.round for v in views)
    model = views[[v.round for v in views].index(last)].model().eval()
    test = exp.dataset().test
    with torch.no_grad():
        z = model.embed(test.inputs)
    recovered = []
    for view in views:
        truth = store.truth(view.round, view.client).labels
        found = _labels.recover(view, len(truth), "bias_corrected")
        classes = view.task.num_classes
        a = np.bincount(found.numpy(), minlength=classes)
        b = np.bincount(truth.numpy(), minlength=classes)
        recovered.append(np.minimum(a, b).sum() / len(truth))
    return {
        "method": method,
        "rounds": spec["rounds"],
        "accuracy": float(trained.iloc[-1]),
        "last5_accuracy": float(trained.tail(5).mean()),
        "message_bytes": max(
            sum(t.numel() * t.element_size() for t in v.messages.values()) for v in views
        ),
        "consistency": mono.semantic_consistency(z, test.labels),
        "zero_fraction": mono.zero_fraction(z),
        "active_dims": mono.active_dimensions(z),
        "effective_rank": mono.effective_rank(z),
        "label_recovery": float(np.mean(recovered)),
        "views": len(views),
        "seconds": seconds,
        "started": str(store.meta().get("started", "")),
    }


def page(runs: pd.DataFrame) -> str:
    lines = [
        "# NCL vs contrastive clients in a federation (digits)",
        "",
        "Zhang, Wang, Cui, Pan, Lei, Jegelka & Wang, ICLR 2025. Written by "
        "`simulations/benchmarks/training_strategies/monosemantic_federated.py` (its docstring "
        "has the setting); base experiment `simulations/ncl_digits.toml`, local runner, one "
        "seed (0).",
        "",
        f"Provenance: {_bench.provenance(runs)} (the analysis; the federated runs started "
        f"{', '.join(runs['started'].astype(str))}).",
        "",
        "| method | test accuracy (round 20) | mean of last 5 | bytes sent beside the model | "
        "semantic consistency | zero fraction | active dims (of 128) | effective rank | "
        "label recovery from the update | run seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs.itertuples():
        lines.append(
            f"| {r.method} | {r.accuracy:.3f} | {r.last5_accuracy:.3f} | {int(r.message_bytes)} "
            f"| {r.consistency:.2f} | {r.zero_fraction:.2f} | {int(r.active_dims)} | "
            f"{r.effective_rank:.1f} | {r.label_recovery:.3f} ({int(r.views)} views) | "
            f"{r.seconds:.0f} |"
        )
    lines += [
        "",
        "Monosemanticity is measured on the projector output of the global model sent in the "
        "last observed round, on the 360 test digits. Label recovery: share of a client's "
        "trained-on label multiset recovered from its classifier update (bias-corrected rule).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    runs_path = OUT / "monosemantic_federated_runs.csv"
    scratch = OUT / ".monosemantic_federated"
    measured = _bench.commit()
    for method in METHODS:
        if method in set(_bench.read_runs(runs_path, FIELDS)["method"]):
            continue
        print(method, flush=True)
        row = run_one(method, scratch)
        _bench.append_row(runs_path, _bench.stamp(row, measured), FIELDS)
    _bench.atomic(OUT / "monosemantic_federated.md", page(_bench.read_runs(runs_path, FIELDS)))
    print(OUT / "monosemantic_federated.md")


if __name__ == "__main__":
    main()
