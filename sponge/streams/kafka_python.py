"""The kafka-python backend of `sponge.streams.kafka` (pure Python; an option beside confluent-kafka).

kafka-python 3 runs its network loop, and its rebalance listeners, on an IO thread of its own,
where any blocking client call raises. So here `on_revoke` runs on that thread (a commit from it
raises `CommitFailed`: the partitions' next owner re-reads from the last commit, the store drops
the repeats), and `on_assign` is deferred to the polling thread: newly assigned partitions are
paused in the listener and started, at the offsets `on_assign` returns, by the next `poll()`.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterable, Sequence

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import TopicPartition as _KTopicPartition
from kafka import errors as _errors
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from sponge.streams import kafka
from sponge.streams.kafka import (
    CommitFailed,
    Delivery,
    DeliveryFailed,
    KafkaClientError,
    KafkaConfigError,
    KafkaUnavailable,
    Record,
    TopicInfo,
    TopicPartition,
    kafka_python_settings,
)

_CONFIG_ERRORS = (_errors.KafkaConfigurationError, _errors.IncompatibleBrokerVersion, _errors.AuthorizationError,
                  _errors.SaslAuthenticationFailedError)
_UNAVAILABLE_ERRORS = (_errors.KafkaConnectionError, _errors.KafkaTimeoutError,
                       _errors.NodeNotReadyError, _errors.RequestTimedOutError, _errors.CoordinatorNotAvailableError,
                       _errors.NotCoordinatorError, _errors.LeaderNotAvailableError)


def translate_native(exc: BaseException) -> KafkaClientError | None:
    """Our exception for a kafka-python one (None: not one of its errors)."""
    if not isinstance(exc, _errors.KafkaError):
        return None
    text = str(exc) or type(exc).__name__
    if not text.startswith(type(exc).__name__):
        text = f"{type(exc).__name__}: {text}"
    if isinstance(exc, _CONFIG_ERRORS):
        return KafkaConfigError(text)
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        return KafkaUnavailable(text)
    return KafkaClientError(text)


def _translated(method):
    """Raise our exceptions, not kafka-python's, from `method`."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except KafkaClientError:
            raise
        except _errors.KafkaError as exc:
            raise translate_native(exc) from exc
    return wrapper


def _make(cls, **config):
    try:
        return cls(**config)
    except _errors.KafkaError as exc:
        raise translate_native(exc) from exc
    except (TypeError, ValueError) as exc:
        raise KafkaConfigError(f"the Kafka client refused its settings: {exc}") from None


def _k(tp: TopicPartition) -> _KTopicPartition:
    return _KTopicPartition(tp.topic, tp.partition)


def _tp(tp) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


class _Listener(ConsumerRebalanceListener):
    """Runs on kafka-python's IO thread (see the module docstring)."""

    def __init__(self, owner: "Consumer"):
        self._owner = owner

    def on_partitions_revoked(self, revoked):
        self._owner._revoked(revoked, lost=False)

    def on_partitions_lost(self, lost):
        self._owner._revoked(lost, lost=True)

    def on_partitions_assigned(self, assigned):
        self._owner._assigned(assigned)


class Consumer(kafka.Consumer):
    client = "kafka-python"

    def __init__(self, bootstrap: str, topics: list[str], group_id: str, *, on_assign=None, on_revoke=None,
                 on_lost=None, max_poll_records: int | None = None, **settings):
        config = dict(auto_offset_reset="earliest", session_timeout_ms=10_000, heartbeat_interval_ms=1_000,
                      max_partition_fetch_bytes=16 << 20, fetch_max_bytes=64 << 20, fetch_max_wait_ms=100)
        config.update(kafka_python_settings(settings))
        config["enable_auto_commit"] = False
        if max_poll_records:
            config["max_poll_records"] = max_poll_records
        self.group_id = group_id
        self._on_assign, self._on_revoke, self._on_lost = on_assign, on_revoke, on_lost
        self._new: set = set()    # assigned; on_assign not run yet (kafka TopicPartitions)
        self._held: set = set()   # paused by this wrapper until on_assign has run
        # _new and _held change on the IO thread (listener) and the polling thread (poll): a partition
        # lost between the two would stay paused for good.
        self._lock = threading.Lock()
        self._callback_error: BaseException | None = None
        self._closing = False
        self._c = _make(KafkaConsumer, bootstrap_servers=bootstrap, group_id=group_id, **config)
        self._c.subscribe(list(topics), listener=_Listener(self))

    # -- on kafka-python's IO thread
    def _assigned(self, assigned) -> None:
        if self._closing:
            return
        assigned = set(assigned)
        with self._lock:
            self._new |= assigned
            self._held |= assigned
            self._c.pause(*assigned)   # local: nothing is fetched before on_assign chose where to start

    def _revoked(self, partitions, lost: bool) -> None:
        partitions = set(partitions)
        with self._lock:
            self._new -= partitions
            if self._held & partitions:
                self._c.resume(*(self._held & partitions))
                self._held -= partitions
        callback = (self._on_lost or self._on_revoke) if lost else self._on_revoke
        if callback is None or self._closing:
            return
        try:
            callback([_tp(tp) for tp in partitions])
        except Exception as exc:  # noqa: BLE001 - raised from the next poll
            self._callback_error = exc

    # -- on the polling thread
    def poll(self, timeout_ms: int = 500, max_records: int | None = None) -> list[Record]:
        if self._callback_error is not None:
            exc, self._callback_error = self._callback_error, None
            raise KafkaClientError(f"a rebalance callback failed: {exc!r}") from exc
        try:
            batches = self._c.poll(timeout_ms=timeout_ms, max_records=max_records)
        except _errors.KafkaError as exc:
            raise translate_native(exc) from exc
        records = [Record(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers or []))
                   for rs in batches.values() for r in rs]
        if self._new:
            records = self._start_new(records)
        return records

    def _start_new(self, records: list[Record]) -> list[Record]:
        """Run on_assign for the partitions assigned since the last poll, seek, and resume them."""
        with self._lock:
            new, self._new = self._new, set()
        new &= set(self._c.assignment())
        starts = {}
        if self._on_assign is not None and new:
            try:
                starts = self._on_assign(sorted(_tp(tp) for tp in new)) or {}
            except Exception as exc:  # noqa: BLE001 - raised from the next poll
                self._callback_error = exc
        # Records of these partitions fetched before on_assign ran are not handed out: they are read
        # again from where they began (or from the start on_assign chose).
        first: dict = {}
        kept = []
        for r in records:
            key = _KTopicPartition(r.topic, r.partition)
            if key in new:
                first.setdefault(key, r.offset)
            else:
                kept.append(r)
        for tp in new:
            start = starts.get(_tp(tp), first.get(tp))
            if start is not None:
                self._c.seek(tp, int(start))
        with self._lock:
            held = self._held & new
            self._held -= held
            if held:
                self._c.resume(*held)
        return kept

    def commit(self, next_offsets: dict[TopicPartition, int], timeout_s: float | None = None) -> None:
        if not next_offsets:
            return
        try:
            self._c.commit({_k(tp): OffsetAndMetadata(int(o), "", -1) for tp, o in next_offsets.items()},
                           timeout_ms=None if timeout_s is None else int(timeout_s * 1000))
        except (_errors.KafkaError, RuntimeError) as exc:
            # RuntimeError: called on the IO thread (a revoke listener), where it cannot block.
            raise CommitFailed(f"commit failed: {type(exc).__name__}: {exc}") from exc

    def committed(self, partitions: Iterable[TopicPartition], timeout_s: float = 10.0
                  ) -> dict[TopicPartition, int | None]:
        out = {}
        try:
            for tp in partitions:
                offset = self._c.committed(_k(tp), timeout_ms=int(timeout_s * 1000))
                out[tp] = offset if offset is not None and offset >= 0 else None
        except (_errors.KafkaError, RuntimeError) as exc:
            raise (translate_native(exc) or KafkaClientError(str(exc))) from exc
        return out

    def assignment(self) -> set[TopicPartition]:
        return {_tp(tp) for tp in self._c.assignment()}

    @_translated
    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        partitions = [_k(tp) for tp in partitions]
        if partitions:
            self._c.pause(*partitions)

    @_translated
    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        with self._lock:
            partitions = [_k(tp) for tp in partitions if _k(tp) not in self._held]
            if partitions:
                self._c.resume(*partitions)

    def paused(self) -> set[TopicPartition]:
        with self._lock:
            return {_tp(tp) for tp in self._c.paused() if tp not in self._held}

    @_translated
    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._c.seek(_k(partition), int(offset))

    @_translated
    def seek_to_beginning(self, partitions: Iterable[TopicPartition]) -> None:
        partitions = [_k(tp) for tp in partitions]
        if partitions:
            self._c.seek_to_beginning(*partitions)

    def position(self, partition: TopicPartition) -> int | None:
        try:
            return self._c.position(_k(partition), timeout_ms=1000)
        except Exception:  # noqa: BLE001 - unknown right after a rebalance
            return None

    def highwater(self, partition: TopicPartition) -> int | None:
        return self._c.highwater(_k(partition))

    def close(self) -> None:
        self._closing = True
        self._c.close(autocommit=False)


class Producer(kafka.Producer):
    client = "kafka-python"

    def __init__(self, bootstrap: str, **settings):
        self._failures: list[BaseException] = []
        self._p = _make(KafkaProducer, bootstrap_servers=bootstrap, **kafka_python_settings(settings))

    def _failed(self, delivery: Delivery, exc: BaseException) -> None:
        error = DeliveryFailed(f"delivery failed: {translate_native(exc) or exc!r}")
        delivery._settle(error)
        self._failures.append(error)

    def send(self, topic: str, value: bytes | None, key: bytes | None = None, headers=None,
             partition: int | None = None) -> Delivery:
        delivery = Delivery()
        try:
            future = self._p.send(topic, value=value, key=key, headers=list(headers or []), partition=partition)
        except _errors.KafkaError as exc:
            raise translate_native(exc) from exc
        future.add_callback(lambda _meta: delivery._settle(None))
        future.add_errback(lambda exc: self._failed(delivery, exc))
        return delivery

    def flush(self, timeout_s: float | None = None) -> None:
        try:
            self._p.flush(timeout=timeout_s)
        except _errors.KafkaTimeoutError as exc:
            raise KafkaUnavailable(f"messages not acknowledged within {timeout_s} s: {exc}") from exc
        if self._failures:
            first, count = self._failures[0], len(self._failures)
            self._failures.clear()
            raise DeliveryFailed(f"{count} message(s) failed; the first: {first}") from first

    @_translated
    def partitions(self, topic: str, timeout_s: float = 10.0) -> int | None:
        found = self._p.partitions_for(topic)
        return len(found) if found else None

    def close(self, timeout_s: float | None = None) -> None:
        try:
            self._p.close(timeout=timeout_s)
        except _errors.KafkaError as exc:
            raise translate_native(exc) from exc


class Admin(kafka.Admin):
    client = "kafka-python"

    def __init__(self, bootstrap: str, *, timeout_s: float = 10.0, **settings):
        # Both bounds: without bootstrap_timeout_ms, a broker that is not there takes kafka-python's
        # default 30 s to report, whatever timeout_s says.
        config = {"request_timeout_ms": int(timeout_s * 1000), "bootstrap_timeout_ms": int(timeout_s * 1000)}
        config.update(kafka_python_settings(settings))
        config.pop("allow_auto_create_topics", None)   # a consumer/producer setting
        self._a = _make(KafkaAdminClient, bootstrap_servers=bootstrap, **config)   # bootstraps: proves a broker

    @_translated
    def create_topic(self, name: str, partitions: int, replication: int = 1) -> None:
        from kafka.admin import NewTopic

        if name in self._a.list_topics():
            return
        try:
            response = self._a.create_topics([NewTopic(name, int(partitions), int(replication))])
        except _errors.TopicAlreadyExistsError:
            return
        # kafka-python 3 returns the response as a dict and raises on most errors; check the
        # per-topic code in case this one did not.
        for topic in (response.get("topics", []) if isinstance(response, dict) else []):
            code = topic.get("error_code", 0)
            if code not in (0, 36):  # 36 = TOPIC_ALREADY_EXISTS
                raise KafkaClientError(f"creating topic {name!r} failed: error {code} {topic.get('error_message')}")

    @_translated
    def describe_topics(self, names: Sequence[str]) -> dict[str, TopicInfo | None]:
        out: dict[str, TopicInfo | None] = {name: None for name in names}
        for t in self._a.describe_topics(list(names)):
            if t.get("error_code", 3) == 0:
                out[t["name"]] = TopicInfo(t["name"], len(t.get("partitions") or []),
                                           str(t["topic_id"]) if t.get("topic_id") else None)
        return out

    @_translated
    def group_offsets(self, group_id: str) -> dict[TopicPartition, int]:
        stored = self._a.list_group_offsets(group_id).get(group_id, {})
        return {_tp(tp): entry.offset for tp, entry in stored.items() if entry.offset >= 0}

    def close(self) -> None:
        try:
            self._a.close()
        except Exception:  # noqa: BLE001 - closing a client of a broker that is gone
            pass


def read_topic(bootstrap: str, topic: str, *, expected: int | None = None, timeout_s: float = 20.0,
               **settings) -> list[Record]:
    config = dict(max_partition_fetch_bytes=64 << 20, fetch_max_bytes=64 << 20)
    config.update(kafka_python_settings(settings))
    consumer = _make(KafkaConsumer, bootstrap_servers=bootstrap, enable_auto_commit=False,
                     auto_offset_reset="earliest", **config)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([_KTopicPartition(topic, p) for p in sorted(partitions)])
        records: list[Record] = []
        deadline = time.monotonic() + timeout_s
        idle_polls = 0
        while partitions and time.monotonic() < deadline:
            batch = [r for rs in consumer.poll(timeout_ms=500).values() for r in rs]
            records.extend(Record(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers or []))
                           for r in batch)
            if expected is not None and len(records) >= expected:
                break
            idle_polls = 0 if batch else idle_polls + 1
            if expected is None and idle_polls >= 4:
                break
        return records
    except _errors.KafkaError as exc:
        raise translate_native(exc) from exc
    finally:
        consumer.close(autocommit=False)
