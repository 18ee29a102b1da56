"""A Flower `Grid` that runs a ClientApp in this process: strategies tested without Ray.

`InProcessGrid(client_app, num_nodes)` gives every node a fixed node id and a
partition id, and answers `send_and_receive` by calling the ClientApp on a
copy of each message (a real transport hands each node its own deserialised
copy; FedAvg sends one shared `RecordDict` to all).  Driven by
`Strategy.start`, it runs a wrapped strategy's rounds exactly as the
simulation engine would, minus the processes, so tests of `LeakageAudit`
take a second instead of half a minute.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    """Nodes `node_ids` (seeded 63-bit numbers, like Flower's random ones) running `client_app`."""

    def __init__(self, client_app: ClientApp, num_nodes: int, *, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.node_ids = [int(v) for v in rng.integers(1, 2**63 - 1, size=num_nodes)]
        self.client_app = client_app
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": p, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for p, node in enumerate(self.node_ids)
        }
        self._run = Run.create_empty(1)
        # Messages take their sender's identity from here (the server process's, in Flower).
        TaskIdentity.task_id, TaskIdentity.run_id = 1, 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid answers send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid answers send_and_receive only")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            delivered = Message(
                metadata=copy.deepcopy(message.metadata), content=copy.deepcopy(message.content)
            )
            replies.append(self.client_app(delivered, self.contexts[node]))
        return replies
