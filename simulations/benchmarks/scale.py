"""How many virtual clients fedleak handles on Flower's simulation engine (Ray), and their cost.

Measured, for each number of clients N (default 10, 1,000 and 10,000): one whole fedleak run
(``fedleak.pipeline.run``, runner ``ray``: ``flwr.simulation.run_simulation`` with one Ray
actor per core) of a small experiment: ``synthetic_images`` data with 4·N + 64 training
examples (about 4 per client) and 64 test examples, an MLP with one hidden layer of 32, local
SGD on batches of 4, 3 rounds of 10 sampled clients, capture of one client in round 1, no
attacks.  Each N runs in a fresh Python subprocess, so that its memory is its own:

* wall time of the subprocess (Python start-up, imports, Ray start-up and shutdown included);
* peak tree RSS: the peak over time of the summed resident memory of the subprocess and every
  process descended from it (Ray's GCS, raylet and worker/actor processes), sampled every
  0.2 s with psutil.  Summed RSS counts shared pages (e.g. torch's libraries, mapped by every
  actor) once per process, so it is an upper bound on the memory actually in use;
* the driver's own max RSS (``getrusage``), and the test accuracy after round 3.

Target: 10,000 virtual clients fit in 24 GiB of RAM on 2 cores.

    .venv/bin/python simulations/benchmarks/scale.py            # N = 10, 1000, 10000
    .venv/bin/python simulations/benchmarks/scale.py --quick    # N = 10, 100, for the tests
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import _bench  # first: keeps Flower offline, so it must be imported before flwr
import psutil

HERE = Path(__file__).resolve().parent
BUDGET_GIB = 24.0
TARGET_CLIENTS = 10_000
ROUNDS, SAMPLED = 3, 10
RESULT = "FEDLEAK-SCALE-RESULT "  # the child's one line of JSON on stdout
FIELDS = [
    "clients",
    "sampled_per_round",
    "rounds",
    "wall_s",
    "peak_tree_rss_gib",
    "driver_rss_mib",
    "processes",
    "test_accuracy",
    "status",
]


def experiment(clients: int, device: str = "cpu") -> dict:
    """The experiment of one measurement, as a dict for ``fedleak.config.load``."""
    return {
        "name": f"scale-{clients}",
        "seed": 0,
        "device": device,
        "rounds": ROUNDS,
        "clients": clients,
        "clients_per_round": min(SAMPLED, clients),
        "data": {"name": "synthetic_images", "examples": 4 * clients + 64, "test_examples": 64},
        "model": {"name": "mlp", "hidden": [32]},
        "training": {"name": "sgd", "batch_size": 4},
        "observe": {"rounds": [1], "clients_per_round": 1},
        "attacks": [],
        "runner": {"name": "ray"},
    }


# -- the child: one run, in its own process ---------------------------------------------------
def one(clients: int, out: Path, device: str) -> None:
    """Run the experiment for ``clients`` into ``out``; print one JSON line with the result."""
    import logging

    import flwr  # noqa: F401 - installs Flower's log handler, quietened below

    from fedleak import config, pipeline

    logging.getLogger("flwr").setLevel(logging.WARNING)
    store = pipeline.run(config.load(experiment(clients, device)), out=out)
    utility = {int(r["round"]): r for r in store.rows("utility.csv")}
    last = utility[ROUNDS]
    result = {
        "test_accuracy": float(last["test_accuracy"]),
        "failures": sum(int(r["failures"]) for r in utility.values()),
        "driver_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(RESULT + json.dumps(result), flush=True)


# -- the parent: time and watch the child's process tree ------------------------------------
class TreeMemory(threading.Thread):
    """Sample the summed RSS of a process and all its descendants every ``interval`` seconds.

    A process once seen in the tree keeps counting while it lives, even if it is re-parented
    (Ray's workers may outlive their parent briefly).
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = psutil.Process(pid), interval
        self.peak, self.processes = 0, 0
        self._known: dict[int, psutil.Process] = {pid: self.root}
        self._halt = threading.Event()

    def sample(self) -> None:
        """One sample: refresh the tree, sum the RSS of every live process in it."""
        try:
            for child in self.root.children(recursive=True):
                self._known.setdefault(child.pid, child)
        except psutil.Error:
            pass
        total = 0
        for pid, proc in list(self._known.items()):
            try:
                if not proc.is_running():  # also catches a recycled pid
                    raise psutil.NoSuchProcess(pid)
                total += proc.memory_info().rss
            except psutil.Error:
                del self._known[pid]
        self.peak = max(self.peak, total)
        self.processes = max(self.processes, len(self._known))

    def run(self) -> None:
        """Sample until stopped."""
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling (after one last sample)."""
        self._halt.set()
        self.join()


def measure(clients: int, timeout: float, device: str) -> dict:
    """Run one N in a fresh subprocess; its wall time, memory and result."""
    out = Path(tempfile.mkdtemp(prefix=f"fedleak-scale-{clients}-"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(clients)]
    cmd += ["--out", str(out / "run"), "--device", str(device)]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    watch = TreeMemory(child.pid)
    watch.start()
    try:
        stdout, _ = child.communicate(timeout=timeout)
        status = "ok" if child.returncode == 0 else f"exit {child.returncode}"
    except subprocess.TimeoutExpired:
        child.kill()
        stdout, _ = child.communicate()
        status = f"timeout {timeout:.0f} s"
    wall = time.perf_counter() - start
    watch.stop()
    shutil.rmtree(out, ignore_errors=True)
    found = [line for line in stdout.splitlines() if line.startswith(RESULT)]
    result = json.loads(found[-1][len(RESULT) :]) if found else {}
    if status == "ok" and result.get("failures"):
        status = f"{result['failures']} failed client updates"
    return {
        "clients": clients,
        "sampled_per_round": min(SAMPLED, clients),
        "rounds": ROUNDS,
        "wall_s": round(wall, 2),
        "peak_tree_rss_gib": round(watch.peak / 2**30, 3),
        "driver_rss_mib": round(result.get("driver_rss_mib", math.nan), 1),
        "processes": watch.processes,
        "test_accuracy": result.get("test_accuracy", math.nan),
        "status": status,
    }


# -- reporting --------------------------------------------------------------------------------
def machine(device: str) -> str:
    """One line describing where and when this was measured."""
    import torch

    return (
        f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM (shared "
        f"machine; load average at start {_bench.load_average()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads, the default), device {device}, "
        f"flwr {version('flwr')}, "
        f"ray {version('ray')}, fedleak {_bench.commit()}, Python {sys.version.split()[0]}, "
        f"{datetime.now().isoformat(timespec='seconds')}"
    )


def verdict(rows: list[dict]) -> str:
    """Whether 10,000 clients fit in 24 GiB (n/a when 10,000 was not measured)."""
    big = [r for r in rows if r["clients"] == TARGET_CLIENTS]
    if not big:
        return f"n/a ({TARGET_CLIENTS:,} clients not measured)"
    row = big[-1]
    fits = row["status"] == "ok" and row["peak_tree_rss_gib"] <= BUDGET_GIB
    return (
        f"{'yes' if fits else 'no'} (peak tree RSS {row['peak_tree_rss_gib']:.2f} GiB, "
        f"status {row['status']})"
    )


def markdown(rows: list[dict], header: str, done: bool) -> str:
    """The results page: set-up, the table, the verdict."""
    lines = [
        "# Virtual clients on Flower's simulation engine (Ray)",
        "",
        f"Machine: {header}.",
        "",
        "Each row is one fresh subprocess running `fedleak.pipeline.run` with runner `ray` "
        f"(one Ray actor per core): synthetic_images (4·N + 64 training examples, 64 test), "
        f"MLP hidden [32], SGD batch 4, {ROUNDS} rounds of {SAMPLED} sampled clients, one "
        "client captured in round 1, no attacks. Wall time includes Python start-up, imports "
        "and Ray's start-up and shutdown. Peak tree RSS is the peak of the summed RSS of the "
        "subprocess and all its descendants (Ray's GCS, raylet, workers), sampled every 0.2 s; "
        "shared pages count once per process, so it overstates real use. Timings were taken on "
        "a shared 2-core machine (other jobs may have been running).",
        "",
        f"Target: {TARGET_CLIENTS:,} clients in {BUDGET_GIB:.0f} GiB on 2 cores.",
        "",
        "| clients | sampled / round | rounds | wall s | peak tree RSS GiB | driver RSS MiB | "
        "processes | test accuracy (round 3) | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['clients']:,} | {r['sampled_per_round']} | {r['rounds']} | {r['wall_s']:.1f} | "
        f"{r['peak_tree_rss_gib']:.2f} | {r['driver_rss_mib']:.0f} | {r['processes']} | "
        f"{r['test_accuracy']:.4f} | {r['status']} |"
        for r in rows
    ]
    lines += ["", f"**Verdict: {TARGET_CLIENTS:,} clients fit in {BUDGET_GIB:.0f} GiB: "]
    lines[-1] += verdict(rows) + ".**" if done else "(running).**"
    if done:
        lines += ["", f"Load average at the end: {_bench.load_average()}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure every N; print the Markdown table; write scale.md and scale.csv."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--clients", type=int, nargs="+", default=None, help="N values (10 1000 10000)"
    )
    parser.add_argument("--quick", action="store_true", help="N = 10 and 100 (a smoke test)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds before one N is abandoned"
    )
    _bench.add_device_option(parser)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: the child
    args = parser.parse_args(argv)
    if args.one is not None:
        one(args.one, args.out, str(args.device))
        return 0
    clients = args.clients or ([10, 100] if args.quick else [10, 1000, 10_000])
    if any(n < 1 for n in clients):
        parser.error("--clients must be >= 1")

    header = machine(str(args.device))
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = args.out / "scale.csv", args.out / "scale.md"
    with csv_path.open("w", newline="") as f:
        csv.DictWriter(f, FIELDS).writeheader()
    rows: list[dict] = []
    md_path.write_text(markdown(rows, header, done=False))
    for n in clients:
        print(f"N = {n:,}: running ...", file=sys.stderr, flush=True)
        row = measure(n, args.timeout, str(args.device))
        rows.append(row)
        with csv_path.open("a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow(row)
        md_path.write_text(markdown(rows, header, done=False))
        print(
            f"N = {n:,}: {row['wall_s']:.1f} s, {row['peak_tree_rss_gib']:.2f} GiB, "
            f"{row['status']}",
            file=sys.stderr,
            flush=True,
        )
    page = markdown(rows, header, done=True)
    md_path.write_text(page)
    print(page)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
