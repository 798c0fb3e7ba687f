"""The ServerApp: a curious server that samples, modifies, captures, then aggregates.

:class:`Observed` wraps any Flower strategy (as Flower's own DP wrappers do).  Per round it

1. samples clients reproducibly (``federation.sample_clients``; client indices, not Flower's
   random node ids, so every runner samples the same clients for the same seed) and tells
   each addressed node which client it plays and the round's instructions (the experiment's
   server strategy asks them, see :func:`fedleak.federation.instructions`),
2. applies the server's modifiers to the global model,
3. lets the inner Flower strategy (FedAvg) address exactly the sampled nodes,
4. strips the simulation's truth channel from every reply, rebuilds the state of clients that
   send messages instead of a model, records the observed clients' states, messages and truths
   in the run directory, and logs failed clients,
5. hands the replies to the experiment's server strategy (``[server]``, FedAvg by default),
   which makes the next global state; the inner strategy only averages the metrics.

Placing the capture *below* aggregation is the threat model: the server sees each client's
individual update, as an honest-but-curious server does without secure aggregation.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from fedleak import config, federation
from fedleak.config import Experiment
from fedleak.core import AggregationDefense, Batch, Messages, Params, Reply
from fedleak.sim.client import (
    CLIENT_KEY,
    CONFIG_KEY,
    INSTRUCTIONS_KEY,
    MESSAGES_KEY,
    REPORT_KEY,
    TRUTH_KEY,
    WATCHED_KEY,
    load_truth,
    pack,
)
from fedleak.store import RunStore

log = logging.getLogger("fedleak")

NODE_WAIT = 120.0  # seconds the first round waits for the simulation's nodes to register


class _Participants(Grid):
    """A view of a grid that exposes only this round's sampled nodes to the inner strategy."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._node_ids = grid, node_ids

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def set_run(self, run):
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs):
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        return self._grid.send_and_receive(messages, timeout=timeout)


@dataclass(frozen=True)
class _Captured:
    """One captured update: what the server received and reported, and the truth beside it."""

    client: int
    received: Params
    report: dict[str, float]
    truth: Batch
    messages: Messages = field(default_factory=dict)

    @classmethod
    def of(cls, reply: Message, received: Reply, truth: Batch) -> _Captured:
        """What one client's reply shows the server (``received``: its state and messages)."""
        metrics, report = reply.content["metrics"], reply.content[REPORT_KEY]
        return cls(
            client=received.client,
            received=received.params,
            messages=received.messages,
            report={
                "num_examples": int(metrics["num-examples"]),
                "loss": float(metrics["train_loss"]),
                "local_steps": int(report["local_steps"]),
                "batch_size": int(report["batch_size"]),
            },
            truth=truth,
        )

    @classmethod
    def aggregate(cls, parts: list[_Captured], secure: AggregationDefense) -> _Captured:
        """The round as one client (index -1): what secure aggregation lets the server see."""
        counts = [int(p.report["num_examples"]) for p in parts]
        total = sum(counts)
        return cls(
            client=-1,
            received=secure.aggregate([p.received for p in parts], counts),
            report={
                "num_examples": total,
                "loss": sum(p.report["loss"] * n for p, n in zip(parts, counts, strict=True))
                / total,
                "local_steps": max(int(p.report["local_steps"]) for p in parts),
                "batch_size": sum(int(p.report["batch_size"]) for p in parts),
            },
            truth=Batch(
                torch.cat([p.truth.inputs for p in parts]),
                torch.cat([p.truth.labels for p in parts]),
            ),
        )


class Observed(Strategy):
    """Wrap a strategy: reproducible sampling, server modifiers, and capture of what it sees.

    Which node plays which client: in a simulation every node can load every partition, so
    the server *assigns* this round's sampled clients to nodes (``discover=False``, one message
    per client, no extra traffic).  On a real deployment each SuperNode holds its own data, so
    the server first asks every node once which client it is (``discover=True``).
    """

    def __init__(self, inner: Strategy, exp: Experiment, store: RunStore, discover: bool) -> None:
        self.inner, self.exp, self.store, self.discover = inner, exp, store, discover
        self._nodes: dict[int, int] = {}  # client index -> node id, when discovered
        self._assigned: dict[int, int] = {}  # node id -> client index, this round
        self._round: dict[str, float] = {}
        self._global: Params = {}  # the global state this round started from
        self._sent: Params = {}  # the global state sent this round (modifiers applied)
        self._started = time.monotonic()
        self._initial_loss: float | None = None  # test loss before round 1: divergence's yardstick

    def nodes(self, grid: Grid) -> dict[int, int]:
        """Ask every node once which client it plays."""
        if not self._nodes:
            node_ids = list(grid.get_node_ids())
            queries = [
                Message(
                    RecordDict({"config": ConfigRecord()}),
                    dst_node_id=n,
                    message_type=MessageType.QUERY,
                )
                for n in node_ids
            ]
            for reply in grid.send_and_receive(queries):
                if reply.has_error():
                    raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                held = reply.content["client"]
                if int(held["clients"]) not in (-1, self.exp.federation.clients):
                    raise RuntimeError(
                        f"node {reply.metadata.src_node_id} was started with num-partitions="
                        f"{held['clients']}, but the experiment has clients="
                        f"{self.exp.federation.clients}"
                    )
                self._nodes[int(held["client"])] = reply.metadata.src_node_id
            if missing := sorted(set(range(self.exp.federation.clients)) - set(self._nodes)):
                raise RuntimeError(
                    f"no node plays clients {missing[:10]}; start one SuperNode per client with "
                    '--node-config "partition-id=<i> num-partitions=<clients>"'
                )
        return self._nodes

    def _place(self, clients: list[int], grid: Grid) -> dict[int, int]:
        """Map node id -> client index for this round's sampled clients."""
        if self.discover:
            nodes = self.nodes(grid)
            return {nodes[c]: c for c in clients}
        # Ray's virtual nodes register while the server thread starts; on a loaded machine
        # the first round can begin before they all have (seen: 0 of 10 connected).
        deadline = time.monotonic() + NODE_WAIT
        while len(node_ids := sorted(grid.get_node_ids())) < len(clients):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(node_ids)} nodes are connected after {NODE_WAIT:.0f} s, but "
                    f"{len(clients)} clients are sampled"
                )
            time.sleep(0.2)
        return dict(zip(node_ids, clients, strict=False))

    def plan(
        self, server_round: int, params: Params, grid: Grid
    ) -> tuple[Params, dict[int, dict[str, bool | int]]]:
        """Sample and place this round's clients and modify the model: (model, node -> config).

        Shared by both aggregation protocols; records the sent model and the instructions
        when the round is watched.
        """
        clients = federation.sample_clients(self.exp, server_round)
        self._assigned = self._place(clients, grid)
        self._global = params
        orders = federation.instructions(self.exp, server_round, params)
        watched = federation.observed_clients(self.exp, server_round, clients)
        if self.exp.secure_aggregation and watched:
            watched = clients  # the aggregate holds every participant's examples
        if watched or any(m.applies_to(server_round) for m in self.exp.modifiers):
            params, secrets = federation.server_model(self.exp, server_round, params)
            if watched:
                self.store.write_sent(server_round, params, secrets, orders)
        self._sent = params
        self._round = {"sampled": len(clients), "watched": watched}
        log.debug("round %d: training clients %s", server_round, clients)
        packed = pack(orders)
        return params, {
            node: {CLIENT_KEY: client, WATCHED_KEY: client in watched, INSTRUCTIONS_KEY: packed}
            for node, client in self._assigned.items()
        }

    @property
    def watched(self) -> set[int]:
        """The clients whose truth this round's capture keeps."""
        return set(self._round.get("watched", ()))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ):
        """Plan the round; the inner strategy addresses exactly the placed nodes."""
        params, configs = self.plan(server_round, arrays.to_torch_state_dict(), grid)
        participants = _Participants(grid, list(configs))
        messages = list(
            self.inner.configure_train(server_round, ArrayRecord(params), config, participants)
        )
        for msg in messages:  # one config per recipient: FedAvg shares one RecordDict among all
            cfg = ConfigRecord({**msg.content["config"], **configs[msg.metadata.dst_node_id]})
            msg.content = RecordDict({**msg.content, "config": cfg})
        return messages

    def record(self, server_round: int, captured: list[_Captured], replies: int, losses) -> None:
        """Store the round's captured views and truths, and its failures and mean loss."""
        for c in captured:
            self.store.write_view(server_round, c.client, c.received, c.report, c.messages)
            self.store.write_truth(server_round, c.client, c.truth)
        losses = list(losses)
        mean_loss = sum(losses) / len(losses) if losses else float("nan")  # no reply: timed out
        self._round.update(failures=replies - len(losses), train_loss=mean_loss)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Strip the truth channel, capture observed clients, log failures, then aggregate."""
        replies = list(replies)
        clients = self._assigned
        # In client order, not arrival order: FedAvg's float sums then come out the same on
        # every runner and every run.
        ok = sorted(
            (r for r in replies if not r.has_error()),
            key=lambda r: int(r.content[REPORT_KEY]["client"]),
        )
        diverged = [r for r in replies if r.has_error() and federation.NON_FINITE in r.error.reason]
        if replies and len(diverged) == len(replies):
            raise federation.Diverged(
                f"round {server_round}: every sampled client's {federation.NON_FINITE}; "
                "lower training.lr, or check the defenses' options"
            )
        if replies and not ok:
            raise RuntimeError(
                f"round {server_round}: all {len(replies)} sampled clients failed; "
                f"the first said: {replies[0].error.reason}"
            )
        for reply in replies:
            if reply.has_error():
                client = clients.get(reply.metadata.src_node_id, "?")
                # A diverged client's reason is its own message wrapped by the runtime (with a
                # traceback on some): one short line says it.
                reason = (
                    f"its {federation.NON_FINITE} (diverged), left out of the average"
                    if reply in diverged
                    else reply.error.reason
                )
                log.warning("round %d: client %s failed: %s", server_round, client, reason)
        secure = self.exp.secure_aggregation
        captured, received = [], []
        watched = self.watched
        for reply in ok:
            # Watched clients pack their truth; it is stripped before anything else reads it.
            packed = reply.content.pop(TRUTH_KEY) if TRUTH_KEY in reply.content else None
            received.append(self._reply(reply))
            if packed is not None and received[-1].client in watched:
                captured.append(_Captured.of(reply, received[-1], load_truth(packed["batch"])))
        if secure and captured:  # simulated SecAgg: the server learns the aggregate only
            captured = [_Captured.aggregate(captured, secure)]
        losses = [r.loss for r in received]
        self.record(server_round, captured, len(replies), losses)
        if not ok:
            return None, None
        state = self.exp.server.aggregate(server_round, self._global, received)
        metrics = self.inner.train_metrics_aggr_fn([r.content for r in ok], "num-examples")
        return ArrayRecord(state), metrics

    def _reply(self, reply: Message) -> Reply:
        """One client's reply as the server strategy sees it (its state rebuilt if not sent)."""
        content = reply.content
        messages = content[MESSAGES_KEY].to_torch_state_dict() if MESSAGES_KEY in content else {}
        sent = content["arrays"].to_torch_state_dict() if "arrays" in content else {}
        return Reply(
            client=int(content[REPORT_KEY]["client"]),
            params=federation.received(self.exp, self._sent, sent, messages),
            num_examples=int(content["metrics"]["num-examples"]),
            loss=float(content["metrics"]["train_loss"]),
            messages=messages,
        )

    def configure_evaluate(self, server_round, arrays, config, grid):
        """No federated evaluation: the server evaluates the global model itself (evaluate)."""
        return []

    def aggregate_evaluate(self, server_round, replies):
        """Nothing to aggregate: no client is asked to evaluate."""
        return None

    def summary(self) -> None:  # noqa: D102
        self.inner.summary()

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Centralised evaluation of the global model; appends one row to utility.csv."""
        params = arrays.to_torch_state_dict()
        federation.require_finite(params, f"round {server_round}: the global model")
        metrics = federation.evaluate(self.exp, params)
        if server_round == self.exp.federation.rounds:
            self.store.write_model(params)
        if self._initial_loss is None:
            self._initial_loss = metrics["test_loss"]
        row = {
            "round": server_round,
            **metrics,
            "train_loss": self._round.get("train_loss", float("nan")),
            "clients": int(self._round.get("sampled", 0)),
            "failures": int(self._round.get("failures", 0)),
            "seconds": round(time.monotonic() - self._started, 3),
        }
        self.store.append_row("utility.csv", row)
        log.info(
            "round %d: test accuracy %.4f, test loss %.4f%s",
            server_round,
            metrics["test_accuracy"],
            metrics["test_loss"],
            f", {row['failures']} failed" if row["failures"] else "",
        )
        loss, ratio = metrics["test_loss"], self.exp.federation.divergence_ratio
        if not math.isfinite(loss):
            raise federation.Diverged(
                f"round {server_round}: the global test loss is {loss}; lower training.lr"
            )
        if ratio and loss > ratio * self._initial_loss:
            raise federation.Diverged(
                f"round {server_round}: the global test loss is {loss:.4g}, over {ratio:g} "
                f"times its initial {self._initial_loss:.4g}; lower training.lr, or raise "
                "divergence_ratio (0 = stop only on NaN/inf)"
            )
        return MetricRecord(metrics)


def serve(grid: Grid, context, exp: Experiment, store: RunStore, discover: bool) -> None:
    """The server's whole run: :class:`Observed` over FedAvg, evaluated every round.

    Flower's FedAvg addresses the nodes; the experiment's server strategy aggregates.

    Under ``secure_aggregation`` with ``protocol = "secaggplus"`` the same :class:`Observed`
    runs inside Flower's legacy SecAgg+ workflow instead (:mod:`fedleak.sim.secaggplus`).
    """
    # fraction_evaluate keeps Flower's default: Observed asks for no federated evaluation
    # (configure_evaluate), and 0.0 here made FedAvg warn that it skips it, at every run.
    strategy = Observed(
        FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1),
        exp,
        store,
        discover,
    )
    store.update_meta(server="running")
    secure = exp.secure_aggregation
    with store.log_file():  # also when the ServerApp runs in a process of its own
        try:
            if getattr(secure, "protocol", "simulated") == "secaggplus":
                # Imported here: the legacy stack (and its deprecation warnings) only if asked.
                from fedleak.sim import secaggplus

                secaggplus.serve(grid, context, strategy)
            else:
                strategy.start(
                    grid=grid,
                    initial_arrays=ArrayRecord(federation.initial_params(exp)),
                    num_rounds=exp.federation.rounds,
                    train_config=ConfigRecord({CONFIG_KEY: exp.toml()}),
                    evaluate_fn=strategy.evaluate,
                )
        except federation.Diverged as err:
            # A result, recorded where every runner's caller reads it (the ServerApp may run
            # in another process, whose exceptions do not reach fedleak).
            log.info("the federation diverged: %s", err)
            store.update_meta(server="diverged", diverged=str(err))
            return
    store.update_meta(server="done")


def make_server_app(exp: Experiment, store: RunStore) -> ServerApp:
    """A ServerApp bound to an experiment, for runners that execute it in this process."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        serve(grid, context, exp, store, discover=False)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    """Entry point under ``flwr run``: run-config ``run-dir`` names the run directory."""
    store = RunStore(Path(str(context.run_config["run-dir"])))
    # Under flwr run the nodes may be real SuperNodes with their own data: ask who is who.
    serve(grid, context, config.load(store.root / "config.toml"), store, discover=True)
