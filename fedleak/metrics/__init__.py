"""Metrics: how close a reconstruction is to the examples a client actually trained on.

Metrics are the only code that sees ground truth (a :class:`~fedleak.core.Batch`).  Each
modality has its own module with a ``score(reconstruction, truth, task) -> dict[str, float]``;
:func:`score` picks it from ``task.modality``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedleak.core import Batch, Reconstruction, ServerView, Task
from fedleak.metrics import features, grid, image, text

Scorer = Callable[[Reconstruction, Batch, Task], dict[str, float]]
Writer = Callable[[Path, Batch, Reconstruction, Task], None]

# A plain dict rather than a Registry: metrics have no options to configure, one per modality.
SCORERS: dict[str, Scorer] = {"image": image.score, "text": text.score}
# The few metrics progress lines and summaries show, per modality.
HEADLINE: dict[str, tuple[str, ...]] = {
    "image": ("psnr", "ssim", "label_acc"),
    "text": ("rouge1", "rouge2", "rouge1_lamp", "token_acc"),
}
# How a reconstruction is shown beside the truth, per modality: a writer and its file suffix.
EXAMPLES: dict[str, tuple[Writer, str]] = {
    "image": (grid.save_grid, ".png"),  # truth above, matched reconstruction below
    "text": (text.save_text, ".txt"),  # true and matched recovered sentences, line by line
}


def score(
    reconstruction: Reconstruction, truth: Batch, task: Task, view: ServerView | None = None
) -> dict[str, float]:
    """Score ``reconstruction`` against ``truth`` with the metrics of ``task.modality``.

    Plus ``feature_cos`` (:mod:`fedleak.metrics.features`), for any modality: how well the
    recovered features match the true ones in ``view``'s model; NaN when the attack recovered
    no features or no ``view`` is given.
    """
    if task.modality not in SCORERS:
        raise ValueError(
            f"No metrics for modality {task.modality!r}; known: {', '.join(sorted(SCORERS))}."
        )
    scores = SCORERS[task.modality](reconstruction, truth, task)
    scores["feature_cos"] = features.feature_cos(reconstruction, truth, view)
    return scores


def save_example(stem: Path, truth: Batch, reconstruction: Reconstruction, task: Task) -> Path:
    """Write ``reconstruction`` beside ``truth`` to ``stem`` + the modality's suffix; the path."""
    write, suffix = EXAMPLES[task.modality]
    path = stem.with_name(stem.name + suffix)
    write(path, truth, reconstruction, task)
    return path
