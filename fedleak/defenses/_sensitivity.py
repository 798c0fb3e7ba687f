"""How strongly each gradient coordinate depends on the batch: the row norms ‖J_j‖ of ∂g/∂x.

For the batch gradient ``g(x) = ∇_θ loss(model(x), y)`` (p coordinates) and the batch inputs
``x`` (d values), ``J = ∂g/∂x`` is p × d: far too large to build (the exact branch of Chen,
Gürsoy & Lei's code needs p·d memory).  A random sketch needs only Jacobian-vector products: for
``v ~ N(0, I_d)``, ``(J v)_j ~ N(0, ‖J_j‖²)``, so ``sqrt(mean_k (J v_k)_j²)`` over K draws
estimates ``‖J_j‖`` (relative error about 1/√(2K) per coordinate).

Each product comes from the mixed second derivative, with no forward-mode AD::

    (J v)_j = Σ_i ∂²loss/∂θ_j∂x_i · v_i = ∂/∂θ_j ⟨∇_x loss, v⟩

so one forward pass and one backward pass to ``x`` (keeping its graph) are shared by all K
directions, and each direction costs one more backward pass through that graph ("double
backward").  The authors' code instead calls ``torch.autograd.functional.jvp`` K times, which
redoes the forward pass and builds two graphs per direction.

Measured alternatives (B = 8, K = 10, 2 shared CPU cores): ``torch.func`` (``vmap`` over the
directions of a forward-over-reverse ``jvp``) took 1.1-1.6x the time of this loop on the
ConvNet (width 16, no/group norm) and failed with batch norm in train mode unless running
statistics are frozen, then took about 6x; ``autograd.grad(..., is_grads_batched=True)`` failed
with group norm and was about 15x slower with batch norm.  On LeNet (no normalisation)
``torch.func`` was about 2x faster than this loop; a model-dependent choice could win there.

The forward pass runs in the model's current mode, as the trainer's did, so batch-norm layers in
train mode normalise with batch statistics; their running statistics are left untouched (the
trainer's own forward pass already updated them once this step).  Forward hooks run again: a
hook that draws randomness (e.g. fedleak's ``dropout`` defense) draws new masks here.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Collection, Iterator

import torch
from torch import Tensor, nn

from fedleak.core import Batch, LossFn, Params


def row_norms(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    names: Collection[str],
    samples: int,
    rng: torch.Generator,
) -> Params:
    """Estimates of ‖∂g_j/∂x‖ for every coordinate of the parameters ``names``.

    From ``samples`` Gaussian directions drawn from ``rng``; same keys (in ``names`` order),
    shapes and dtypes as the parameters.
    """
    if samples < 1:
        raise ValueError(f"row_norms: samples must be >= 1, got {samples}")
    if not batch.inputs.is_floating_point():
        raise ValueError(
            "row_norms: the sensitivity to the inputs needs floating-point inputs; "
            f"got {batch.inputs.dtype} (token ids have no derivative)"
        )
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    inputs = batch.inputs.detach().clone().requires_grad_(True)
    # The generator lives on the CPU; draw there and move, so any device gets the same stream.
    directions = torch.randn((samples, *inputs.shape), generator=rng, dtype=inputs.dtype).to(
        inputs.device
    )
    squares = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
    with torch.enable_grad(), _running_stats_frozen(model):
        loss = loss_fn(model(inputs), batch.labels)
        (input_grad,) = torch.autograd.grad(loss, inputs, create_graph=True)
        if input_grad.requires_grad:  # else ∇_x loss does not depend on θ: J = 0
            for k in range(samples):
                products = torch.autograd.grad(
                    input_grad,
                    params,
                    grad_outputs=directions[k],
                    retain_graph=k < samples - 1,
                    allow_unused=True,  # a parameter ∇_x loss does not depend on
                )
                for square, product in zip(squares, products, strict=True):
                    if product is not None:
                        square.addcmul_(product, product)
    return {n: (s / samples).sqrt_() for n, s in zip(names, squares, strict=True)}


class Amortised:
    """Row norms estimated every ``refresh`` local steps of a round, reused in between.

    The K double-backward passes are ~90 % of an optimal defense's cost (16-20x a plain step
    at K = 10 on the ConvNet); reusing one estimate over ``refresh`` steps divides that part
    by ``refresh``.  The reused estimate is stale: it was taken at an earlier model and on an
    earlier mini-batch, an approximation that holds while the model moves little within a
    round (``simulations/benchmarks/optimal_defense_cost.py`` measures its error).  Estimates
    are kept per model object, weakly: each client round trains its own copy of the model, so
    nothing carries over to another round or client, and a finished round's entry goes with
    its model.
    """

    def __init__(self) -> None:
        self._kept: weakref.WeakKeyDictionary[nn.Module, tuple[int, Params]] = (
            weakref.WeakKeyDictionary()
        )

    def row_norms(
        self,
        refresh: int,
        model: nn.Module,
        batch: Batch,
        loss_fn: LossFn,
        names: Collection[str],
        samples: int,
        rng: torch.Generator,
    ) -> Params:
        """:func:`row_norms`, recomputed on every ``refresh``-th call for ``model``."""
        calls, norms = self._kept.get(model, (0, {}))
        if calls % refresh == 0 or set(norms) != set(names):
            norms = row_norms(model, batch, loss_fn, names, samples, rng)
        self._kept[model] = (calls + 1, norms)
        return norms


@contextlib.contextmanager
def _running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Normalisation layers in train mode normalise by batch statistics but record nothing."""
    # With track_running_stats off, a layer in train mode still uses the batch statistics (as
    # the trainer's forward pass did) but neither updates running_mean/var nor counts batches.
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def exact_row_norms(
    model: nn.Module, batch: Batch, loss_fn: LossFn, names: Collection[str]
) -> dict[str, Tensor]:
    """The exact ‖∂g_j/∂x‖ from the full Jacobian: p × d memory, for tests on tiny models only."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]

    def gradient(inputs: Tensor) -> tuple[Tensor, ...]:
        loss = loss_fn(model(inputs), batch.labels)
        return torch.autograd.grad(loss, params, create_graph=True)

    with torch.enable_grad(), _running_stats_frozen(model):
        jacobians = torch.autograd.functional.jacobian(gradient, batch.inputs.detach())
    dims = batch.inputs.dim()
    return {
        n: torch.linalg.vector_norm(j.flatten(start_dim=j.dim() - dims), dim=-1)
        for n, j in zip(names, jacobians, strict=True)
    }
