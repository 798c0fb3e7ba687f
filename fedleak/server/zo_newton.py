"""A server that tunes a few parameters by zeroth-order Newton steps on the clients' losses.

Yu, Wang, Huang, Lei & Lee, "Stochastic Zeroth-Order Optimization under Strongly Convexity and
Lipschitz Hessian: Minimax Sample Complexity", NeurIPS 2024: Algorithm 4 (a bootstrapping
Newton stage, then one step from a gradient estimated on the Hessian-shaped ellipsoid) reaches
the minimax simple regret ``Theta(d rho^(2/3) M^-1 T^(-2/3))`` from ``T`` noisy evaluations.
:func:`fedleak.optim.zeroth_order.two_stage` implements it; this strategy runs it federated.

The global objective is ``F(x) = sum_k p_k F_k(x)`` over the ``parameters`` named here (flattened
into ``x``, ``d`` numbers in all: a head's bias, a temperature, a few adapter coordinates),
the rest of the model fixed.  Each round the server sends every sampled client the next
``points`` ``[q, d]`` the algorithm asks about (at most ``queries_per_round``); each client
(trainer ``zo_query``) returns its mean loss at each point; the example-weighted mean over
the round's clients is the noisy evaluation ``F(x) + w`` of the theory (client sampling and
mini-batches are the noise).  When a phase of the algorithm (one estimator's points) is
answered, it is sent the values and asks for the next.  The global state carries the current
iterate (the centre of the phase being queried; every estimator queries symmetrically around
it) and, once the budget is spent, the algorithm's answer, which later rounds keep.

What leaks.  Nothing of the model leaves a client, only its losses at public points, but those
are its own loss surface: the differences at ``x +- Z u_j`` with the public ``u_j`` are its
gradient in the tuned parameters (:func:`fedleak.optim.zeroth_order.two_point`), and for a
classifier's bias that gradient is its label distribution minus its mean prediction.

Noise.  Every point of a round is evaluated by the same sampled clients, so under partial
participation the sample is one offset shared by the round's points, not the independent
per-query noise of the theory: the algorithm then converges to the optimum of a sampled
sub-federation (measured on digits, 10 of 20 non-IID clients: the regret stays at 2e-2 for
T = 3e3 to 3e4, against 4e-4 with every client and a fresh mini-batch per point,
``simulations/benchmarks/results/training_strategies/zo_server.md``).  Ask every client each
round, with ``zo_query``'s ``batch_size`` for independent noise.

Departures.  The algorithm's state lives in this object, in the server's process: a federation
resumed in a new process restarts it.  The paper's constants (``rho``, ``M``, the noise level)
are options, as the algorithm needs them; nothing estimates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from fedleak.core import Messages, Params, Reply, Setting
from fedleak.optim import zeroth_order as zo
from fedleak.server import SERVER_STRATEGIES


@SERVER_STRATEGIES.register("zo_newton")
@dataclass
class ZONewton:
    """Algorithm 4 of Yu et al. on a few parameters, queried through the clients' losses."""

    sends: ClassVar[dict[str, str]] = {
        "points": "[q, d] the values of the tuned parameters (flattened, in the order of "
        "`parameters`) at which every sampled client is asked its loss this round",
    }

    parameters: tuple[str, ...] = ()  # the model tensors tuned (names in its state dict)
    budget: int = 10_000  # T: noisy evaluations in all (one per point and round)
    rho: float = 1.0  # the loss's Hessian Lipschitz constant in the tuned parameters
    strong_convexity: float = 0.1  # M: a lower bound on the Hessian's eigenvalues
    noise_std: float = 0.1  # standard deviation of one evaluation (the round's mean loss)
    queries_per_round: int = 1000  # points sent per round at most
    seed: int = 0  # of the algorithm's random directions
    _run: _Run | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.parameters = tuple(self.parameters)
        if not self.parameters:
            raise ValueError("zo_newton: name the parameters to tune, e.g. parameters = ['3.bias']")
        if self.queries_per_round < 1:
            raise ValueError(
                f"zo_newton: queries_per_round must be >= 1, got {self.queries_per_round}"
            )
        # the budget and the constants: checked once the dimension is known (check), but
        # the constants' signs need no model
        zo.plan(max(self.budget, 1), 1, self.rho, self.strong_convexity, self.noise_std)

    def check(self, setting: Setting) -> None:
        """The parameters exist, the budget fits their dimension, the clients answer queries."""
        state = setting.model.state_dict()
        if missing := [p for p in self.parameters if p not in state]:
            raise ValueError(
                f"zo_newton: the model has no tensor {missing[0]!r}; choose among "
                f"{[k for k, v in state.items() if v.is_floating_point()]}"
            )
        dim = sum(state[p].numel() for p in self.parameters)
        zo.plan(self.budget, dim, self.rho, self.strong_convexity, self.noise_std)
        trainer = setting.trainer
        if getattr(trainer, "name", None) != "zo_query":
            raise ValueError(
                f"zo_newton: [training] {getattr(trainer, 'name', trainer)!r} does not return "
                "losses at the server's points; use training.name = 'zo_query'"
            )
        if tuple(trainer.parameters) != self.parameters:
            raise ValueError(
                f"zo_newton: training.parameters {list(trainer.parameters)} must equal "
                f"server.parameters {list(self.parameters)} (the points' layout)"
            )

    def rounds_needed(self, dim: int) -> int:
        """Rounds the whole budget takes in dimension ``dim`` (each phase starts a new round)."""
        p = zo.plan(self.budget, dim, self.rho, self.strong_convexity, self.noise_std)
        hessian = 2 * dim * (dim + 1)
        phases = [2 * dim * p.n_m, hessian * p.n_h1] * p.iterations + [
            hessian * p.n_h2,
            2 * p.n_g,
        ]
        return sum(math.ceil(q / self.queries_per_round) for q in phases)

    def instructions(self, round: int, params: Params, rng: torch.Generator) -> Messages:
        """This round's points (the same if asked twice in a round); none once done."""
        run = self._start(params)
        if run.round != round:
            run.round = round
            run.asked = run.pending[: self.queries_per_round]
        return {"points": run.asked.to(params[self.parameters[0]].dtype)}

    def aggregate(self, round: int, params: Params, replies: list[Reply]) -> Params:
        """Feed the round's mean losses to the algorithm; the state carries its iterate."""
        run = self._start(params)
        asked = len(run.asked)
        if asked and replies:
            losses = torch.stack([r.messages["losses"].to(zo.DTYPE) for r in replies])
            if losses.shape[1] != asked:
                raise ValueError(
                    f"zo_newton: a client answered {losses.shape[1]} of the {asked} points"
                )
            weights = torch.tensor([float(r.num_examples) for r in replies], dtype=zo.DTYPE)
            run.values.append(weights @ losses / weights.sum())
            run.pending = run.pending[asked:]
            run.asked = run.pending[:0]
            if not len(run.pending):
                run.advance(torch.cat(run.values))
        out = {k: v.clone() for k, v in params.items()}
        return _unflatten(out, self.parameters, run.answer if run.done else run.centre)

    def _start(self, params: Params) -> _Run:
        if self._run is None:
            x0 = torch.cat([params[p].detach().reshape(-1).to(zo.DTYPE) for p in self.parameters])
            algorithm = zo.two_stage(
                x0,
                self.budget,
                rho=self.rho,
                strong_convexity=self.strong_convexity,
                noise_std=self.noise_std,
                rng=torch.Generator().manual_seed(self.seed),
            )
            self._run = _Run(algorithm, x0)
        return self._run


class _Run:
    """The algorithm in progress: the phase's points not yet answered and the values so far."""

    def __init__(self, algorithm: zo.Queries, x0: Tensor) -> None:
        self.algorithm = algorithm
        self.round = -1
        self.centre = x0
        self.answer: Tensor | None = None
        self.phase(next(algorithm))

    @property
    def done(self) -> bool:
        return self.answer is not None

    def phase(self, points: Tensor) -> None:
        self.pending, self.asked, self.values = points, points[:0], []
        self.centre = points.mean(0)  # every estimator queries symmetrically around x

    def advance(self, values: Tensor) -> None:
        try:
            self.phase(self.algorithm.send(values))
        except StopIteration as finished:
            self.answer = finished.value
            self.pending = self.asked = self.pending[:0]


def _unflatten(state: Params, names: tuple[str, ...], x: Tensor) -> Params:
    """``state`` with the tensors ``names`` set from the flat vector ``x``."""
    start = 0
    for name in names:
        size = state[name].numel()
        state[name] = x[start : start + size].reshape(state[name].shape).to(state[name].dtype)
        start += size
    return state
