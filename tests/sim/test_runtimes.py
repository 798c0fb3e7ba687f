"""The same experiment on Flower's real runtimes: simulation engine (Ray) and deployment engine.

Both are slow (Ray start-up; one process per message on SuperNodes) and marked so.
"""

import csv
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedleak import config, pipeline

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def read(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def same_run_directory(a: Path, b: Path) -> None:
    """Identical utility, results and captured views (timings aside)."""
    for name in ("utility.csv", "results.csv"):
        assert (a / name).exists() == (b / name).exists(), name  # results: only with attacks
        if (a / name).exists():
            assert read(a / name) == read(b / name), name
    views = sorted(p.name for p in (a / "views").iterdir())
    assert views == sorted(p.name for p in (b / "views").iterdir()) and views
    for name in views:
        x, y = torch.load(a / "views" / name), torch.load(b / "views" / name)
        assert all(torch.equal(x["received"][k], y["received"][k]) for k in x["received"])


def test_ray_simulation_matches_the_in_process_run(tmp_path, tiny):
    spec = tiny(runner={"name": "ray", "cpus_per_client": 1, "cpus": 2})
    ray = pipeline.run(config.load(spec), tmp_path / "ray")
    local = pipeline.run(config.load(tiny()), tmp_path / "local")
    assert ray.meta()["status"] == "done" and ray.meta()["runner"] == "ray"
    assert [int(r["failures"]) for r in ray.rows("utility.csv")] == [0, 0, 0]
    same_run_directory(ray.root, local.root)


def test_ray_runs_flower_secaggplus_like_the_in_process_run(tmp_path, tiny):
    secure = {"name": "secure_aggregation", "protocol": "secaggplus"}
    spec = tiny(defenses=[secure], clients_per_round=3, observe={"rounds": [2]})
    ray = pipeline.run(config.load({**spec, "runner": {"name": "ray", "cpus": 2}}), tmp_path / "r")
    local = pipeline.run(config.load(spec), tmp_path / "local")
    assert [int(r["failures"]) for r in ray.rows("utility.csv")] == [0, 0, 0]
    assert ray.observed() == local.observed() == [(2, -1)]
    exp = config.load(spec)
    x, y = (next(iter(s.views(exp))).received for s in (ray, local))
    # equal up to SecAgg+'s stochastic quantisation (Flower draws it from NumPy's global RNG)
    assert all(torch.allclose(x[k], y[k], atol=1e-3) for k in x)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(path: Path, text: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text(errors="replace").count(text) >= count:
            return
        time.sleep(0.5)
    raise TimeoutError(
        f"{path} never showed {text!r} x{count}:\n{path.read_text(errors='replace')[-2000:]}"
    )


DEPLOYED = {
    "none": {},
    "secaggplus": {"defenses": [{"name": "secure_aggregation", "protocol": "secaggplus"}]},
    # a server strategy whose clients answer its instructions with messages, not a model
    "zo_newton": {
        "training": {"name": "zo_query", "parameters": ["3.bias"]},
        "server": {"name": "zo_newton", "parameters": ["3.bias"], "budget": 400},
        "attacks": [],
    },
}


@pytest.mark.parametrize("case", list(DEPLOYED))
def test_deployment_engine_superlink_and_two_supernodes(tmp_path, tiny, flower_offline, case):
    """SuperLink + 2 SuperNodes over loopback; `flwr run` via the deployment runner.

    With ``secaggplus`` the nodes run Flower's SecAgg+ (four round trips, a ClientApp process
    per message, the protocol's state kept by the SuperNodes between them); with ``zo_newton``
    the server's points travel to the nodes and their losses come back as messages.
    """
    name = f"fedleak-test-{case}"
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    logs, procs = tmp_path / "logs", []
    logs.mkdir()
    try:
        procs.append(
            subprocess.Popen(
                [
                    BIN / "flower-superlink",
                    "--insecure",
                    "--port",
                    str(port),
                    "--disable-runtime-dependency-installation",
                ],
                stdout=(logs / "superlink.log").open("w"),
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        for i in range(2):
            node_env = {**env, "FLWR_HOME": str(tmp_path / f"node{i}")}
            procs.append(
                subprocess.Popen(
                    [
                        BIN / "flower-supernode",
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        f"partition-id={i} num-partitions=2",
                    ],
                    stdout=(logs / f"node{i}.log").open("w"),
                    stderr=subprocess.STDOUT,
                    env=node_env,
                )
            )
        wait_for(logs / "superlink.log", "Activated node_id", 2, timeout=120)
        with (Path(flower_offline) / "config.toml").open("a") as f:
            # one federation per test: FLWR_HOME (and its config.toml) lasts the whole session
            f.write(f'\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        spec = tiny(
            clients=2,
            rounds=1,
            observe={"rounds": [1]},
            runner={"name": "deployment", "federation": name, "timeout": 900},
            **DEPLOYED[case],
        )
        store = pipeline.run(config.load(spec), tmp_path / "run")
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    assert store.meta()["status"] == "done" and store.meta()["server"] == "done"
    assert [int(r["failures"]) for r in store.rows("utility.csv")] == [0, 0]
    # the ServerApp ran in its own process and reached the same numbers as the in-process run
    spec.pop("runner")
    local = pipeline.run(config.load(spec), tmp_path / "local")
    if case != "secaggplus":
        assert sorted(store.observed()) == [(1, 0), (1, 1)]
        assert len(store.rows("results.csv")) == 2 * len(spec["attacks"])
        same_run_directory(store.root, local.root)
        exp = config.load(spec)
        for a, b in zip(store.views(exp), local.views(exp), strict=True):
            assert set(a.messages) == set(b.messages) == _declared(exp)
            assert all(torch.equal(a.messages[k], b.messages[k]) for k in a.messages)
    else:  # one aggregate view, equal up to SecAgg+'s stochastic quantisation
        assert store.observed() == local.observed() == [(1, -1)]
        exp = config.load(spec)
        x, y = (next(iter(s.views(exp))).received for s in (store, local))
        assert all(torch.allclose(x[k], y[k], atol=1e-3) for k in x)


# Every shipped strategy file on Ray, shrunk to two rounds: what the clients send beside (or
# instead of) their models crosses Ray's process boundary and reaches the same views.
STRATEGIES = (
    "zo_mezo",
    "zo_newton",
    "skmm_digits",
    "ncl_digits",
    "cpt_clients",
    "cpt_groups",
    "shared_features",
    "meta_posterior",
    "robust_pruning_federated",
    "text_prune_client",
    "text_prune_server",
    "projectionnet",
)


NEEDS_DATA = {"robust_pruning_federated"}  # SST-2 from the data root


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_runs_on_ray_like_in_process(tmp_path, request, name):
    shrink = ["rounds=2", "observe.rounds=[1, 2]", "attacks=[]"]
    if name in NEEDS_DATA:
        shrink.append(f"data.root={str(request.getfixturevalue('data_root'))!r}")
    path = Path(__file__).parents[2] / "simulations" / f"{name}.toml"
    local = pipeline.run(config.load(path, shrink), tmp_path / "local")
    exp = config.load(path, [*shrink, 'runner={name = "ray", cpus = 2}'])
    ray = pipeline.run(exp, tmp_path / "ray")
    assert ray.meta()["status"] == "done" and ray.meta()["runner"] == "ray"
    same_run_directory(ray.root, local.root)
    for a, b in zip(local.views(exp), ray.views(exp), strict=True):
        # what the options make the clients send, among what their plugins declare
        assert set(a.messages) == set(b.messages) <= _declared(exp)
        assert a.messages or not _declared(exp)
        assert all(torch.equal(a.messages[k], b.messages[k]) for k in a.messages)


def _declared(exp) -> set[str]:
    """Every message name the experiment's client-side plugins declare."""
    from fedleak.core import sends

    return {*sends(exp.trainer), *sends(exp.selection)}
