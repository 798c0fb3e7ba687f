"""Zeroth-order clients: MeZO-style local training sent as (seed, scalar) pairs, and loss queries.

* ``mezo``: local training by two-point zeroth-order SGD (Malladi et al., "Fine-Tuning Language
  Models with Just Forward Passes", NeurIPS 2023), sent the way FedKSeed (Qin et al., ICML
  2024) and DeComFL (Li et al., 2024) send it: not the model, but for every local step the
  seed of its random directions and the projected differences.  At step ``t`` the client
  draws a seed ``s_t`` from its own training stream, then ``n = directions`` Gaussian
  directions ``z_tj`` from a generator seeded with ``s_t``, and measures on its mini-batch
  ``p_tj = (L(theta + eps z_tj) - L(theta - eps z_tj)) / (2 eps)`` (clipped to ``clip`` and
  noised with ``N(0, noise_std^2)`` when asked: DPZero's mechanism, Zhang et al. 2024).  It
  steps ``theta <- theta - lr / n sum_j p_tj z_tj`` and sends ``seeds [steps]`` and
  ``projected [steps, n]``; the server's :meth:`MeZO.replay` rebuilds the client's state
  from them with the same arithmetic, bit for bit on the CPU.
* ``zo_query``: the client half of the server strategy ``zo_newton``
  (:mod:`fedleak.server.zo_newton`): it trains nothing and returns its loss at each point the
  server asks about (``losses``), for a few low-dimensional parameters (a bias, a
  temperature).

Threat model and what leaks.  The scalars look innocuous, but each ``p_tj`` with its public
seed is a directional derivative of the client's mini-batch loss, and the replayed update is
``-lr`` times ``(1/n) sum_j p_tj z_tj``: with one local step, an unbiased estimate of the
client's gradient projected on ``n`` random directions (``ServerView.gradient()``), on which
the existing inversion attacks (DLG, inverting gradients) run unchanged.  The estimate's error
shrinks like ``sqrt(d / n)`` of the gradient's norm, so the number of directions per step is
the privacy knob beside the noise on the scalars.  ``zo_query``'s losses at ``x +- Z u``
with known ``u`` likewise give the server each client's own gradient in the queried
parameters (:func:`fedleak.optim.zeroth_order.two_point`).

Departures.  MeZO perturbs in place and regenerates ``z`` from the seed to save memory; here
each direction is materialised (small models), which changes no number.  Batch-norm buffers
are not updated by the perturbed forward passes (they are sent back unchanged).  Replay is
exact when the server computes on the device type the client trained on (the CPU here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedleak.core import (
    Batch,
    GradientDefense,
    LossFn,
    Messages,
    Params,
    Setting,
    TrainingDefense,
    TrainResult,
    set_batch_norm,
)
from fedleak.training import TRAINERS, refuse_training_defenses
from fedleak.training.sgd import SGD, _first_use

SEED_HIGH = 2**62  # step seeds are drawn in [0, 2^62): int64 on the wire, any torch seed


@TRAINERS.register("mezo")
@dataclass
class MeZO:
    """Two-point zeroth-order local SGD, sent as per-step seeds and projected differences."""

    defend_with: ClassVar[str] = "its clip and noise_std on the scalars (it computes no gradients)"
    sends_model: ClassVar[bool] = False
    sends: ClassVar[dict[str, str]] = {
        "seeds": "[local_steps] int64: the seed of each local step's random directions",
        "projected": "[local_steps, directions] projected differences (L(theta + eps z) - "
        "L(theta - eps z)) / (2 eps) of the client's mini-batch loss, clipped and noised when "
        "asked: with the seeds, directional derivatives that rebuild its update exactly "
        "(with one step, its gradient projected on `directions` random directions)",
    }

    lr: float = 1e-3
    local_steps: int = 1
    batch_size: int = 0  # examples per step; 0 = the whole partition
    eps: float = 1e-3  # perturbation scale of the two-point difference
    directions: int = 1  # two-point queries per step (n): the update averages n estimates
    clip: float = 0.0  # > 0: each projected difference clipped to [-clip, clip] before noise
    noise_std: float = 0.0  # Gaussian noise added to each projected difference
    parameters: tuple[str, ...] = ()  # names or name prefixes perturbed; () = every parameter
    batch_norm: Literal["train", "eval"] = "train"
    _sgd: SGD = field(init=False, repr=False)  # plans the mini-batches exactly as sgd does

    def __post_init__(self) -> None:
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"mezo: {name} must be > 0, got {getattr(self, name)}")
        if self.directions < 1:
            raise ValueError(f"mezo: directions must be >= 1, got {self.directions}")
        if self.clip < 0 or self.noise_std < 0:
            raise ValueError(
                f"mezo: clip and noise_std must be >= 0 (0 = off), got {self.clip} and "
                f"{self.noise_std}"
            )
        self.parameters = tuple(self.parameters)
        self._sgd = SGD(lr=self.lr, local_steps=self.local_steps, batch_size=self.batch_size)

    def check(self, setting: Setting) -> None:
        """The names match parameters."""
        self.perturbed(setting.model)

    def perturbed(self, model: nn.Module) -> list[str]:
        """The names of the floating-point parameters the directions cover, in model order."""
        names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        if not self.parameters:
            return names
        chosen = [n for n in names if any(n.startswith(p) for p in self.parameters)]
        if not chosen:
            raise ValueError(
                f"mezo: parameters {list(self.parameters)} match none of the model's "
                f"parameters; choose among {names}"
            )
        return chosen

    def fit(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        defenses: tuple[TrainingDefense | GradientDefense, ...] = (),
        instructions: Messages | None = None,
    ) -> TrainResult:
        """Train ``model`` in place by zeroth-order steps; the messages rebuild its state."""
        refuse_training_defenses(self, defenses)
        if not len(data):
            raise ValueError("mezo: the client has no examples to train on")
        batches = self._sgd.batches(data, rng)
        set_batch_norm(model, self.batch_norm)
        names = self.perturbed(model)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        theta = {k: state[k] for k in names}
        seeds, rows, losses = [], [], []
        with torch.no_grad():
            for batch in batches:
                seed = int(torch.randint(SEED_HIGH, (1,), generator=rng))
                directions = _directions(theta, seed, self.directions)
                row = []
                for z in directions:
                    plus = _loss(model, state, theta, z, self.eps, batch, loss_fn)
                    minus = _loss(model, state, theta, z, -self.eps, batch, loss_fn)
                    row.append((plus - minus) / (2 * self.eps))
                    losses.append(float(plus + minus) / 2)
                projected = torch.stack(row)
                if self.clip > 0:
                    projected = projected.clamp(-self.clip, self.clip)
                if self.noise_std > 0:
                    noise = torch.randn(projected.shape, generator=rng, dtype=projected.dtype).to(
                        projected.device
                    )
                    projected = projected + self.noise_std * noise
                theta = _step(theta, directions, projected, self.lr)
                seeds.append(seed)
                rows.append(projected)
            model.load_state_dict({**state, **theta})
        return TrainResult(
            loss=sum(losses) / len(losses),
            steps=len(batches),
            batch_size=len(batches[0]),
            used=_first_use(batches),
            messages={
                "seeds": torch.tensor(seeds, dtype=torch.int64),
                "projected": torch.stack(rows),
            },
        )

    def replay(self, sent: Params, messages: Messages, build_model) -> Params:
        """The client's state from the global state it received and its seeds and scalars."""
        seeds, projected = messages["seeds"], messages["projected"]
        if seeds.ndim != 1 or projected.shape != (len(seeds), self.directions):
            raise ValueError(
                f"mezo: expected seeds [steps] and projected [steps, {self.directions}], got "
                f"{tuple(seeds.shape)} and {tuple(projected.shape)}"
            )
        names = self.perturbed(build_model())
        theta = {k: sent[k].clone() for k in names}
        for seed, row in zip(seeds.tolist(), projected, strict=True):
            theta = _step(theta, _directions(theta, seed, self.directions), row, self.lr)
        return {**{k: v.clone() for k, v in sent.items()}, **theta}


def _directions(theta: Params, seed: int, n: int) -> list[Params]:
    """The ``n`` Gaussian directions of one step, drawn in order from the step's seed.

    Drawn on the CPU and moved, so a client on any device and the server agree.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append(
            {
                k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)
                for k, v in theta.items()
            }
        )
    return out


def _step(theta: Params, directions: list[Params], projected: Tensor, lr: float) -> Params:
    """``theta - lr / n sum_j projected_j z_j``: the one update rule of client and replay."""
    n = len(directions)
    out = {}
    for k, v in theta.items():
        total = sum(float(p) * z[k] for p, z in zip(projected, directions, strict=True))
        out[k] = v - (lr / n) * total
    return out


def _loss(
    model: nn.Module,
    state: Params,
    theta: Params,
    z: Params,
    scale: float,
    batch: Batch,
    loss_fn: LossFn,
) -> Tensor:
    """The mini-batch loss at ``theta + scale z`` (other tensors as in ``state``, copies)."""
    params = {k: v.clone() for k, v in state.items()}
    params.update({k: v + scale * z[k] for k, v in theta.items()})
    return loss_fn(functional_call(model, params, (batch.inputs,)), batch.labels)


@TRAINERS.register("zo_query")
@dataclass
class ZOQuery:
    """The client of ``zo_newton``: its loss at each point the server asks, nothing trained."""

    defend_with: ClassVar[str] = "its noise_std on the losses (it computes no gradients)"
    sends_model: ClassVar[bool] = False
    sends: ClassVar[dict[str, str]] = {
        "losses": "[q] the client's mean loss at each of the server's points: its own loss "
        "surface in the tuned parameters (with the public points, its gradient there)",
    }

    lr: float = 1.0  # unused: nothing is trained; kept for the protocol record
    parameters: tuple[str, ...] = ()  # the tensors the points set, as in server.parameters
    batch_size: int = 0  # > 0: each point on a fresh random mini-batch of this size
    noise_std: float = 0.0  # Gaussian noise added to each loss before it is sent

    def __post_init__(self) -> None:
        self.parameters = tuple(self.parameters)
        if not self.parameters:
            raise ValueError("zo_query: name the parameters the server's points set")
        if self.batch_size < 0 or self.noise_std < 0:
            raise ValueError(
                f"zo_query: batch_size and noise_std must be >= 0, got {self.batch_size} and "
                f"{self.noise_std}"
            )

    def fit(
        self,
        model: nn.Module,
        data: Batch,
        loss_fn: LossFn,
        rng: torch.Generator,
        defenses: tuple[TrainingDefense | GradientDefense, ...] = (),
        instructions: Messages | None = None,
    ) -> TrainResult:
        """The losses at ``instructions["points"]``; the model is left as received."""
        refuse_training_defenses(self, defenses)
        if not len(data):
            raise ValueError("zo_query: the client has no examples to evaluate")
        points = (instructions or {}).get("points")
        if points is None:
            raise ValueError("zo_query: no points to evaluate; use server.name = 'zo_newton'")
        state = {k: v.detach() for k, v in model.state_dict().items()}
        model.eval()
        losses = []
        with torch.no_grad():
            for point in points:
                params = dict(state)
                start = 0
                for name in self.parameters:
                    size = state[name].numel()
                    chunk = point[start : start + size].reshape(state[name].shape)
                    params[name] = chunk.to(state[name].dtype)
                    start += size
                batch = data
                if self.batch_size:
                    idx = torch.randperm(len(data), generator=rng).to(data.labels.device)
                    idx = idx[: self.batch_size]
                    batch = data.select(idx)
                out = functional_call(model, params, (batch.inputs,))
                losses.append(loss_fn(out, batch.labels))
            here = float(loss_fn(model(data.inputs), data.labels))  # at the received model
        sent = torch.stack(losses) if losses else torch.zeros(0, device=data.labels.device)
        if self.noise_std > 0:
            noise = torch.randn(sent.shape, generator=rng, dtype=sent.dtype).to(sent.device)
            sent = sent + self.noise_std * noise
        return TrainResult(
            loss=here,
            steps=len(points),
            batch_size=self.batch_size or len(data),
            used=data,
            messages={"losses": sent},
        )

    def replay(self, sent: Params, messages: Messages, build_model) -> Params:
        """The client's state is the global one: it trains nothing."""
        return {k: v.clone() for k, v in sent.items()}
