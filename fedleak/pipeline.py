"""An experiment end to end: federate (capturing what the server sees), then attack and score.

Capture first, attack afterwards: the federation writes the server's views into the run
directory (whatever process the server runs in), then every configured attack runs on every
stored view and each result is scored against the truth the attack never saw.  Rows are
appended as they are produced, and finished (round, client, attack) rows are skipped when a run
directory is attacked again, so nothing computed is lost or recomputed.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from datetime import datetime
from pathlib import Path

import torch

from fedleak import metrics, seeding
from fedleak.config import Experiment
from fedleak.defenses.dpsgd import accounting
from fedleak.federation import Diverged, non_finite
from fedleak.store import RunStore

log = logging.getLogger("fedleak")


def default_dir(exp: Experiment, base: str | Path = "runs") -> Path:
    """``runs/<name>/<timestamp>``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return Path(base) / exp.federation.name / stamp


def run(exp: Experiment, out: str | Path | None = None) -> RunStore:
    """Run the federation with the experiment's runner, then its attacks; return the run store."""
    from fedleak.sim.runners import runner  # Flower is needed for federating, not for attacking

    execute = runner(exp)
    exp.check()
    store = RunStore(out or default_dir(exp))
    if store.root.exists() and any(store.root.iterdir()):
        raise FileExistsError(f"{store.root} is not empty; choose another --out directory")
    store.write_text("config.toml", exp.toml())
    started = time.monotonic()
    store.mark_running(
        runner=exp.runner.name,
        started=datetime.now().isoformat(timespec="seconds"),
        versions=_versions(),
    )
    try:
        with store.log_file():
            execute(exp, store)
            if why := store.meta().get("diverged"):
                raise Diverged(f"{why} (run directory: {store.root})")
            if (privacy := accounting(exp)) is not None:  # DP-SGD: each client's ε over the run
                store.update_meta(dpsgd=privacy)
            attack(exp, store)
    except Diverged as err:
        store.update_meta(status="diverged", error=str(err))
        raise
    except BaseException as err:
        store.update_meta(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    store.update_meta(status="done", seconds=round(time.monotonic() - started, 3))
    return store


def resume(exp: Experiment, store: RunStore) -> None:
    """Attack a run directory's stored views again: missing rows only, finished ones are kept.

    For a run whose federation is over (``fedleak attack``, a resumed sweep cell, attacks
    appended to the list).  The status is "running" meanwhile, then "done" once the rows are
    complete, if the federation was (a diverged or interrupted federation keeps its status).
    """
    meta, before = store.meta(), store.status()
    if before == "running" and meta.get("pid") != os.getpid():
        raise FileExistsError(
            f"{store.root} is being written by process {meta.get('pid')} on {meta.get('host')}; "
            "wait for it, or stop it first"
        )
    store.mark_running()
    started = time.monotonic()
    try:
        with store.log_file():
            if "dpsgd" not in meta and (privacy := accounting(exp)) is not None:
                store.update_meta(dpsgd=privacy)
            attack(exp, store)
    except BaseException as err:
        store.update_meta(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    seconds = float(meta.get("seconds", 0)) + time.monotonic() - started
    status = "done" if meta.get("server") == "done" else before
    store.update_meta(status=status, seconds=round(seconds, 3))


def attack(exp: Experiment, store: RunStore) -> None:
    """Run every attack on every stored view; append one scored row per result.

    Attacks run on the experiment's device (the view moved there), scoring on the CPU.
    """
    device = exp.device
    done = {(r["round"], r["client"], r["attack_index"]) for r in store.rows("results.csv")}
    images = store.root / "images"
    images.mkdir(exist_ok=True)
    for view in store.views(exp):
        if bad := non_finite(view.received):  # e.g. a run from before clients were checked
            log.warning(
                "round %d client %d: the stored update is not finite (%s); not attacked",
                view.round,
                view.client,
                bad[0],
            )
            continue
        truth = store.truth(view.round, view.client)
        on_device = view.to(device)
        for index, attack in enumerate(exp.attacks):
            if (str(view.round), str(view.client), str(index)) in done:
                continue
            rng = seeding.rng(exp.seed, "attack", index, view.round, view.client)
            start = time.monotonic()
            reconstruction = attack(on_device, rng).to("cpu")
            seconds = time.monotonic() - start
            scores = metrics.score(reconstruction, truth, view.task, view=view)
            store.append_row(
                "results.csv",
                {
                    "round": view.round,
                    "client": view.client,
                    "attack_index": index,
                    "attack": attack.name,
                    "examples": len(truth),
                    **{k: round(v, 6) for k, v in scores.items()},
                    "seconds": round(seconds, 3),
                },
            )
            stem = f"r{view.round:04d}_c{view.client:04d}_{index}_{attack.name}"
            metrics.save_example(images / stem, truth, reconstruction, view.task)
            log.info(
                "round %d client %d %s: %s (%.1fs)",
                view.round,
                view.client,
                attack.name,
                ", ".join(f"{k} {scores[k]:.3f}" for k in metrics.HEADLINE[view.task.modality]),
                seconds,
            )


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": version("flwr"),
        "fedleak": version("fedleak"),
    }
