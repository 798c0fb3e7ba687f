"""Helpers the update defenses share: map over floating tensors, global norm, smallest-k masks.

An update (``Params``) mixes floating-point tensors (weights, biases, running statistics) with
integer counters (``num_batches_tracked``); every defense transforms the former and passes the
latter through untouched, so the helpers here do that in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from fedleak.core import Params


def map_floating(delta: Params, fn: Callable[[Tensor], Tensor]) -> Params:
    """``fn`` applied to every floating-point tensor, in key order; other tensors pass through."""
    return {name: fn(d) if d.is_floating_point() else d for name, d in delta.items()}


def floating(delta: Params) -> list[Tensor]:
    """The floating-point tensors of ``delta``, in key order."""
    return [d for d in delta.values() if d.is_floating_point()]


def global_norm(tensors: Iterable[Tensor]) -> float:
    """The L2 norm of all ``tensors`` taken together (0 for none)."""
    # Accumulate in float64 so that half-precision updates do not overflow the norm.
    norms = [torch.linalg.vector_norm(t.double()).cpu() for t in tensors]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def flat(tensors: list[Tensor]) -> Tensor:
    """All ``tensors`` as one 1-D float64 CPU tensor (float64 so that no two values collapse)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])


def unflat(vector: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Split a 1-D ``vector`` (from :func:`flat`) into tensors shaped and placed like ``like``."""
    parts = torch.split(vector, [t.numel() for t in like])
    return [p.reshape(t.shape).to(t.device) for p, t in zip(parts, like, strict=True)]


def smallest(values: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` smallest entries of 1-D ``values``.

    Ties are broken by position (the earlier entry counts as smaller) through a stable sort, so
    the mask has exactly ``k`` entries and is the same on every run and machine; ``topk`` and
    ``kthvalue`` make no such promise.  NaN sorts last, so it is never among the smallest.
    """
    mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if k > 0:
        mask[torch.sort(values, stable=True).indices[:k]] = True
    return mask


def largest(values: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest entries of 1-D ``values``, with :func:`smallest`'s rules.

    The same stable sort on the negated values: ties go to the earlier entry, the count is
    exact, NaN is never selected.
    """
    return smallest(-values, k)
