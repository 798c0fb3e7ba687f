"""Robbing the Fed: inputs read off the gradient of an imprint block, in closed form.

Fowl, Geiping, Czaja, Goldblum & Goldstein, "Robbing the Fed: Directly Obtaining Private Data
in Federated Learning with Modified Models", ICLR 2022.

Threat model: a malicious server that put an imprint block in front of the model (the
``imprint`` modifier, which this attack requires) and receives a client's update of one local
step (``view.gradient()`` exact).  Row ``i`` of the block's ``bins`` layer fires for the examples
whose brightness exceeds edge ``e_i``, and every example ``n`` sends the same upstream gradient
``g_n`` to all rows, so

    ∇W_i = Σ_{n: m(x_n) > e_i} g_n x_n,        ∇b_i = Σ_{n: m(x_n) > e_i} g_n.

Consecutive rows differ by the examples in one bin ``(e_i, e_{i+1}]``, and an example alone in
its bin comes back exactly:  ``x = (∇W_i - ∇W_{i+1}) / (∇b_i - ∇b_{i+1})`` (the last row on its
own).  Bins holding several examples give their ``g``-weighted mean; empty bins give nothing.
The attack returns up to ``batch`` (default: the client's example count) reconstructions from
the non-empty bins with the largest ``|∇b_i - ∇b_{i+1}|``, and recovers no labels.  With several
local steps the gradient is an average over steps and the reconstructions blur.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedleak.attacks import ATTACKS
from fedleak.core import Reconstruction, ServerView
from fedleak.modifiers.imprint import locate

EMPTY = 1e-4  # a bin is empty below this fraction of the largest |∇b_i - ∇b_{i+1}| (rounding)


@ATTACKS.register("imprint")
@dataclass
class ImprintAttack:
    """Closed-form recovery of the inputs alone in their bins (needs the imprint modifier)."""

    modality: ClassVar[str] = "image"
    requires: ClassVar[tuple[str, ...]] = ("imprint",)  # config checks the modifier is there
    batch: int = 0  # reconstructions to return at most; 0 = as many as the client reports

    def __post_init__(self) -> None:
        if self.batch < 0:
            raise ValueError(
                f"imprint: batch must be >= 0 (0 = the client's count), got {self.batch}"
            )

    def __call__(self, view: ServerView, rng: torch.Generator) -> Reconstruction:
        """Reconstruct the examples alone in their bins; ``info`` holds ``bins``, ``nonempty``.

        Deterministic: ``rng`` is not used.
        """
        start = time.perf_counter()
        path = locate(view.model())
        gradient = view.gradient()
        weight = gradient[f"{path}.bins.weight"].double()
        bias = gradient[f"{path}.bins.bias"].double()
        # Rows in ascending edge order (edge = -bias as sent), whatever order they were sent in.
        order = torch.argsort(-view.sent[f"{path}.bins.bias"].double())
        weight, bias = weight[order], bias[order]
        # One bin = one row minus the next; the last row has nothing above it.
        dw = weight - torch.cat([weight[1:], torch.zeros_like(weight[:1])])
        db = bias - torch.cat([bias[1:], torch.zeros_like(bias[:1])])
        size = self.batch or view.num_examples
        strength = db.abs()
        filled = (strength > EMPTY * strength.max()).nonzero().flatten()
        best = filled[strength[filled].argsort(descending=True)[:size]]
        if len(best) == 0:  # no gradient reached the block: nothing to read
            best = strength.argmax()[None]
        inputs = dw[best] / db[best, None].where(
            db[best, None] != 0, torch.ones((), device=db.device)
        )
        dtype = view.sent[f"{path}.bins.weight"].dtype
        return Reconstruction(
            inputs=inputs.to(dtype).reshape(len(best), *view.task.input_shape),
            info={
                "bins": float(len(db)),
                "nonempty": float(len(filled)),
                "seconds": time.perf_counter() - start,
            },
        )
