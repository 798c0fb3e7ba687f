"""Shared test set-up: Flower kept offline and inside a temporary home; the shared data root."""

import os
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from fedleak import seeding
from fedleak.core import Batch, Task
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


class TextCase:
    """Text fixtures: a 12-token task over MiniLM's vocabulary, a one-layer BERT, sentences."""

    SENTENCES = (
        "the film was a joy from start to finish .",
        "a dull and far too long movie .",
        "he was born in the city of london .",
        "she loved every minute of it .",
        "what a waste of a good cast .",
        "i would watch it again tomorrow .",
    )
    SIZES: ClassVar[dict[str, int]] = {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64}

    def __init__(self) -> None:
        from fedleak import hf

        self.task = Task("text", (12,), 2, tokenizer=hf.tokenizer_dir())
        self._tokenizer = hf.tokenizer(self.task.tokenizer)

    def batch(self, rows, labels=None) -> Batch:
        """Sentences ``rows``, padded to 12 tokens; labels default to ``row % 2``."""
        ids = self._tokenizer(
            [self.SENTENCES[i] for i in rows],
            padding="max_length",
            max_length=self.task.input_shape[0],
            return_tensors="pt",
        )["input_ids"]
        labels = [i % 2 for i in rows] if labels is None else list(labels)
        return Batch(ids.long(), torch.tensor(labels))

    def model(self, seed=0, **sizes):
        """A tiny BERT for :attr:`task`, seeded: :attr:`SIZES`, or ``sizes`` on tiny_bert's
        defaults (2 layers, 128 wide) when given."""
        from fedleak.models import MODELS

        with seeding.isolated(seed, "model"):
            return MODELS["tiny_bert"](**(sizes or self.SIZES))(self.task)


@pytest.fixture(scope="session")
def text():
    """The :class:`TextCase` (skips without transformers)."""
    pytest.importorskip("transformers")
    return TextCase()
