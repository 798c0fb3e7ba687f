"""Label inference from the losses a zeroth-order client returns at the server's points.

Threat model: the honest-but-curious server of ``zo_newton`` (:mod:`fedleak.server.zo_newton`),
whose clients (trainer ``zo_query``) send nothing but their mean loss at the points the server
chose.  The points are public to the server, so a least-squares linear fit of the losses
around the points' centre is the client's gradient in the tuned parameters (for the
algorithm's symmetric designs, exactly its central differences; Yu et al., NeurIPS 2024,
Theorem 4.1 for the sphere design).  When those include the classifier's bias, the gradient
is ``mean_i (p_i - onehot(y_i))`` (see :mod:`fedleak.attacks._labels`): the client's label
frequencies are ``p_mean - gradient``.  The one assumption is the mean prediction ``p_mean``,
taken uniform (``1 / classes``: near-exact for an untrained or balanced head); the frequencies
are clipped at 0, renormalised and turned into ``num_examples`` labels by largest remainders.
On digits with a Dirichlet(0.5) partition this beat LLG's two-stage rule (Wainakh et al.,
PETS 2022; ``bias_corrected`` in :mod:`fedleak.attacks._labels`) on the same estimated
gradient: label accuracy 0.88-0.94 against 0.73-0.83 on four clients.

It recovers labels only: the reconstruction's inputs are blank (zeros), so its image scores
say nothing; ``label_acc`` is the metric.  ``info["gradient_fit_residual"]`` is the fit's
relative residual (0 for a noise-free linear loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedleak.attacks import ATTACKS
from fedleak.core import Reconstruction, ServerView, Setting
from fedleak.models import classifier


@ATTACKS.register("zo_labels")
@dataclass
class ZOLabels:
    """The client's labels from its losses at the server's points (zo_newton on a bias)."""

    modality: ClassVar[str] = "image"

    def check(self, setting: Setting) -> None:
        """The server queries the classifier's bias through losses."""
        server = setting.server
        if getattr(server, "name", None) != "zo_newton":
            raise ValueError(
                "zo_labels: it reads the losses clients return at a zo_newton server's points; "
                "use server.name = 'zo_newton' (with training.name = 'zo_query')"
            )
        bias = f"{classifier(setting.model, 'zo_labels')[0]}.bias"
        if bias not in server.parameters:
            raise ValueError(
                f"zo_labels: the server does not tune the classifier's bias {bias!r} "
                f"(it tunes {list(server.parameters)}); add it to server.parameters"
            )

    def __call__(self, view: ServerView, rng: torch.Generator) -> Reconstruction:
        """Labels of the ``view.num_examples`` examples; inputs left blank."""
        points = view.instructions["points"].double()
        losses = view.messages["losses"].double()
        if len(points) < points.shape[1] + 1:
            raise ValueError(
                f"zo_labels: {len(points)} points cannot fit a gradient in {points.shape[1]} "
                "dimensions; observe a round in which the server asks more"
            )
        centred = points - points.mean(0)
        design = torch.cat(
            [torch.ones(len(points), 1, dtype=points.dtype, device=points.device), centred], 1
        )
        fit = torch.linalg.lstsq(design, losses[:, None]).solution[:, 0]
        residual = (design @ fit - losses).norm() / losses.norm().clamp(min=1e-30)
        gradient = fit[1:]
        model = view.model()
        name = f"{classifier(model, 'zo_labels')[0]}.bias"
        state = model.state_dict()
        start = 0
        for tuned in view.protocol["parameters"]:
            size = state[tuned].numel()
            if tuned == name:
                bias_gradient = gradient[start : start + size]
            start += size
        labels = _counts(1 / len(bias_gradient) - bias_gradient, view.num_examples)
        inputs = torch.zeros(view.num_examples, *view.task.input_shape, device=view.device)
        return Reconstruction(
            inputs=inputs,
            labels=labels.to(view.device),
            info={"gradient_fit_residual": float(residual)},
        )


def _counts(frequencies: torch.Tensor, total: int) -> torch.Tensor:
    """``total`` sorted labels distributed as ``frequencies`` (clipped at 0), largest remainders."""
    share = frequencies.clamp(min=0)
    share = share / share.sum() if share.sum() > 0 else torch.full_like(share, 1 / len(share))
    exact = share * total
    counts = exact.floor().long()
    left = total - int(counts.sum())
    counts[(exact - counts).argsort(descending=True)[:left]] += 1
    return torch.repeat_interleave(torch.arange(len(share), device=share.device), counts)
