"""R-GAP: Recursive Gradient Attack on Privacy (Zhu & Blaschko, ICLR 2021), in closed form.

Threat model: an honest-but-curious server that knows the architecture and the weights it sent,
and receives one client's update after **one SGD step on one example** (B = 1) with softmax
cross-entropy, so that ``view.gradient()`` is that example's gradient.  No optimisation and no
randomness: every layer's input is the least-squares solution of a linear system.

Networks covered: an ``nn.Sequential`` chain of ``Conv2d`` (any stride, padding and dilation;
no groups) and ``Linear`` layers, with only invertible element-wise activations between them
(LeakyReLU with a positive slope, Sigmoid, Tanh; ``Flatten`` and ``Identity`` are free), ending
in a linear classifier.  Pooling, normalisation, ReLU (not invertible), dropout and residual
connections are refused by :meth:`RGAP.check` when an experiment loads.

The recursion, from the classifier back to the image (layer ``i`` computes ``z_i = W_i x_i + b_i``
and ``x_{i+1} = act_i(z_i)``):

1. The classifier's logit gradient ``g = softmax(z) - onehot(y)`` is its bias gradient; without a
   bias, its weight gradient ``g xᵀ`` is rank 1 and ``g`` follows in closed form (see
   :func:`_logit_gradient`).  ``y`` is the only negative entry of ``g``.
2. For each layer, from the last: with ``δ_i = ∂L/∂z_i`` known, the input ``x_i`` satisfies the
   *gradient constraint* ``∂L/∂W_i = δ_i ⊗ x_i`` (for a convolution: ``δ_i`` times the unfolded
   input, im2col) and, except for the classifier, the *forward constraint*
   ``W_i x_i = z_i - b_i`` (a convolution as its Toeplitz matrix), with ``z_i = act_i⁻¹(x_{i+1})``
   from the layer above.  Both are linear in ``x_i``; they are stacked and solved in the
   least-squares sense (the minimum-norm solution when the system is rank-deficient).
3. ``δ_{i-1} = act'(z_{i-1}) ⊙ W_iᵀ δ_i`` and ``z_{i-1} = act⁻¹(x_i)``: go to the layer below.

**Rank analysis.**  A layer's input is determined when the rank of its stacked system equals the
number of unknowns (the entries of its input).  The attack reports ``rank_layer<i>`` and
``unknowns_layer<i>`` in ``Reconstruction.info`` (layer 0 is the one that reads the image) and
warns (:class:`UnderdeterminedWarning`) for every under-determined layer; errors there are not
only this layer's but propagate to every layer below.  :func:`rank_analysis` gives the same
analysis for a model before any gradient exists (with a random stand-in for ``δ``, which gives
the rank of a generic gradient), so a user can check a network before attacking it.

The official code (JunyiZhu-AI/R-GAP) solves for the zero-padded input with extra rows pinning
the padding to zero; here the unknowns are the unpadded input, which is the same system.  The
gradient constraint of a convolution splits into one identical block per input channel; each
is compressed to its triangular QR factor, which leaves the least-squares solution unchanged,
and the system is solved through its Gram matrix, whose gradient part is block-diagonal
(:func:`_least_squares` says why not ``torch.linalg.lstsq``).  CIFAR-10's CNN6
(:mod:`fedleak.models.rgap_cnn`) took 17 s on a busy, shared 2-core CPU, mostly the Gram
matrices of its ~3,000-unknown layers and their eigenvalues; 8x8 digits take 0.1 s.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional

from fedleak.attacks import ATTACKS
from fedleak.core import Params, Reconstruction, ServerView, Setting

WHO = "rgap"
# Singular values of a layer's system below RCOND times its largest count as zero: float32
# gradients carry ~1e-7 relative error, which such directions would amplify past 1e-2.  (The
# rank is read off the Gram matrix, whose eigenvalues resolve about 1e-7 of the largest
# singular value in float64; 1e-5 keeps clear of that.)
RCOND = 1e-5
_TINY = 1e-300  # guards the block scaling against an all-zero block
INVERTIBLE = (nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Identity)
# Why common layers are outside R-GAP, for the errors of the coverage check.
UNCOVERED: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    (
        (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU),
        "is not invertible in closed form (ReLU loses its negative part); use LeakyReLU, "
        "Sigmoid or Tanh",
    ),
    (
        (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd),
        "pools, which discards entries R-GAP cannot recover; downsample with a strided "
        "convolution instead",
    ),
    (
        (nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd),
        "pools, which discards entries R-GAP cannot recover; downsample with a strided "
        "convolution instead",
    ),
    (
        (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d),
        "normalises with statistics of the input, which is not a linear constraint; use a "
        "network without normalisation layers",
    ),
    (
        (nn.Dropout, nn.Dropout2d),
        "drops random units the server does not know; use a network without dropout",
    ),
)


class UnderdeterminedWarning(UserWarning):
    """A layer's constraints have lower rank than its unknowns: its input is not determined."""


@dataclass(frozen=True)
class LayerRank:
    """One weight layer's R-GAP system: its unknowns against the rank of its constraints."""

    index: int  # 0 = the layer that reads the image
    name: str  # the module's name in the model
    unknowns: int  # entries of the layer's input
    equations: int  # forward equations (outputs; none for the classifier) + gradient equations
    rank: int  # numerical rank of the stacked constraints
    advice: str = ""  # what would make an under-determined layer determined; "" when it is

    @property
    def determined(self) -> bool:
        """Whether the constraints pin down every entry of the layer's input."""
        return self.rank >= self.unknowns


@dataclass(frozen=True)
class _Stage:
    """A weight layer of the chain and the activations applied to its output."""

    name: str
    layer: nn.Conv2d | nn.Linear
    in_shape: tuple[int, ...]  # without the batch dimension
    out_shape: tuple[int, ...]
    activations: tuple[nn.Module, ...]  # empty for the classifier

    def weights(self, params: Params) -> tuple[Tensor, Tensor | None]:
        """Weight as a convolution kernel ``[O, C, kh, kw]`` (a linear layer as 1x1) and bias."""
        weight = params[f"{self.name}.weight"]
        if isinstance(self.layer, nn.Linear):
            weight = weight[:, :, None, None]
        return weight, params.get(f"{self.name}.bias")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The input as ``(C, H, W)``: a linear layer's input is ``(n, 1, 1)``."""
        if isinstance(self.layer, nn.Linear):
            return (math.prod(self.in_shape), 1, 1)
        channels, height, width = self.in_shape
        return channels, height, width

    @property
    def geometry(self) -> dict[str, tuple[int, ...]]:
        """Stride, padding and dilation, as keyword arguments of conv2d and unfold."""
        if isinstance(self.layer, nn.Linear):
            return {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1)}
        conv = self.layer
        return {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}


def rank_analysis(
    model: nn.Module, input_shape: tuple[int, ...], rng: torch.Generator | None = None
) -> list[LayerRank]:
    """Per weight layer of ``model``, the rank of R-GAP's constraints against its unknowns.

    Needs no gradient: each layer's ``δ`` is drawn at random (from ``rng``, or a fixed
    generator), which gives the rank of a generic gradient; the forward constraints use the
    model's weights.  Raises ``ValueError`` for a model R-GAP does not cover.  Layer 0 reads
    the image.
    """
    rng = rng if rng is not None else torch.Generator().manual_seed(0)
    stages = _stages(model, input_shape)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    dtype, device = _work_dtype(params), next(model.parameters()).device
    ranks = []
    for index, stage in enumerate(stages):
        # random draws come from the CPU generator and are then moved
        delta = torch.randn(stage.out_shape, generator=rng, dtype=torch.float64)
        system = _System(stage, params, delta.to(device=device, dtype=dtype), dtype)
        last = index == len(stages) - 1
        forward = None if last else torch.zeros(system.outputs, device=device, dtype=dtype)
        weight_gradient = torch.zeros(stage.layer.weight.shape, device=device, dtype=dtype)
        _, rank, _ = system.solve(forward, weight_gradient)
        ranks.append(_layer_rank(index, stages, system, rank, last))
    return ranks


@ATTACKS.register("rgap")
@dataclass
class RGAP:
    """R-GAP: closed-form, layer-by-layer inversion of one example's gradient (B = 1)."""

    modality: ClassVar[str] = "image"

    def check(self, setting: Setting) -> None:
        """Refuse, when the experiment loads, a model, task or training R-GAP does not cover."""
        if setting.task.modality != "image":
            raise ValueError(
                f"{WHO}: R-GAP inverts image models; this task's modality is "
                f"{setting.task.modality!r}"
            )
        stages = _stages(setting.model, setting.task.input_shape)
        _check_classifier(stages[-1], setting.task.num_classes)
        trainer = setting.trainer
        if getattr(trainer, "batch_size", 1) != 1:
            raise ValueError(
                f"{WHO}: R-GAP reconstructs one example from one gradient (B = 1), and the "
                f"client trains on batches of {trainer.batch_size or 'its whole partition'}; "
                "set [training] batch_size = 1"
            )
        if getattr(trainer, "local_epochs", 0) or getattr(trainer, "local_steps", 1) != 1:
            raise ValueError(
                f"{WHO}: R-GAP inverts one gradient, and the client takes several local steps; "
                "set [training] local_steps = 1 and local_epochs = 0"
            )

    def __call__(self, view: ServerView, rng: torch.Generator) -> Reconstruction:
        """Reconstruct the client's one example and its label.

        ``info`` holds ``rank_layer<i>``, ``unknowns_layer<i>`` and ``residual_layer<i>`` (the
        relative least-squares residual) per weight layer, ``underdetermined`` (how many
        layers are) and ``seconds``.  Deterministic: ``rng`` is not used.
        """
        start = time.perf_counter()
        if view.num_examples != 1:
            raise ValueError(
                f"{WHO}: R-GAP is a B = 1 attack, and this client reports {view.num_examples} "
                "examples; attack clients that train on one example (batch_size = 1)"
            )
        if view.local_steps != 1:
            raise ValueError(
                f"{WHO}: R-GAP inverts one gradient, and this client took {view.local_steps} "
                "local steps; attack one-step (FedSGD) updates"
            )
        stages = _stages(view.model(), view.task.input_shape)
        _check_classifier(stages[-1], view.task.num_classes)
        out_dtype = view.sent[f"{stages[-1].name}.weight"].dtype
        dtype = _work_dtype(view.sent)
        params = {k: v.to(dtype) for k, v in view.sent.items() if v.is_floating_point()}
        gradient = {k: v.to(dtype) for k, v in view.gradient().items()}

        classifier = stages[-1].name
        delta = _logit_gradient(
            gradient[f"{classifier}.weight"],
            gradient.get(f"{classifier}.bias"),
            params[f"{classifier}.weight"],
        )
        label = delta.argmin()
        info: dict[str, float] = {}
        ranks: list[LayerRank] = []
        forward = None  # the classifier's outputs (logits) are not known
        for index in reversed(range(len(stages))):
            stage = stages[index]
            system = _System(stage, params, delta, dtype)
            weight_gradient = gradient[f"{stage.name}.weight"]
            x, rank, residual = system.solve(forward, weight_gradient)
            ranks.append(_layer_rank(index, stages, system, rank, forward is None))
            info[f"rank_layer{index}"] = float(rank)
            info[f"unknowns_layer{index}"] = float(system.unknowns)
            info[f"residual_layer{index}"] = residual
            if index == 0:
                break
            below = stages[index - 1]
            # The layer below produced x through its activations: undo them, and carry the
            # gradient with respect to x back through them to its pre-activation output.
            z, derivative = _invert(below.activations, x.reshape(below.out_shape))
            delta = derivative * (system.forward.T @ delta.reshape(-1)).reshape(below.out_shape)
            _, bias = below.weights(params)
            forward = z - (0 if bias is None else bias.reshape(-1, *[1] * (z.ndim - 1)))
        for layer in ranks:
            if not layer.determined:
                warnings.warn(f"{WHO}: {layer.advice}", UnderdeterminedWarning, stacklevel=2)
        info["underdetermined"] = float(sum(not layer.determined for layer in ranks))
        info["seconds"] = time.perf_counter() - start
        return Reconstruction(
            inputs=x.reshape(1, *view.task.input_shape).to(out_dtype),
            labels=label.reshape(1).long(),
            info=info,
        )


class _System:
    """The linear constraints on one layer's input ``x`` (flattened, ``n`` unknowns).

    * forward: ``F x = z - b`` with ``F`` the layer's (Toeplitz) matrix, ``[outputs, n]``;
    * gradient: for every input channel ``c``, ``G x_c = ∂L/∂W[:, c]`` with one matrix ``G``
      (``δ`` times the unfolded channel, im2col, ``[O·kh·kw, H·W]``), the same for every
      channel.  It is replaced by its QR factors: ``R x_c = Qᵀ ∂L/∂W[:, c]`` has the same
      least-squares solution and at most ``H·W`` rows.  A linear layer is a 1x1 convolution
      of a ``(n, 1, 1)`` input: ``G = δ``.
    """

    def __init__(self, stage: _Stage, params: Params, delta: Tensor, dtype: torch.dtype) -> None:
        weight, _ = stage.weights(params)
        weight = weight.to(dtype)
        self.channels, height, width = stage.image_shape
        self.unknowns = self.channels * height * width
        self.gradient_equations = weight.numel()  # one per weight, before compression
        device = weight.device
        if isinstance(stage.layer, nn.Linear):
            self.forward = weight.flatten(1)
        else:
            shape = (self.unknowns, self.channels, height, width)
            basis = torch.eye(self.unknowns, device=device, dtype=dtype).reshape(shape)
            columns = functional.conv2d(basis, weight, **stage.geometry)
            self.forward = columns.reshape(self.unknowns, -1).T
        self.outputs = self.forward.shape[0]
        pixels = height * width
        basis = torch.eye(pixels, device=device, dtype=dtype).reshape(pixels, 1, height, width)
        unfolded = functional.unfold(basis, weight.shape[-2:], **stage.geometry)
        per_channel = torch.einsum("jkp,op->okj", unfolded, delta.reshape(len(delta), -1))
        self.q, self.r = torch.linalg.qr(per_channel.reshape(-1, pixels))

    def solve(self, forward: Tensor | None, weight_gradient: Tensor) -> tuple[Tensor, int, float]:
        """The least-squares input (flattened), the system's rank and its relative residual.

        ``forward`` is ``z - b`` (``None`` for the classifier, whose logits are unknown).  The
        residual ``‖A x - b‖ / ‖b‖`` is 0 for exact, consistent constraints.
        """
        per_channel = weight_gradient.to(self.q.dtype).transpose(0, 1).reshape(self.channels, -1)
        targets = self.q.T @ per_channel.T  # [rows of R, channels]
        if forward is None:
            # Gradient rows only: the same small system R x_c = t_c for every channel.
            x, rank = _least_squares(self.r.T @ self.r, self.r.T @ targets)
            residual = (self.r @ x - targets).norm() / targets.norm().clamp_min(_TINY)
            return x.T.reshape(-1), rank * self.channels, float(residual)
        # Each block scaled to unit RMS column norm, so that the forward and the (much
        # smaller) gradient rows count alike in the fit and in the rank's tolerance.
        ratio = math.sqrt(self.channels / self.unknowns)  # ‖kron(I, R)‖ = √channels ‖R‖
        gradient_scale = (self.r.norm() * ratio).clamp_min(_TINY)
        forward_scale = (self.forward.norm() / math.sqrt(self.unknowns)).clamp_min(_TINY)
        r, targets = self.r / gradient_scale, targets / gradient_scale
        matrix, value = self.forward / forward_scale, forward.reshape(-1) / forward_scale
        eye = torch.eye(self.channels, device=r.device, dtype=r.dtype)
        # The gradient rows' Gram matrix is block-diagonal: one RᵀR per channel.
        gram = matrix.T @ matrix + torch.kron(eye, (r.T @ r).contiguous())
        rhs = matrix.T @ value + (r.T @ targets).T.reshape(-1)
        x, rank = _least_squares(gram, rhs[:, None])
        x = x[:, 0]
        error = (matrix @ x - value).square().sum()
        error = error + (r @ x.reshape(self.channels, -1).T - targets).square().sum()
        total = value.square().sum() + targets.square().sum()
        return x, rank, float((error / total.clamp_min(_TINY)).sqrt())


def _least_squares(gram: Tensor, rhs: Tensor) -> tuple[Tensor, int]:
    """The least-squares solution of ``A x = b`` from ``AᵀA`` and ``Aᵀb``, and ``A``'s rank.

    The rank counts singular values of ``A`` above :data:`RCOND` times the largest.  Full rank:
    Cholesky; otherwise the minimum-norm solution on the determined directions.  Not
    ``torch.linalg.lstsq``: its rank-revealing CPU driver (gelsy) reads uninitialised pivots
    and returns wrong ranks at random (pytorch/pytorch#187411), its SVD drivers are ~10x
    slower, and the Gram matrix of a convolution's system is cheap to form.
    """
    eigenvalues = torch.linalg.eigvalsh(gram)
    floor = RCOND**2 * eigenvalues[-1].clamp_min(0)
    rank = int((eigenvalues > floor).sum())
    if rank == len(gram):
        return torch.cholesky_solve(rhs, torch.linalg.cholesky(gram)), rank
    eigenvalues, vectors = torch.linalg.eigh(gram)
    kept = vectors[:, eigenvalues > floor]
    return kept @ ((kept.T @ rhs) / eigenvalues[eigenvalues > floor, None]), rank


def _stages(model: nn.Module, input_shape: tuple[int, ...]) -> list[_Stage]:
    """``model`` as a chain of weight layers, or a ValueError naming what R-GAP cannot invert."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"{WHO}: R-GAP inverts a plain chain of layers (an nn.Sequential), and "
            f"{type(model).__name__} computes its own forward (e.g. residual connections); use "
            "Conv2d and Linear layers with LeakyReLU, Sigmoid or Tanh between them, such as "
            '[model] name = "rgap_cnn"'
        )
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError(f"{WHO}: the model has no weights to invert")
    # A forward pass of zeros checks that the chain fits the input and records its shapes.
    x = torch.zeros((1, *input_shape), device=parameter.device, dtype=parameter.dtype)
    layers: list[tuple[str, nn.Module, tuple[int, ...], tuple[int, ...]]] = []
    activations: list[list[nn.Module]] = []
    # The structure first (blocks with their own forward), then each layer.
    for name, module in list(_leaves(model, "")):
        _check_covered(name, module)
        shape = tuple(x.shape[1:])
        if isinstance(module, nn.Linear) and len(shape) != 1:
            raise ValueError(
                f"{WHO}: {name} (Linear) gets an input of shape {shape}; put an nn.Flatten "
                "before it"
            )
        try:
            with torch.no_grad():
                x = module(x)
        except RuntimeError as err:
            raise ValueError(
                f"{WHO}: {name} does not fit its input of shape {shape}: {err}"
            ) from None
        if isinstance(module, nn.Conv2d | nn.Linear):
            layers.append((name, module, shape, tuple(x.shape[1:])))
            activations.append([])
        elif isinstance(module, INVERTIBLE):
            if not layers:
                raise ValueError(
                    f"{WHO}: the model starts with {name} ({type(module).__name__}); R-GAP "
                    "needs its first layer to be a Conv2d or Linear"
                )
            activations[-1].append(module)
        # nn.Flatten only reshapes: nothing to invert
    if not layers or not isinstance(layers[-1][1], nn.Linear):
        raise ValueError(
            f"{WHO}: R-GAP needs the model to end in a linear classifier (logits into "
            "cross-entropy)"
        )
    if any(not isinstance(module, nn.Identity) for module in activations[-1]):
        raise ValueError(
            f"{WHO}: the classifier {layers[-1][0]} must be the last layer (its logits go to "
            f"cross-entropy), and {type(activations[-1][0]).__name__} follows it"
        )
    activations[-1] = []
    return [
        _Stage(name, module, in_shape, out_shape, tuple(acts))  # type: ignore[arg-type]
        for (name, module, in_shape, out_shape), acts in zip(layers, activations, strict=True)
    ]


def _leaves(module: nn.Sequential, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """The layers of a (nested) ``nn.Sequential`` in order, with their state-dict names."""
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, f"{path}.")
        elif next(child.children(), None) is not None:
            raise ValueError(
                f"{WHO}: {path} ({type(child).__name__}) is a block with its own forward (e.g. "
                "a residual connection); R-GAP inverts a plain chain of layers"
            )
        else:
            yield path, child


def _check_covered(name: str, module: nn.Module) -> None:
    """A ValueError naming ``module`` and the fix, unless R-GAP can invert it."""
    kind = type(module).__name__
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(
                f"{WHO}: {name} ({kind}) needs groups = 1, zero padding and integer padding "
                f"(has groups = {module.groups}, padding_mode = {module.padding_mode!r}, "
                f"padding = {module.padding!r})"
            )
        return
    if isinstance(module, nn.LeakyReLU) and not module.negative_slope > 0:
        raise ValueError(
            f"{WHO}: {name} (LeakyReLU with slope {module.negative_slope}) is not invertible; "
            "use a positive negative_slope"
        )
    if isinstance(module, (nn.Linear, nn.Flatten, *INVERTIBLE)):
        return
    for kinds, why in UNCOVERED:
        if isinstance(module, kinds):
            raise ValueError(f"{WHO}: {name} ({kind}) {why}")
    raise ValueError(
        f"{WHO}: R-GAP does not cover {name} ({kind}); it inverts chains of Conv2d and Linear "
        "layers with LeakyReLU, Sigmoid or Tanh between them"
    )


def _check_classifier(stage: _Stage, num_classes: int) -> None:
    """Without a bias, reading the logit gradient off the weight gradient needs 3 classes."""
    if stage.layer.bias is None and num_classes < 3:
        raise ValueError(
            f"{WHO}: the classifier {stage.name} has no bias, so R-GAP reads the scale of its "
            "input from the other classes' probabilities, which needs >= 3 classes (this task "
            f"has {num_classes}); give the classifier a bias"
        )


def _logit_gradient(
    weight_gradient: Tensor, bias_gradient: Tensor | None, weight: Tensor
) -> Tensor:
    """``g = ∂L/∂z = softmax(z) - onehot(y)`` of the classifier ``z = W x (+ b)``, one example.

    With a bias it is the bias gradient.  Without, ``∂L/∂W = g xᵀ`` is rank 1: its top singular
    pair gives ``g = (σ/t) u`` and ``x = t v`` up to the scalar ``t``.  ``|g_y| = Σ_{c≠y} g_c`` is
    the largest entry, and negative, which fixes the signs.  Off the label, ``g_c = p_c`` with
    ``log p_c = t (W v)_c + const``, so ``t`` is the slope of ``log u_c`` against ``(W v)_c``
    (weighted by ``u_c²``: small probabilities carry the gradient's rounding error).
    """
    if bias_gradient is not None:
        return bias_gradient
    left, singular, right = torch.linalg.svd(weight_gradient, full_matrices=False)
    u, sigma, v = left[:, 0], singular[0], right[0]
    label = u.abs().argmax()
    if u[label] > 0:
        u, v = -u, -v
    others = u > 0
    others[label] = False
    logits, logs, weights = (weight @ v)[others], u[others].log(), u[others] ** 2
    logits = logits - (weights * logits).sum() / weights.sum()
    logs = logs - (weights * logs).sum() / weights.sum()
    t = (weights * logits * logs).sum() / (weights * logits**2).sum()
    if not (torch.isfinite(t) and t > 0):
        raise ValueError(
            f"{WHO}: the classifier's weight gradient is not the rank-1 gradient of one example "
            "under cross-entropy; cannot recover its input"
        )
    return sigma / t * u


def _invert(activations: tuple[nn.Module, ...], post: Tensor) -> tuple[Tensor, Tensor]:
    """The pre-activation ``z`` with ``acts(z) = post``, and ``d acts / dz`` there (per entry)."""
    derivative = torch.ones_like(post)
    tiny = torch.finfo(post.dtype).eps
    for act in reversed(activations):
        if isinstance(act, nn.LeakyReLU):
            pre = torch.where(post >= 0, post, post / act.negative_slope)
            slope = torch.where(
                pre >= 0, torch.ones_like(pre), torch.full_like(pre, act.negative_slope)
            )
        elif isinstance(act, nn.Sigmoid):
            # the recovered output may overshoot (0, 1) by its error; the clamp keeps it finite
            post = post.clamp(tiny, 1 - tiny)
            pre, slope = torch.logit(post), post * (1 - post)
        elif isinstance(act, nn.Tanh):
            post = post.clamp(-1 + tiny, 1 - tiny)
            pre, slope = torch.atanh(post), 1 - post**2
        else:  # nn.Identity
            pre, slope = post, torch.ones_like(post)
        derivative = derivative * slope
        post = pre
    return post, derivative


def _layer_rank(
    index: int, stages: list[_Stage], system: _System, rank: int, classifier: bool
) -> LayerRank:
    """The :class:`LayerRank` of ``stages[index]``, with advice when it is under-determined."""
    stage = stages[index]
    unknowns = system.unknowns
    equations = (0 if classifier else system.outputs) + system.gradient_equations
    advice = ""
    if rank < unknowns:
        advice = (
            f"layer {index} ({stage.name}) is under-determined: its constraints have rank "
            f"{rank} for {unknowns} unknowns (its input, of shape {stage.in_shape}), so "
            f"{unknowns - rank} directions of it are free and the error reaches every layer "
            "below; "
        )
        layer = stage.layer
        if isinstance(layer, nn.Conv2d):
            advice += (
                f"give {stage.name} more output channels (now {layer.out_channels}) or a "
                f"smaller stride (now {layer.stride[0]})"
            )
        else:
            advice += "the gradient reaching this linear layer is zero (saturated activations)"
        if index > 0:
            advice += (
                f", or shrink its input: fewer output channels or a larger stride in "
                f"{stages[index - 1].name}"
            )
        else:
            advice += " (its input is the image)"
    return LayerRank(index, stage.name, unknowns, equations, rank, advice)


def _work_dtype(params: Params) -> torch.dtype:
    """float64, which keeps the recursion's own rounding far below the gradient's (MPS has none)."""
    device = next(iter(params.values())).device
    return torch.float32 if device.type == "mps" else torch.float64
