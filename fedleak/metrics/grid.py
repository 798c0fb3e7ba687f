"""PNG grids for eyeballing a reconstruction: truths on top, matched reconstructions below.

Column ``j`` holds truth ``j`` and the reconstruction :func:`fedleak.metrics.image.match` paired
with it, so a glance shows what the metrics measured.  Unmatched truths (fewer reconstructions
than truths) leave their bottom tile blank; unmatched reconstructions get extra columns on the
right with a blank top tile.  Pillow only, so no plotting library is needed.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from fedleak.core import Batch, Reconstruction, Task
from fedleak.metrics.image import match

MIN_TILE = 64  # pixels: 8x8 digits are upscaled 8x so they are visible
GAP = 2  # pixels between tiles
BACKGROUND = 255  # white gaps and blank tiles


def save_grid(
    path: str | os.PathLike[str], truth: Batch, reconstruction: Reconstruction, task: Task
) -> None:
    """Write a two-row PNG grid (truth above, matched reconstruction below) to ``path``.

    Small images are upscaled by an integer factor (nearest neighbour, so pixels stay sharp)
    until their smaller side is at least 64 px.  The file is written atomically.
    """
    true = task.to_pixels(truth.inputs.detach().cpu().float())
    rec = task.to_pixels(reconstruction.inputs.detach().cpu().float())
    rec_idx, true_idx = match(rec, true)

    # Column order: truths in their own order, then reconstructions no truth was matched to.
    columns = len(true) + len(rec) - len(rec_idx)
    top: list[Tensor | None] = [*true, *([None] * (columns - len(true)))]
    bottom: list[Tensor | None] = [None] * len(true)
    for r, t in zip(rec_idx, true_idx, strict=True):
        bottom[t] = rec[r]
    matched = set(rec_idx.tolist())
    bottom += [rec[r] for r in range(len(rec)) if r not in matched]

    channels, height, width = true.shape[1:]
    if channels not in (1, 3):
        raise ValueError(f"save_grid: images need 1 or 3 channels, got {channels}")
    scale = max(1, math.ceil(MIN_TILE / min(height, width)))
    tile_h, tile_w = height * scale, width * scale
    canvas = np.full(
        (2 * tile_h + GAP, columns * tile_w + (columns - 1) * GAP, channels),
        BACKGROUND,
        dtype=np.uint8,
    )
    for row, images in enumerate((top, bottom)):
        for col, pixels in enumerate(images):
            if pixels is None:
                continue
            y, x = row * (tile_h + GAP), col * (tile_w + GAP)
            canvas[y : y + tile_h, x : x + tile_w] = _tile(pixels, scale)

    # A 2-D uint8 array becomes a grayscale ("L") PNG, an [H, W, 3] one an RGB PNG.
    image = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
    _write_atomically(image, Path(path))


def _tile(pixels: Tensor, scale: int) -> np.ndarray:
    """``[C, H, W]`` in [0, 1] -> ``[H*scale, W*scale, C]`` uint8, nearest-neighbour upscaled."""
    array = (pixels.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return array.repeat(scale, axis=0).repeat(scale, axis=1)


def _write_atomically(image: Image.Image, path: Path) -> None:
    """Save to a temporary file beside ``path``, then rename: readers never see half a PNG."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            image.save(file, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
