"""What a person sees while ``fedleak run`` and ``fedleak bench`` work: progress, not a log.

The library only logs (logger ``fedleak``) and writes its run directory; this module, used by
the CLI alone, turns that into a terminal display:

* :func:`terminal` routes the log: every line still reaches each run's ``run.log`` (see
  :meth:`fedleak.store.RunStore.log_file`), but the terminal shows warnings and the sweep's
  one line per cell, and the per-round and per-attack lines only with ``--verbose``.
* :class:`Watch` follows a run directory while the run fills it, whatever process writes it
  (the ray and deployment runners' servers run elsewhere, so the directory, not the log, is
  the one source every runner shares): on a terminal a live ``rich`` display of rounds (with
  ETA and the current test accuracy) and then of attacks; anywhere, one plain summary line per
  phase, so CI logs and pipes get lines without escape codes.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from fedleak.config import Experiment
from fedleak.store import RunStore

SWEEP_LOGGER = "fedleak.bench"  # its one line per cell is the sweep's progress: always shown
POLL = 0.25  # seconds between looks at the run directory


def terminal(verbose: bool) -> None:
    """Route fedleak's log to stderr: everything with ``verbose``, else what a person needs."""
    logger = logging.getLogger("fedleak")
    logger.setLevel(logging.INFO)
    for handler in [h for h in logger.handlers if getattr(h, "fedleak_terminal", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(lambda record: verbose or _always_shown(record))
    handler.fedleak_terminal = True  # type: ignore[attr-defined]
    logger.addHandler(handler)


def _always_shown(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name == SWEEP_LOGGER


class Watch:
    """Follow one run directory while a run fills it; report each finished phase in one line.

    Use as a context manager around the run.  ``live`` (default: stderr is a terminal) adds
    a rich progress display; ``say`` prints a phase line (default: to stderr).
    """

    def __init__(
        self,
        exp: Experiment,
        root: Path,
        live: bool | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.exp, self.store = exp, RunStore(root)
        self.live = sys.stderr.isatty() if live is None else live
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._started = time.monotonic()
        self._federated_at: float | None = None
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Watch:
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[note]}"),
                console=Console(file=sys.stderr),
                transient=True,  # the phase lines stay, the bars go
            )
            self._progress.start()
            rounds = self.exp.federation.rounds
            self._tasks["rounds"] = self._progress.add_task("rounds", total=rounds, note="")
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        if self._progress is not None:
            self._progress.stop()
        if kind is None:
            self._look()  # the last rows, written after the thread's last look
            self._finish_federation()
            self._finish_attacks()

    # -- following ----------------------------------------------------------------------------
    def _follow(self) -> None:
        while not self._stop.wait(POLL):
            self._look()

    def _look(self) -> None:
        utility = self.store.rows("utility.csv")  # round 0 (the initial model) first
        done = max(len(utility) - 1, 0)
        if self._progress is not None and utility:
            accuracy = float(utility[-1]["test_accuracy"])
            self._progress.update(
                self._tasks["rounds"], completed=done, note=f"test accuracy {accuracy:.4f}"
            )
        if self.store.meta().get("server") in ("done", "diverged"):
            self._finish_federation()
            if self._progress is not None:
                attacked = len(self.store.rows("results.csv"))
                if "attacks" not in self._tasks:
                    total = len(self.store.observed()) * len(self.exp.attacks)
                    self._tasks["attacks"] = self._progress.add_task(
                        "attacks", total=total, note=""
                    )
                self._progress.update(self._tasks["attacks"], completed=attacked)

    # -- the phase lines ----------------------------------------------------------------------
    def _finish_federation(self) -> None:
        if self._federated_at is not None:
            return
        utility = self.store.rows("utility.csv")
        if self.store.meta().get("server") not in ("done", "diverged") or not utility:
            return
        self._federated_at = time.monotonic()
        fed = self.exp.federation
        failures = sum(int(r.get("failures") or 0) for r in utility)
        self.say(
            f"federation: {len(utility) - 1} of {fed.rounds} rounds of {fed.clients_per_round} "
            f"of {fed.clients} clients ({self.exp.runner.name} runner) in "
            f"{self._federated_at - self._started:.0f} s; test accuracy "
            f"{float(utility[-1]['test_accuracy']):.4f}"
            + (f"; {failures} failed client updates" if failures else "")
        )

    def _finish_attacks(self) -> None:
        if not self.exp.attacks or self._federated_at is None:
            return
        rows = self.store.rows("results.csv")
        views = len({(r["round"], r["client"]) for r in rows})
        self.say(
            f"attacks: {len(self.exp.attacks)} on {views} captured updates, {len(rows)} "
            f"reconstructions scored in {time.monotonic() - self._federated_at:.0f} s"
        )


class SweepWatch:
    """A live bar of a sweep's finished cells (on a terminal), from its ``results.csv``.

    The sweep's own one line per cell (logger ``fedleak.bench``) says what each cell gave;
    this adds the bar and its ETA while a cell runs.  Nothing without a terminal.
    """

    def __init__(self, root: Path, cells: int, live: bool | None = None) -> None:
        self.store, self.cells = RunStore(root), cells
        self.live = sys.stderr.isatty() if live is None else live
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._progress = Progress(
            TextColumn("cells"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=True,
        )
        self._task = self._progress.add_task("cells", total=cells)

    def __enter__(self) -> SweepWatch:
        if self.live:
            self._progress.start()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self._stop.set()
            self._thread.join()
            self._progress.stop()

    def _follow(self) -> None:
        while not self._stop.wait(POLL):
            done = len({row["cell"] for row in self.store.rows("results.csv")})
            self._progress.update(self._task, completed=done)
