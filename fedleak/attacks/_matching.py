"""Gradient matching, shared by every optimisation attack (DLG, iDLG, Inverting Gradients, ...).

An optimisation attack guesses a batch, asks "what would the client have sent had it trained on
this?", and moves the guess to make the answer match what the client did send.  This module is
that question and the distances between answers, written once:

* :class:`Update` predicts the client's update for a dummy batch, differentiably.  With one
  local step it is the plain gradient (the FedSGD threat model).  With several steps it
  *unrolls* the client's local SGD -- same learning rate, step count, batch split and momentum,
  which the server prescribed and so knows -- the way breaching's multi-step objective does,
  instead of pretending a FedAvg update is one gradient.  Either way the prediction and the
  observation are compared as "gradient equivalents" ``(sent - received) / (lr * steps)``, so
  a single step needs no special case.
* :func:`distance` compares predicted and observed updates: squared Euclidean (DLG), cosine
  (Inverting Gradients), Euclidean + L1 (TAG), each with optional per-layer weights.
* :func:`total_variation` is the image prior of Inverting Gradients.

Threat model: an honest-but-curious server that knows the architecture, the weights it sent,
the loss and the local training hyper-parameters (all part of the protocol it runs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor
from torch.func import functional_call

from fedleak.core import ServerView, set_batch_norm

Forward = Callable[[Mapping[str, Tensor], Tensor], Tensor]  # (parameters, inputs) -> logits
Distance = Literal["l2", "cosine", "l2_l1"]
LayerWeights = Literal["equal", "linear", "exp"]
DISTANCES: tuple[str, ...] = ("l2", "cosine", "l2_l1")
LAYER_WEIGHTS: tuple[str, ...] = ("equal", "linear", "exp")


class Update:
    """The server's model of one client's local training, applied to a dummy batch.

    ``Update(view)(inputs, labels)`` returns the predicted gradient equivalent per trainable
    parameter, in the order of :attr:`names`; :attr:`observed` is the client's, in the same
    order.  ``labels`` may be class indices or probabilities (soft labels, for attacks that
    optimise them), as long as ``view.loss_fn`` accepts them.

    Args:
        view: what the server holds about the client.
        unroll: ``"auto"`` unrolls the local steps when the client took more than one, ``True``
            always, ``False`` never (match the averaged update as if it were one gradient).
        forward: how to run the model on attack inputs given its parameters; the default calls
            the model on the inputs (text attacks pass a forward on embeddings instead).
    """

    def __init__(
        self,
        view: ServerView,
        *,
        unroll: bool | Literal["auto"] = "auto",
        forward: Forward | None = None,
    ) -> None:
        self.view = view
        self.model = view.model()
        # The client trained in train mode (dropout on), its batch norm on the batch's
        # statistics or on the sent running statistics, as the protocol says; the attack
        # reproduces it.  Buffers (running statistics) change only on this copy.
        set_batch_norm(self.model, str(view.protocol.get("batch_norm", "train")))
        observed = view.gradient()
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named if n in observed]
        self.params = {n: p.detach().requires_grad_() for n, p in named if n in observed}
        self.buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        self.observed = [observed[n].detach() for n in self.names]
        steps = max(view.local_steps, 1)
        self.unrolled = steps > 1 if unroll == "auto" else bool(unroll)
        self.steps = steps if self.unrolled else 1
        self.momentum = float(view.protocol.get("momentum", 0.0)) if self.unrolled else 0.0
        self._forward = forward or self._call_model

    def _call_model(self, params: Mapping[str, Tensor], inputs: Tensor) -> Tensor:
        return functional_call(self.model, {**self.buffers, **params}, (inputs,))

    def logits(self, inputs: Tensor) -> Tensor:
        """The sent model's outputs on ``inputs`` (differentiable w.r.t. the inputs)."""
        return self._forward(self.params, inputs)

    def __call__(self, inputs: Tensor, labels: Tensor) -> list[Tensor]:
        """The predicted gradient equivalent of training on ``(inputs, labels)``."""
        if not self.unrolled:
            return self._gradient(self.params, inputs, labels)
        # Unroll local SGD as fedleak.training.sgd does it: consecutive chunks of the batch
        # (the dummy order is free, so the client's first shuffle is just a relabelling).
        # Later epochs reshuffle with the client's private RNG, which the server cannot know;
        # they reuse the first epoch's split, so beyond one epoch the prediction is approximate.
        size = min(self.view.batch_size or len(inputs), len(inputs))
        chunks = list(zip(inputs.split(size), labels.split(size), strict=True))
        params = dict(self.params)
        velocity: dict[str, Tensor] = {}
        lr = self.view.lr
        for step in range(self.steps):
            x, y = chunks[step % len(chunks)]
            grads = self._gradient(params, x, y)
            for name, grad in zip(self.names, grads, strict=True):
                if self.momentum:
                    # torch.optim.SGD's rule: v = mu * v + g (v = g at the first step).
                    grad = self.momentum * velocity[name] + grad if name in velocity else grad
                    velocity[name] = grad
                params[name] = params[name] - lr * grad
        return [(self.params[n] - params[n]) / (lr * self.steps) for n in self.names]

    def _gradient(
        self, params: Mapping[str, Tensor], inputs: Tensor, labels: Tensor
    ) -> list[Tensor]:
        loss = self.view.loss_fn(self._forward(params, inputs), labels)
        # create_graph: the attack differentiates the gradient once more, w.r.t. its guess.
        return list(torch.autograd.grad(loss, [params[n] for n in self.names], create_graph=True))


def layer_weights(count: int, scheme: LayerWeights = "equal") -> Tensor:
    """Per-parameter-tensor weights, first layer first, summing to ``count``.

    ``linear`` and ``exp`` weigh early layers more, as breaching's weighted objectives do: the
    first layers' gradients carry the most spatial detail of the input.
    """
    if scheme not in LAYER_WEIGHTS:
        raise ValueError(f"layer weights {scheme!r} unknown; choose one of {LAYER_WEIGHTS}")
    position = torch.arange(count, dtype=torch.float64)
    if scheme == "equal":
        weights = torch.ones(count, dtype=torch.float64)
    elif scheme == "linear":
        weights = (count - position) / count
    else:
        weights = torch.exp(-position / max(count / 4, 1))
    return weights * count / weights.sum()


def distance(
    predicted: list[Tensor],
    observed: list[Tensor],
    kind: Distance = "cosine",
    weights: Tensor | None = None,
    *,
    l1: float = 1e-2,
) -> Tensor:
    """How far a predicted update is from the observed one (0 = identical).

    Args:
        predicted: one tensor per parameter, from :class:`Update`.
        observed: the client's, same order and shapes.
        kind: ``"l2"`` = Σ‖p − o‖² (DLG); ``"cosine"`` = 1 − cos(p, o) over all parameters
            jointly (Inverting Gradients); ``"l2_l1"`` = Σ‖p − o‖² + ``l1``·Σ‖p − o‖₁ (TAG).
        weights: optional per-tensor weights (see :func:`layer_weights`).
        l1: weight of the L1 part of ``"l2_l1"``.
    """
    if kind not in DISTANCES:
        raise ValueError(f"distance {kind!r} unknown; choose one of {DISTANCES}")
    w = [1.0] * len(predicted) if weights is None else [float(x) for x in weights]
    if kind == "cosine":
        dot = sum(wi * (p * o).sum() for wi, p, o in zip(w, predicted, observed, strict=True))
        pp = sum(wi * p.pow(2).sum() for wi, p in zip(w, predicted, strict=True))
        oo = sum(wi * o.pow(2).sum() for wi, o in zip(w, observed, strict=True))
        return 1 - dot / (pp.sqrt() * oo.sqrt()).clamp_min(1e-12)
    total = sum(wi * (p - o).pow(2).sum() for wi, p, o in zip(w, predicted, observed, strict=True))
    if kind == "l2_l1":
        total = total + l1 * sum(
            wi * (p - o).abs().sum() for wi, p, o in zip(w, predicted, observed, strict=True)
        )
    return total


def total_variation(images: Tensor) -> Tensor:
    """Anisotropic total variation (mean absolute difference of neighbouring pixels)."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy
