"""Runners: execute an experiment's federation and fill its run directory.

* ``local``       — an in-process grid (seconds; tests, notebooks, the quickstart);
* ``ray``         — Flower's simulation engine (``run_simulation``), for many virtual clients;
* ``deployment``  — ``flwr run`` against a SuperLink: the managed local one (``federation =
  "local"``, a simulation) or real SuperLink + SuperNode processes on one or many machines.

All three produce the same run directory for the same config: the server writes everything it
observes there, whichever process it runs in.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fedleak.config import Experiment
from fedleak.registry import ConfigError, Registry, construct
from fedleak.sim import OFFLINE_ENV, client
from fedleak.sim.grid import LocalGrid
from fedleak.sim.server import make_server_app
from fedleak.store import RunStore

RUNNERS = Registry("runner")
APP_DIR = Path(__file__).parent / "app"  # the thin Flower app whose components live in fedleak


@RUNNERS.register("local")
@dataclass
class Local:
    """Every client in this process, one after the other (no Ray, no network)."""

    def __call__(self, exp: Experiment, store: RunStore) -> None:
        """Federate ``exp``; the server writes into ``store``."""
        from flwr.app import Context, RecordDict

        grid = LocalGrid(client.app, exp.federation.clients)
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        make_server_app(exp, store)(grid, context)


@RUNNERS.register("ray")
@dataclass
class Ray:
    """Flower's simulation engine: virtual clients on a pool of Ray actors."""

    cpus_per_client: int = 1  # each concurrent client actor reserves this many cores
    cpus: int = 0  # cores Ray may use; 0 = all of this machine's

    def __post_init__(self) -> None:
        if self.cpus_per_client < 1:
            raise ValueError(f"ray: cpus_per_client must be >= 1, got {self.cpus_per_client}")
        if self.cpus < 0:
            raise ValueError(f"ray: cpus must be >= 0 (0 = all), got {self.cpus}")

    def __call__(self, exp: Experiment, store: RunStore) -> None:
        """Federate ``exp``; the server writes into ``store``."""
        from flwr.simulation import run_simulation

        for key, value in OFFLINE_ENV.items():
            os.environ.setdefault(key, value)
        run_simulation(
            server_app=make_server_app(exp, store),
            client_app=client.app,
            num_supernodes=exp.federation.clients,
            backend_config={
                "client_resources": {"num_cpus": self.cpus_per_client, "num_gpus": 0.0},
                "init_args": {"num_cpus": self.cpus or os.cpu_count(), "log_to_driver": False},
            },
        )


@RUNNERS.register("deployment")
@dataclass
class Deployment:
    """``flwr run`` against a SuperLink named in ``$FLWR_HOME/config.toml``."""

    federation: str = "local"  # "local" = Flower's managed local SuperLink (simulation)
    timeout: float = 3600.0  # seconds before the run is abandoned (Flower's "pending" flake)
    app: str = ""  # Flower app directory; empty = the thin app shipped with fedleak

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"deployment: timeout must be > 0, got {self.timeout}")

    def command(self, exp: Experiment, store: RunStore) -> list[str]:
        """The ``flwr run`` command line for this run."""
        flwr = Path(sys.executable).with_name("flwr")
        cmd = [
            str(flwr if flwr.exists() else "flwr"),
            "run",
            self.app or str(APP_DIR),
            self.federation,
            "--stream",
            "--run-config",
            f"run-dir={_toml_string(str(store.root.resolve()))}",
        ]
        if self.federation == "local":
            cmd += ["--federation-config", f"num-supernodes={exp.federation.clients}"]
        return cmd

    def __call__(self, exp: Experiment, store: RunStore) -> None:
        """Federate ``exp``; the server writes into ``store``."""
        # flwr looks up flower-superlink (for "local") on PATH: use this environment's scripts.
        scripts = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            **OFFLINE_ENV,
            "PATH": scripts + os.pathsep + os.environ.get("PATH", ""),
        }
        cmd = self.command(exp, store)
        done = subprocess.run(cmd, env=env, timeout=self.timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"flwr run failed with exit code {done.returncode}: {shlex.join(cmd)}"
            )
        if store.meta().get("server") not in ("done", "diverged"):
            raise RuntimeError(
                f"flwr run returned, but the ServerApp did not finish ({store.root}/meta.json); "
                "see the SuperLink log"
            )


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def runner(exp: Experiment):
    """The experiment's runner object (options checked here, before anything runs)."""
    try:
        cls = RUNNERS[exp.runner.name]
    except ConfigError as err:
        raise ConfigError(f"[runner] {err}") from None
    return construct(cls, exp.runner.options, "runner", label=f"runner {exp.runner.name!r}")
