"""Send rollout tables to Kafka, many rollouts per message, a GRPO group never split.

Throughput comes from batching: one Kafka message carries about `rows_per_message`
rollouts as one Arrow IPC stream. Rows go to the partition Kafka's default partitioner
would choose for their prompt_id (murmur2 of the key), so every rollout of a prompt -
its GRPO group - lands in one partition, and a group is never cut across messages.
The message key is the prompt_id of the message's first row. Messages go through
`sponge.streams.kafka` (confluent-kafka by default, kafka-python with `client="kafka-python"`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sponge.streams import kafka
from sponge.streams.codec import ARROW_CONTENT_TYPE, JSON_CONTENT_TYPE, encode_arrow, encode_json, headers_for


def kafka_partition(key: bytes, num_partitions: int) -> int:
    """The partition the Java client's (and kafka-python's) default partitioner picks for `key`: every
    message names its partition explicitly, so both clients put a prompt's rollouts in the same one."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % num_partitions


def plan_messages(prompt_ids: pa.ChunkedArray | pa.Array, num_partitions: int,
                  rows_per_message: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group rows into messages: returns (row order, message start offsets into it, partition per message).

    Rows are ordered by (partition, prompt group); a message begins at the first group
    whose start crosses the next multiple of `rows_per_message` within its partition, so
    messages hold about `rows_per_message` rows and never split a group.
    """
    encoded = pc.dictionary_encode(prompt_ids)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    group = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    group_partition = np.array([kafka_partition(p.encode(), num_partitions)
                                for p in encoded.dictionary.to_pylist()], dtype=np.int64)
    row_partition = group_partition[group]
    order = np.lexsort((group, row_partition))
    part_sorted, group_sorted = row_partition[order], group[order]
    n = len(order)
    if n == 0:
        return order, np.zeros(0, np.int64), np.zeros(0, np.int64)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (group_sorted[1:] != group_sorted[:-1]) | (part_sorted[1:] != part_sorted[:-1])
    # position of each row within its partition's run
    part_start = np.flatnonzero(np.r_[True, part_sorted[1:] != part_sorted[:-1]])
    run_lengths = np.diff(np.r_[part_start, n])
    pos_in_part = np.arange(n) - np.repeat(part_start, run_lengths)
    # window index of each group start; a message starts where the window changes
    window = np.where(new_group, pos_in_part // rows_per_message, -1)
    group_starts = np.flatnonzero(new_group)
    gw, gp = window[group_starts], part_sorted[group_starts]
    first = np.ones(len(group_starts), dtype=bool)
    first[1:] = (gw[1:] != gw[:-1]) | (gp[1:] != gp[:-1])
    starts = group_starts[first]
    return order, starts, part_sorted[starts]


class RolloutProducer:
    """A producer that sends rollout tables in batches.

    `send(table)` returns the number of messages queued; `flush()` waits for the broker
    to acknowledge them and raises if any failed. `client` picks the Kafka client (default:
    $SPONGE_KAFKA_CLIENT or confluent); extra keyword arguments are client settings in
    either spelling (e.g. SASL/TLS: `security_protocol` or `security.protocol`).
    """

    def __init__(self, bootstrap_servers: str | Sequence[str], topic: str, *, rows_per_message: int = 64,
                 content_type: str = ARROW_CONTENT_TYPE, compression: str | None = None,
                 client: str | None = None, **kafka_config):
        if content_type not in (ARROW_CONTENT_TYPE, JSON_CONTENT_TYPE):
            raise ValueError(f"content_type must be {ARROW_CONTENT_TYPE!r} or {JSON_CONTENT_TYPE!r}")
        self.topic = topic
        self.rows_per_message = rows_per_message
        self.content_type = content_type
        self.compression = compression
        config = dict(linger_ms=10, batch_size=1 << 20, max_request_size=32 << 20, acks=1)
        config.update(kafka_config)
        self._producer = kafka.producer(bootstrap_servers, client=client, **config)

    @property
    def client(self) -> str:
        return self._producer.client

    def num_partitions(self) -> int:
        partitions = self._producer.partitions(self.topic)
        if not partitions:
            raise RuntimeError(f"topic {self.topic!r} has no partitions (does it exist?)")
        return partitions

    def send(self, table: pa.Table) -> int:
        """Queue `table`'s rollouts; returns the number of messages."""
        if table.num_rows == 0:
            return 0
        order, starts, partitions = plan_messages(table.column("prompt_id"), self.num_partitions(),
                                                  self.rows_per_message)
        ordered = table.take(pa.array(order))
        ends = np.r_[starts[1:], len(order)]
        headers = headers_for(self.content_type)
        for start, end, partition in zip(starts.tolist(), ends.tolist(), partitions.tolist()):
            chunk = ordered.slice(start, end - start)
            value = (encode_arrow(chunk, self.compression) if self.content_type == ARROW_CONTENT_TYPE
                     else encode_json(chunk))
            key = chunk.column("prompt_id")[0].as_py().encode()
            self.send_raw(value, key=key, headers=headers, partition=partition)
        return len(starts)

    def send_raw(self, value: bytes | None, key: bytes | None = None,
                 headers: Sequence[tuple[str, bytes]] | None = None, partition: int | None = None
                 ) -> kafka.Delivery:
        """Send one message as is (used for dead letters and for malformed test input)."""
        return self._producer.send(self.topic, value, key=key, headers=headers, partition=partition)

    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every queued message is acknowledged; raise if any failed (or, after
        `timeout_s`, if some are still unacknowledged)."""
        self._producer.flush(timeout_s)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._producer.close()

    def __enter__(self) -> "RolloutProducer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
