"""Metrics: how close a reconstruction is to the examples a client actually trained on.

Metrics are the only code that sees ground truth (a :class:`~fedleak.core.Batch`).  Each
modality has its own module with a ``score(reconstruction, truth, task) -> dict[str, float]``;
:func:`score` picks it from ``task.modality``.
"""

from __future__ import annotations

from collections.abc import Callable

from fedleak.core import Batch, Reconstruction, Task
from fedleak.metrics import image

Scorer = Callable[[Reconstruction, Batch, Task], dict[str, float]]

# A plain dict rather than a Registry: metrics have no options to configure, one per modality.
SCORERS: dict[str, Scorer] = {"image": image.score}
# The few metrics progress lines and summaries show, per modality.
HEADLINE: dict[str, tuple[str, ...]] = {"image": ("psnr", "ssim", "label_acc")}


def score(reconstruction: Reconstruction, truth: Batch, task: Task) -> dict[str, float]:
    """Score ``reconstruction`` against ``truth`` with the metrics of ``task.modality``."""
    if task.modality not in SCORERS:
        raise ValueError(
            f"No metrics for modality {task.modality!r}; known: {', '.join(sorted(SCORERS))}."
        )
    return SCORERS[task.modality](reconstruction, truth, task)
