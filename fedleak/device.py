"""The device an experiment computes on: its ``device`` key, resolved to a :class:`torch.device`.

CPU is the default and the reference the tests run on.  Random draws always come from CPU
generators (:func:`fedleak.seeding.rng`) and are moved to the device afterwards, so a seed
means the same draws on every device and CPU results do not depend on device support; only the
floating-point arithmetic after the draws may differ on an accelerator.
"""

from __future__ import annotations

import re

import torch

CHOICES = ("cpu", "cuda", "cuda:N", "mps", "auto")  # "auto": cuda if available, else mps, else cpu


def resolve(name: str) -> torch.device:
    """The torch device ``name`` stands for on this machine.

    Raises ``ValueError`` naming the device and the fix when it is not one of :data:`CHOICES`
    or this machine does not have it (so a config file fails when it loads, not mid-run).
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise ValueError(
                'device = "mps", but this machine has no usable MPS backend (Apple GPU); '
                'use device = "cpu" or "auto"'
            )
        return torch.device("mps")
    if match := re.fullmatch(r"cuda(?::(\d+))?", name):
        index = int(match.group(1) or 0)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device (or a CPU-only torch)"
            raise ValueError(
                f'device = {name!r}, but this machine has {have}; use device = "cpu" or '
                '"auto", or install a CUDA build of torch (make install TORCH=)'
            )
        return torch.device(name)
    raise ValueError(f"device must be one of {', '.join(CHOICES)}, got {name!r}")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())
