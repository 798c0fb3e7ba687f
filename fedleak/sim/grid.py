"""An in-process Grid: the same ServerApp and ClientApp, no Ray and no processes.

Each push runs the ClientApp synchronously on the node's own :class:`Context` (so per-node
state persists across rounds, as on a SuperNode).  Messages go through Flower's protobuf
serialisation both ways: that copies them (FedAvg shares one RecordDict between recipients)
and catches anything that would not survive a real transport.  A ClientApp exception becomes
an error reply, as Flower's runtimes do.

Besides the SecAgg+ adapter (which needs Flower's legacy compat layer and protocol constants),
this module is fedleak's only use of Flower internals (``TaskIdentity``, ``serde``, ``Run``); a
Flower upgrade that moves them touches these places alone.
"""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import serde
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1
_CLIENT_APP_EXCEPTION = 1  # mirrors Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION


class LocalGrid(Grid):
    """Run ``client_app`` for ``num_nodes`` virtual SuperNodes inside this process."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        # Node ids need not look like Flower's random ones: fedleak identifies clients by index.
        self.contexts = {
            1000 + i: Context(
                run_id=run_id,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id)  # legacy workflows (SecAgg+) read grid.run.run_id
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE_ID, 1

    def set_run(self, run) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self):  # noqa: D102
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        ids = []
        for msg in messages:
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            delivered = Message(_copy(msg.content), metadata=msg.metadata)
            try:
                reply = self.client_app(delivered, self.contexts[msg.metadata.dst_node_id])
                reply = Message(_copy(reply.content), metadata=reply.metadata)
            except Exception as err:
                reason = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
                reply = Message(Error(_CLIENT_APP_EXCEPTION, reason), reply_to=delivered)
            self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):  # noqa: D102
        return list(self.pull_messages(self.push_messages(messages)))


def _copy(content: RecordDict) -> RecordDict:
    # Record by record: nesting a record's proto into the RecordDict proto copies it once more,
    # which for a 90 MB model (MiniLM) costs seconds per message; each record still makes the
    # full protobuf round trip a transport would.
    copied = RecordDict()
    for key, record in content.items():
        to_proto, from_proto = _SERDE[type(record)]
        copied[key] = from_proto(to_proto(record))
    return copied


_SERDE = {
    ArrayRecord: (serde.array_record_to_proto, serde.array_record_from_proto),
    MetricRecord: (serde.metric_record_to_proto, serde.metric_record_from_proto),
    ConfigRecord: (serde.config_record_to_proto, serde.config_record_from_proto),
}
