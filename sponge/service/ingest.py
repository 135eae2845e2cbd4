"""The ingest service: Kafka → decode → validate → buffer → Parquet segment → commit.

One loop, read top to bottom in `IngestService.poll_once`:

1. poll a batch of messages from the consumer group;
2. decode each (Arrow IPC or JSON) and conform it to the rollout schema; a message that
   cannot be read is a dead letter as a whole;
3. validate all rows of the batch in one vectorised pass; bad rows make their message a
   dead letter (original bytes, reason naming field, rule, row and rollout_id), good rows
   are buffered per partition with their offsets;
4. flush when the buffer holds `flush_rows` rows or `flush_bytes` bytes or its oldest
   message is `flush_interval_s` old: dead letters are acknowledged by the DLQ topic and
   written to the store, each partition's rows become one atomic segment, and only then
   are the offsets committed.

A crash anywhere replays from the last commit; the store drops rollout_ids it already
has, so each rollout is stored exactly once (dead letters are at-least-once, each with a
stable `letter_id`, and the store's view shows each once). On SIGTERM (or `stop_event`) the
service flushes, commits and closes. When the group rebalances, buffered partitions are
flushed and committed before they move.

Kafka is reached through `sponge.streams.kafka` (confluent-kafka by default, kafka-python with
`kafka_client`). Broker faults never leave the loop. At start the service waits up to `broker_wait_s` for
Kafka (one log line per attempt), then raises `BrokerUnavailable`. Later, every client
reconnects with backoff: the consumer by itself, the dead-letter producer is replaced when
it fails (after a broker restart its producer id means nothing to the broker), the admin
client of the periodic broker check is re-made. While dead letters wait for the DLQ's
acknowledgement their offsets stay uncommitted and consumption pauses (nothing read is
dropped, memory stays bounded). `health()` says why ingest cannot progress (broker
unreachable since ..., dead letters unacknowledged, topics missing), for `/readyz`. Offsets
read from a topic the broker has since re-created (an in-memory broker restarted empty: the
topic has a new id) are never committed into the new log.

`IngestService(config).run(stop_event)` runs it in-process; `on_segment(write, rows)` is
called after each segment is durable with the store's `SegmentWrite` and the newly
stored rows (rollout_id and embedding at least): the hook for online selection.
`sponge serve` runs it as a long-lived process with structured JSON logs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sponge import record
from sponge.service.metrics import IngestMetrics
from sponge.store import DEFAULT_STORE_PATH, Segment
from sponge.record import RecordError, Violation
from sponge.streams.codec import decode
from sponge.streams.dlq import DeadLetter, DeadLetterPublisher, dead_letters_table, dlq_topic_for


log = logging.getLogger("sponge.ingest")


# ---- configuration ----------------------------------------------------------------------

def _default_kafka_client() -> str:
    """$SPONGE_KAFKA_CLIENT if it names a client, else confluent: so an IngestConfig made in Python
    follows the same variable as `sponge serve` (a bad value is refused by the config loader, which
    reads the variable again)."""
    from sponge.streams.kafka import CLIENT_ENV, CLIENTS

    name = os.environ.get(CLIENT_ENV, "")
    return name if name in CLIENTS else "confluent"


@dataclass
class IngestConfig:
    """Every knob of the ingest service. Precedence: flags > SPONGE_* environment > config file > defaults.

    Environment names are `SPONGE_` + the field name in capitals (e.g. SPONGE_FLUSH_ROWS).
    A config file is YAML or TOML with these keys at top level or under `ingest:`.
    """

    #: Kafka bootstrap servers, comma-separated host:port
    bootstrap_servers: str = "127.0.0.1:9092"
    #: topic the rollouts arrive on
    topic: str = "rollouts"
    #: consumer group; processes in one group split the partitions between them
    group_id: str = field(default="sponge-engine", metadata={"alias": "group"})
    #: where the rollout store is: a directory, or s3://bucket/prefix (AWS_* settings, AWS_ENDPOINT_URL)
    store_path: str = field(default=DEFAULT_STORE_PATH, metadata={"alias": "store"})
    #: embedding width of the store; rows with another width are dead-lettered
    embedding_dim: int = record.DEFAULT_EMBEDDING_DIM
    #: dead-letter topic; empty means `<topic>.dlq`
    dlq_topic: str = ""
    #: create the topic and DLQ topic at start if missing
    create_topics: bool = True
    #: partitions of the topic when this service creates it
    partitions: int = 4
    #: flush when this many valid rollouts are buffered
    flush_rows: int = 20_000
    #: ... or when the buffered messages hold this many bytes (bounds memory)
    flush_bytes: int = 256 << 20
    #: ... or when the oldest buffered message has waited this long
    flush_interval_s: float = 5.0
    #: batches being written while the next is consumed (0 = write synchronously in the poll loop)
    max_inflight_flushes: int = 1
    #: a message larger than this is dead-lettered without being decoded
    max_message_bytes: int = record.DEFAULT_MAX_MESSAGE_BYTES
    #: how long one poll waits for messages
    poll_timeout_ms: int = 200
    #: messages handed over by one poll
    max_poll_records: int = 500
    #: group session timeout; a dead member's partitions move after this long
    session_timeout_ms: int = 10_000
    #: heartbeat period (about a third of the session timeout or less)
    heartbeat_interval_ms: int = 1_000
    #: most bytes fetched per partition per request (must exceed max_message_bytes)
    max_partition_fetch_bytes: int = 16 << 20
    #: most bytes fetched per request
    fetch_max_bytes: int = 64 << 20
    #: log level
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: at start, wait this long for a Kafka broker before giving up (seconds; 0 = wait forever)
    broker_wait_s: float = 30.0
    #: a lost broker is retried at most this far apart (kafka-python's own default, 30 s, delays recovery)
    reconnect_backoff_max_s: float = 5.0
    #: probe the broker this often: readiness, missing topics re-created, a broker restarted empty noticed
    broker_check_interval_s: float = 2.0
    #: one attempt to have dead letters acknowledged waits this long; then retried with backoff while
    #: their offsets stay uncommitted and consumption pauses
    dlq_timeout_s: float = 5.0
    #: Kafka client library: confluent (librdkafka through confluent-kafka) or kafka-python (pure Python)
    kafka_client: Literal["confluent", "kafka-python"] = field(default_factory=_default_kafka_client)
    #: extra Kafka settings for every client (SASL/TLS etc.), in librdkafka's names, e.g. {"security.protocol":
    #: "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.username": "u", "sasl.password": "p"}, or kafka-python's
    #: (security_protocol, sasl_plain_username, ssl_cafile, ...): either is translated for the client in use
    kafka: dict = field(default_factory=dict)

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or dlq_topic_for(self.topic)


# ---- structured logs ----------------------------------------------------------------------

class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event and the record's `fields`."""

    def format(self, rec: logging.LogRecord) -> str:
        out = {"ts": round(rec.created, 3), "level": rec.levelname, "logger": rec.name, "event": rec.getMessage()}
        out.update(getattr(rec, "fields", {}))
        if rec.exc_info:
            out["exc"] = self.formatException(rec.exc_info)
        return json.dumps(out, default=str)


def configure_json_logging(level: str = "INFO", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger("sponge")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def log_event(level: int, event: str, **fields) -> None:
    """One structured log line: `event` with `fields` (JSON lines under configure_json_logging)."""
    log.log(level, event, extra={"fields": fields})


# ---- the service ----------------------------------------------------------------------------

class BrokerUnavailable(RuntimeError):
    """No Kafka broker answered within `broker_wait_s` at start. Transient: a later start may succeed."""


class IngestConfigError(RuntimeError):
    """The Kafka clients refused the configuration (e.g. an unknown `kafka` setting). Final: fix it first."""


@dataclass
class IngestTotals:
    """Running counts since the service started (also exported as Prometheus metrics)."""

    messages: int = 0
    ingested: int = 0
    duplicates: int = 0
    #: rollouts refused because retention had already retired their policy version
    retired: int = 0
    rejected_rows: int = 0
    dead_letters: int = 0
    segments: int = 0
    flushes: int = 0
    #: times the broker became unreachable (each outage counts once)
    broker_outages: int = 0
    #: seconds spent decoding, validating and buffering (poll thread)
    process_seconds: float = 0.0
    #: seconds spent making batches durable (writer thread: Parquet encode, fsync, dead letters)
    write_seconds: float = 0.0


@dataclass
class _PartitionBuffer:
    """Valid rows and dead letters read from one partition (of one topic log) since the last flush."""

    tables: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    letters: list = field(default_factory=list)
    first_offset: int = -1
    last_offset: int = -1
    rows: int = 0

    def note_offsets(self, first: int, last: int) -> None:
        self.first_offset = first if self.first_offset < 0 else min(self.first_offset, first)
        self.last_offset = max(self.last_offset, last)


SegmentCallback = Callable[[Any, pa.Table], None]

# Buffers are keyed by (topic, partition, topic id): offsets mean something only in the log they
# were read from, and a broker that restarted empty re-creates the topic under a new id.
BufferKey = tuple[str, int, "str | None"]


def _short(exc: BaseException) -> str:
    """One line for a log or /readyz: the exception's type and first line."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if text.startswith(name):   # kafka errors repeat their own name
        text = text[len(name):].lstrip(": ")
    return f"{name}: {text}"[:300] if text else name


def _iso(wall: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(wall, dt.timezone.utc).isoformat(timespec="seconds")


def _is_transient(exc: BaseException) -> bool:
    """A fault of the broker or the network (retry), as opposed to a refused configuration (give up)."""
    from sponge.streams.broker import BrokerError
    from sponge.streams.kafka import is_transient

    return isinstance(exc, BrokerError) or is_transient(exc)


class IngestService:
    """Consume rollouts from Kafka into a `RolloutStore`; see the module docstring for the loop."""

    def __init__(self, config: IngestConfig, store=None, on_segment: SegmentCallback | None = None,
                 metrics: IngestMetrics | None = None,
                 enrich: Callable[[pa.Table], pa.Table] | None = None,
                 on_assign: Callable[[set[int]], None] | None = None):
        self.config = config
        if store is None:
            from sponge.store import RolloutStore

            store = RolloutStore(config.store_path, embedding_dim=config.embedding_dim)
        self.store = store
        self.on_segment = on_segment
        # Applied to each partition's valid rows just before they are written (e.g. computing
        # embeddings for rollouts that arrived without one); must keep the rollout schema.
        self.enrich = enrich
        # Called with the topic's partitions this process owns after every rebalance.
        self.on_assign = on_assign
        self.metrics = metrics or IngestMetrics()
        self.totals = IngestTotals()
        self._buffers: dict[BufferKey, _PartitionBuffer] = {}
        self._buffered_bytes = 0
        self._oldest = None  # monotonic time the oldest buffered message arrived
        self._last_check = 0.0
        self._last_commits: dict = {}    # TopicPartition -> next offset we last committed
        self._failed_commits: dict = {}  # TopicPartition -> (offset, topic id) whose commit failed, retried later
        self._admin = None               # admin client of the broker check, re-made after a failure
        self._consumer = None
        self._dlq: DeadLetterPublisher | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[tuple[Future, dict, float]] = []  # batches handed to the writer, oldest first
        self._flush_requested = False    # request_flush(): flush at the next poll
        self._stop = threading.Event()   # run()'s stop event: waits and backoffs end early on it
        # Why ingest cannot progress, for health(): each is None/empty while all is well.
        self._state = "not started"
        self._waiting_since: float | None = None      # wall time start-up began waiting for the broker
        self._broker_down_since: float | None = None  # wall time the broker became unreachable
        self._broker_error = ""
        self._last_down_log = 0.0
        self._missing_topics: list[str] = []
        self._dlq_held_since: float | None = None     # wall time dead letters began waiting for their ack
        self._dlq_retry_at = 0.0
        self._dlq_backoff = 0.0
        self._poll_backoff = 0.0
        self._log_ids: dict[str, str] = {}             # topic -> the topic id the broker check last saw

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, stop_event: threading.Event | None = None) -> "IngestService":
        """Connect to Kafka, waiting up to `broker_wait_s` for it (0 = forever) with backoff.

        Raises `BrokerUnavailable` when no broker answered in time, `IngestConfigError` when the
        Kafka clients refuse the configuration. Returns without connecting if `stop_event` is set
        while waiting.
        """
        if self._consumer is not None:
            return self
        if stop_event is not None:
            self._stop = stop_event   # backoffs in poll_once end early on it too
        stop = self._stop
        cfg = self.config
        began = time.monotonic()
        deadline = None if cfg.broker_wait_s <= 0 else began + cfg.broker_wait_s
        delay, attempt = 0.5, 0
        self._waiting_since, self._state = time.time(), "waiting for Kafka"
        while not stop.is_set():
            attempt += 1
            try:
                self._connect(deadline)
                break
            except Exception as exc:  # sorted into transient and final below
                self._close_clients()
                if not _is_transient(exc):
                    raise IngestConfigError(f"the Kafka clients refused the configuration: {_short(exc)}") from exc
                self._broker_error = _short(exc)
            log_event(logging.WARNING, f"waiting for Kafka at {cfg.bootstrap_servers}", attempt=attempt,
                      waited_s=round(time.monotonic() - began, 1), bound_s=cfg.broker_wait_s or None,
                      error=self._broker_error)
            if deadline is not None and time.monotonic() >= deadline:
                raise BrokerUnavailable(
                    f"no Kafka broker answered at {cfg.bootstrap_servers} within {cfg.broker_wait_s:g} s "
                    f"({self._broker_error}); start one (`sponge broker`) or pass --bootstrap-servers HOST:PORT")
            pause = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            stop.wait(pause)
            delay = min(2 * delay, max(0.5, cfg.reconnect_backoff_max_s))
        if self._consumer is None:
            return self   # stopped while waiting
        self._waiting_since, self._state, self._broker_error = None, "running", ""
        self._check_broker()   # learn the topic's id before the first record is read
        log_event(logging.INFO, "started", topic=cfg.topic, group=cfg.group_id, store=str(cfg.store_path),
                  bootstrap=cfg.bootstrap_servers, waited_s=round(time.monotonic() - began, 3))
        return self

    def _client_config(self, timeout_s: float | None = None, auto_create: bool | None = None) -> dict:
        """Settings every Kafka client of the service gets (the `kafka` knob wins over them).

        Names in kafka-python's spelling; `sponge.streams.kafka` translates them for the client in use."""
        cfg = self.config
        bootstrap_ms = int(1000 * max(0.5, min(5.0, timeout_s if timeout_s is not None else 5.0)))
        out = dict(bootstrap_timeout_ms=bootstrap_ms,
                   reconnect_backoff_max_ms=max(50, int(1000 * cfg.reconnect_backoff_max_s)))
        if auto_create is not None:
            # Topics are created by this service with their configured partitions (create_topics),
            # never by a broker's defaults on a metadata request.
            out["allow_auto_create_topics"] = auto_create
        out.update(cfg.kafka)
        return out

    def _connect(self, deadline: float | None) -> None:
        """One attempt to reach the broker and make the clients (raises on any failure)."""
        from sponge.streams import kafka

        cfg = self.config
        # One attempt window: a few seconds for the clients to bootstrap, less if the bound is nearer.
        left = 3.0 if deadline is None else min(3.0, deadline - time.monotonic())
        self._admin = self._make_admin(left)     # the cheapest proof that a broker answers
        if cfg.create_topics:
            self._admin.create_topic(cfg.topic, cfg.partitions)
            self._admin.create_topic(cfg.dead_letter_topic, 1)
        self._dlq = DeadLetterPublisher(self._make_dlq_producer, cfg.dead_letter_topic)
        self._consumer = kafka.consumer(
            cfg.bootstrap_servers, [cfg.topic], cfg.group_id, client=cfg.kafka_client,
            on_revoke=self._on_revoke, on_assign=self._on_assign, on_lost=self._on_lost,
            session_timeout_ms=cfg.session_timeout_ms, heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            max_partition_fetch_bytes=cfg.max_partition_fetch_bytes, fetch_max_bytes=cfg.fetch_max_bytes,
            max_poll_records=cfg.max_poll_records, **self._client_config(left, auto_create=False))

    def _make_admin(self, timeout_s: float | None = None):
        from sponge.streams import kafka

        return kafka.admin(self.config.bootstrap_servers, client=self.config.kafka_client,
                           timeout_s=max(0.5, timeout_s if timeout_s is not None else 5.0),
                           request_timeout_ms=5000, **self._client_config(timeout_s))

    def _make_dlq_producer(self):
        """A new producer for dead letters (a failed one is replaced, see DeadLetterPublisher)."""
        from sponge.streams import kafka

        cfg = self.config
        # Short blocking and delivery bounds: a letter the broker cannot take fails within
        # ~30 s and is re-sent by a new producer instead of waiting out a client's minutes.
        settings = dict(acks="all", linger_ms=5, max_request_size=max(32 << 20, 2 * cfg.max_message_bytes),
                        max_block_ms=5000, request_timeout_ms=10_000, delivery_timeout_ms=30_000)
        settings.update(self._client_config(auto_create=False))
        return kafka.producer(cfg.bootstrap_servers, client=cfg.kafka_client, **settings)

    def _close_clients(self) -> None:
        for close in (lambda: self._consumer.close(), lambda: self._dlq.close(timeout_s=0), self._close_admin):
            try:
                close()
            except Exception:  # noqa: BLE001 - closing clients of a broker that is not there
                pass
        self._consumer = self._dlq = None

    def _close_admin(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                admin.close()
            except Exception:  # noqa: BLE001 - its broker is gone; only its sockets matter
                pass

    def run(self, stop_event: threading.Event | None = None) -> IngestTotals:
        """Poll until `stop_event` is set, then flush, commit and close."""
        self._stop = stop_event = stop_event or threading.Event()
        try:
            self.start(stop_event)
            while not stop_event.is_set():
                self.poll_once()
        finally:
            self.close()
        return self.totals

    def close(self) -> None:
        """Flush what is buffered, commit it, and leave the group."""
        if self._consumer is None:
            self._close_clients()
            self._state = "stopped"
            return
        try:
            self.flush(wait=True)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._pending.clear()
            if self._dlq.pending:
                # Their offsets were never committed: the messages are read and dead-lettered again.
                log_event(logging.WARNING, "stopping with dead letters unacknowledged; their messages stay "
                          "uncommitted and will be read again", pending=self._dlq.pending,
                          error=self._dlq.last_error)
            self._consumer.close()
            self._dlq.close(timeout_s=10)
            self._close_admin()
            self._consumer = self._dlq = None
            self._state = "stopped"
            log_event(logging.INFO, "stopped", **dataclasses.asdict(self.totals))

    def __enter__(self) -> "IngestService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- health ---------------------------------------------------------------------------------
    def health(self) -> str | None:
        """None while ingest can make progress; otherwise one line saying why not (for /readyz)."""
        if self._waiting_since is not None:
            return (f"waiting for Kafka at {self.config.bootstrap_servers} since {_iso(self._waiting_since)}"
                    + (f" ({self._broker_error})" if self._broker_error else ""))
        if self._state != "running":
            return f"ingest {self._state}"
        problems = []
        if self._broker_down_since is not None:
            problems.append(f"broker unreachable since {_iso(self._broker_down_since)} ({self._broker_error})")
        if self._missing_topics:
            problems.append(f"topic(s) {', '.join(self._missing_topics)} missing on the broker (create_topics is off)")
        if self._dlq_held_since is not None:
            dlq = self._dlq
            problems.append(f"{dlq.pending if dlq else '?'} dead letter(s) not acknowledged by "
                            f"{self.config.dead_letter_topic} since {_iso(self._dlq_held_since)} "
                            f"({dlq.last_error if dlq else ''}); consumption paused")
        return "; ".join(problems) or None

    def _broker_trouble(self, during: str, exc: BaseException) -> None:
        """Note that the broker cannot be reached (logged once per outage, then once a minute)."""
        from sponge.streams.kafka import KafkaUnavailable

        if isinstance(exc, (KafkaUnavailable, OSError)):
            # A client's own words here ("No node_id provided") may not say what is wrong.
            self._broker_error = f"no connection to {self.config.bootstrap_servers}: {_short(exc)}"
        else:
            self._broker_error = _short(exc)
        now = time.monotonic()
        if self._broker_down_since is None:
            self._broker_down_since = time.time()
            self.totals.broker_outages += 1
            self._last_down_log = now
            log_event(logging.WARNING, "broker unreachable; retrying with backoff", during=during,
                      bootstrap=self.config.bootstrap_servers, error=self._broker_error)
        elif now - self._last_down_log >= 60.0:
            self._last_down_log = now
            log_event(logging.WARNING, "broker still unreachable", during=during,
                      down_s=round(time.time() - self._broker_down_since, 1), error=self._broker_error)

    def _broker_back(self) -> None:
        if self._broker_down_since is not None:
            log_event(logging.INFO, "broker reachable again", down_s=round(time.time() - self._broker_down_since, 1))
        self._broker_down_since, self._broker_error = None, ""

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    # -- the loop -----------------------------------------------------------------------------
    def poll_once(self, timeout_ms: int | None = None) -> int:
        """One poll → decode → validate → buffer step, flushing if a limit is reached. Returns messages read.

        Broker faults never raise here: they show in `health()` and are retried with backoff.
        """
        from sponge.streams.kafka import KafkaClientError

        self.start()
        if self._consumer is None:
            return 0   # stopped while waiting for the broker
        cfg = self.config
        self._hold_consumption(self._dlq_held_since is not None)
        try:
            if timeout_ms is None:
                # A write in flight (or a flush asked for) is finished by a later poll: look again soon.
                timeout_ms = min(cfg.poll_timeout_ms, 20) if self._pending or self._flush_requested \
                    else cfg.poll_timeout_ms
            records = self._consumer.poll(timeout_ms=timeout_ms, max_records=cfg.max_poll_records)
            self._poll_backoff = 0.0
        except KafkaClientError as exc:
            self._broker_trouble("poll", exc)
            self._poll_backoff = min(max(0.1, 2 * self._poll_backoff), cfg.reconnect_backoff_max_s)
            self._sleep(self._poll_backoff)
            records = []
        if records:
            t0 = time.perf_counter()
            self._ingest(records)
            self.totals.process_seconds += time.perf_counter() - t0
        if self._should_flush() or (self._pending and self._pending[0][0].done()):
            self.flush(wait=False)
        now = time.monotonic()
        if now - self._last_check >= cfg.broker_check_interval_s:
            self._last_check = now
            self._check_broker()
            if self._broker_down_since is None:
                self.metrics.set_lag(self._consumer.lag())
                self._retry_failed_commits()
        return len(records)

    def _hold_consumption(self, hold: bool) -> None:
        """Pause every owned partition while dead letters wait for their ack (bounded memory); resume after.

        Polling goes on meanwhile, so the group keeps this member.
        """
        consumer = self._consumer
        try:
            if hold:
                owned = consumer.assignment()
                if owned - consumer.paused():
                    consumer.pause(owned)
            elif paused := consumer.paused():
                consumer.resume(paused)
        except Exception as exc:  # noqa: BLE001 - e.g. partitions moved meanwhile; next poll tries again
            log_event(logging.DEBUG, "pause/resume failed", error=_short(exc))

    def _check_broker(self) -> None:
        """Probe the broker: readiness, missing topics (re-created if `create_topics`), a broker that
        restarted empty. Never raises; a failure marks the broker unreachable until a probe succeeds."""
        cfg = self.config
        topics = [cfg.topic, cfg.dead_letter_topic]
        try:
            if self._admin is None:
                self._admin = self._make_admin()
            described = self._admin.describe_topics(topics)
            missing = [n for n in topics if described.get(n) is None]
            if missing and cfg.create_topics:
                for name in missing:
                    self._admin.create_topic(name, cfg.partitions if name == cfg.topic else 1)
                log_event(logging.WARNING, "topics missing on the broker (restarted empty?); created them",
                          topics=missing)
                missing = []
            self._missing_topics = missing
            info = described.get(cfg.topic)
            replaced = self._note_topic_id(info.topic_id if info is not None else None)
            self._check_broker_reset(replaced)
        except Exception as exc:  # noqa: BLE001 - sorted below; a failing check must never stop ingest
            if _is_transient(exc):
                self._broker_trouble("broker check", exc)
                self._close_admin()
            else:
                log_event(logging.WARNING, "broker check failed", error=repr(exc))
            return
        self._broker_back()

    def _note_topic_id(self, topic_id) -> bool:
        """Remember the topic's id; True when the broker now has another one (the topic was re-created)."""
        if topic_id is None:
            return False   # a broker without topic ids: the offset checks below still apply
        topic_id, before = str(topic_id), self._log_ids.get(self.config.topic)
        self._log_ids[self.config.topic] = topic_id
        return before is not None and before != topic_id

    def _topic_ids_now(self, topics: set[str]) -> dict[str, str | None]:
        """Each topic's id as the broker answers now (None: missing, or a broker without topic ids).

        Asked afresh before every commit: the consumer's own metadata lags a broker restart, and
        the periodic check can miss a quick one.
        """
        if self._admin is None:
            self._admin = self._make_admin()
        described = self._admin.describe_topics(sorted(topics))
        return {name: (info.topic_id if info is not None else None) for name, info in described.items()}

    def _check_broker_reset(self, topic_replaced: bool = False) -> None:
        """Notice a broker that came back without its state and re-read its partitions from the start.

        A durable Kafka cluster never does this; the in-memory dev broker does on every restart:
        its logs start again at offset 0 and it has forgotten the group's commits, so the positions
        this consumer holds would skip the new records. If the topic has a new id, or a partition we
        committed to has no committed offset any more, or its log end is now below our position,
        seek to its beginning (anything re-read is deduplicated by the store). Offsets read from
        the old log are never committed into the new one (see `_commit`).
        """
        # Partitions whose offsets the broker should know: committed, or tried (a failed commit
        # is retried, and must not re-commit old-log offsets into a new log).
        ours = {tp for tp, off in self._last_commits.items() if off > 0}
        ours |= {tp for tp, (off, _) in self._failed_commits.items() if off > 0}
        consumer = self._consumer
        owned = consumer.assignment()
        forgotten = [tp for tp in owned if tp.topic == self.config.topic] if topic_replaced else []
        for tp in owned:
            if tp in forgotten:
                continue
            high, position = consumer.highwater(tp), consumer.position(tp)
            if high is not None and position is not None and high < position:
                forgotten.append(tp)   # the log end moved backwards: the broker's log was reset
        assigned = [tp for tp in owned if tp in ours and tp not in forgotten]
        if assigned:
            # Ask the broker itself: a consumer may answer from its cache.
            stored = self._admin.group_offsets(self.config.group_id)
            forgotten += [tp for tp in assigned if tp not in stored]
        if forgotten:
            log_event(logging.WARNING, "broker lost this group's offsets (restarted empty?); re-reading from the start",
                      partitions=[f"{tp.topic}/{tp.partition}" for tp in forgotten], topic_replaced=topic_replaced)
            for tp in forgotten:
                self._last_commits.pop(tp, None)
                self._failed_commits.pop(tp, None)
            self.flush()
            consumer.seek_to_beginning(forgotten)

    def _ingest(self, records: list) -> None:
        cfg = self.config
        decoded: list[tuple[Any, pa.Table]] = []
        # Tagged with the id the last broker check saw: records read before a re-created topic is
        # noticed carry the old id and are not committed (re-read later, deduplicated); once it is
        # noticed the consumer seeks to the start, so no old-log record is read under the new id.
        log_ids = {topic: self._log_ids.get(topic) for topic in {rec.topic for rec in records}}
        for rec in records:
            self._buffer_for(rec.topic, rec.partition, log_ids[rec.topic]).note_offsets(rec.offset, rec.offset)
            self._buffered_bytes += len(rec.value or b"")
            try:
                table = decode(rec.value, rec.headers, cfg.max_message_bytes)
                decoded.append((rec, record.conform(table, cfg.embedding_dim)))
            except RecordError as exc:
                self._dead_letter(rec, exc.violations, {}, log_ids[rec.topic])
        if self._oldest is None:
            self._oldest = time.monotonic()
        self.totals.messages += len(records)
        self.metrics.messages.inc(len(records))
        if decoded:
            self._validate_and_buffer(decoded, log_ids)
        self.metrics.buffered.set(sum(b.rows for b in self._buffers.values()))

    def _validate_and_buffer(self, decoded: list[tuple[Any, pa.Table]], log_ids: dict) -> None:
        """Validate every decoded row at once; buffer good rows per partition, dead-letter bad messages."""
        dim = self.config.embedding_dim
        lengths = np.array([t.num_rows for _, t in decoded], dtype=np.int64)
        tables = [t for _, t in decoded]
        if len({t.schema.field("embedding").type for t in tables}) > 1:
            # JSON gives variable-length embeddings; validate them together as variable lists.
            i = tables[0].schema.get_field_index("embedding")
            tables = [t.set_column(i, "embedding", t.column(i).cast(pa.list_(pa.float32()))) for t in tables]
        table = pa.concat_tables(tables)
        bad, violations = record.check(table, dim)
        starts = np.r_[0, np.cumsum(lengths)[:-1]]
        if violations:
            message_of_row = np.repeat(np.arange(len(decoded)), lengths)
            by_message: dict[int, list[Violation]] = {}
            for v in violations:
                m = int(message_of_row[v.row])
                by_message.setdefault(m, []).append(dataclasses.replace(v, row=v.row - int(starts[m])))
            ids = table.column("rollout_id")
            for m, vs in by_message.items():
                rows = {v.row for v in vs}
                names = {r: ids[int(starts[m]) + r].as_py() for r in rows}
                rec = decoded[m][0]
                self._dead_letter(rec, vs, names, log_ids[rec.topic])
            self.totals.rejected_rows += int(bad.sum())
        good = record.keep_valid(table, bad, dim)
        row_offset = np.repeat(np.array([r.offset for r, _ in decoded], dtype=np.int64), lengths)[~bad]
        row_partition = np.repeat(np.array([r.partition for r, _ in decoded], dtype=np.int64), lengths)[~bad]
        topic = decoded[0][0].topic
        partitions = np.unique(row_partition).tolist()
        for partition in partitions:
            if len(partitions) == 1:
                rows, offsets = good, row_offset
            else:
                mask = row_partition == partition
                rows, offsets = good.filter(pa.array(mask)), row_offset[mask]
            buf = self._buffer_for(topic, partition, log_ids[topic])
            buf.tables.append(rows)
            buf.offsets.append(offsets)
            buf.rows += rows.num_rows

    def _buffer_for(self, topic: str, partition: int, log_id: str | None) -> _PartitionBuffer:
        key = (topic, int(partition), log_id)
        if key not in self._buffers:
            self._buffers[key] = _PartitionBuffer()
        return self._buffers[key]

    def _dead_letter(self, rec, violations: list[Violation], rollout_ids: dict[int, str],
                     log_id: str | None) -> None:
        letter = DeadLetter(rec.topic, rec.partition, rec.offset, rec.value, rec.key, list(rec.headers or []),
                            violations, rollout_ids)
        self._dlq.publish(letter)   # queued until acknowledged; never raises for the broker
        self._buffer_for(rec.topic, rec.partition, log_id).letters.append(letter)
        self.totals.dead_letters += 1
        self.metrics.rejected_messages.labels(reason=violations[0].rule).inc()
        # Count each bad row once, under the first rule it broke; a whole unreadable message counts once.
        first_rule: dict[int | None, str] = {}
        for v in violations:
            first_rule.setdefault(v.row, v.rule)
        for rule in first_rule.values():
            self.metrics.rejected.labels(reason=rule).inc()
        log_event(logging.WARNING, "dead letter", topic=rec.topic, partition=rec.partition, offset=rec.offset,
                  reason=letter.reason()[:5], violations=len(violations), letter_id=letter.letter_id)

    def request_flush(self) -> None:
        """Flush at the next poll instead of at the deadline (a trainer waits for its rollouts).
        Safe from any thread: the poll loop reads the flag."""
        self._flush_requested = True

    def _should_flush(self) -> bool:
        if not self._buffers:
            return False
        if self._flush_requested:
            self._flush_requested = False
            return True
        cfg = self.config
        rows = sum(b.rows for b in self._buffers.values())
        return (rows >= cfg.flush_rows or self._buffered_bytes >= cfg.flush_bytes
                or (self._oldest is not None and time.monotonic() - self._oldest >= cfg.flush_interval_s))

    # -- durability -----------------------------------------------------------------------------
    def flush(self, wait: bool = True) -> None:
        """Hand everything buffered to the segment writer, then commit whatever has become durable.

        With `wait` (the default) return only when every write is durable and committed; the
        loop itself passes wait=False so the next batch is consumed while this one is written.
        Nothing is handed over (or committed) before the DLQ topic has acknowledged every dead
        letter buffered: until then the buffers stay, and consumption pauses.
        """
        if self._buffers and self._dead_letters_acknowledged(force=wait):
            buffers, self._buffers = self._buffers, {}
            self._buffered_bytes, self._oldest = 0, None
            # Backpressure: at most `max_inflight_flushes` batches written at once (bounded memory).
            while self._pending and len(self._pending) >= max(1, self.config.max_inflight_flushes):
                self._finish(*self._pending.pop(0))
            if self.config.max_inflight_flushes > 0:
                future = self._writer().submit(self._write, buffers)
            else:
                future = Future()
                future.set_result(self._write(buffers))
            self._pending.append((future, buffers, time.perf_counter()))
        while self._pending and (wait or self._pending[0][0].done()):
            self._finish(*self._pending.pop(0))

    def _dead_letters_acknowledged(self, force: bool = False) -> bool:
        """True once the DLQ topic has acknowledged every dead letter published so far.

        One attempt waits up to `dlq_timeout_s`; after a failed one the next waits for a backoff
        (up to `reconnect_backoff_max_s`) unless `force`d (close, rebalance).
        """
        dlq = self._dlq
        if dlq.pending == 0:
            self._release_dlq_hold()
            return True
        now = time.monotonic()
        if not force and now < self._dlq_retry_at:
            return False
        from sponge.streams.dlq import DeadLettersUnacknowledged

        try:
            dlq.flush(timeout_s=self.config.dlq_timeout_s)
        except DeadLettersUnacknowledged as exc:
            if self._dlq_held_since is None:
                self._dlq_held_since = time.time()
                log_event(logging.WARNING, "dead letters not acknowledged; holding their offsets and pausing "
                          "consumption until they are", pending=exc.pending, error=exc.error)
            self._dlq_backoff = min(max(0.5, 2 * self._dlq_backoff), max(0.5, self.config.reconnect_backoff_max_s))
            self._dlq_retry_at = time.monotonic() + self._dlq_backoff
            return False
        self._release_dlq_hold()
        return True

    def _release_dlq_hold(self) -> None:
        if self._dlq_held_since is not None:
            log_event(logging.INFO, "dead letters acknowledged; consuming again",
                      held_s=round(time.time() - self._dlq_held_since, 1), producers_made=self._dlq.producers_made)
        self._dlq_held_since, self._dlq_backoff, self._dlq_retry_at = None, 0.0, 0.0

    def _writer(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sponge-segment-writer")
        return self._executor

    def _write(self, buffers: dict[BufferKey, _PartitionBuffer]) -> list:
        """Make one batch durable (runs on the writer thread): dead letters, then every partition's
        segment in one commit."""
        t0 = time.perf_counter()
        letters = [letter for b in buffers.values() for letter in b.letters]
        if letters:
            self.store.write_dead_letters(dead_letters_table(letters))
        segments = []
        for (topic, partition, _), buf in sorted(buffers.items(), key=lambda kv: kv[0][:2]):
            if buf.rows == 0:
                continue
            rows = pa.concat_tables(buf.tables)
            if self.enrich is not None:
                rows = self.enrich(rows)
            segments.append(Segment(rows, topic, partition, np.concatenate(buf.offsets), buf.first_offset,
                                    buf.last_offset))
        writes = []
        if segments:   # every partition's range in one commit
            write = self.store.write_segments(segments)
            writes.append((write, pa.concat_tables([seg.rows for seg in segments], promote_options="default")))
        self.totals.write_seconds += time.perf_counter() - t0  # only this thread writes it
        return writes

    def _finish(self, future: Future, buffers: dict, started: float) -> None:
        """Wait for one batch's write (re-raising its error), commit its offsets, report it."""
        from sponge.streams.kafka import TopicPartition

        writes = future.result()
        offsets: dict = {}   # TopicPartition -> (next offset, id of the topic it was read from)
        for (topic, partition, log_id), buf in buffers.items():
            tp = TopicPartition(topic, partition)
            if tp not in offsets or offsets[tp][0] < buf.last_offset + 1:
                offsets[tp] = (buf.last_offset + 1, log_id)
        commits = self._commit(offsets)
        elapsed = time.perf_counter() - started
        for write, _ in writes:
            self.totals.ingested += write.rows_written
            self.totals.duplicates += write.rows_skipped_duplicate
            self.totals.retired += write.rows_skipped_retired
            self.totals.segments += len(write.paths)
            self.metrics.ingested.inc(write.rows_written)
            self.metrics.duplicates.inc(write.rows_skipped_duplicate)
            self.metrics.retired.inc(write.rows_skipped_retired)
            self.metrics.segments.inc(len(write.paths))
        self.totals.flushes += 1
        self.metrics.flush_seconds.observe(elapsed)
        self.metrics.buffered.set(sum(b.rows for b in self._buffers.values()))
        log_event(logging.INFO, "flushed", seconds=round(elapsed, 4),
                  rows=sum(w.rows_written for w, _ in writes),
                  duplicates=sum(w.rows_skipped_duplicate for w, _ in writes),
                  retired=sum(w.rows_skipped_retired for w, _ in writes),
                  dead_letters=sum(len(b.letters) for b in buffers.values()),
                  commits={f"{tp.topic}/{tp.partition}": o for tp, o in commits.items()})
        if self.on_segment is not None:
            for write, rows in writes:
                if len(write.new_ids):
                    new = rows if len(write.new_ids) == rows.num_rows else rows.filter(
                        pc.is_in(rows.column("rollout_id"), write.new_ids))
                    self.on_segment(write, new)

    def _commit(self, offsets: dict) -> dict:
        """Commit `offsets` (TopicPartition -> (next offset, topic id read from)); returns what was committed.

        Offsets read under a topic id the broker no longer has came from a log it re-created
        (restarted empty): they would point into the new log, so they are dropped. While the
        topic is unknown (not re-created yet) they wait with the failed commits.
        """
        from sponge.streams.kafka import KafkaClientError

        now: dict[str, str | None] = {}
        if any(log_id is not None for _, log_id in offsets.values()):
            try:
                now = self._topic_ids_now({tp.topic for tp in offsets})
            except Exception as exc:  # broker away: keep them all for the retry
                if not _is_transient(exc):
                    raise
                self._broker_trouble("commit", exc)
                self._close_admin()
                for tp, (offset, log_id) in offsets.items():
                    before = self._failed_commits.get(tp, (0, None))[0]
                    self._failed_commits[tp] = (max(offset, before), log_id)
                return {}
        commits, later, stale = {}, {}, []
        for tp, (offset, log_id) in offsets.items():
            current = now.get(tp.topic)
            if log_id is None or log_id == current:
                commits[tp] = offset
            elif current is None:
                later[tp] = (offset, log_id)
            else:
                stale.append(f"{tp.topic}/{tp.partition}")
                self._failed_commits.pop(tp, None)
        if stale:
            log_event(logging.WARNING, "not committing offsets read from a topic the broker has re-created",
                      partitions=stale)
            self._last_check = 0.0   # the broker check notices it next and re-reads from the start
        self._failed_commits.update(later)
        if not commits:
            return {}
        try:
            self._consumer.commit(commits, timeout_s=10.0)
        except (KafkaClientError, RuntimeError) as exc:
            # The group moved on (rebalance) or the broker is away (or this runs on kafka-python's
            # IO thread, where it cannot block): the rows are durable, so nothing is lost. Retry once
            # we own the partitions again; a new owner meanwhile replays from the last commit and the
            # store drops the duplicates.
            for tp, offset in commits.items():
                before = self._failed_commits.get(tp, (0, None))[0]
                self._failed_commits[tp] = (max(offset, before), offsets[tp][1])
            log_event(logging.WARNING, "commit failed; will retry", error=_short(exc))
            return {}
        self._last_commits.update(commits)
        for tp in commits:
            self._failed_commits.pop(tp, None)
        return commits

    def _retry_failed_commits(self) -> None:
        if not self._failed_commits:
            return
        owned = self._consumer.assignment()
        for tp in [tp for tp in self._failed_commits if tp not in owned]:
            del self._failed_commits[tp]   # someone else owns it now and replays from its last commit
        if self._failed_commits:
            self._commit(dict(self._failed_commits))

    def _on_revoke(self, partitions: list) -> None:
        log_event(logging.INFO, "partitions revoked", partitions=[f"{tp.topic}/{tp.partition}" for tp in partitions])
        self.flush()

    def _on_lost(self, partitions: list) -> None:
        """The group dropped this member (its broker restarted, or it was silent too long): the
        partitions are no longer ours, so nothing is flushed or committed here (this runs on
        kafka-python's IO thread, where a blocking call raises). What is buffered is flushed by
        the loop later; its commits fail or are dropped, and the partitions' next owner (maybe
        this member again) re-reads from the last commit, the store dropping the duplicates."""
        log_event(logging.INFO, "partitions lost", partitions=[f"{tp.topic}/{tp.partition}" for tp in partitions])

    def _on_assign(self, partitions: list) -> None:
        log_event(logging.INFO, "partitions assigned", partitions=[f"{tp.topic}/{tp.partition}" for tp in partitions])
        if self.on_assign is not None:
            self.on_assign({tp.partition for tp in partitions if tp.topic == self.config.topic})


def exit_status(exc: BaseException) -> int:
    """1 for a transient failure (no broker: a restart may succeed), 2 for a final one (fix the config)."""
    return 2 if isinstance(exc, IngestConfigError) else 1
