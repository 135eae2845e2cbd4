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
has, so each rollout is stored exactly once (dead letters are at-least-once). On SIGTERM
(or `stop_event`) the service flushes, commits and closes. When the group rebalances,
buffered partitions are flushed and committed before they move.

`IngestService(config).run(stop_event)` runs it in-process; `on_segment(write, rows)` is
called after each segment is durable with the store's `SegmentWrite` and the newly
stored rows (rollout_id and embedding at least): the hook for online selection.
`sponge serve` runs it as a long-lived process with structured JSON logs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sponge import record
from sponge.engine.metrics import IngestMetrics
from sponge.record import RecordError, Violation
from sponge.streams.codec import decode
from sponge.streams.dlq import DeadLetter, DeadLetterPublisher, dead_letters_table, dlq_topic_for

HELP = "run the long-running ingest service: Kafka rollouts → validated Parquet store"

log = logging.getLogger("sponge.ingest")


# ---- configuration ----------------------------------------------------------------------

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
    group_id: str = "sponge-engine"
    #: directory of the rollout store (Parquet segments)
    store_path: str = "sponge-store"
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
    #: serve Prometheus metrics on this port (0 = off)
    metrics_port: int = 0
    #: log level (DEBUG, INFO, WARNING, ...)
    log_level: str = "INFO"
    #: extra kafka-python settings for consumer and producer (SASL/TLS etc.), e.g. {"security_protocol": "SSL"}
    kafka: dict = field(default_factory=dict)

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or dlq_topic_for(self.topic)

    @classmethod
    def load(cls, path: str | Path | None = None, env: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> "IngestConfig":
        """Defaults, then the file at `path`, then SPONGE_* variables of `env`, then `overrides`."""
        values: dict[str, Any] = {}
        if path:
            values.update(_read_config_file(Path(path)))
        env = os.environ if env is None else env
        for f in dataclasses.fields(cls):
            name = f"SPONGE_{f.name.upper()}"
            if name in env:
                values[f.name] = env[name]
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown ingest config keys: {unknown}; known: {sorted(known)}")
        return cls(**{k: _coerce(known[k], v) for k, v in values.items()})


def _read_config_file(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".toml", ".tml"):
        data = tomllib.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return dict(data.get("ingest", data))


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if not isinstance(value, str):
        return value
    if kind == "bool":
        return value.strip().lower() in ("1", "true", "yes", "on")
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "dict":
        return json.loads(value)
    return value


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
    #: seconds spent decoding, validating and buffering (poll thread)
    process_seconds: float = 0.0
    #: seconds spent making batches durable (writer thread: Parquet encode, fsync, dead letters)
    write_seconds: float = 0.0


@dataclass
class _PartitionBuffer:
    """Valid rows and dead letters read from one partition since the last flush."""

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


class IngestService:
    """Consume rollouts from Kafka into a `RolloutStore`; see the module docstring for the loop."""

    def __init__(self, config: IngestConfig, store=None, on_segment: SegmentCallback | None = None,
                 metrics: IngestMetrics | None = None,
                 enrich: Callable[[pa.Table], pa.Table] | None = None,
                 on_assign: Callable[[set[int]], None] | None = None):
        self.config = config
        if store is None:
            from sponge.engine.store import RolloutStore

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
        self._buffers: dict[tuple[str, int], _PartitionBuffer] = {}
        self._buffered_bytes = 0
        self._oldest = None  # monotonic time the oldest buffered message arrived
        self._last_lag = 0.0
        self._last_commits: dict = {}  # TopicPartition -> next offset we last committed
        self._failed_commits: dict = {}  # TopicPartition -> offset whose commit failed, retried later
        self._admin = None               # admin client for the broker-reset check, made on first use
        self._consumer = None
        self._producer = None
        self._dlq = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[tuple[Future, dict, float]] = []  # batches handed to the writer, oldest first

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> "IngestService":
        if self._consumer is not None:
            return self
        from kafka import KafkaProducer

        from sponge.streams.broker import create_topic
        from sponge.streams.consumer import RolloutConsumer

        cfg = self.config
        if cfg.create_topics:
            create_topic(cfg.bootstrap_servers, cfg.topic, partitions=cfg.partitions, **cfg.kafka)
            create_topic(cfg.bootstrap_servers, cfg.dead_letter_topic, partitions=1, **cfg.kafka)
        self._producer = KafkaProducer(bootstrap_servers=cfg.bootstrap_servers, acks="all", linger_ms=5,
                                       max_request_size=max(32 << 20, 2 * cfg.max_message_bytes), **cfg.kafka)
        self._dlq = DeadLetterPublisher(self._producer, cfg.dead_letter_topic)
        self._consumer = RolloutConsumer(
            cfg.bootstrap_servers, [cfg.topic], cfg.group_id,
            on_revoke=self._on_revoke, on_assign=self._on_assign,
            session_timeout_ms=cfg.session_timeout_ms, heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            max_partition_fetch_bytes=cfg.max_partition_fetch_bytes, fetch_max_bytes=cfg.fetch_max_bytes,
            max_poll_records=cfg.max_poll_records, **cfg.kafka)
        log_event(logging.INFO, "started", topic=cfg.topic, group=cfg.group_id, store=str(cfg.store_path),
               bootstrap=cfg.bootstrap_servers)
        return self

    def run(self, stop_event: threading.Event | None = None) -> IngestTotals:
        """Poll until `stop_event` is set, then flush, commit and close."""
        stop_event = stop_event or threading.Event()
        self.start()
        try:
            while not stop_event.is_set():
                self.poll_once()
        finally:
            self.close()
        return self.totals

    def close(self) -> None:
        """Flush what is buffered, commit it, and leave the group."""
        if self._consumer is None:
            return
        try:
            self.flush(wait=True)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._pending.clear()
            self._consumer.close()
            self._producer.close(timeout=10)
            if self._admin is not None:
                self._admin.close()
            self._consumer = self._producer = self._dlq = self._admin = None
            log_event(logging.INFO, "stopped", **dataclasses.asdict(self.totals))

    def __enter__(self) -> "IngestService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the loop -----------------------------------------------------------------------------
    def poll_once(self, timeout_ms: int | None = None) -> int:
        """One poll → decode → validate → buffer step, flushing if a limit is reached. Returns messages read."""
        self.start()
        cfg = self.config
        records = self._consumer.poll(timeout_ms=cfg.poll_timeout_ms if timeout_ms is None else timeout_ms,
                                      max_records=cfg.max_poll_records)
        if records:
            t0 = time.perf_counter()
            self._ingest(records)
            self.totals.process_seconds += time.perf_counter() - t0
        if self._should_flush() or (self._pending and self._pending[0][0].done()):
            self.flush(wait=False)
        now = time.monotonic()
        if now - self._last_lag > 2.0:
            self._last_lag = now
            self.metrics.set_lag(self._consumer.lag())
            self._check_broker_reset()
            self._retry_failed_commits()
        return len(records)

    def _check_broker_reset(self) -> None:
        """Notice a broker that came back without its state and re-read its partitions from the start.

        A durable Kafka cluster never does this; the in-memory dev broker does on every restart:
        its logs start again at offset 0 and it has forgotten the group's commits, so the positions
        this consumer holds would skip the new records. If a partition we committed to has no
        committed offset any more, or its log end is now below our position, seek to its beginning
        (anything re-read is deduplicated by the store).
        """
        from kafka.errors import KafkaError

        # Partitions whose offsets the broker should know: committed, or tried (a failed commit
        # is retried, and must not re-commit old-log offsets into a new log).
        ours = {tp for tp, off in (*self._last_commits.items(), *self._failed_commits.items()) if off > 0}
        kafka = self._consumer.kafka
        forgotten = []
        try:
            for tp in self._consumer.assignment():
                high = kafka.highwater(tp)
                if high is not None and high < kafka.position(tp, timeout_ms=1000):
                    forgotten.append(tp)   # the log end moved backwards: the broker's log was reset
            assigned = [tp for tp in self._consumer.assignment() if tp in ours and tp not in forgotten]
            if assigned:
                if self._admin is None:
                    from kafka import KafkaAdminClient

                    self._admin = KafkaAdminClient(bootstrap_servers=self.config.bootstrap_servers,
                                                   request_timeout_ms=5000, **self.config.kafka)
                # Ask the broker itself: the consumer's own committed() answers from its cache.
                group = self.config.group_id
                stored = self._admin.list_group_offsets(group).get(group, {})
                forgotten += [tp for tp in assigned if tp not in stored or stored[tp].offset < 0]
        except (KafkaError, OSError):
            return  # broker unreachable right now: check again later
        except Exception as exc:  # noqa: BLE001 - a failing check must never stop ingest
            log_event(logging.WARNING, "broker-reset check failed", error=repr(exc))
            return
        if forgotten:
            log_event(logging.WARNING, "broker lost this group's offsets (restarted empty?); re-reading from the start",
                   partitions=[f"{tp.topic}/{tp.partition}" for tp in forgotten])
            for tp in forgotten:
                self._last_commits.pop(tp, None)
                self._failed_commits.pop(tp, None)
            self.flush()
            kafka.seek_to_beginning(*forgotten)

    def _ingest(self, records: list) -> None:
        cfg = self.config
        decoded: list[tuple[Any, pa.Table]] = []
        for rec in records:
            self._buffer_for(rec.topic, rec.partition).note_offsets(rec.offset, rec.offset)
            self._buffered_bytes += len(rec.value or b"")
            try:
                table = decode(rec.value, rec.headers, cfg.max_message_bytes)
                decoded.append((rec, record.conform(table, cfg.embedding_dim)))
            except RecordError as exc:
                self._dead_letter(rec, exc.violations, {})
        if self._oldest is None:
            self._oldest = time.monotonic()
        self.totals.messages += len(records)
        self.metrics.messages.inc(len(records))
        if decoded:
            self._validate_and_buffer(decoded)
        self.metrics.buffered.set(sum(b.rows for b in self._buffers.values()))

    def _validate_and_buffer(self, decoded: list[tuple[Any, pa.Table]]) -> None:
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
                self._dead_letter(decoded[m][0], vs, names)
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
            buf = self._buffer_for(topic, partition)
            buf.tables.append(rows)
            buf.offsets.append(offsets)
            buf.rows += rows.num_rows

    def _buffer_for(self, topic: str, partition: int) -> _PartitionBuffer:
        key = (topic, int(partition))
        if key not in self._buffers:
            self._buffers[key] = _PartitionBuffer()
        return self._buffers[key]

    def _dead_letter(self, rec, violations: list[Violation], rollout_ids: dict[int, str]) -> None:
        letter = DeadLetter(rec.topic, rec.partition, rec.offset, rec.value, rec.key, list(rec.headers or []),
                            violations, rollout_ids)
        self._dlq.publish(letter)
        self._buffer_for(rec.topic, rec.partition).letters.append(letter)
        self.totals.dead_letters += 1
        self.metrics.rejected_messages.labels(reason=violations[0].rule).inc()
        # Count each bad row once, under the first rule it broke; a whole unreadable message counts once.
        first_rule: dict[int | None, str] = {}
        for v in violations:
            first_rule.setdefault(v.row, v.rule)
        for rule in first_rule.values():
            self.metrics.rejected.labels(reason=rule).inc()
        log_event(logging.WARNING, "dead letter", topic=rec.topic, partition=rec.partition, offset=rec.offset,
               reason=letter.reason()[:5], violations=len(violations))

    def _should_flush(self) -> bool:
        if not self._buffers:
            return False
        cfg = self.config
        rows = sum(b.rows for b in self._buffers.values())
        return (rows >= cfg.flush_rows or self._buffered_bytes >= cfg.flush_bytes
                or (self._oldest is not None and time.monotonic() - self._oldest >= cfg.flush_interval_s))

    # -- durability -----------------------------------------------------------------------------
    def flush(self, wait: bool = True) -> None:
        """Hand everything buffered to the segment writer, then commit whatever has become durable.

        With `wait` (the default) return only when every write is durable and committed; the
        loop itself passes wait=False so the next batch is consumed while this one is written.
        """
        if self._buffers:
            buffers, self._buffers = self._buffers, {}
            self._buffered_bytes, self._oldest = 0, None
            if any(b.letters for b in buffers.values()):
                self._dlq.flush()  # dead letters acknowledged by the DLQ topic before any commit
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

    def _writer(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sponge-segment-writer")
        return self._executor

    def _write(self, buffers: dict[tuple[str, int], _PartitionBuffer]) -> list:
        """Make one batch durable (runs on the writer thread): dead letters, then one segment per partition."""
        t0 = time.perf_counter()
        letters = [letter for b in buffers.values() for letter in b.letters]
        if letters:
            self.store.write_dead_letters(dead_letters_table(letters))
        writes = []
        for (topic, partition), buf in sorted(buffers.items()):
            if buf.rows == 0:
                continue
            rows = pa.concat_tables(buf.tables)
            offsets = np.concatenate(buf.offsets)
            if self.enrich is not None:
                rows = self.enrich(rows)
            write = self.store.write_segment(rows, topic=topic, partition=partition, offsets=offsets,
                                             first_offset=buf.first_offset, last_offset=buf.last_offset)
            writes.append((write, rows))
        self.totals.write_seconds += time.perf_counter() - t0  # only this thread writes it
        return writes

    def _finish(self, future: Future, buffers: dict, started: float) -> None:
        """Wait for one batch's write (re-raising its error), commit its offsets, report it."""
        from kafka import TopicPartition

        writes = future.result()
        commits = {TopicPartition(t, p): b.last_offset + 1 for (t, p), b in buffers.items()}
        self._commit(commits)
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

    def _commit(self, commits: dict) -> None:
        from kafka.errors import CommitFailedError, KafkaError

        try:
            self._consumer.commit(commits)
            self._last_commits.update(commits)
            for tp in commits:
                self._failed_commits.pop(tp, None)
        except (CommitFailedError, KafkaError) as exc:
            # The group moved on (rebalance) or the broker is away: the rows are durable, so
            # nothing is lost. Retry once we own the partitions again; a new owner meanwhile
            # replays from the last commit and the store drops the duplicates.
            for tp, offset in commits.items():
                self._failed_commits[tp] = max(offset, self._failed_commits.get(tp, 0))
            log_event(logging.WARNING, "commit failed; will retry", error=str(exc))

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

    def _on_assign(self, partitions: list) -> None:
        log_event(logging.INFO, "partitions assigned", partitions=[f"{tp.topic}/{tp.partition}" for tp in partitions])
        if self.on_assign is not None:
            self.on_assign({tp.partition for tp in partitions if tp.topic == self.config.topic})


# ---- `sponge serve` ---------------------------------------------------------------------------

_FLAG_FIELDS = {
    "bootstrap_servers": "--bootstrap-servers", "topic": "--topic", "group_id": "--group",
    "store_path": "--store", "embedding_dim": "--embedding-dim", "dlq_topic": "--dlq-topic",
    "partitions": "--partitions", "flush_rows": "--flush-rows", "flush_bytes": "--flush-bytes",
    "flush_interval_s": "--flush-interval-s", "max_message_bytes": "--max-message-bytes",
    "max_poll_records": "--max-poll-records",
    "session_timeout_ms": "--session-timeout-ms", "metrics_port": "--metrics-port", "log_level": "--log-level",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML or TOML file of IngestConfig keys")
    docs = _field_docs()
    for name, flag in _FLAG_FIELDS.items():
        f = next(x for x in dataclasses.fields(IngestConfig) if x.name == name)
        typ = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else "", str)
        # SUPPRESS: an unset flag leaves no attribute, so env and file values are not overridden.
        parser.add_argument(flag, dest=name, type=typ, default=argparse.SUPPRESS,
                            help=f"{docs.get(name, '')} (default {f.default!r}; env SPONGE_{name.upper()})")
    parser.add_argument("--no-create-topics", dest="create_topics", action="store_const", const=False,
                        default=argparse.SUPPRESS, help="do not create the topic and DLQ topic at start")


def _field_docs() -> dict[str, str]:
    """The `#:` comment above each IngestConfig field, for --help."""
    import inspect

    docs, pending = {}, []
    for line in inspect.getsource(IngestConfig).splitlines():
        line = line.strip()
        if line.startswith("#:"):
            pending.append(line[2:].strip())
        elif ":" in line and pending and not line.startswith(("@", "def", '"""')):
            docs[line.split(":")[0].strip()] = " ".join(pending)
            pending = []
    return docs


def run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name, None) for name in list(_FLAG_FIELDS) + ["create_topics"]}
    config = IngestConfig.load(args.config, overrides=overrides)
    configure_json_logging(config.log_level)
    stop = threading.Event()

    def _stop(signum, _frame):
        log_event(logging.INFO, "signal received; flushing and stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    service = IngestService(config)
    if config.metrics_port:
        port = service.metrics.serve(config.metrics_port)
        log_event(logging.INFO, "metrics", url=f"http://127.0.0.1:{port}/metrics")
    try:
        totals = service.run(stop)
    finally:
        service.metrics.stop()
    print(json.dumps({"event": "totals", **dataclasses.asdict(totals)}), flush=True)
    return 0
