"""Gradient inversion from zeroth-order scalars: reconstruction quality against queries per step.

A ``mezo`` client (``fedleak.training.zeroth_order``) sends, for its one local step on a
mini-batch, a seed and ``n = directions`` projected differences ``p_j ~ <grad L, z_j>``.  The
server replays them (``federation.reply``, as the runtime does) into the client's state; the
view's ``gradient()`` is then ``(1/n) sum_j p_j z_j``, an unbiased estimate of the mini-batch
gradient whose cosine with it is about ``sqrt(n / (n + d))`` (``d`` parameters).  The existing
attacks run on that view unchanged.  The defense is Gaussian noise on the scalars
(``training.noise_std``; DPZero's mechanism, without clipping here).

Setting (the quickstart's task): digits 8x8, LeNet (sigmoid, d = 8,026 parameters), one local
step on a batch of ``--batch`` examples (default 1, the attacker's best case), round 1 of a
20-client federation, the first ``--clients`` sampled clients (default 3).  Rows: plain
``sgd`` (the exact gradient: the attacks' ceiling), then ``mezo`` with n in 1 .. 50,000, then
n = 10,000 with noise std 0.1, 1 and 10 on each scalar.  Attacks: DLG (joint labels, 100
L-BFGS steps) and inverting gradients (cosine, 1,000 steps, tv 0: see ATTACK_SPECS).
Columns: PSNR / SSIM / label accuracy of the reconstruction (``fedleak.metrics``), the cosine
and relative error of the server's gradient estimate against the true mini-batch gradient, and
the bytes the client sent (its messages, or its float32 model for sgd).

    nice -n 5 .venv/bin/python simulations/benchmarks/training_strategies/zo_attack.py
    ... --quick   # n <= 100, one client, 20-step attacks, into a temporary folder

Resumable: rows are appended to ``zo_attack_runs.csv`` as they finish; a rerun skips them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench
import pandas as pd
import torch

from fedleak import config, federation, metrics, seeding
from fedleak.attacks import ATTACKS
from fedleak.core import ServerView

OUT = _bench.REPO / "simulations/benchmarks/results/training_strategies"
FIELDS = [
    "cell",
    "trainer",
    "directions",
    "noise_std",
    "client",
    "attack",
    "psnr",
    "ssim",
    "label_acc",
    "grad_cos",
    "grad_rel_err",
    "grad_norm",
    "bytes_sent",
    "client_seconds",
    "attack_seconds",
    *_bench.STAMP,
]
CELLS = [
    ("sgd", {"name": "sgd", "lr": 0.1}),
    *(
        (f"mezo_n{n}", {"name": "mezo", "lr": 0.1, "eps": 1e-3, "directions": n})
        for n in (1, 10, 100, 1000, 10_000, 50_000)
    ),
    *(
        (
            f"mezo_n10000_noise{s:g}",
            {"name": "mezo", "lr": 0.1, "directions": 10_000, "noise_std": s},
        )
        for s in (0.1, 1.0, 10.0)
    ),
]
ATTACK_SPECS = {
    "dlg": {"name": "dlg", "steps": 100},
    # tv = 0: the default prior (0.2, for 32 x 32 photos) holds 8 x 8 digits at 8.7 dB even on
    # the exact gradient; measured on the sgd cell's 3 clients, tv 0 reaches 58-71 dB at 300
    # steps and 59-100 dB at 1,000 (3,000 adds nothing), tv 1e-3 stays at 23 dB.
    "inverting_gradients": {"name": "inverting_gradients", "steps": 1000, "tv": 0.0},
}


def experiment(training: dict, batch: int):
    return config.load(
        {
            "name": "zo_attack",
            "seed": 0,
            "clients": 20,
            "clients_per_round": 10,
            "data": {"name": "digits"},
            "partition": {"name": "iid"},
            "model": {"name": "lenet"},
            "training": {**training, "local_steps": 1, "batch_size": batch},
        }
    )


def client_view(exp, client: int) -> tuple[ServerView, object, dict]:
    """Round 1 of ``client`` as the server holds it, its truth, and the measured extras."""
    sent = federation.initial_params(exp)
    orders = federation.instructions(exp, 1, sent)
    start = time.perf_counter()
    update = federation.local_update(exp, client, 1, sent, orders)
    reply = federation.reply(exp, client, sent, update)  # the server's replay of the seeds
    seconds = time.perf_counter() - start
    result = update.result
    view = ServerView(
        round=1,
        client=client,
        task=exp.dataset().task,
        build_model=exp.build_model,
        loss_fn=exp.loss_fn,
        sent=sent,
        received=reply.params,
        num_examples=len(result.used),
        lr=exp.trainer.lr,
        local_steps=result.steps,
        batch_size=result.batch_size,
        loss=result.loss,
        protocol=dict(exp.resolved["training"]),
        messages=update.messages,
        instructions=orders,
    )
    truth = result.used
    exact = ServerView.from_local_step(view.model(), truth, view.task, lr=1.0).gradient()
    estimate = view.gradient()
    flat_true = torch.cat([exact[k].reshape(-1) for k in sorted(exact)])
    flat_est = torch.cat([estimate[k].reshape(-1) for k in sorted(exact)])
    payload = update.messages if update.messages else update.params
    extras = {
        "grad_cos": float(torch.nn.functional.cosine_similarity(flat_true, flat_est, dim=0)),
        "grad_rel_err": float((flat_est - flat_true).norm() / flat_true.norm()),
        "grad_norm": float(flat_true.norm()),
        "bytes_sent": sum(t.numel() * t.element_size() for t in payload.values()),
        "client_seconds": seconds,
    }
    return view, truth, extras


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    order = {label: i for i, (label, _) in enumerate(CELLS)}
    out = (
        runs.groupby(["cell", "attack"])
        .agg(
            directions=("directions", "first"),
            noise_std=("noise_std", "first"),
            views=("psnr", "size"),
            psnr=("psnr", "mean"),
            psnr_sd=("psnr", "std"),
            ssim=("ssim", "mean"),
            label_acc=("label_acc", "mean"),
            grad_cos=("grad_cos", "mean"),
            bytes_sent=("bytes_sent", "mean"),
        )
        .reset_index()
    )
    out["order"] = out["cell"].map(order)
    return out.sort_values(["attack", "order"]).drop(columns="order")


def page(summary: pd.DataFrame, runs: pd.DataFrame, args) -> str:
    lines = [
        "# Gradient inversion from zeroth-order scalars (mezo): queries per step vs leakage",
        "",
        "Written by `simulations/benchmarks/training_strategies/zo_attack.py` (its docstring "
        "has the setting). Digits, LeNet (d = 8,026), one local step on a batch of "
        f"{args.batch}, round 1, {args.clients} clients per cell; DLG 100 L-BFGS steps, "
        "inverting gradients 1,000 steps (cosine, no TV prior: the measured working setting)"
        + (" (QUICK RUN: n <= 100, 20-step attacks)" if args.quick else "")
        + ". `grad_cos`: cosine of the server's replayed estimate with the true mini-batch "
        "gradient. `bytes`: what the client sent (messages; sgd: its float32 model).",
        f"Provenance: {_bench.provenance(runs)}.",
        "",
        "| attack | cell | n | noise std | views | PSNR (dB) | ± sd | SSIM | label acc | grad cos "
        "| bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.itertuples():
        lines.append(
            f"| {r.attack} | {r.cell} | {r.directions} | {r.noise_std:g} | {r.views} | "
            f"{r.psnr:.2f} | {_bench.cell(r.psnr_sd, 2)} | {r.ssim:.3f} | {r.label_acc:.2f} | "
            f"{r.grad_cos:.3f} | {r.bytes_sent:,.0f} |"
        )
    order = [label for label, _ in CELLS if label in set(runs["cell"])]
    per_client = runs[runs["attack"] == "dlg"].pivot(index="cell", columns="client", values="psnr")
    per_client = per_client.reindex(order)
    clients = list(per_client.columns)
    lines += [
        "",
        "## DLG PSNR (dB) per client",
        "",
        "| cell | " + " | ".join(f"client {c}" for c in clients) + " |",
        "|---|" + "---|" * len(clients),
    ]
    for cell, values in per_client.iterrows():
        lines.append(f"| {cell} | " + " | ".join(_bench.cell(v, 1) for v in values) + " |")
    lines += [
        "",
        "## Reading",
        "",
        "The server's estimate has cosine about sqrt(n / (n + d)) with the true gradient "
        "(0.74 at n = 10,000, 0.93 at n = 50,000, d = 8,026), and DLG's reconstructions follow "
        "it: at the failure floor (4-6 dB) up to n = 1,000 scalars per step, 10-16 dB on the "
        "clients DLG can attack at n = 10,000, 18-21 dB at n = 50,000, against 93-99 dB from "
        "the exact gradient (the third client defeats DLG even then: 5.9 dB). So the leakage "
        "is set by the number of scalars per step relative to d: the few scalars of a "
        "practical MeZO client (1-10 per step) leave DLG at its floor, but DLG recovers the "
        "single example's label from 10 scalars on. Gaussian noise on the scalars changes "
        "nothing up to std 1 (the scalars are ~|grad| = 4.4 in size) and brings DLG back to "
        "its floor at std 10 (estimate cosine 0.41). Inverting gradients, at its measured "
        "working setting (no TV prior; the default 0.2 held it at 8.7 dB even on the exact "
        "gradient), reaches 69 dB on the exact gradient and tells the same story on every "
        "client, including the one DLG cannot attack: 5-6 dB up to n = 100, 7.2 dB at "
        "n = 1,000, 14.9 dB (SSIM 0.85) at n = 10,000 and 20.9 dB (SSIM 0.97: the digit "
        "recovered) at n = 50,000; noise std 10 brings it down to 9.1 dB.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.clients = 1
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "zo_attack_runs.csv"
    done = {(r["cell"], int(r["client"]), r["attack"]) for r in _bench.read_rows(runs_path)}
    measured = _bench.commit()
    for label, training in CELLS:
        if args.quick and training.get("directions", 0) > 100:
            continue
        exp = experiment(training, args.batch)
        clients = federation.sample_clients(exp, 1)[: args.clients]
        for client in clients:
            todo = [a for a in ATTACK_SPECS if (label, client, a) not in done]
            if not todo:
                continue
            view, truth, extras = client_view(exp, client)
            for name in todo:
                spec = dict(ATTACK_SPECS[name])
                if args.quick:
                    spec["steps"] = 20
                attack = ATTACKS[spec.pop("name")](**spec)
                start = time.perf_counter()
                rng = seeding.rng(0, "zo_attack", name, client)
                reconstruction = attack(view, rng)
                scores = metrics.score(reconstruction, truth, view.task, view=view)
                row = {
                    "cell": label,
                    "trainer": training["name"],
                    "directions": training.get("directions", 0),
                    "noise_std": training.get("noise_std", 0.0),
                    "client": client,
                    "attack": name,
                    "psnr": scores["psnr"],
                    "ssim": scores["ssim"],
                    "label_acc": scores["label_acc"],
                    "attack_seconds": time.perf_counter() - start,
                    **extras,
                }
                _bench.append_row(runs_path, _bench.stamp(row, measured), FIELDS)
                print(f"{label} client {client} {name}: psnr {scores['psnr']:.2f}", flush=True)
    runs = pd.read_csv(runs_path, keep_default_na=False, na_values=["nan"])
    summary = summarise(runs)
    _bench.write_csv(out / "zo_attack.csv", summary.to_dict("records"), list(summary.columns))
    text = page(summary, runs, args)
    _bench.atomic(out / "zo_attack.md", text)
    print(text)


if __name__ == "__main__":
    main()
