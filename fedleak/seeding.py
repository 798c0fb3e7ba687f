"""Every random stream in fedleak derives from the experiment seed and a few keys.

Library code never reseeds the global RNG: it takes a ``torch.Generator`` from :func:`rng`
(or :func:`numpy_rng`), so two runs with the same seed see the same streams, whatever else the
user's program does with ``torch.manual_seed``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import numpy as np
import torch


def derive(seed: int, *keys: object) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (stable across processes and runs)."""
    text = repr((int(seed), *map(str, keys))).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def rng(seed: int, *keys: object) -> torch.Generator:
    """A fresh torch generator for the stream named by ``keys``."""
    return torch.Generator().manual_seed(derive(seed, *keys))


def numpy_rng(seed: int, *keys: object) -> np.random.Generator:
    """A fresh numpy generator for the stream named by ``keys``."""
    return np.random.default_rng(derive(seed, *keys))


@contextlib.contextmanager
def isolated(seed: int, *keys: object) -> Iterator[None]:
    """Run a block (e.g. a model constructor) under a derived seed, then restore the global RNG.

    Module constructors draw their initial weights from the global generator and take no
    ``generator`` argument; forking and restoring leaves the caller's stream untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive(seed, *keys))
        yield
