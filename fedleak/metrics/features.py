"""Feature metric: how well an attack recovered the features of a batch at some layer.

Feature attacks (the tensor method of Wang, Lee & Lei, used by the feature-reconstruction and
pooler attacks) recover directions of the inputs of one module of the sent model
(``Reconstruction.features`` ``[B, d]`` at ``Reconstruction.feature_layer``), up to sign, scale
and order.  The true features come from running the true batch through the sent model in train
mode, as the client did (BatchNorm normalises with the batch's statistics; dropout is off, so
the score is deterministic), and reading the module's input with a forward pre-hook.  Recovered
and true directions are paired by the Hungarian algorithm on |cos|; the score is the mean |cos|
over the ``min(B_rec, B_true)`` pairs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from fedleak.core import Batch, Reconstruction, ServerView


def feature_cos(reconstruction: Reconstruction, truth: Batch, view: ServerView | None) -> float:
    """Mean |cos| between recovered and true features after matching; NaN without features.

    NaN when the attack recovered no features or no view (model) is given.
    """
    if reconstruction.features is None or view is None:
        return math.nan
    true = true_features(view, truth, reconstruction.feature_layer)
    recovered = reconstruction.features.detach().flatten(1).double().cpu()
    if recovered.shape[1] != true.shape[1] or len(recovered) == 0:
        raise ValueError(
            f"feature_cos: recovered features {tuple(recovered.shape)} do not match the "
            f"{true.shape[1]} inputs of {reconstruction.feature_layer!r}; features must be "
            f"[B, {true.shape[1]}]"
        )
    cos = (_unit(recovered) @ _unit(true).T).abs().cpu().numpy()
    rows, cols = linear_sum_assignment(-cos)
    return float(np.mean(cos[rows, cols]))


def true_features(view: ServerView, truth: Batch, layer: str) -> Tensor:
    """The inputs of module ``layer`` of the sent model on ``truth``, ``[B, d]`` (float64)."""
    model = view.model()
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(
            f"feature_cos: the model has no module {layer!r} (feature_layer); it has e.g. "
            f"{', '.join(names[-5:])}"
        ) from None
    captured: list[Tensor] = []

    def record(_: nn.Module, args: tuple[Tensor, ...]) -> None:
        captured.append(args[0].detach())

    # Train mode, as the client's step ran (BatchNorm with batch statistics; the running ones
    # change only on this copy), but without dropout: its masks would make the score random
    # and draw from the global RNG.
    model.train()
    for dropout in (m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)):
        dropout.eval()
    handle = module.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            model(truth.inputs)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"feature_cos: module {layer!r} is not called in the model's forward")
    return captured[0].flatten(1).double().cpu()  # the first call: the batch's own features


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
