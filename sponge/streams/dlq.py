"""Dead letters: messages (or rows of messages) that failed decoding or validation.

A dead letter keeps the original bytes, key and headers of the Kafka message and adds
headers saying why and where from: `reason` (a JSON list of violations, each naming the
field, the rule, the row and its rollout_id when known), `source-topic`,
`source-partition`, `source-offset`, and `letter-id`, a stable key of the letter
(source topic, partition, offset and a hash of the value) that is the same every time
the message is dead-lettered again. It goes to the `<topic>.dlq` topic and, as a table
row, to the store's dead-letter table. Nothing that arrives is lost: a message whose
rows are partly bad has its good rows stored and its whole original bytes dead-lettered
with the bad row numbers.

Dead letters are at-least-once: a crash before the source offset is committed, or a
producer re-made after a broker restart, sends a letter again. Readers drop the copies by
`letter-id` (the store's `dead_letters` view shows each letter once).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from sponge.record import DEAD_LETTER_SCHEMA, Violation

REASON_HEADER = "reason"
SOURCE_TOPIC_HEADER = "source-topic"
SOURCE_PARTITION_HEADER = "source-partition"
SOURCE_OFFSET_HEADER = "source-offset"
LETTER_ID_HEADER = "letter-id"
_OWN_HEADERS = {REASON_HEADER, SOURCE_TOPIC_HEADER, SOURCE_PARTITION_HEADER, SOURCE_OFFSET_HEADER, LETTER_ID_HEADER}
#: hex digits of the value's SHA-256 kept in a letter id (128 bits)
LETTER_HASH_HEX = 32


def dlq_topic_for(topic: str) -> str:
    return f"{topic}.dlq"


def letter_id(topic: str, partition: int, offset: int, value: bytes | None) -> str:
    """`topic/partition/offset/sha256(value)[:32]`: the same for every copy of one dead-lettered message.

    The store's `dead_letters` view computes the same string in SQL for files written before
    letter ids existed; a test checks the two agree.
    """
    digest = hashlib.sha256(value or b"").hexdigest()[:LETTER_HASH_HEX]
    return f"{topic}/{int(partition)}/{int(offset)}/{digest}"


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

    @property
    def letter_id(self) -> str:
        return letter_id(self.topic, self.partition, self.offset, self.value)

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
            (LETTER_ID_HEADER, self.letter_id.encode()),
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
        "letter_id": pa.array([d.letter_id for d in letters], pa.string()),
    }, schema=DEAD_LETTER_SCHEMA)


class DeadLettersUnacknowledged(RuntimeError):
    """Some dead letters were not acknowledged by the DLQ topic in time; they are kept and sent again."""

    def __init__(self, pending: int, dlq_topic: str, error: str):
        super().__init__(f"{pending} dead letter(s) not acknowledged by {dlq_topic!r}: {error}")
        self.pending, self.error = pending, error


class DeadLetterPublisher:
    """Sends dead letters to `<topic>.dlq` and keeps each one until the broker has acknowledged it.

    `make_producer()` returns a new `sponge.streams.kafka.Producer`. A producer that fails a letter is
    closed and replaced, and every letter it had not had acknowledged is sent again by the new
    one: after a broker restart the old producer's id and sequence numbers mean nothing to the
    broker (unknown producer id, out-of-order sequence, fenced epoch), and only a new producer
    gets a new id. `flush(timeout_s)` returns once every letter is acknowledged, or raises
    `DeadLettersUnacknowledged` and keeps them all for the next `flush`.
    """

    def __init__(self, make_producer: Callable[[], object], dlq_topic: str):
        self._make_producer = make_producer
        self.dlq_topic = dlq_topic
        self._producer = None
        self._letters: list[DeadLetter] = []   # not yet acknowledged, in publish order
        self._futures: list = []               # per letter: its Delivery with the current producer, or None
        self._broken = False                   # the current producer failed: replace it before sending again
        #: the last error seen (str), for logs and readiness
        self.last_error = ""
        #: producers made so far (a new one after each failure)
        self.producers_made = 0

    @property
    def pending(self) -> int:
        """Letters published and not yet acknowledged."""
        return len(self._letters)

    def publish(self, letter: DeadLetter) -> None:
        """Queue `letter` and start sending it if the producer is healthy (never raises for the broker)."""
        self._letters.append(letter)
        self._futures.append(None)
        if self._producer is not None and not self._broken:
            self._send(len(self._letters) - 1)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Return once every queued letter is acknowledged; else raise DeadLettersUnacknowledged after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        backoff = 0.1
        while self._letters:
            if self._broken:
                self._drop_producer()
            if self._producer is None:
                try:
                    self._producer = self._make_producer()
                    self.producers_made += 1
                except Exception as exc:  # noqa: BLE001 - no broker: keep the letters and try later
                    self.last_error = f"cannot create a producer: {exc!r}"
            if self._producer is not None:
                for i, future in enumerate(self._futures):
                    if future is None and not self._broken:
                        self._send(i)
                try:
                    self._producer.flush(timeout_s=max(0.0, deadline - time.monotonic()))
                except Exception as exc:  # noqa: BLE001 - some letters still in flight, or failed: see _collect
                    self.last_error = str(exc)
                self._collect()
            if not self._letters:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadLettersUnacknowledged(len(self._letters), self.dlq_topic, self.last_error)
            time.sleep(min(backoff, remaining))
            backoff = min(2 * backoff, 1.0)

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the producer; letters not acknowledged by then are dropped (their offsets stay uncommitted)."""
        if self._producer is not None:
            try:
                self._producer.close(timeout_s=timeout_s)
            except Exception:  # noqa: BLE001 - closing a producer of a dead broker
                pass
        self._producer = None

    def _send(self, i: int) -> None:
        letter = self._letters[i]
        try:
            self._futures[i] = self._producer.send(self.dlq_topic, letter.value, key=letter.key,
                                                   headers=letter.kafka_headers())
        except Exception as exc:  # noqa: BLE001 - the producer is in an error state or has no metadata
            self.last_error = str(exc)
            self._broken = True

    def _collect(self) -> None:
        """Forget acknowledged letters; a failed one marks the producer for replacement."""
        letters, futures = [], []
        for letter, future in zip(self._letters, self._futures):
            if future is not None and future.done:
                if future.error is None:
                    continue
                self.last_error = str(future.error)
                self._broken = True
                future = None
            letters.append(letter)
            futures.append(future)
        self._letters, self._futures = letters, futures

    def _drop_producer(self) -> None:
        """Abandon the failed producer; its unacknowledged letters will be sent by the next one."""
        producer, self._producer = self._producer, None
        self._futures = [None] * len(self._letters)
        self._broken = False
        if producer is not None:
            try:
                producer.close(timeout_s=0)
            except Exception:  # noqa: BLE001 - it failed already; only its resources matter now
                pass


def read_dead_letters(bootstrap_servers: str, dlq_topic: str, *, expected: int | None = None,
                      timeout_s: float = 20.0, client: str | None = None, **kafka_config) -> list[dict]:
    """Read every dead letter currently in `dlq_topic` (no group, no commits): for tests and inspection.

    Returns dicts with key, value, headers (str → bytes) and the decoded reason list.
    Stops when `expected` letters were read, or when the topic is drained.
    """
    from sponge.streams.kafka import read_topic

    letters = []
    for r in read_topic(bootstrap_servers, dlq_topic, expected=expected, timeout_s=timeout_s, client=client,
                        **kafka_config):
        headers = dict(r.headers or [])
        letters.append({"key": r.key, "value": r.value, "headers": headers,
                        "reason": json.loads(headers.get(REASON_HEADER, b"[]"))})
    return letters
