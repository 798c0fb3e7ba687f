"""SparseGPT's solver: prune one linear layer and update its remaining weights (OBS, blocked).

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
ICML 2023.  For a layer ``W`` (``[out, in]``) with input Hessian ``H = XᵀX`` (up to a scale),
columns are processed left to right in blocks of ``block_size``: within a block the mask keeps
the weights with the largest ``w² / [H⁻¹]_jj²`` (adaptive mask selection, the layer's sparsity
per block), and after each column is pruned the Optimal-Brain-Surgeon update
``W[:, j:] -= (w_j - q_j) / [H⁻¹]_jj * H⁻¹[j, j:]`` (with the upper Cholesky factor of
``H⁻¹``) compensates the error on the columns not yet processed; the block's accumulated error
is then propagated to the remaining columns in one matrix product.

Reusable on its own (the KRP pruner builds on it): give it any Hessian — e.g. of a refit
layer's pruned-model inputs — and optionally a fixed ``mask`` to only run the compensation.
Written from the paper's Algorithm 1; not a copy of the authors' code.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def sparsegpt(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(pruned weight, keep mask)`` of ``weight`` at ``sparsity`` given ``hessian = XᵀX``.

    ``damp``: fraction of the mean diagonal added to the Hessian (SparseGPT's 1 %).  ``mask``
    (bool, True = keep, the weight's shape): use it instead of choosing one.  Inputs whose
    Hessian diagonal is zero (never active) are pruned first-hand: their weights cannot matter.
    The weight is returned in its own dtype; the arithmetic is float32 (float64 inputs stay).
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsegpt: sparsity must be in [0, 1), got {sparsity}")
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"sparsegpt: the Hessian must be [{cols}, {cols}] for a weight with {cols} inputs, "
            f"got {tuple(hessian.shape)}"
        )
    if mask is not None and mask.shape != weight.shape:
        raise ValueError(f"sparsegpt: mask shape {tuple(mask.shape)} != {tuple(weight.shape)}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype=dtype, device=w.device).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * h.diagonal().mean() * torch.eye(cols, dtype=dtype, device=w.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.to(w.device).clone()
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block = w[:, start:stop].clone()
        hblock = hinv[start:stop, start:stop]
        errors = torch.zeros_like(block)
        if mask is None:
            saliency = block**2 / hblock.diagonal().unsqueeze(0) ** 2
            k = int(saliency.numel() * sparsity)
            if k:
                order = torch.argsort(saliency.flatten(), stable=True)[:k]
                chosen = torch.ones(saliency.numel(), dtype=torch.bool, device=w.device)
                chosen[order] = False
                keep[:, start:stop] = chosen.view_as(block)
        kept = keep[:, start:stop]
        for j in range(stop - start):
            column = block[:, j]
            pruned = torch.where(kept[:, j], column, torch.zeros_like(column))
            error = (column - pruned) / hblock[j, j]
            block[:, j:] -= error.unsqueeze(1) * hblock[j, j:].unsqueeze(0)
            block[:, j] = pruned
            errors[:, j] = error
        w[:, start:stop] = block
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    w[~keep] = 0
    return w.to(weight.dtype), keep
