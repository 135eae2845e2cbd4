"""Dead letters: messages (or rows of messages) that failed decoding or validation.

A dead letter keeps the original bytes, key and headers of the Kafka message and adds
headers saying why and where from: `reason` (a JSON list of violations, each naming the
field, the rule, the row and its rollout_id when known), `source-topic`,
`source-partition`, `source-offset`. It goes to the `<topic>.dlq` topic and, as a table
row, to the store's dead-letter table. Nothing that arrives is lost: a message whose
rows are partly bad has its good rows stored and its whole original bytes dead-lettered
with the bad row numbers.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from sponge.record import DEAD_LETTER_SCHEMA, Violation

REASON_HEADER = "reason"
SOURCE_TOPIC_HEADER = "source-topic"
SOURCE_PARTITION_HEADER = "source-partition"
SOURCE_OFFSET_HEADER = "source-offset"
_OWN_HEADERS = {REASON_HEADER, SOURCE_TOPIC_HEADER, SOURCE_PARTITION_HEADER, SOURCE_OFFSET_HEADER}



def dlq_topic_for(topic: str) -> str:
    return f"{topic}.dlq"


@dataclass
class DeadLetter:
    """One rejected message and every violation found in it."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = ()
    violations: list[Violation] = field(default_factory=list)
    #: rollout_id per bad row index, when the rows could be read
    rollout_ids: dict[int, str] = field(default_factory=dict)

    def reason(self) -> list[dict]:
        out = []
        for v in self.violations:
            d = v.to_dict()
            if v.row is not None and v.row in self.rollout_ids:
                d["rollout_id"] = self.rollout_ids[v.row]
            out.append(d)
        return out

    def reason_json(self) -> str:
        return json.dumps(self.reason(), separators=(",", ":"))

    def rules(self) -> list[str]:
        """The distinct rules broken, e.g. ['non-finite', 'wrong dimension']."""
        return sorted({v.rule for v in self.violations})

    def kafka_headers(self) -> list[tuple[str, bytes]]:
        """The original headers (content-type kept, so the letter can be replayed) plus where and why."""
        kept = [(k, v) for k, v in self.headers if k not in _OWN_HEADERS]
        return kept + [
            (REASON_HEADER, self.reason_json().encode()),
            (SOURCE_TOPIC_HEADER, self.topic.encode()),
            (SOURCE_PARTITION_HEADER, str(self.partition).encode()),
            (SOURCE_OFFSET_HEADER, str(self.offset).encode()),
        ]


def dead_letters_table(letters: Sequence[DeadLetter], received_at: dt.datetime | None = None) -> pa.Table:
    """The store's dead-letter rows for `letters` (one row per message)."""
    now = received_at or dt.datetime.now(dt.timezone.utc)
    return pa.table({
        "topic": pa.array([d.topic for d in letters], pa.string()),
        "partition": pa.array([d.partition for d in letters], pa.int32()),
        "offset": pa.array([d.offset for d in letters], pa.int64()),
        "reason": pa.array([d.reason_json() for d in letters], pa.string()),
        "value": pa.array([d.value for d in letters], pa.binary()),
        "received_at": pa.array([now] * len(letters), pa.timestamp("ms", tz="UTC")),
    }, schema=DEAD_LETTER_SCHEMA)


class DeadLetterPublisher:
    """Sends dead letters to `<topic>.dlq`; `flush()` returns once the broker has them all."""

    def __init__(self, producer, dlq_topic: str):
        self._producer = producer  # a kafka.KafkaProducer
        self.dlq_topic = dlq_topic
        self._futures: list = []

    def publish(self, letter: DeadLetter) -> None:
        self._futures.append(self._producer.send(self.dlq_topic, value=letter.value, key=letter.key,
                                                 headers=letter.kafka_headers()))

    def flush(self, timeout_s: float | None = 30.0) -> None:
        if not self._futures:
            return
        self._producer.flush(timeout=timeout_s)
        futures, self._futures = self._futures, []
        for future in futures:
            future.get(timeout=timeout_s)  # raises if the broker refused a letter


def read_dead_letters(bootstrap_servers: str, dlq_topic: str, *, expected: int | None = None,
                      timeout_s: float = 20.0, **kafka_config) -> list[dict]:
    """Read every dead letter currently in `dlq_topic` (no group, no commits): for tests and inspection.

    Returns dicts with key, value, headers (str → bytes) and the decoded reason list.
    Stops when `expected` letters were read, or when the topic is drained.
    """
    import time

    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                             auto_offset_reset="earliest", max_partition_fetch_bytes=64 << 20,
                             fetch_max_bytes=64 << 20, **kafka_config)
    try:
        partitions = consumer.partitions_for_topic(dlq_topic) or set()
        consumer.assign([TopicPartition(dlq_topic, p) for p in sorted(partitions)])
        letters: list[dict] = []
        deadline = time.monotonic() + timeout_s
        idle_polls = 0
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500)
            records = [r for rs in batch.values() for r in rs]
            for r in records:
                headers = dict(r.headers or [])
                letters.append({"key": r.key, "value": r.value, "headers": headers,
                                "reason": json.loads(headers.get(REASON_HEADER, b"[]"))})
            if expected is not None and len(letters) >= expected:
                break
            idle_polls = 0 if records else idle_polls + 1
            if expected is None and idle_polls >= 4:
                break
        return letters
    finally:
        consumer.close(autocommit=False)
