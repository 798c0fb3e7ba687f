"""The ClientApp: a federated client that trains, defends, and (in simulation) reports truth.

The experiment reaches the client inside the first train message's config (the resolved TOML
text), so one module-level app serves every runner, including SuperNodes on other machines.
A node may point to its own copy of the data with ``--node-config 'data-root="/path"'``.

The server strategy's instructions for the round (always a public seed) arrive packed in the
config under :data:`INSTRUCTIONS_KEY`; the client's messages (whatever its selector and trainer
send beside the model, declared by them) go back as an ArrayRecord under :data:`MESSAGES_KEY`,
and a trainer that sends no model replies without ``"arrays"``.

The ground truth (the examples actually used) travels back in a separate ConfigRecord under
:data:`TRUTH_KEY`.  It exists only because this is a simulation: the server strips it before
anything else sees the reply, and it is stored where only metrics read it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedleak import config, federation
from fedleak.core import Batch

TRUTH_KEY = "fedleak.truth"  # the simulation's ground-truth channel; never reaches an attack
CONFIG_KEY = "fedleak-config"  # the resolved experiment, sent in every train config
CLIENT_KEY = "fedleak-client"  # the client (partition) the server asks this node to play
WATCHED_KEY = "fedleak-watched"  # whether the server captures this client: only then pack truth
INSTRUCTIONS_KEY = "fedleak-instructions"  # the server strategy's instructions, packed tensors
MESSAGES_KEY = "fedleak.messages"  # what a client sends beside its state (declared by plugins)
REPORT_KEY = "fedleak.report"  # who the client is and how it trained (FedAvg averages metrics)
REPORT_KEYS = ("client", "local_steps", "batch_size", "train_loss")  # SecAgg+: in plaintext

app = ClientApp()


@lru_cache(maxsize=4)
def _experiment(text: str, data_root: str) -> config.Experiment:
    exp = config.load(text)
    if data_root and hasattr(exp.data, "root"):  # bundled or generated data need no root
        exp = config.load(text, [f"data.root={data_root}"])
    return exp


def client_index(context: Context) -> int:
    """The client (partition) this node holds, from its node config."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError(
            'this SuperNode has no "partition-id"; start it with '
            '--node-config "partition-id=<i> num-partitions=<clients>"'
        ) from None


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which client this node holds, and of how many (reproducible sampling)."""
    held = {
        "client": client_index(context),
        "clients": int(context.node_config.get("num-partitions", -1)),
    }
    return Message(RecordDict({"client": MetricRecord(held)}), reply_to=msg)


def _local_update(cfg, sent, context: Context) -> tuple[int, federation.Update]:
    """Train as client ``cfg[CLIENT_KEY]`` on ``sent`` (a state dict, or legacy arrays)."""
    exp = _experiment(str(cfg[CONFIG_KEY]), str(context.node_config.get("data-root", "")))
    client = int(cfg[CLIENT_KEY])  # the node's own partition-id when the server discovered it
    if isinstance(sent, list):  # the legacy API carries arrays in the model's state-dict order
        names = exp.build_model().state_dict()
        sent = {k: torch.from_numpy(a.copy()) for k, a in zip(names, sent, strict=True)}
    orders = unpack(cfg[INSTRUCTIONS_KEY]) if INSTRUCTIONS_KEY in cfg else None
    return client, federation.local_update(exp, client, int(cfg["server-round"]), sent, orders)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training with the experiment's trainer and defenses."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:  # a stage of Flower's SecAgg+
        return secaggplus_mod(msg, context, _train_masked)
    cfg = msg.content["config"]
    client, update = _local_update(cfg, msg.content["arrays"].to_torch_state_dict(), context)
    result = update.result
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": len(result.used), "train_loss": result.loss}),
            REPORT_KEY: ConfigRecord(
                {"client": client, "local_steps": result.steps, "batch_size": result.batch_size}
            ),
        }
    )
    if update.sends_model:
        content["arrays"] = ArrayRecord(update.params)
    if update.messages:
        content[MESSAGES_KEY] = ArrayRecord(dict(update.messages))
    if cfg.get(WATCHED_KEY, True):
        content[TRUTH_KEY] = ConfigRecord({"batch": _dump(update.truth)})
    return Message(content, reply_to=msg)


def _train_masked(msg: Message, context: Context) -> Message:
    """The same local update in legacy FitIns/FitRes form, for ``secaggplus_mod`` to mask.

    The mod clears the returned arrays after masking them; num_examples and the metrics (here
    the report, and the truth when watched) stay plaintext, as in Flower.
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = fitins.config
    client, update = _local_update(cfg, parameters_to_ndarrays(fitins.parameters), context)
    result = update.result
    metrics = {
        "client": client,
        "local_steps": result.steps,
        "batch_size": result.batch_size,
        "train_loss": result.loss,
    }
    if cfg.get(WATCHED_KEY, True):
        metrics[TRUTH_KEY] = _dump(update.truth)
    fitres = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters([t.numpy() for t in update.params.values()]),
        len(result.used),
        metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def pack(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Named tensors as bytes, for a ConfigRecord (instructions, the truth channel)."""
    buffer = io.BytesIO()
    torch.save(dict(tensors), buffer)
    return buffer.getvalue()


def unpack(packed: bytes) -> dict[str, torch.Tensor]:
    """The tensors :func:`pack` packed."""
    return torch.load(io.BytesIO(packed), weights_only=True)


def _dump(batch: Batch) -> bytes:
    return pack({"inputs": batch.inputs, "labels": batch.labels})


def load_truth(packed: bytes) -> Batch:
    """The ground truth a client packed with :func:`_dump`."""
    stored = unpack(packed)
    return Batch(stored["inputs"], stored["labels"])
