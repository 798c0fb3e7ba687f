"""What the benchmark scripts share: Flower kept offline, and the facts of the machine measured.

Import it before anything that imports flwr: Flower reads these settings at import time.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from fedleak.sim import OFFLINE_ENV  # flwr-free: Flower is not imported yet

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
if "FLWR_HOME" not in os.environ:  # a temporary home, removed when this process exits
    os.environ["FLWR_HOME"] = tempfile.mkdtemp(prefix="fedleak-flwr-home-")
    atexit.register(shutil.rmtree, os.environ["FLWR_HOME"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[2]


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
