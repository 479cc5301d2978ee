"""Which clients train in a federated round, seeded: Flower names nodes by random 64-bit ids and samples them with
the process's global ``random``, so the same seed trained different clients. The server asks each node its partition
id once and lists the nodes by partition; sampling under a seeded ``random`` then picks the same partitions every run
(``sectune.training.federated.make_strategy``)."""

from __future__ import annotations

import math

PARTITION_KEY = "partition-id"


def node_partitions(grid, known: dict[int, int], wait_for: int, timeout: float = 600.0) -> dict[int, int]:
    """{node id: partition id} of every connected node: Flower names nodes by random 64-bit ids, so the
    partitions are asked for (a query message each node's ClientApp answers from its node config). Nodes
    already in ``known`` are not asked again. Waits, as Flower's own sampling does, until ``wait_for`` are up."""
    import time

    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    t0 = time.monotonic()
    while len(nodes := list(grid.get_node_ids())) < wait_for and time.monotonic() - t0 < timeout:
        time.sleep(1)
    ask = [n for n in nodes if n not in known]
    out = dict(known)
    if ask:
        msgs = [Message(content=RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=n) for n in ask]
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            if not reply.has_error() and PARTITION_KEY in reply.content.get("metrics", {}):
                out[reply.metadata.src_node_id] = int(reply.content["metrics"][PARTITION_KEY])
    return out


class PartitionOrderedGrid:
    """The Grid, its node ids listed by partition id (then by node id for any that did not answer): Flower's
    ``random.sample`` over them, under a seeded ``random``, then picks the same partitions in every run."""

    def __init__(self, grid, partition_of: dict[int, int]):
        self._grid, self._of = grid, partition_of

    def get_node_ids(self):
        return sorted(self._grid.get_node_ids(), key=lambda n: (self._of.get(n, math.inf), n))

    def __getattr__(self, name):
        return getattr(self._grid, name)


def check_distinct_partitions(partition_of: dict[int, int], up=None) -> None:
    """Two SuperNodes started with one ``partition-id`` trained the same partition, counted twice in FedAvg, while another
    never trained (an audit, session 42): refused before the round, naming them. ``up``: the node ids connected now (a
    restarted SuperNode comes back under a new id beside its old one, which is no second node: a review, session 42)."""
    by: dict[int, list[int]] = {}
    for node, part in partition_of.items():
        if up is not None and node not in up:
            continue
        by.setdefault(part, []).append(node)
    shared = {p: n for p, n in by.items() if len(n) > 1}
    if shared:
        from sectune.errors import ConfigError

        p, nodes = next(iter(sorted(shared.items())))
        raise ConfigError(f"nodes {', '.join(map(str, sorted(nodes)))} were all started with partition-id={p}: each SuperNode "
                          "needs its own (--node-config \"partition-id=N num-partitions=M\"), or one partition trains twice "
                          "and another never")
