"""What the benchmark scripts share: Flower kept offline, and the facts of the machine measured.

Import it before anything that imports flwr: Flower reads these settings at import time.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import io
import math
import os
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch

from fedleak import results
from fedleak.device import CHOICES, resolve
from fedleak.sim import OFFLINE_ENV  # flwr-free: Flower is not imported yet

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
if "FLWR_HOME" not in os.environ:  # a temporary home, removed when this process exits
    os.environ["FLWR_HOME"] = tempfile.mkdtemp(prefix="fedleak-flwr-home-")
    atexit.register(shutil.rmtree, os.environ["FLWR_HOME"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[2]


def load_config(path: Path) -> dict:
    """A TOML file; ``base = "other.toml"`` (beside it) supplies what the file does not set."""
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    base = cfg.pop("base", None)
    return merge_config(load_config(path.parent / base), cfg) if base else cfg


def merge_config(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``: tables merge key by key, arrays of tables with a ``label`` merge
    label by label (an ablation adds rows beside the base's without repeating them), other
    values are replaced."""
    out = dict(base)
    for key, value in extra.items():
        old = out.get(key)
        if isinstance(value, dict):
            out[key] = merge_config(old if isinstance(old, dict) else {}, value)
        elif _labelled(value) and _labelled(old):
            mine = {item["label"]: item for item in value}
            out[key] = [mine.pop(item["label"], item) for item in old] + list(mine.values())
        else:
            out[key] = value
    return out


def _labelled(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) and "label" in v for v in value)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def commit() -> str:
    """The fedleak git commit measured, marked when the library has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "fedleak"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {head}" + (" + uncommitted changes in fedleak/" if dirty else "")


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV file written by :func:`append_row` ([] when it does not exist yet)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def read_runs(path: Path, fields: list[str]) -> pd.DataFrame:
    """A runs file as a DataFrame, typed by :func:`fedleak.results.read`; no rows (but its
    columns) when it does not exist yet, so a page can be written before the first row."""
    if path.is_file():
        return results.read(path)
    return pd.DataFrame({f: pd.Series(dtype=str if f in results.TEXT else float) for f in fields})


def append_row(path: Path, row: dict, fields: list[str]) -> None:
    """Append one row (header first in a new file): results survive an interrupted run.

    A file written with fewer columns is rewritten first, its rows blank in the new ones.
    """
    new = not path.is_file()
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            write_csv(path, read_rows(path), fields)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fields)
        if new:
            writer.writeheader()
        writer.writerow({k: fmt(row[k]) for k in fields})


def merge_rows(
    path: Path, others: list[Path], key: Callable[[dict], tuple], fields: list[str]
) -> int:
    """Add to the runs file ``path`` the rows of the same-named files in the folders ``others``
    (the outputs of parallel runs) whose ``key`` it does not hold yet; return how many.

    The rows ``path`` holds keep their place and the first copy of a key wins, so merging the
    same folder twice, or folders that all started from one committed file, adds nothing twice.
    """
    rows = read_rows(path)
    seen = {key(r) for r in rows}
    added = []
    for folder in others:
        source = folder / path.name
        if not source.is_file():
            raise SystemExit(f"--merge {folder}: no {path.name} there")
        for row in read_rows(source):
            if key(row) not in seen:
                seen.add(key(row))
                added.append(row)
    write_csv(path, [{f: r.get(f) or "" for f in fields} for r in rows + added], fields)
    return len(added)


# The last columns of every runs file: each row's provenance (rows from before device support
# have no device and threads; their pages say nothing of them).
STAMP = ["commit", "finished", "device", "threads"]


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default cpu), checked on this machine: ``args.device`` is a torch.device."""

    def device(name: str) -> torch.device:
        try:
            return resolve(name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parser.add_argument(
        "--device", type=device, default="cpu", help=f"{' | '.join(CHOICES)} (default cpu)"
    )


def stamp(row: dict, measured: str, device: torch.device | str = "cpu") -> dict:
    """``row`` with the commit its run measured (``commit()`` at its start), the time now, and
    the device and torch threads it ran on."""
    return {
        **row,
        "commit": measured.removeprefix("commit "),
        "finished": datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def provenance(rows: pd.DataFrame) -> str:
    """When and at which commits ``rows`` were computed, from their stamps."""
    stamped = rows[rows["finished"] != ""] if "finished" in rows else rows.iloc[:0]
    if stamped.empty:
        return "rows not stamped (written before runs recorded their commit)"
    commits = stamped["commit"].unique()  # in order of appearance
    text = (
        f"rows finished {stamped['finished'].min()} to {stamped['finished'].max()} at commit "
        f"{', '.join(commits)}"
    )
    if len(stamped) < len(rows):
        text += f" ({len(rows) - len(stamped)} earlier rows unstamped)"
    ran = stamped[stamped["device"] != ""] if "device" in stamped else stamped.iloc[:0]
    if not ran.empty:
        where = ran["device"] + " (" + ran["threads"].astype(int).astype(str) + " threads)"
        text += f", on {', '.join(where.unique())}"
    return text


def check_budget(budgets: pd.Series, steps: int, runs: Path) -> None:
    """Refuse to describe rows run at another budget than ``steps`` (0: no budget, e.g. a
    closed-form attack): the page states the budget from the settings, not from the rows."""
    other = sorted({int(b) for b in budgets if b and int(b) != steps})
    if other:
        raise SystemExit(
            f"{runs} holds rows run at {other} steps, not {steps}; pass --steps to match them"
        )


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Write a whole table atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields)
    writer.writeheader()
    writer.writerows({k: fmt(v) for k, v in r.items()} for r in rows)
    atomic(path, buffer.getvalue())


def fmt(value) -> str:
    """A CSV cell: six significant digits for floats, ``nan`` kept."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def cell(value: float, digits: int) -> str:
    """A Markdown table cell: ``n/a`` for NaN."""
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_summary(
    table: Path, summary: pd.DataFrame, fields: list[str], page: Path, text: str
) -> str:
    """Write a benchmark's summary table (CSV) and its Markdown page; return the page."""
    write_csv(table, summary.to_dict("records"), fields)
    atomic(page, text)
    return text
