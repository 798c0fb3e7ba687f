"""What fedleak's hooks cost on top of plain Flower, on the same in-process grid.

Measured: the wall time of one whole federation (every round, with the global model evaluated
on the test set after each round) of one experiment (default ``quickstart_defended.toml``:
digits, LeNet, 200 rounds, 20 clients, 10 per round, clip + Gaussian noise), run three ways on
a fresh :class:`fedleak.sim.grid.LocalGrid` with one node per client:

* ``a``  fedleak, full hooks: ``make_server_app`` + ``fedleak.sim.client.app``, the defenses
  on, and capture of *every* round and *every* sampled client (``observe.rounds = []``,
  ``observe.clients_per_round = 0``): each round writes the sent state, the views and the truth
  files into a run directory, and every reply carries the truth channel.  No attacks.
* ``a'`` the same with fedleak's default capture (round 1 only, every sampled client).
* ``b``  plain Flower: a minimal ClientApp (the same model, data, learning rate, batch size and
  steps, a plain torch SGD loop) and Flower's stock ``FedAvg`` with centralised evaluation
  (``fedleak.federation.evaluate``), Flower's own sampling; no capture, no defenses, no truth.

After one warm-up run of each, the three alternate for ``--repeats`` rounds; the table reports
the median wall time of each, per-round milliseconds, and the ratio to ``b``.

Target: ``a / b <= 1.15`` (full hooks cost at most 15 % over plain Flower).

    .venv/bin/python simulations/benchmarks/overhead.py            # the full benchmark
    .venv/bin/python simulations/benchmarks/overhead.py --quick    # 10 rounds, for the tests
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import _bench  # first: keeps Flower offline, so it must be imported before flwr
import flwr  # noqa: F401 - installs Flower's log handler, tuned below
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedleak import config, federation
from fedleak.config import Experiment
from fedleak.sim import client
from fedleak.sim.grid import LocalGrid
from fedleak.sim.server import make_server_app
from fedleak.store import RunStore

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE.parent / "quickstart_defended.toml"
TARGET = 1.15
FULL, DEFAULT, PLAIN = "a", "a'", "b"
LABELS = {
    FULL: "fedleak, capture every round + defenses",
    DEFAULT: "fedleak, capture round 1 only + defenses",
    PLAIN: "plain Flower (stock FedAvg, no hooks)",
}
FIELDS = [
    "variant",
    "run",
    "rounds",
    "clients",
    "clients_per_round",
    "seconds",
    "ms_per_round",
    "test_accuracy",
]


# -- (b) plain Flower: the baseline, written the way a Flower user would --------------------
_PLAIN: dict[str, Experiment] = {}  # the experiment the plain ClientApp trains (set per run)
plain_client = ClientApp()


@plain_client.train()
def plain_train(msg: Message, context: Context) -> Message:
    """Local SGD with the experiment's model, data and hyper-parameters; no defenses."""
    exp = _PLAIN["exp"]
    sgd = exp.trainer
    partition = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    device = exp.device  # as fedleak's client: train there, reply from the CPU
    model = exp.build_model().to(device)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = exp.client_data(partition).to(device)
    n = len(data.labels)
    size = min(sgd.batch_size or n, n)
    per_epoch = math.ceil(n / size)
    steps = sgd.local_epochs * per_epoch if sgd.local_epochs else sgd.local_steps
    optimizer = torch.optim.SGD(model.parameters(), lr=sgd.lr, momentum=sgd.momentum)
    generator = torch.Generator().manual_seed(1_000_003 * server_round + partition)
    model.train()
    losses = []
    for step in range(steps):
        k = step % per_epoch
        if k == 0:
            order = torch.randperm(n, generator=generator).to(device)
        idx = order[k * size : (k + 1) * size]
        optimizer.zero_grad()
        loss = exp.loss_fn(model(data.inputs[idx]), data.labels[idx])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    metrics = MetricRecord(
        {"train_loss": sum(losses) / len(losses), "num-examples": min(n, steps * size)}
    )
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics})
    return Message(content, reply_to=msg)


def plain_server(exp: Experiment, accuracy: list[float]) -> ServerApp:
    """Flower's stock FedAvg sampling k of n nodes, the global model evaluated every round."""
    app = ServerApp()
    fed = exp.federation
    fraction = fed.clients_per_round / fed.clients
    if int(fed.clients * fraction) != fed.clients_per_round:  # float rounding, e.g. 3/7
        fraction = (fed.clients_per_round + 0.5) / fed.clients

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = federation.evaluate(exp, arrays.to_torch_state_dict())
        accuracy.append(metrics["test_accuracy"])
        return MetricRecord(metrics)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=fraction, fraction_evaluate=0.0, min_available_nodes=fed.clients
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(federation.initial_params(exp)),
            num_rounds=fed.rounds,
            train_config=ConfigRecord({"lr": exp.trainer.lr}),
            evaluate_fn=evaluate,
        )

    return app


# -- one timed run of each variant ----------------------------------------------------------
def _context() -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


def run_fedleak(exp: Experiment) -> tuple[float, float]:
    """Wall seconds and final test accuracy of fedleak's server + client apps (no attacks)."""
    root = Path(tempfile.mkdtemp(prefix="fedleak-overhead-"))
    try:
        store = RunStore(root)
        grid = LocalGrid(client.app, exp.federation.clients)
        start = time.perf_counter()
        make_server_app(exp, store)(grid, _context())
        seconds = time.perf_counter() - start
        rows = store.rows("utility.csv")
        failures = sum(int(r["failures"]) for r in rows)
        if failures:
            raise RuntimeError(f"fedleak run had {failures} failed client updates")
        return seconds, float(rows[-1]["test_accuracy"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_plain(exp: Experiment) -> tuple[float, float]:
    """Wall seconds and final test accuracy of the plain Flower apps."""
    _PLAIN["exp"] = exp
    accuracy: list[float] = []
    grid = LocalGrid(plain_client, exp.federation.clients)
    start = time.perf_counter()
    plain_server(exp, accuracy)(grid, _context())
    seconds = time.perf_counter() - start
    return seconds, accuracy[-1]


# -- reporting --------------------------------------------------------------------------------
def machine(threads: int, device: torch.device) -> str:
    """One line describing where and when this was measured."""
    return (
        f"{os.cpu_count()} cores (shared machine; load average at start {_bench.load_average()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads, "
        f"{'set with --threads' if threads else 'the default'}), device {device}, "
        f"flwr {version('flwr')}, fedleak {_bench.commit()}, Python {sys.version.split()[0]}, "
        f"{datetime.now().isoformat(timespec='seconds')}"
    )


def summary(rows: list[dict], exp: Experiment) -> list[dict]:
    """Median per variant over the timed (non-warm-up) runs, and the ratio to plain Flower."""
    timed = [r for r in rows if r["run"] != "warm-up"]
    medians = {
        v: statistics.median(r["seconds"] for r in timed if r["variant"] == v)
        for v in (FULL, DEFAULT, PLAIN)
        if any(r["variant"] == v for r in timed)
    }
    out = []
    for variant, seconds in medians.items():
        ratio = seconds / medians[PLAIN] if PLAIN in medians else float("nan")
        accuracy = [r["test_accuracy"] for r in timed if r["variant"] == variant]
        out.append(
            {
                "variant": variant,
                "what": LABELS[variant],
                "runs": len(accuracy),
                "median_s": seconds,
                "ms_per_round": 1000 * seconds / exp.federation.rounds,
                "ratio": ratio,
                "accuracy": statistics.median(accuracy),
            }
        )
    return out


def markdown(rows: list[dict], exp: Experiment, args: argparse.Namespace, done: bool) -> str:
    """The results page: set-up, summary table, verdict, and every run."""
    fed = exp.federation
    lines = [
        "# fedleak hook overhead vs plain Flower",
        "",
        f"Machine: {args.machine}.",
        "",
        f"Experiment: `{args.config_name}` ({exp.data.name}, {exp.model.name}, {fed.rounds} "
        f"rounds, {fed.clients} clients, {fed.clients_per_round} per round, defenses: "
        f"{', '.join(d.name for d in exp.defenses) or 'none'}), on a fresh in-process "
        f"`LocalGrid` per run; the global model is evaluated on the test set after every "
        f"round in all variants. One warm-up of each variant, then {args.repeats} alternating "
        f"repeats; medians of the repeats. Timings were taken on a shared 2-core machine "
        f"(other jobs were running), so single runs are noisy.",
        "",
        "Target: a / b <= 1.15.",
        "",
    ]
    table = summary(rows, exp) if done else []
    if table:
        lines += [
            "| variant | what | runs | median wall s | ms / round | ratio to b | "
            "final test accuracy |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {t['variant']} | {t['what']} | {t['runs']} | {t['median_s']:.2f} | "
            f"{t['ms_per_round']:.1f} | {t['ratio']:.3f} | {t['accuracy']:.4f} |"
            for t in table
        ]
        ratios = {t["variant"]: t["ratio"] for t in table}
        lines += [""] + [
            f"**Verdict, {what}: {v} / b = {ratios[v]:.3f}, target <= {TARGET}: "
            f"{'yes' if ratios[v] <= TARGET else 'no'}.**"
            for v, what in (
                (DEFAULT, "the experiment as configured (capture of round 1)"),
                (FULL, "capture of every update of every round"),
            )
        ]
        lines += ["", f"Load average at the end: {_bench.load_average()}."]
    else:
        lines += ["(incomplete: the summary is written when every run has finished)"]
    lines += [
        "",
        "## Every run",
        "",
        "| variant | run | rounds | wall s | ms / round | final test accuracy |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} | {r['run']} | {r['rounds']} | {r['seconds']:.2f} | "
        f"{r['ms_per_round']:.1f} | {r['test_accuracy']:.4f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the Markdown table; write overhead.md and overhead.csv."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="experiment TOML")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs of each variant (3; --quick: 1)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument("--quick", action="store_true", help="10 rounds, 1 repeat (smoke test)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    _bench.add_device_option(parser)
    parser.add_argument(
        "-o", "--override", action="append", default=[], help="dotted.key=value, as fedleak run"
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # as `fedleak run` does, for both

    overrides = ["attacks=[]", f"device={args.device}", *args.override]
    if args.quick:
        overrides.append("rounds=10")
    base = config.load(args.config, [*overrides, "observe.rounds=[1]"])
    if base.trainer.name != "sgd":
        parser.error("the plain-Flower baseline implements the sgd trainer only")
    experiments = {
        FULL: config.load(
            args.config, [*overrides, "observe.rounds=[]", "observe.clients_per_round=0"]
        ),
        DEFAULT: config.load(
            args.config, [*overrides, "observe.rounds=[1]", "observe.clients_per_round=0"]
        ),
        PLAIN: base,
    }
    base.check()
    runners = {FULL: run_fedleak, DEFAULT: run_fedleak, PLAIN: run_plain}
    try:
        args.config_name = str(args.config.resolve().relative_to(HERE.parents[1]))
    except ValueError:
        args.config_name = str(args.config)
    args.machine = machine(args.threads, args.device)

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = args.out / "overhead.csv", args.out / "overhead.md"
    with csv_path.open("w", newline="") as f:
        csv.DictWriter(f, FIELDS).writeheader()
    rows: list[dict] = []
    order = [FULL, PLAIN, DEFAULT]  # a, b, a', a, b, a', ...: drifts in load hit all three
    plan = [(v, "warm-up") for v in order]
    plan += [(v, str(i)) for i in range(1, args.repeats + 1) for v in order]
    for variant, run in plan:
        exp = experiments[variant]
        seconds, accuracy = runners[variant](exp)
        row = {
            "variant": variant,
            "run": run,
            "rounds": exp.federation.rounds,
            "clients": exp.federation.clients,
            "clients_per_round": exp.federation.clients_per_round,
            "seconds": round(seconds, 4),
            "ms_per_round": round(1000 * seconds / exp.federation.rounds, 3),
            "test_accuracy": round(accuracy, 6),
        }
        rows.append(row)
        with csv_path.open("a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow(row)
        md_path.write_text(markdown(rows, exp, args, done=False))
        print(f"{variant:>2} {run:>7}: {seconds:8.2f} s", file=sys.stderr, flush=True)
    page = markdown(rows, base, args, done=True)
    md_path.write_text(page)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
