"""Per-group losses, gradients and accuracies: what every group-robust rule is computed from.

A group is an integer id per example; with a spurious attribute ``a`` (of ``A`` values) and a
label ``y`` the usual groups are ``y * A + a`` (Waterbirds: landbird/waterbird x land/water).
The worst-group accuracy is the minimum over groups with examples; the "average" accuracy of
the tables is the mean over examples (on balanced test groups it is the mean over groups).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def group_ids(labels: Tensor, attributes: Tensor, num_attributes: int) -> Tensor:
    """``label * A + attribute`` for every example (int64)."""
    if not ((attributes >= 0) & (attributes < num_attributes)).all():
        raise ValueError(f"attributes must lie in 0..{num_attributes - 1}")
    return labels.long() * num_attributes + attributes.long()


def group_losses(per_example: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """The mean loss of each group [K] (0 for a group without examples) and the counts [K]."""
    if groups.numel() and not ((groups >= 0) & (groups < num_groups)).all():
        raise ValueError(
            f"group ids must lie in 0..{num_groups - 1}, got {int(groups.min())}.."
            f"{int(groups.max())}; set num_groups to the number of groups"
        )
    counts = torch.bincount(groups, minlength=num_groups).to(per_example.dtype)
    sums = torch.zeros(num_groups, dtype=per_example.dtype, device=per_example.device)
    sums = sums.index_add(0, groups, per_example)
    return sums / counts.clamp(min=1), counts


def group_gradients(losses: Tensor, params: list[Tensor], present: Tensor) -> Tensor:
    """Each present group's gradient over ``params``, flattened: [K, P] (zero rows if absent)."""
    size = sum(p.numel() for p in params)
    rows = []
    for k in range(len(losses)):
        if not present[k]:
            rows.append(torch.zeros(size, dtype=losses.dtype, device=losses.device))
            continue
        grads = torch.autograd.grad(losses[k], params, retain_graph=True, allow_unused=True)
        flat = [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
        rows.append(torch.cat(flat))
    return torch.stack(rows)


def group_accuracy(correct: Tensor, groups: Tensor, num_groups: int) -> np.ndarray:
    """Accuracy of each group [K] (NaN for a group without examples)."""
    counts = torch.bincount(groups, minlength=num_groups).double()
    hits = torch.zeros(num_groups, dtype=torch.float64).index_add(0, groups, correct.double())
    return np.where(counts.numpy() > 0, (hits / counts.clamp(min=1)).numpy(), np.nan)
