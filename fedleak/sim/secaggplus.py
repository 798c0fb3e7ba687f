"""Real SecAgg+ (Bell et al., CCS 2020) on Flower: the server's view is the unmasked sum only.

``secure_aggregation`` with ``protocol = "secaggplus"`` runs Flower's own protocol instead of
fedleak's ideal functionality.  Flower offers it only on its legacy API (``SecAggPlusWorkflow``
inside a ``DefaultWorkflow`` with a ``LegacyContext`` and a legacy ``Strategy``, and
``secaggplus_mod`` on the client); there is no Message-API version in flwr 1.41.  This module is
the adapter:

* :class:`SecAggPlusStrategy` is a legacy strategy that delegates every decision to the same
  :class:`~fedleak.sim.server.Observed` the Message-API path uses (sampling, node placement,
  modifiers, what is recorded, evaluation), so both protocols federate identically;
* the client side is :func:`train_masked` in :mod:`fedleak.sim.client`: the one ClientApp hands
  a SecAgg+ stage to ``secaggplus_mod``, whose inner handler trains as usual.

Per round the protocol takes four round trips (setup, share keys, collect masked vectors,
unmask).  The clients' vectors are quantised, pairwise- and self-masked modulo 2³²; the server
unmasks only their sum, and every ``FitRes`` reaching the strategy carries that same aggregate.
The capture therefore records one view per round (client ``-1``), exactly as the simulated
protocol does, up to SecAgg+'s clipping and quantisation.  Flower quantises with stochastic
rounding drawn from NumPy's global generator, which fedleak does not seed, so SecAgg+ runs are
reproducible only to within a quantisation step per round.  Example counts and metrics travel in
plaintext, as in Flower; the simulation's truth channel rides in the metrics and is removed
before anything else reads them.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedleak import federation
from fedleak.core import Batch, Params
from fedleak.sim.client import CONFIG_KEY, REPORT_KEYS, TRUTH_KEY, load_truth
from fedleak.sim.server import Observed, _Captured


def to_parameters(params: Params) -> Parameters:
    """A state dict as legacy ``Parameters`` (ndarrays in state-dict order)."""
    return ndarrays_to_parameters([t.detach().cpu().numpy() for t in params.values()])


def to_params(parameters: Parameters, like: Params) -> Params:
    """Legacy ``Parameters`` back to a state dict with ``like``'s keys and dtypes."""
    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(like):
        raise ValueError(f"expected {len(like)} arrays, got {len(arrays)}")
    return {
        # SecAgg+ returns dequantised floats for every array, integer buffers included.
        k: torch.from_numpy(np.array(a)).reshape(v.shape).to(v.dtype)
        for (k, v), a in zip(like.items(), arrays, strict=True)
    }


class SecAggPlusStrategy(Strategy):
    """A legacy strategy over :class:`Observed`: what SecAgg+ lets a curious server do."""

    def __init__(self, observed: Observed, grid: Grid) -> None:
        self.observed, self.grid = observed, grid
        self.like = federation.initial_params(observed.exp)
        self.aggregated = 0  # the last round SecAgg+ completed

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:  # noqa: D102
        return to_parameters(self.like)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The round's placed nodes, each with the (modified) model and its client's config."""
        params, configs = self.observed.plan(
            server_round, to_params(parameters, self.like), self.grid
        )
        proxies = client_manager.all()
        common = {
            CONFIG_KEY: self.observed.exp.toml(),
            "server-round": server_round,  # what the Message-API FedAvg adds to every config
        }
        return [
            (proxies[str(node)], FitIns(to_parameters(params), {**common, **cfg}))
            for node, cfg in configs.items()
        ]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures):
        """Every result carries the same unmasked aggregate; capture it once, as client -1."""
        if not results:
            self.observed.record(server_round, [], len(failures), [])
            return None, {}
        watched = self.observed.watched
        reports, truths = [], []
        for _, res in results:
            packed = res.metrics.pop(TRUTH_KEY, None)  # the simulation's channel: strip first
            report = {k: res.metrics.pop(k) for k in REPORT_KEYS}
            reports.append((report, res.num_examples))
            if packed is not None and int(report["client"]) in watched:
                truths.append(load_truth(packed))
        aggregate = results[0][1].parameters
        captured = []
        if truths:
            total = sum(n for _, n in reports)
            captured.append(
                _Captured(
                    client=-1,
                    received=to_params(aggregate, self.like),
                    report={
                        "num_examples": total,
                        "loss": sum(r["train_loss"] * n for r, n in reports) / total,
                        "local_steps": max(int(r["local_steps"]) for r, _ in reports),
                        "batch_size": sum(int(r["batch_size"]) for r, _ in reports),
                    },
                    truth=Batch(
                        torch.cat([t.inputs for t in truths]),
                        torch.cat([t.labels for t in truths]),
                    ),
                )
            )
        self.aggregated = server_round
        losses = [float(r["train_loss"]) for r, _ in reports]
        self.observed.record(server_round, captured, len(results) + len(failures), losses)
        return aggregate, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: D102
        return []  # evaluation is centralised, as on the Message-API path

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: D102
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        """Centralised evaluation through :meth:`Observed.evaluate` (one utility.csv row)."""
        if server_round != self.aggregated and server_round > 0:
            # The workflow only logs a halted protocol and carries on with the old model.
            raise RuntimeError(
                f"round {server_round}: SecAgg+ halted before unmasking (too few clients "
                "answered; their errors are in the log above)"
            )
        metrics = self.observed.evaluate(
            server_round, ArrayRecord(to_params(parameters, self.like))
        )
        return float(metrics["test_loss"]), dict(metrics)


def serve(grid: Grid, context, observed: Observed) -> None:
    """Federate ``observed.exp`` with Flower's SecAgg+ workflow."""
    exp = observed.exp
    secure = exp.secure_aggregation
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=secure.num_shares,
            reconstruction_threshold=secure.reconstruction_threshold,
            max_weight=secure.max_weight or float(max(map(len, exp.partitions()))),
            clipping_range=secure.clipping_range,
            quantization_range=secure.quantization_range,
        )
    )
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=exp.federation.rounds),
        strategy=SecAggPlusStrategy(observed, grid),
    )
    workflow(grid, legacy)
