"""Controllable Prompt Tuning across clients: the server balances the clients' losses.

Phan, Wilson & Lei, "Controllable Prompt Tuning for Balancing Group Distributional
Robustness", ICML 2024, read with groups = clients (research notes, training.md 4.5): a
controllable alternative to q-FFL and AFL for client-level fairness.  Each round the server
takes every sampled client's update of a small tunable *block* (prompt, adapter or head) as
its pseudo-gradient ``g_k = -(theta_k - theta)``, the client's reported training loss as
``L_k``, solves the K x K EPO program (:mod:`fedleak.robust.epo`) on ``C = G G^T`` with the
operator's preference ``c`` over clients, and moves the block along the chosen mix:
``theta_block += server_lr * sum_k alpha_k (theta_k - theta)_block``.  With ``server_lr = 1``
that is FedAvg with the EPO weights ``alpha`` in place of ``n_k / n``.  Parameters outside the
block get FedAvg's weighted mean (they do not move when clients freeze them).

Exact with FedSGD (``sgd`` with one full-batch step: ``g_k`` is the client's gradient, up to
the shared ``lr``, and its reported loss is ``L_k`` at the global model); with several local
steps both are the usual FedAvg surrogates.

What leaks: nothing beyond FedAvg's view -- each client's block update and its reported loss --
but the strategy *needs* them individually, so it cannot run under secure aggregation (the
notes' variant with a secure inner-product protocol would reveal only ``C`` and the mix).  The
Gram matrix it computes is itself revealing: cosine similarities between clients' block
gradients cluster clients by label and group mix, and a linear head's gradient gives a
client's label proportions (``simulations/benchmarks/server_strategies/cpt_clients.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fedleak.core import Messages, Params, Reply, Setting
from fedleak.robust.block import block_names
from fedleak.robust.epo import EpoStep, epo_weights
from fedleak.server import SERVER_STRATEGIES
from fedleak.server.fedavg import weighted_mean

log = logging.getLogger(__name__)


@SERVER_STRATEGIES.register("cpt")
@dataclass
class CPT:
    """EPO over clients: the mix of client updates that drives c * L toward uniform."""

    sends: ClassVar[dict[str, str]] = {}

    block: tuple[str, ...] = ()  # parameter-name prefixes mixed by EPO; () = every float tensor
    preference: tuple[float, ...] = ()  # c per client id (0, 1, ...); () = uniform
    server_lr: float = 1.0  # step along the mix; 1 = a convex combination of client blocks
    eps: float = 1e-4  # non-uniformity below which the program switches to common descent

    def __post_init__(self) -> None:
        if self.preference and not all(np.isfinite(c) and c > 0 for c in self.preference):
            raise ValueError(
                f"cpt: preference entries (one per client) must be > 0, got {list(self.preference)}"
            )
        if not self.server_lr > 0:
            raise ValueError(f"cpt: server_lr must be > 0, got {self.server_lr}")
        if not self.eps >= 0:
            raise ValueError(f"cpt: eps must be >= 0, got {self.eps}")

    def check(self, setting: Setting) -> None:
        """The block must name parameters of the model."""
        block_names((n for n, _ in setting.model.named_parameters()), self.block, "[server] cpt")

    def instructions(self, round: int, params: Params, rng: torch.Generator) -> Messages:
        """Nothing beyond the model."""
        return {}

    def aggregate(self, round: int, params: Params, replies: list[Reply]) -> Params:
        """FedAvg outside the block; the EPO mix of the clients' block updates inside it."""
        new, step = self.mix(params, replies)
        log.info(
            "cpt round %d: clients %s, losses %s, mix %s (%s, non-uniformity %.4g)",
            round,
            [r.client for r in replies],
            np.round([r.loss for r in replies], 4).tolist(),
            np.round(step.weights, 4).tolist(),
            step.mode,
            step.non_uniformity,
        )
        return new

    def mix(self, params: Params, replies: list[Reply]) -> tuple[Params, EpoStep]:
        """The next state and the program's solution (for analyses and tests)."""
        if not replies:
            raise ValueError("cpt: no client replied this round")
        floats = [k for k, v in params.items() if v.is_floating_point()]
        names = block_names(floats, self.block, "[server] cpt")
        deltas = torch.stack(
            [
                torch.cat([(r.params[n] - params[n]).reshape(-1) for n in names]).double()
                for r in replies
            ]
        )
        step = epo_weights(
            # a client fitted to float precision reports 0; the program needs positive losses
            np.maximum([r.loss for r in replies], 1e-12),
            (deltas @ deltas.T).numpy(),  # the Gram of -delta equals that of delta
            self.client_preference([r.client for r in replies]),
            self.eps,
        )
        new = weighted_mean([r.params for r in replies], [r.num_examples for r in replies])
        alpha = torch.as_tensor(step.weights)
        for n in names:
            moved = torch.einsum(
                "k,k...->...",
                alpha,
                torch.stack([r.params[n] - params[n] for r in replies]).double(),
            )
            new[n] = params[n] + (self.server_lr * moved).to(params[n].dtype)
        return new, step

    def client_preference(self, clients: list[int]) -> np.ndarray | None:
        """``c`` of the replying clients, from the per-client-id option."""
        if not self.preference:
            return None
        if max(clients) >= len(self.preference):
            raise ValueError(
                f"[server] cpt: preference gives {len(self.preference)} entries, but client "
                f"{max(clients)} replied; give one entry per client (federation.clients)"
            )
        return np.array([self.preference[c] for c in clients])
