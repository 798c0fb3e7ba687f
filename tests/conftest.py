"""Shared test set-up: Flower kept offline and inside a temporary home; the shared data root."""

import os
from pathlib import Path

import pytest
import torch

from fedleak.sim import OFFLINE_ENV

# One thread per process: on a 2-core machine shared with Ray actors and SuperNodes, torch's
# default of one thread per core oversubscribes the CPU and slows tests several-fold.
torch.set_num_threads(1)

DATA_ROOT = Path(
    os.environ.get(
        "FEDLEAK_DATA_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
)


@pytest.fixture(scope="session", autouse=True)
def flower_offline(tmp_path_factory):
    """Flower's telemetry, update check and runtime installs off; state in a temp FLWR_HOME."""
    home = tmp_path_factory.mktemp("flwr_home")
    env = {
        **OFFLINE_ENV,
        "FLWR_HOME": str(home),
        "UV_CACHE_DIR": str(home / "uv"),
        "MPLCONFIGDIR": str(home / "mpl"),
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def data_root() -> Path:
    """The benchmark data beside the repository (../shared/data), or skip."""
    if not DATA_ROOT.is_dir():
        pytest.skip(f"no data root at {DATA_ROOT} (set FEDLEAK_DATA_ROOT)")
    return DATA_ROOT


# A tiny experiment (synthetic 1x8x8 images, an MLP, 4 clients) that federates in seconds.
TINY = {
    "name": "tiny",
    "seed": 3,
    "rounds": 2,
    "clients": 4,
    "clients_per_round": 2,
    "data": {"name": "synthetic_images", "examples": 64, "test_examples": 32, "classes": 4},
    "model": {"name": "mlp", "hidden": [16], "activation": "sigmoid"},
    "training": {"name": "sgd", "lr": 0.1, "batch_size": 2},
    "observe": {"rounds": [1, 2], "clients_per_round": 0},
    "attacks": [{"name": "dlg", "steps": 2}],
}


@pytest.fixture
def tiny():
    """A function returning the tiny experiment with top-level keys replaced."""
    return lambda **changes: {**TINY, **changes}
