"""The run directory: the one place every runner writes what the server saw, and results.

Flower's deployment engine runs the ServerApp in a process of its own, so the server never
hands Python objects back: it writes them here, and attacks read them back afterwards.

Layout::

    config.toml            the resolved experiment (the only input a run needs)
    run.log                every log line of the run (rounds, failed clients, attacks)
    meta.json              status ("running" | "done" | "failed" | "diverged"; a dead writer
                           reads "interrupted"), its pid and host, versions, runner, wall time
    model.pt               the global state after the last round (the trained model)
    sent/r0001.pt          global state sent in an observed round (after modifiers) + secrets
    views/r0001_c0003.pt   what client 3 sent back in round 1, with its reported metadata
    truth/r0001_c0003.pt   the examples client 3 trained on: read by metrics only, never attacks
    utility.csv            one row per round   } their columns: fedleak.results, the one
    results.csv            one row per attack  } place every CSV schema is described
    images/                truth beside reconstruction: PNG grids (images), .txt (text)

Every file is written under a temporary name and renamed, and CSV rows are appended as they
are produced, so a run that dies keeps everything it finished.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from fedleak.core import Batch, Messages, Params, Secrets, ServerView

_VIEW = re.compile(r"r(\d+)_c(-?\d+)\.pt$")  # client -1: a securely aggregated round


def _name(round: int, client: int) -> str:
    return f"r{round:04d}_c{client:04d}.pt"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a reused pid reads as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- generic, crash-safe writes ---------------------------------------------------------
    def write_bytes(self, relative: str, data: bytes) -> Path:
        """Write a file atomically (temporary name, then rename)."""
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    def write_text(self, relative: str, text: str) -> Path:
        """Write a text file atomically."""
        return self.write_bytes(relative, text.encode())

    def _save(self, relative: str, obj: Any) -> None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        self.write_bytes(relative, buffer.getvalue())

    def _load(self, relative: str) -> Any:
        return torch.load(self.root / relative, weights_only=True)

    def append_row(self, name: str, row: Mapping[str, Any]) -> None:
        """Append one row to ``name`` (a CSV file), widening the header if the row has new keys."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        header = self._header(path)
        if header and set(row) <= set(header):
            with path.open("a", newline="") as f:
                csv.DictWriter(f, header, restval="").writerow(row)
            return
        rows = self.rows(name)
        header = header + [k for k in row if k not in header]
        out = io.StringIO()
        writer = csv.DictWriter(out, header, restval="")
        writer.writeheader()
        writer.writerows([*rows, row])
        self.write_text(name, out.getvalue())

    @staticmethod
    def _header(path: Path) -> list[str]:
        if not path.exists():
            return []
        with path.open(newline="") as f:
            return next(csv.reader(f), [])

    def rows(self, name: str) -> list[dict[str, str]]:
        """All rows of a CSV file of this run (empty if it does not exist yet)."""
        path = self.root / name
        if not path.exists():
            return []
        with path.open(newline="") as f:
            return list(csv.DictReader(f))

    @contextlib.contextmanager
    def log_file(self) -> Iterator[None]:
        """Append everything logger ``fedleak`` says meanwhile to ``run.log`` in the run.

        Whichever process writes the run (the ServerApp may run in another one) logs there;
        a process that already logs to this file is not attached twice.
        """
        path = (self.root / "run.log").resolve()
        logger = logging.getLogger("fedleak")
        if any(getattr(h, "baseFilename", None) == str(path) for h in logger.handlers):
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)  # the file keeps every round, whatever the terminal
        try:
            yield
        finally:
            logger.setLevel(level)
            logger.removeHandler(handler)
            handler.close()

    # -- meta -------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """The run's meta.json (empty before the run starts)."""
        path = self.root / "meta.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def mark_running(self, **fields: Any) -> None:
        """Status "running", with the process and host that write the run (see :meth:`status`)."""
        self.update_meta(status="running", pid=os.getpid(), host=socket.gethostname(), **fields)

    def status(self) -> str:
        """meta.json's status, except that a run whose writer died reads ``"interrupted"``.

        A killed process (SIGKILL, power loss) cannot update meta.json, so readers check
        whether the recorded process still runs.  Only on the same host: a run written from
        another machine reads "running" until that machine says otherwise.
        """
        meta = self.meta()
        status = str(meta.get("status", ""))
        if status != "running" or meta.get("host", socket.gethostname()) != socket.gethostname():
            return status
        return "running" if process_alive(int(meta.get("pid", -1))) else "interrupted"

    def update_meta(self, **fields: Any) -> None:
        """Merge ``fields`` into meta.json."""
        self.write_text("meta.json", json.dumps({**self.meta(), **fields}, indent=2) + "\n")

    def write_model(self, params: Params) -> None:
        """The global state after the last round."""
        self._save("model.pt", params)

    def model(self) -> Params:
        """The trained global state (``exp.build_model().load_state_dict`` takes it)."""
        if not (self.root / "model.pt").is_file():
            raise FileNotFoundError(
                f"{self.root} has no model.pt: the run did not finish its last round"
            )
        return self._load("model.pt")

    # -- what the server saw ----------------------------------------------------------------
    def write_sent(
        self, round: int, params: Params, secrets: Secrets, instructions: Messages
    ) -> None:
        """The global state sent in ``round`` and the instructions every client received.

        The state is the one after the modifiers; ``secrets`` is what they planted.
        """
        self._save(
            f"sent/r{round:04d}.pt",
            {"params": params, "secrets": dict(secrets), "instructions": dict(instructions)},
        )

    def write_view(
        self,
        round: int,
        client: int,
        received: Params,
        report: Mapping[str, Any],
        messages: Messages,
    ) -> None:
        """What ``client`` sent back in ``round``, and the metadata it reported.

        Its state as the server holds it, and the messages it sent beside it.
        """
        self._save(
            f"views/{_name(round, client)}",
            {"received": received, "messages": dict(messages), **report},
        )

    def write_truth(self, round: int, client: int, truth: Batch) -> None:
        """The examples ``client`` trained on in ``round`` (for metrics only)."""
        self._save(
            f"truth/{_name(round, client)}",
            {"inputs": truth.inputs, "labels": truth.labels},
        )

    def observed(self) -> list[tuple[int, int]]:
        """``(round, client)`` of every stored view, in order."""
        found = (_VIEW.search(p.name) for p in (self.root / "views").glob("r*_c*.pt"))
        return sorted((int(m[1]), int(m[2])) for m in found if m)

    def views(self, experiment: Any) -> Iterator[ServerView]:
        """Rebuild the stored views; the architecture and loss come from the experiment."""
        sent_cache: dict[int, dict[str, Any]] = {}
        trainer = experiment.resolved["training"]
        task = experiment.dataset().task
        for round, client in self.observed():
            if round not in sent_cache:
                sent_cache = {round: self._load(f"sent/r{round:04d}.pt")}
            sent = sent_cache[round]
            stored = self._load(f"views/{_name(round, client)}")
            yield ServerView(
                round=round,
                client=client,
                task=task,
                build_model=experiment.build_model,
                loss_fn=experiment.loss_fn,
                sent=sent["params"],
                received=stored["received"],
                num_examples=int(stored["num_examples"]),
                lr=float(trainer["lr"]),
                local_steps=int(stored["local_steps"]),
                batch_size=int(stored["batch_size"]),
                loss=float(stored["loss"]),
                protocol=trainer,
                secrets=sent["secrets"],
                messages=stored.get("messages", {}),  # runs before messages existed: none
                instructions=sent.get("instructions", {}),
            )

    def truth(self, round: int, client: int) -> Batch:
        """The examples ``client`` trained on in ``round``."""
        stored = self._load(f"truth/{_name(round, client)}")
        return Batch(stored["inputs"], stored["labels"])
