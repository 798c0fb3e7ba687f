"""The fedleak contract: what a curious server holds, and one small protocol per plugin kind.

Threat model.  A server (honest-but-curious, or malicious when it runs model *modifiers*) sends a
global model to sampled clients and receives their updated models.  Everything an attack may use
about one client after one round is a :class:`ServerView`.  Ground truth (the examples a client
trained on) is a :class:`Batch` that only metrics ever see; it never appears in a view.

Every plugin is a dataclass registered by name (see :mod:`fedleak.registry`); its fields are its
options.  No base classes: a plugin only has to match its protocol below.

* :class:`Attack`          — server side, ``view -> Reconstruction``.
* :class:`UpdateDefense`   — client side, transforms the update a client sends.
* :class:`TrainingDefense` — client side, changes how a client trains (DP-SGD, dropout, ...).
* :class:`GradientDefense` — client side, transforms each local step's gradients.
* :class:`AggregationDefense` — both sides, hides individual updates (secure aggregation).
* :class:`Trainer`         — client side, the local training procedure (or objective).
* :class:`Selector`        — client side, chooses which local examples to train on.
* :class:`ServerStrategy`  — server side, what clients are asked and how replies are combined.
* :class:`ModelModifier`   — server side, transforms the global model before it is sent.
* :class:`DataSource`, :class:`Partitioner`, :class:`ModelSpec` — the task, its data, the model.

Any plugin may also define ``check(self, setting: Setting) -> None``: it raises ``ValueError``
(naming the value and the fix) when the experiment around it cannot work — an attack that
needs a modifier or an architecture, a defense that needs a trainer.  The config calls every
plugin's check when a file loads, before any training, so a bad combination is one clear
error; the knowledge of what a plugin needs stays in the plugin.

The leakage surface is explicit.  Beyond its model state a client may send *messages* (named
tensors: ZO seeds and scalars, sketched moments, masks, per-group losses), and the server may
send every client *instructions* (a public per-round ``seed`` always, plus whatever its
strategy asks).  Every plugin that sends something declares it in ``sends`` (name -> what it
reveals); the runtime refuses undeclared names, records both channels with each captured view,
and attacks read them from :attr:`ServerView.messages` and :attr:`ServerView.instructions`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

Params = dict[str, Tensor]  # state_dict-style: name -> tensor
Messages = Mapping[str, Tensor]  # named tensors sent beside a model state (scalars are 0-d)
Secrets = Mapping[str, Tensor]  # what a modifier planted; only the server knows it
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Task:
    """Public facts about the learning task; every party knows them."""

    modality: str  # "image" | "text"
    input_shape: tuple[int, ...]  # (C, H, W) for images, (seq_len,) for text
    num_classes: int
    mean: tuple[float, ...] = ()  # image normalisation, to map model inputs back to pixels
    std: tuple[float, ...] = ()
    tokenizer: str = ""  # text: the Hugging Face tokenizer (local directory) that maps ids to text

    def to_pixels(self, inputs: Tensor) -> Tensor:
        """Undo the input normalisation and clamp to [0, 1] (images only)."""
        if self.modality != "image":
            raise ValueError(f"to_pixels is for images; this task's modality is {self.modality!r}")
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean or (0.0,), dtype=inputs.dtype, device=inputs.device)
        std = torch.tensor(self.std or (1.0,), dtype=inputs.dtype, device=inputs.device)
        return (inputs * std.view(shape) + mean.view(shape)).clamp(0, 1)


@dataclass(frozen=True)
class Batch:
    """Examples a client actually trained on: ground truth, read by metrics only.

    ``groups`` are per-example group ids where the data has them (e.g. label x spurious
    attribute): metadata that stays on the client, for group-robust trainers and worst-group
    accuracy; never part of what a client sends.
    """

    inputs: Tensor
    labels: Tensor
    groups: Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: Tensor) -> Batch:
        """The examples at ``indices``, in their order, with their group ids."""
        return Batch(
            self.inputs[indices],
            self.labels[indices],
            None if self.groups is None else self.groups[indices.to(self.groups.device)],
        )

    def to(self, device: torch.device | str) -> Batch:
        """These examples on ``device`` (tensors already there are not copied)."""
        groups = None if self.groups is None else self.groups.to(device)
        return Batch(self.inputs.to(device), self.labels.to(device), groups)


@dataclass(frozen=True)
class ServerView:
    """What the server holds about one client after one round."""

    round: int
    client: int
    task: Task
    build_model: Callable[[], nn.Module]  # the architecture as sent (modifiers applied)
    loss_fn: LossFn  # mean-reduced training loss, e.g. cross-entropy
    sent: Params  # global state the server sent, after its modifiers
    received: Params  # state the client sent back, after its defenses
    num_examples: int  # examples the client reports having trained on
    lr: float  # protocol hyper-parameters the server chose
    local_steps: int  # optimiser steps the client reports
    batch_size: int  # examples per local step (the last one may be smaller)
    loss: float = float("nan")  # training loss the client reports
    protocol: Mapping[str, Any] = field(default_factory=dict)  # trainer name and options
    secrets: Secrets = field(default_factory=dict)  # empty for an honest server
    messages: Messages = field(default_factory=dict)  # what the client sent beside its state
    instructions: Messages = field(default_factory=dict)  # what the server sent every client

    def to(self, device: torch.device | str) -> ServerView:
        """This view with its tensors (sent, received, secrets) and its models on ``device``.

        The pipeline moves each stored view to the experiment's device before attacking it, so
        an attack works on the device of the view it is given.
        """
        build = self.build_model
        return replace(
            self,
            build_model=lambda: build().to(device),
            sent=_moved(self.sent, device),
            received=_moved(self.received, device),
            secrets=_moved(self.secrets, device),
            messages=_moved(self.messages, device),
            instructions=_moved(self.instructions, device),
        )

    @property
    def device(self) -> torch.device:
        """Where the view's tensors live: what an attack on it computes on."""
        return next(iter(self.sent.values())).device if self.sent else torch.device("cpu")

    def model(self) -> nn.Module:
        """A fresh copy of the global model as sent; the caller may do anything with it."""
        model = self.build_model()
        model.load_state_dict(self.sent)
        return model

    def delta(self) -> Params:
        """``received - sent`` for floating-point tensors (the update proper)."""
        return {k: self.received[k] - v for k, v in self.sent.items() if v.is_floating_point()}

    def gradient(self) -> Params:
        """``-delta / (lr * local_steps)``: exact for one plain SGD step, an estimate otherwise."""
        scale = -1.0 / (self.lr * max(self.local_steps, 1))
        return {k: d * scale for k, d in self.delta().items()}

    @classmethod
    def from_local_step(
        cls,
        model: nn.Module,
        batch: Batch,
        task: Task,
        *,
        loss_fn: LossFn = nn.functional.cross_entropy,
        lr: float = 0.1,
        batch_norm: str | None = None,
    ) -> ServerView:
        """The view after one SGD step of ``model`` on ``batch``, without any federation.

        This is the FedSGD threat model in one call, for notebooks and tests::

            view = ServerView.from_local_step(model, batch, task)
            reconstruction = ATTACKS["dlg"]()(view, seeding.rng(0))

        The step runs in the model's current modes, or with its batch norm in ``batch_norm``
        mode ("train" or "eval", see :func:`set_batch_norm`); the view's protocol records it.
        """
        sent = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if batch_norm is not None:
            set_batch_norm(model, batch_norm)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        batch_norm = "eval" if any(not m.training for m in norms) else "train"
        model.zero_grad()
        loss = loss_fn(model(batch.inputs), batch.labels)
        names, params = zip(*model.named_parameters(), strict=True)
        grads = dict(zip(names, torch.autograd.grad(loss, params), strict=True))
        received = {k: v - lr * grads[k] if k in grads else v for k, v in sent.items()}
        architecture = _architecture_of(model)
        return cls(
            round=0,
            client=0,
            task=task,
            build_model=architecture,
            loss_fn=loss_fn,
            sent=sent,
            received=received,
            num_examples=len(batch),
            lr=lr,
            local_steps=1,
            batch_size=len(batch),
            loss=loss.item(),
            protocol={"name": "sgd", "batch_norm": batch_norm},
        )


def _moved(tensors: Mapping[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}


def _architecture_of(model: nn.Module) -> Callable[[], nn.Module]:
    """A builder of fresh copies of ``model`` (weights are overwritten by ``view.model()``)."""
    import copy

    template = copy.deepcopy(model)
    return lambda: copy.deepcopy(template)


def set_batch_norm(model: nn.Module, mode: str) -> nn.Module:
    """Train mode for ``model``, with its batch-norm layers in ``mode`` ("train" or "eval").

    The batch-norm mode of a client's local step is part of the protocol: "train" normalises
    with the batch's own statistics (the server cannot know them), "eval" with the running
    statistics the server sent (public buffers).  Trainers and the attacks' model of the step
    both set it through here.
    """
    model.train()
    if mode == "eval":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model


@dataclass(frozen=True)
class Setting:
    """The experiment around a plugin, as its ``check`` sees it: built, never trained.

    ``model`` is the model the plugin acts on: for a modifier the architecture before any
    modifier, for every other plugin the global architecture as sent (modifiers applied).
    """

    task: Task
    model: nn.Module
    trainer: Any  # the Trainer
    defenses: tuple[Any, ...] = ()
    modifiers: tuple[Any, ...] = ()
    attacks: tuple[Any, ...] = ()
    server: Any = None  # the ServerStrategy
    selection: Any = None  # the Selector, if the clients select their examples

    def has_modifier(self, name: str) -> bool:
        """Whether the server runs the modifier registered as ``name``."""
        return any(getattr(m, "name", None) == name for m in self.modifiers)


@dataclass(frozen=True)
class Reconstruction:
    """An attack's output, in the model's input space."""

    inputs: Tensor  # images [B, C, H, W] (normalised like the task's inputs) | token ids [B, T]
    labels: Tensor | None = None  # recovered labels [B], if the attack recovers them
    info: Mapping[str, float] = field(default_factory=dict)  # e.g. final loss
    # Feature attacks: the recovered inputs [B, d] of the module named ``feature_layer`` in the
    # sent model (directions only, sign and order free); metrics compare them with the true ones.
    features: Tensor | None = None
    feature_layer: str = ""

    def to(self, device: torch.device | str) -> Reconstruction:
        """This reconstruction with its tensors on ``device`` (metrics score on the CPU)."""
        return replace(
            self,
            inputs=self.inputs.to(device),
            labels=None if self.labels is None else self.labels.to(device),
            features=None if self.features is None else self.features.to(device),
        )


@runtime_checkable
class Attack(Protocol):
    """Server side: reconstruct a client's training examples from what the server holds."""

    modality: ClassVar[str]  # the task modality it applies to

    def __call__(self, view: ServerView, rng: torch.Generator) -> Reconstruction:
        """Reconstruct the client's examples; all randomness comes from ``rng``."""


@runtime_checkable
class UpdateDefense(Protocol):
    """Client side: transform the update (``received - sent``) before it is sent."""

    def __call__(self, delta: Params, rng: torch.Generator) -> Params:
        """The defended update: same keys, shapes and dtypes as ``delta``."""


@runtime_checkable
class TrainingDefense(Protocol):
    """Client side: change how a client trains (same shape as Opacus's ``make_private``)."""

    def wrap(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Iterable[Batch],
        rng: torch.Generator,
        *,
        data: Batch,
    ) -> tuple[nn.Module, torch.optim.Optimizer, Iterable[Batch]]:
        """Return the (possibly wrapped) model, optimiser and batches to train with.

        ``batches`` are the trainer's planned mini-batches; ``data`` is the client's whole
        partition they were drawn from (DP-SGD samples its own batches from it, so that its
        sampling rate is batch size / partition size even with less than an epoch of steps).
        """


@runtime_checkable
class GradientDefense(Protocol):
    """Client side: transform every local step's gradients, with the batch at hand.

    For defenses that need the examples, not just the update (e.g. sensitivity-weighted noise
    or pruning): the trainer calls it between ``backward`` and the optimiser step.
    """

    def gradients(
        self, model: nn.Module, batch: Batch, loss_fn: LossFn, grads: Params, rng: torch.Generator
    ) -> Params:
        """The defended gradients of this step: same keys, shapes and dtypes as ``grads``."""


@runtime_checkable
class AggregationDefense(Protocol):
    """Both sides: a protocol under which the server sees only a round's aggregate update."""

    def aggregate(self, received: list[Params], weights: list[int]) -> Params:
        """What the server learns from the round's states, weighted by example counts."""


@dataclass(frozen=True)
class TrainResult:
    """What a trainer reports; the update itself is the model's new state."""

    loss: float  # mean training loss over the local steps
    steps: int  # optimiser steps taken
    batch_size: int  # examples per step
    used: Batch  # the examples actually trained on, in first-use order (ground truth)
    messages: Messages = field(default_factory=dict)  # sent beside the state; see Trainer.sends


@runtime_checkable
class Trainer(Protocol):
    """Client side: the local training procedure of one round.

    Optional attributes: ``sends`` (``ClassVar[Mapping[str, str]]``, message name -> what it
    reveals; default nothing) and, for a trainer whose client sends messages *instead of* its
    state (zeroth-order seeds and scalars), ``sends_model = False`` with a method
    ``replay(sent, messages, build_model) -> Params`` by which the server rebuilds the state.
    A trainer that takes no SGD step on the task loss, which training defenses wrap, names
    what protects it instead in ``defend_with`` (``ClassVar[str]``); the config then refuses
    training defenses with it.
    """

    lr: float

    def fit(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        defenses: tuple[TrainingDefense | GradientDefense, ...] = (),
        instructions: Messages | None = None,
    ) -> TrainResult:
        """Train ``model`` in place for one round on ``data``, applying ``defenses``.

        ``instructions`` are what the server strategy sent every sampled client this round
        (always a public ``seed``, an int64 0-d tensor); ``None`` outside a federation.
        """


@dataclass(frozen=True)
class Selection:
    """The local examples a client trains on, and what choosing them sends the server."""

    indices: Tensor  # int64 indices into the client's partition, in training order
    messages: Messages = field(default_factory=dict)


@runtime_checkable
class Selector(Protocol):
    """Client side: choose which local examples to train on this round (data selection).

    It sees the global model as received, before training; ``sends`` declares its messages.
    """

    sends: ClassVar[Mapping[str, str]]

    def select(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        instructions: Messages,
    ) -> Selection:
        """The chosen examples of ``data``; all randomness from ``rng`` or the shared seed."""


def sends(plugin: Any) -> Mapping[str, str]:
    """What ``plugin`` declares it sends beside the model (name -> what it reveals)."""
    return getattr(plugin, "sends", {}) if plugin is not None else {}


@dataclass(frozen=True)
class Reply:
    """One client's reply as a server strategy sees it."""

    client: int
    params: Params  # its state (rebuilt with the trainer's replay when it sends no model)
    num_examples: int
    loss: float
    messages: Messages = field(default_factory=dict)


@runtime_checkable
class ServerStrategy(Protocol):
    """Server side: what every sampled client is asked, and how replies become the global state.

    ``sends`` declares the instructions it adds to the runtime's public per-round ``seed``.
    """

    sends: ClassVar[Mapping[str, str]]

    def instructions(self, round: int, params: Params, rng: torch.Generator) -> Messages:
        """What every sampled client receives beside the model in ``round``."""

    def aggregate(self, round: int, params: Params, replies: list[Reply]) -> Params:
        """The next global state from ``params`` (this round's) and the replies, client-sorted."""


@runtime_checkable
class ModelModifier(Protocol):
    """Server side: transform the global model before sending it (malicious or benign)."""

    adversarial: ClassVar[bool]  # True: part of a malicious server's threat model

    def applies_to(self, round: int) -> bool:
        """Whether the modifier acts in ``round``."""

    def architecture(self, model: nn.Module) -> nn.Module:
        """The structurally modified model, built the same on every node."""

    def __call__(self, params: Params, round: int, rng: torch.Generator) -> tuple[Params, Secrets]:
        """The weights to send this round, and what was planted in them (server-only)."""


@dataclass(frozen=True)
class Dataset:
    """A loaded data set: the task, the pool clients are partitioned from, and a test split."""

    task: Task
    train: Batch
    test: Batch


@runtime_checkable
class DataSource(Protocol):
    """Loads a data set (from a data root, a bundled copy, or by generating it).

    A source whose size is an option declares its ``task`` and ``generated_examples`` (an int
    property), so the config can refuse what this machine cannot hold before generating it.
    """

    modality: ClassVar[str]

    def load(self) -> Dataset:
        """Read or generate the data."""


@runtime_checkable
class Partitioner(Protocol):
    """Splits example indices among clients, from the labels alone."""

    def __call__(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """One array of example indices per client, disjoint."""


@runtime_checkable
class ModelSpec(Protocol):
    """Builds a freshly initialised model for a task (from the global RNG; see seeding.isolated)."""

    def __call__(self, task: Task) -> nn.Module:
        """A new model for ``task``."""
