"""One small interface to Kafka for the whole project, with two backends: confluent-kafka and kafka-python.

Everything in sponge that talks to Kafka (the ingest service's consumer, its dead-letter producer
and admin client, `RolloutProducer`, `create_topic`, `read_dead_letters`) goes through the three
classes here, made by `consumer()`, `producer()` and `admin()`:

* `Consumer`: a group member with manual commits only. `poll()` hands out `Record`s; `commit()`
  is synchronous and raises `CommitFailed`; rebalance callbacks `on_assign` (may return start
  offsets: the consumer begins each partition there), `on_revoke` (the last moment to commit) and
  `on_lost` (the partitions are already gone); pause/resume, seek, position, high watermark, lag.
* `Producer`: `send()` returns a `Delivery` (done, error); `flush(timeout_s)` raises when something
  was not acknowledged in time (`KafkaUnavailable`) or failed (`DeliveryFailed`).
* `Admin`: idempotent `create_topic`, `describe_topics` (partitions and topic id: a re-created topic
  has a new id), a group's committed offsets.

Backends: `confluent` (librdkafka through confluent-kafka: the default) and `kafka-python` (pure
Python, kept as an option). `$SPONGE_KAFKA_CLIENT` names the default for code that does not choose
(the ingest service's `kafka_client` knob reads the same variable).

Settings are given in either spelling and translated for the backend: kafka-python's names
(`security_protocol`, `sasl_plain_username`, `ssl_cafile`, `session_timeout_ms`, ...) or
librdkafka's (`security.protocol`, `sasl.username`, `ssl.ca.location`, `session.timeout.ms`).
A known pair maps by the table below; any other name has its `_` and `.` swapped; the client
itself refuses a name it does not know (`KafkaConfigError`, one line). Errors of both backends
come out as the exceptions below, so callers never import a client's own error types.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

Client = Literal["confluent", "kafka-python"]
CLIENTS: tuple[str, ...] = get_args(Client)
#: the environment variable naming the default client (the ingest service's --kafka-client knob too)
CLIENT_ENV = "SPONGE_KAFKA_CLIENT"

Headers = Sequence[tuple[str, bytes]]


def default_client() -> Client:
    """The client used when none is named: $SPONGE_KAFKA_CLIENT, else confluent."""
    return check_client(os.environ.get(CLIENT_ENV) or "confluent")


def check_client(client: str | None) -> Client:
    """`client` if it names a backend (None: the default); a clear error otherwise."""
    if client is None:
        return default_client()
    if client not in CLIENTS:
        raise KafkaConfigError(f"unknown Kafka client {client!r}: choose one of {', '.join(CLIENTS)}")
    return client  # type: ignore[return-value]


# ---- values -----------------------------------------------------------------------------------

class TopicPartition(NamedTuple):
    topic: str
    partition: int


@dataclass(slots=True)
class Record:
    """One consumed message."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True)
class TopicInfo:
    """What the broker says about an existing topic."""

    name: str
    partitions: int
    #: the topic's id (None: a broker without topic ids); a topic deleted and created again gets a new one
    topic_id: str | None


class Delivery:
    """The outcome of one `Producer.send`: `done` once acknowledged or failed, `error` if it failed."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: BaseException | None = None

    def _settle(self, error: BaseException | None) -> None:
        self.error, self.done = error, True


# ---- errors -----------------------------------------------------------------------------------

class KafkaClientError(RuntimeError):
    """A Kafka operation failed; transient (retry later) unless it is a `KafkaConfigError`."""


class KafkaUnavailable(KafkaClientError):
    """No broker answered, or not in time: the network or the broker (retry with backoff)."""


class KafkaConfigError(KafkaClientError):
    """The client refused its settings (an unknown name, a bad value, failed authentication): fix them first."""


class CommitFailed(KafkaClientError):
    """Offsets were not committed (the group moved on, the broker is away, or the call may not block here)."""


class DeliveryFailed(KafkaClientError):
    """The broker refused a message or it could not be delivered in time."""


def is_transient(exc: BaseException) -> bool:
    """True for a fault of the broker or the network (retry), False for refused settings (give up)."""
    if isinstance(exc, KafkaConfigError):
        return False
    if isinstance(exc, (KafkaClientError, OSError)):
        return True
    # A client's own error that escaped a backend's translation.
    from sponge.streams import kafka_confluent, kafka_python

    for backend in (kafka_confluent, kafka_python):
        translated = backend.translate_native(exc)
        if translated is not None:
            return not isinstance(translated, KafkaConfigError)
    return False


# ---- the interface ----------------------------------------------------------------------------

#: on_assign may return the offset to begin each partition at (default: the committed offset)
AssignCallback = Callable[[list[TopicPartition]], "dict[TopicPartition, int] | None"]
PartitionsCallback = Callable[[list[TopicPartition]], None]


class Consumer(ABC):
    """A consumer-group member with manual commits (auto-commit is always off).

    Rebalance callbacks run inside `poll()`: `on_assign(partitions)` before any record of those
    partitions is handed out, on the polling thread, where blocking calls (`committed`) are
    allowed; it may return {partition: offset} to begin there instead of at the committed offset.
    `on_revoke(partitions)` before the partitions move (the last moment to commit them; on
    kafka-python it runs on the client's IO thread, where `commit` raises `CommitFailed`).
    `on_lost(partitions)` when the group has already dropped this member: nothing can be
    committed. `close()` leaves the group without calling `on_revoke` (flush before closing).
    """

    group_id: str
    client: str

    @abstractmethod
    def poll(self, timeout_ms: int = 500, max_records: int | None = None) -> list[Record]:
        """Fetched records, in offset order within each partition."""

    @abstractmethod
    def commit(self, next_offsets: dict[TopicPartition, int], timeout_s: float | None = None) -> None:
        """Commit, for each partition, the offset of the next record to read; raise `CommitFailed` if not done."""

    @abstractmethod
    def committed(self, partitions: Iterable[TopicPartition], timeout_s: float = 10.0
                  ) -> dict[TopicPartition, int | None]:
        """The group's committed offset of each partition (None: none), as the broker answers now."""

    @abstractmethod
    def assignment(self) -> set[TopicPartition]: ...

    @abstractmethod
    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        """Stop fetching these partitions; `poll()` goes on (the group keeps this member)."""

    @abstractmethod
    def resume(self, partitions: Iterable[TopicPartition]) -> None: ...

    @abstractmethod
    def paused(self) -> set[TopicPartition]: ...

    @abstractmethod
    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Read `partition` from `offset` on (an assigned partition)."""

    @abstractmethod
    def seek_to_beginning(self, partitions: Iterable[TopicPartition]) -> None: ...

    @abstractmethod
    def position(self, partition: TopicPartition) -> int | None:
        """The offset of the next record this consumer will hand out (None: not known yet)."""

    @abstractmethod
    def highwater(self, partition: TopicPartition) -> int | None:
        """The partition's log end as the last fetch saw it (None: nothing fetched yet).

        From the fetch, not a ListOffsets request: Tansu answers ListOffsets(latest) with the last
        batch's base offset + 1, not the log end."""

    def lag(self) -> dict[TopicPartition, int]:
        """Records behind the log end, per assigned partition whose position and end are known."""
        out = {}
        for tp in self.assignment():
            high, position = self.highwater(tp), self.position(tp)
            if high is not None and position is not None:
                out[tp] = max(0, high - position)
        return out

    @abstractmethod
    def close(self) -> None:
        """Leave the group (no commit, no `on_revoke`)."""

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Producer(ABC):
    """Sends messages; each `send` returns a `Delivery` settled by a later `send`, `flush` or `close`."""

    client: str

    @abstractmethod
    def send(self, topic: str, value: bytes | None, key: bytes | None = None, headers: Headers | None = None,
             partition: int | None = None) -> Delivery:
        """Queue one message (raises `KafkaUnavailable` if the queue stays full for `max_block_ms`)."""

    @abstractmethod
    def flush(self, timeout_s: float | None = None) -> None:
        """Wait for every queued message; raise `KafkaUnavailable` if some are still unacknowledged after
        `timeout_s`, `DeliveryFailed` if any sent since the last flush failed."""

    @abstractmethod
    def partitions(self, topic: str, timeout_s: float = 10.0) -> int | None:
        """How many partitions `topic` has (None: it does not exist)."""

    @abstractmethod
    def close(self, timeout_s: float | None = None) -> None:
        """Wait up to `timeout_s` for queued messages (0: drop them at once), then release the client."""

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Admin(ABC):
    """Topics and group offsets. Made only once a broker answered (else `KafkaUnavailable`)."""

    client: str

    @abstractmethod
    def create_topic(self, name: str, partitions: int, replication: int = 1) -> None:
        """Create `name` unless it exists (then nothing happens, whatever its partition count)."""

    @abstractmethod
    def describe_topics(self, names: Sequence[str]) -> dict[str, TopicInfo | None]:
        """Each topic's partitions and id; None for a topic the broker does not have."""

    @abstractmethod
    def group_offsets(self, group_id: str) -> dict[TopicPartition, int]:
        """The offsets `group_id` has committed (partitions without a commit are left out)."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "Admin":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- making clients -------------------------------------------------------------------------------

def consumer(bootstrap_servers: str | Sequence[str], topics: Sequence[str], group_id: str, *,
             client: str | None = None, on_assign: AssignCallback | None = None,
             on_revoke: PartitionsCallback | None = None, on_lost: PartitionsCallback | None = None,
             **settings) -> Consumer:
    """A group member subscribed to `topics`. Settings in either spelling (module docstring); defaults:
    start at the earliest offset without a commit, 10 s sessions, 16 MiB per partition and 64 MiB per
    fetch, a fetch answered within 100 ms. Extra: `max_poll_records` (default for `poll`)."""
    return _backend(client).Consumer(_servers(bootstrap_servers), list(topics), group_id,
                                      on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost, **settings)


def producer(bootstrap_servers: str | Sequence[str], *, client: str | None = None, **settings) -> Producer:
    """A producer. Settings in either spelling; `max_block_ms` bounds how long `send` waits for queue space."""
    return _backend(client).Producer(_servers(bootstrap_servers), **settings)


def admin(bootstrap_servers: str | Sequence[str], *, client: str | None = None, timeout_s: float = 10.0,
          **settings) -> Admin:
    """An admin client; raises `KafkaUnavailable` if no broker answers within `timeout_s`."""
    return _backend(client).Admin(_servers(bootstrap_servers), timeout_s=timeout_s, **settings)


def read_topic(bootstrap_servers: str | Sequence[str], topic: str, *, expected: int | None = None,
               timeout_s: float = 20.0, client: str | None = None, **settings) -> list[Record]:
    """Every record of `topic` from the beginning, without a group or commits (tests, inspection).

    Stops once `expected` records were read, or (without `expected`) when polls come back empty."""
    return _backend(client).read_topic(_servers(bootstrap_servers), topic, expected=expected,
                                       timeout_s=timeout_s, **settings)


def _servers(bootstrap_servers: str | Sequence[str]) -> str:
    return bootstrap_servers if isinstance(bootstrap_servers, str) else ",".join(bootstrap_servers)


def _backend(client: str | None):
    if check_client(client) == "confluent":
        from sponge.streams import kafka_confluent

        return kafka_confluent
    from sponge.streams import kafka_python

    return kafka_python


# ---- setting names ------------------------------------------------------------------------------

#: kafka-python name → librdkafka name, where the two differ by more than `_` for `.`
KAFKA_PYTHON_TO_LIBRDKAFKA: dict[str, str] = {
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "ssl_crlfile": "ssl.crl.location",
    "ssl_ciphers": "ssl.cipher.suites",
    "ssl_check_hostname": "ssl.endpoint.identification.algorithm",   # True → https, False → none
    "fetch_max_wait_ms": "fetch.wait.max.ms",
    "max_request_size": "message.max.bytes",
    "delivery_timeout_ms": "message.timeout.ms",
    "bootstrap_timeout_ms": "socket.connection.setup.timeout.ms",
}
LIBRDKAFKA_TO_KAFKA_PYTHON: dict[str, str] = {v: k for k, v in KAFKA_PYTHON_TO_LIBRDKAFKA.items()}
LIBRDKAFKA_TO_KAFKA_PYTHON["delivery.timeout.ms"] = "delivery_timeout_ms"


def librdkafka_settings(settings: dict) -> dict:
    """`settings` with librdkafka's names (kafka-python names translated)."""
    out = {}
    for name, value in settings.items():
        if "." in name:
            out[name] = value
            continue
        native = KAFKA_PYTHON_TO_LIBRDKAFKA.get(name, name.replace("_", "."))
        if name == "ssl_check_hostname":
            value = "https" if value else "none"
        elif native == "socket.connection.setup.timeout.ms":
            value = max(1000, int(value))   # librdkafka's least
        out[native] = value
    return out


def kafka_python_settings(settings: dict) -> dict:
    """`settings` with kafka-python's names (librdkafka names translated)."""
    out = {}
    for name, value in settings.items():
        if "." not in name:
            out[name] = value
            continue
        native = LIBRDKAFKA_TO_KAFKA_PYTHON.get(name, name.replace(".", "_"))
        if name == "ssl.endpoint.identification.algorithm":
            value = str(value).lower() == "https"
        out[native] = value
    return out
