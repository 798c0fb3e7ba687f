"""What data selection sees of an example: its gradient over the fine-tuned layers, sketched.

Dong, Phan, Pan & Lei, "Sketchy Moment Matching: Toward Fast and Provable Data Selection for
Finetuning", NeurIPS 2024.  Fine-tuning is linearised at the current model: example ``i`` is
its gradient ``g_i`` over the fine-tuned parameters (the last layers), computed with *random*
targets, as the authors do, so that the representation depends on the input and the model but
not on the example's label.  A Gaussian sketch ``Gamma`` (``r x m``, entries ``N(0, 1/m)``)
maps the ``N x r`` gradients to ``N x m``; it is drawn from a seed, so every client that gets
the same seed (the server's public per-round seed) uses the same sketch, and sketched
statistics of different clients live in the same coordinates.

The budget options and the gradient options every selector shares are dataclasses here
(:class:`Budget`, :class:`GradientOptions`); the plugins inherit them.

Departures from the authors' code: the gradients are taken with the model in eval mode (batch
norm reads the running statistics the server sent; a batch of one has no statistics of its
own, and dropout would make the features random), and the random targets come from the
client's own generator.  Gradients and the sketch are computed on the model's device; the
sketch is drawn on the CPU in float64, so it is the same on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedleak.core import Batch, LossFn, Messages, Setting

CHUNK = 256  # examples per vmap call: bounds memory at CHUNK x r gradients


def finetuned(model: nn.Module, layers: int) -> list[str]:
    """Names of the parameters of the last ``layers`` modules that hold parameters themselves."""
    owners = [
        (name, module)
        for name, module in model.named_modules()
        if any(p is not None for p in module._parameters.values())
    ]
    if not 1 <= layers <= len(owners):
        raise ValueError(
            f"layers = {layers}: the model has {len(owners)} layers with parameters; use 1 to "
            f"{len(owners)}"
        )
    return [
        f"{name}.{key}" if name else key
        for name, module in owners[-layers:]
        for key, p in module._parameters.items()
        if p is not None
    ]


def random_targets(model: nn.Module, data: Batch, rng: torch.Generator) -> Tensor:
    """Targets drawn independently of the labels: uniform classes, or N(0, 1) for real labels."""
    if data.labels.is_floating_point():
        noise = torch.randn(data.labels.shape, generator=rng, dtype=torch.float64)
        return noise.to(device=data.labels.device, dtype=data.labels.dtype)
    with torch.no_grad():
        classes = model(data.inputs[:1]).shape[-1]
    drawn = torch.randint(classes, (len(data),), generator=rng)
    return drawn.to(device=data.labels.device, dtype=data.labels.dtype)


def gaussian_sketch(rows: int, dim: int, seed: int) -> Tensor:
    """The ``rows x dim`` sketch with N(0, 1/dim) entries drawn from ``seed`` (CPU, float64)."""
    rng = torch.Generator().manual_seed(int(seed))
    return torch.randn(rows, dim, generator=rng, dtype=torch.float64) / dim**0.5


def per_example_gradients(
    model: nn.Module,
    data: Batch,
    targets: Tensor,
    loss_fn: LossFn,
    layers: int = 1,
    sketch: Tensor | None = None,
) -> Tensor:
    """``[N, r]`` per-example gradients over the last ``layers`` layers, or ``[N, m]`` sketched.

    ``sketch`` (``r x m``) is applied chunk by chunk, so the ``N x r`` matrix is never held.
    Returns float64 on the CPU (selection is small dense linear algebra).
    """
    names = finetuned(model, layers)
    own = dict(model.named_parameters())
    params = {k: own[k].detach() for k in names}
    width = sum(p.numel() for p in params.values())
    if sketch is not None and sketch.shape[0] != width:
        raise ValueError(f"the sketch has {sketch.shape[0]} rows for {width} gradient entries")

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, p, (x[None],)), y[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    was_training = model.training
    model.eval()
    out = []
    try:
        # func.grad ignores an outer no_grad; the context keeps the other layers' graph away.
        with torch.no_grad():
            for start in range(0, len(data), CHUNK):
                x, y = data.inputs[start : start + CHUNK], targets[start : start + CHUNK]
                g = per_example(params, x, y)
                flat = torch.cat([g[k].reshape(len(x), -1) for k in names], 1).cpu().double()
                out.append(flat if sketch is None else flat @ sketch)
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, width if sketch is None else sketch.shape[1])


def shared_seed(instructions: Messages | None, key: str = "seed") -> int:
    """The public seed the server sent (``instructions[key]``); a clear error without it."""
    if not instructions or key not in instructions:
        raise ValueError(
            f"a shared sketch needs the server's public seed (instructions[{key!r}]); outside a "
            "federation pass instructions={'seed': torch.tensor(<int>)}"
        )
    return int(instructions[key])


@dataclass
class Budget:
    """How many of its examples a client selects each round."""

    fraction: float = 0.1  # share of the partition (at least one example)
    count: int = 0  # > 0: this many examples instead (all of a smaller partition)

    def __post_init__(self) -> None:
        name = getattr(self, "name", "selection")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"{name}: fraction must be in (0, 1], got {self.fraction}")
        if self.count < 0:
            raise ValueError(f"{name}: count must be >= 0 (0 = use fraction), got {self.count}")

    def size(self, examples: int) -> int:
        """The number of examples selected from a partition of ``examples``."""
        wanted = self.count if self.count else max(1, round(self.fraction * examples))
        return min(wanted, examples)


@dataclass
class GradientOptions(Budget):
    """The budget, and which gradients represent an example."""

    layers: int = 1  # fine-tuned layers: the last ones that hold parameters
    sketch_dim: int = 0  # > 0: Gaussian sketch to this many dimensions (seed from the server)

    def __post_init__(self) -> None:
        super().__post_init__()
        name = getattr(self, "name", "selection")
        if self.layers < 1:
            raise ValueError(f"{name}: layers must be >= 1 (the last layer), got {self.layers}")
        if self.sketch_dim < 0:
            raise ValueError(
                f"{name}: sketch_dim must be >= 0 (0 = unsketched gradients), got {self.sketch_dim}"
            )

    def check(self, setting: Setting) -> None:
        """Refuse more fine-tuned layers than the model has, or a sketch wider than them."""
        name = getattr(self, "name", "selection")
        try:
            names = set(finetuned(setting.model, self.layers))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        width = sum(p.numel() for k, p in setting.model.named_parameters() if k in names)
        if self.sketch_dim > width:
            raise ValueError(
                f"{name}: sketch_dim = {self.sketch_dim} is wider than the {width} gradient "
                f"entries of the last {self.layers} layer(s); use at most {width}"
            )

    def features(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        instructions: Messages | None,
        seed_key: str = "seed",
    ) -> Tensor:
        """``[N, sketch_dim]`` sketched (or ``[N, r]`` raw) random-target gradients, float64."""
        targets = random_targets(model, data, rng)
        sketch = None
        if self.sketch_dim:
            names = set(finetuned(model, self.layers))
            width = sum(p.numel() for k, p in model.named_parameters() if k in names)
            sketch = gaussian_sketch(width, self.sketch_dim, shared_seed(instructions, seed_key))
        return per_example_gradients(model, data, targets, loss_fn, self.layers, sketch)
