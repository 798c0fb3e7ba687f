"""fedleak: federated-learning privacy research on Flower.

A curious (or malicious) server attacks what clients send; clients defend; fedleak measures
the privacy-utility trade-off.  The contract is in :mod:`fedleak.core`; experiments are TOML
files loaded by :func:`fedleak.config.load` and run by :func:`fedleak.pipeline.run`.
"""

from fedleak.config import Experiment, load
from fedleak.core import Batch, Reconstruction, ServerView, Task
from fedleak.registry import ConfigError
from fedleak.seeding import rng

__all__ = [
    "Batch",
    "ConfigError",
    "Experiment",
    "Reconstruction",
    "ServerView",
    "Task",
    "load",
    "rng",
]
