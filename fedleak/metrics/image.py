"""Image reconstruction metrics: MSE, PSNR, SSIM and label accuracy after optimal matching.

An attack returns its reconstructions in no particular order, and possibly more or fewer of them
than the client trained on.  As in breaching's ``analysis`` (Geiping et al.), both sides are
mapped to pixels in [0, 1] and paired by the Hungarian algorithm
(:func:`scipy.optimize.linear_sum_assignment`) on pairwise pixel MSE; breaching matches on LPIPS,
which needs a network, while MSE keeps the metrics dependency-free.  Per-pair scores are then
averaged over the ``min(B_rec, B_true)`` matched pairs.

SSIM is scikit-image's windowed SSIM (Wang et al. 2004), *not* breaching's CW-SSIM; the two are
not comparable.

LPIPS (Zhang et al. 2018, AlexNet backbone, as breaching reports it) is computed only when the
``lpips`` package and torchvision's ImageNet AlexNet weights are already on this machine
(torch's hub cache); fedleak never downloads them, and otherwise the column is NaN ("not
computed"), never a stand-in value.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity
from torch import Tensor

from fedleak.core import Batch, Reconstruction, Task

MIN_MSE = 1e-10  # floor for PSNR: a perfect reconstruction scores 100 dB instead of inf
ALEXNET = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet weights, LPIPS's backbone


def match(rec_pixels: Tensor, true_pixels: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Pair reconstructions with truths by minimum total pixel MSE (Hungarian matching).

    Args:
        rec_pixels: reconstructions in pixel space, ``[B_rec, C, H, W]``.
        true_pixels: ground truth in pixel space, ``[B_true, C, H, W]``.

    Returns:
        ``(rec_idx, true_idx)``, two integer arrays of length ``min(B_rec, B_true)``:
        reconstruction ``rec_idx[i]`` is matched to truth ``true_idx[i]``.  Pairs are sorted by
        ``true_idx``.
    """
    if rec_pixels.shape[1:] != true_pixels.shape[1:]:
        raise ValueError(
            f"match: reconstructions {tuple(rec_pixels.shape[1:])} and truths "
            f"{tuple(true_pixels.shape[1:])} differ in shape"
        )
    rec = rec_pixels.detach().cpu().double().flatten(1)
    true = true_pixels.detach().cpu().double().flatten(1)
    # ||t - r||^2 = ||t||^2 + ||r||^2 - 2 t.r, one matrix product instead of B_true*B_rec
    # differences; rounding can make it slightly negative, hence the clamp.
    squared = (true**2).sum(1, keepdim=True) + (rec**2).sum(1) - 2 * true @ rec.T
    cost = squared.clamp_min(0) / true.shape[1]
    # Rows are truths, so linear_sum_assignment returns the pairs sorted by truth index.
    true_idx, rec_idx = linear_sum_assignment(cost.cpu().numpy())
    return rec_idx, true_idx


def score(reconstruction: Reconstruction, truth: Batch, task: Task) -> dict[str, float]:
    """Compare a reconstruction with the client's examples, after matching them.

    Returns:
        ``mse``, ``psnr`` and ``ssim`` (means over matched pairs), ``psnr_max`` and ``ssim_max``
        (the best matched pair), ``label_acc`` (order-free overlap of the recovered and the true
        label multisets, as in breaching) and ``label_acc_matched`` (recovered label of each
        matched reconstruction equals its truth's).  Label metrics are NaN when the attack
        recovers no labels.  ``lpips`` (mean over matched pairs) is NaN unless its backbone's
        weights are available locally (:func:`lpips_available`).
    """
    rec = task.to_pixels(reconstruction.inputs.detach().cpu().double())
    true = task.to_pixels(truth.inputs.detach().cpu().double())
    if len(rec) == 0 or len(true) == 0:
        raise ValueError(
            f"score: need at least one reconstruction and one truth, got {len(rec)} and {len(true)}"
        )
    rec_idx, true_idx = match(rec, true)
    rec, true = rec[rec_idx], true[true_idx]

    mse = ((rec - true) ** 2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1 / mse.clamp_min(MIN_MSE))
    ssim = torch.tensor(
        [_ssim(r, t) for r, t in zip(rec, true, strict=True)],
        dtype=torch.float64,
        device=rec.device,
    )

    lpips = math.nan
    # AlexNet's pooling needs sides of at least 32 pixels (CIFAR's); smaller images stay NaN.
    if min(rec.shape[-2:]) >= 32 and (network := _lpips_network()) is not None:
        with torch.no_grad():  # LPIPS takes three channels in [-1, 1]
            a, b = (p.float().expand(-1, 3, -1, -1) * 2 - 1 for p in (rec, true))
            lpips = float(network(a, b).mean())

    label_acc = label_acc_matched = math.nan
    if reconstruction.labels is not None:
        predicted = reconstruction.labels.detach().cpu().long().flatten()
        actual = truth.labels.detach().cpu().long().flatten()
        label_acc = _label_overlap(predicted, actual)
        matched = predicted[rec_idx] == actual[true_idx]
        label_acc_matched = float(matched.double().mean())

    return {
        "mse": float(mse.mean()),
        "psnr": float(psnr.mean()),
        "ssim": float(ssim.mean()),
        "psnr_max": float(psnr.max()),
        "ssim_max": float(ssim.max()),
        "lpips": lpips,
        "label_acc": label_acc,
        "label_acc_matched": label_acc_matched,
    }


def lpips_available() -> bool:
    """Whether LPIPS can be computed here: the ``lpips`` package and cached AlexNet weights."""
    return _lpips_network() is not None


@functools.cache
def _lpips_network() -> torch.nn.Module | None:
    try:
        import lpips  # optional: not a fedleak dependency
    except ImportError:
        return None
    if not (Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET).is_file():
        return None  # torchvision would try to download it: fedleak never does
    return lpips.LPIPS(net="alex", verbose=False).eval()


def _ssim(rec: Tensor, true: Tensor) -> float:
    """SSIM of one ``[C, H, W]`` pair in [0, 1]; NaN for images too small for any window."""
    side = min(rec.shape[-2:])
    # skimage's default 7x7 window needs both sides >= 7; smaller toy images get the largest odd
    # window that fits.  Below 3 pixels a window has no spatial variance left to compare.
    win_size = min(7, side if side % 2 else side - 1)
    if win_size < 3:
        return math.nan
    rec_np, true_np = rec.cpu().numpy(), true.cpu().numpy()
    if rec.shape[0] == 1:
        return float(
            structural_similarity(rec_np[0], true_np[0], data_range=1.0, win_size=win_size)
        )
    return float(
        structural_similarity(rec_np, true_np, data_range=1.0, win_size=win_size, channel_axis=0)
    )


def _label_overlap(predicted: Tensor, actual: Tensor) -> float:
    """Fraction of labels recovered, ignoring order: the overlap of the two label multisets.

    Divided by the larger of the two counts, so predicting extra labels is penalised as much as
    missing some; with equal counts this is breaching's ``count_integer_overlap``.
    """
    length = int(torch.cat([predicted, actual]).max()) + 1
    overlap = torch.minimum(
        torch.bincount(predicted, minlength=length), torch.bincount(actual, minlength=length)
    ).sum()
    return float(overlap) / max(len(predicted), len(actual))
