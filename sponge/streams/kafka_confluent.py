"""The confluent-kafka (librdkafka) backend of `sponge.streams.kafka`: the default client.

librdkafka fetches ahead on its own threads and hands messages over from C, so the polling thread
spends its time on the records, not on the protocol. Its rebalance callbacks run inside
`consume()` on the polling thread, so a revoke callback can still commit synchronously.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
import uuid
from collections.abc import Iterable, Sequence

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException
from confluent_kafka import Consumer as _RdConsumer
from confluent_kafka import Producer as _RdProducer
from confluent_kafka import TopicPartition as _RdPartition

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
    librdkafka_settings,
)

log = logging.getLogger("sponge.kafka")

_CONFIG_CODES = {KafkaError._INVALID_ARG, KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED,
                 KafkaError._SSL, KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
                 KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.UNSUPPORTED_SASL_MECHANISM}
_UNAVAILABLE_CODES = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
                      KafkaError._WAIT_COORD, KafkaError._RESOLVE, KafkaError._MSG_TIMED_OUT,
                      KafkaError.REQUEST_TIMED_OUT, KafkaError.NETWORK_EXCEPTION, KafkaError.NOT_COORDINATOR,
                      KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                      KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION,
                      KafkaError._TIMED_OUT_QUEUE}
_MISSING_TOPIC_CODES = {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_EXCEPTION, KafkaError._UNKNOWN_TOPIC}


def _error(err: KafkaError, what: str = "", kind: type[KafkaClientError] | None = None) -> KafkaClientError:
    """Our exception for a librdkafka error (kind forced, or chosen by the error's code)."""
    text = f"{what}{err.str()} ({err.name()})"
    if kind is None:
        code = err.code()
        kind = (KafkaConfigError if code in _CONFIG_CODES else KafkaUnavailable if code in _UNAVAILABLE_CODES
                else KafkaClientError)
    return kind(text)


def translate_native(exc: BaseException) -> KafkaClientError | None:
    """Our exception for a confluent-kafka one (None: not one of its errors)."""
    if isinstance(exc, KafkaException):
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        return _error(err) if err is not None else KafkaClientError(str(exc))
    if isinstance(exc, BufferError):
        return KafkaUnavailable(f"producer queue full: {exc}")
    return None


def _translated(method):
    """Raise our exceptions, not confluent-kafka's, from `method`."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except KafkaClientError:
            raise
        except (KafkaException, BufferError) as exc:
            raise translate_native(exc) from exc
    return wrapper


def _make(cls, conf: dict):
    """A librdkafka client; settings it refuses (unknown name, bad value) are a `KafkaConfigError`."""
    try:
        return cls(conf)
    except KafkaException as exc:
        raise _error(exc.args[0], "the Kafka client refused its settings: ", KafkaConfigError) from None
    except (ValueError, TypeError) as exc:
        raise KafkaConfigError(f"the Kafka client refused its settings: {exc}") from None


class _LogBridge:
    """librdkafka's log lines into the `sponge.kafka` logger (served by poll/consume/flush).

    Connection failures and disconnects (facility FAIL) go to DEBUG: during an outage they repeat
    at every reconnect, and the ingest service reports the outage itself, once."""

    def log(self, level: int, fmt: str, *args) -> None:
        if args and args[0] == "FAIL":
            level = logging.DEBUG
        log.log(level, fmt, *args)


_LOG_BRIDGE = _LogBridge()


def _on_error(err: KafkaError) -> None:
    # Global errors (all brokers down, a transport error): librdkafka retries by itself, and the
    # calls that need the broker fail on their own; logged for debugging only.
    log.debug("librdkafka error: %s", err)


def _common(conf: dict, bootstrap: str) -> dict:
    conf.update({"bootstrap.servers": bootstrap, "logger": _LOG_BRIDGE, "error_cb": _on_error})
    return conf


def _rd(tp: TopicPartition, offset: int | None = None) -> _RdPartition:
    return _RdPartition(tp.topic, tp.partition) if offset is None else _RdPartition(tp.topic, tp.partition, offset)


def _tp(p: _RdPartition) -> TopicPartition:
    return TopicPartition(p.topic, p.partition)


def _topic_id(value) -> str | None:
    """The topic id in the usual UUID form (kafka-python's too), so ids compare across clients."""
    if not value:
        return None
    mask = (1 << 64) - 1
    return str(uuid.UUID(int=((value.get_most_significant_bits() & mask) << 64)
                         | (value.get_least_significant_bits() & mask)))


# ---- consumer --------------------------------------------------------------------------------------

class Consumer(kafka.Consumer):
    client = "confluent"

    def __init__(self, bootstrap: str, topics: list[str], group_id: str, *, on_assign=None, on_revoke=None,
                 on_lost=None, max_poll_records: int | None = None, **settings):
        base = dict(auto_offset_reset="earliest", session_timeout_ms=10_000, heartbeat_interval_ms=1_000,
                    max_partition_fetch_bytes=16 << 20, fetch_max_bytes=64 << 20, fetch_max_wait_ms=100)
        base.update(settings)
        conf = librdkafka_settings(base)
        # A fetch response must fit in one read (librdkafka: receive.message.max.bytes >= fetch.max.bytes + 512).
        conf.setdefault("receive.message.max.bytes", max(100_000_000, int(conf["fetch.max.bytes"]) + (1 << 20)))
        conf.update({"group.id": group_id, "enable.auto.commit": False, "enable.auto.offset.store": False})
        self.group_id = group_id
        self._cooperative = "cooperative" in str(conf.get("partition.assignment.strategy", ""))
        self._max_poll_records = max_poll_records or 500
        self._on_assign, self._on_revoke, self._on_lost = on_assign, on_revoke, on_lost
        self._paused: set[TopicPartition] = set()
        self._callback_error: BaseException | None = None
        self._closing = False
        self._errors_logged: dict[int, float] = {}
        self._c = _make(_RdConsumer, _common(conf, bootstrap))
        self._c.subscribe(list(topics), on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost)

    # Rebalance callbacks: librdkafka calls them inside consume(), on the polling thread.
    def _assigned(self, consumer, partitions: list[_RdPartition]) -> None:
        if not self._cooperative:
            self._paused.clear()   # an eager rebalance revoked everything first; new partitions start unpaused
        starts = None
        if self._on_assign is not None and not self._closing:
            try:
                starts = self._on_assign([_tp(p) for p in partitions])
            except Exception as exc:  # noqa: BLE001 - raised from the next poll; the partitions are still taken
                self._callback_error = exc
        for p in partitions:
            start = (starts or {}).get(_tp(p))
            if start is not None:
                p.offset = int(start)
        # Assigning here (not leaving it to the wrapper) is what makes the start offsets count.
        (consumer.incremental_assign if self._cooperative else consumer.assign)(partitions)

    def _revoked(self, consumer, partitions: list[_RdPartition]) -> None:
        self._call(self._on_revoke, partitions)

    def _lost(self, consumer, partitions: list[_RdPartition]) -> None:
        self._call(self._on_lost or self._on_revoke, partitions)

    def _call(self, callback, partitions: list[_RdPartition]) -> None:
        tps = [_tp(p) for p in partitions]
        self._paused.difference_update(tps)
        if callback is None or self._closing:
            return
        try:
            callback(tps)
        except Exception as exc:  # noqa: BLE001 - raised from the next poll (the records of this one are kept)
            self._callback_error = exc

    def poll(self, timeout_ms: int = 500, max_records: int | None = None) -> list[Record]:
        if self._callback_error is not None:
            exc, self._callback_error = self._callback_error, None
            raise KafkaClientError(f"a rebalance callback failed: {exc!r}") from exc
        try:
            messages = self._c.consume(num_messages=max_records or self._max_poll_records, timeout=timeout_ms / 1000)
        except KafkaException as exc:
            raise translate_native(exc) from exc
        records = []
        for m in messages:
            err = m.error()
            if err is None:
                records.append(Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers() or []))
            else:
                self._message_error(err)
        return records

    def _message_error(self, err: KafkaError) -> None:
        """A consumer error event (a missing topic, a failed fetch): librdkafka retries by itself."""
        if err.fatal():
            raise _error(err, "the consumer failed: ")
        now = time.monotonic()
        if now - self._errors_logged.get(err.code(), -1e9) >= 60.0:   # once a minute per kind
            self._errors_logged[err.code()] = now
            log.warning("consumer error (retried by the client): %s", err.str())

    def commit(self, next_offsets: dict[TopicPartition, int], timeout_s: float | None = None) -> None:
        # librdkafka bounds a synchronous commit itself: it fails once the coordinator cannot be
        # reached (about a session timeout) or a request times out (socket.timeout.ms).
        if not next_offsets:
            return
        try:
            result = self._c.commit(offsets=[_rd(tp, int(o)) for tp, o in next_offsets.items()], asynchronous=False)
        except KafkaException as exc:
            raise _error(exc.args[0], "commit failed: ", CommitFailed) from exc
        except RuntimeError as exc:   # the consumer is closed
            raise CommitFailed(f"commit failed: {exc}") from exc
        failed = [p for p in result or [] if p.error is not None]
        if failed:
            raise _error(failed[0].error, f"commit of {failed[0].topic}/{failed[0].partition} failed: ", CommitFailed)

    @_translated
    def committed(self, partitions: Iterable[TopicPartition], timeout_s: float = 10.0
                  ) -> dict[TopicPartition, int | None]:
        partitions = list(partitions)
        if not partitions:
            return {}
        answer = self._c.committed([_rd(tp) for tp in partitions], timeout=timeout_s)
        return {_tp(p): (p.offset if p.offset >= 0 else None) for p in answer}

    def assignment(self) -> set[TopicPartition]:
        return {_tp(p) for p in self._c.assignment()}

    @_translated
    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        partitions = list(partitions)
        if partitions:
            self._c.pause([_rd(tp) for tp in partitions])
            self._paused.update(partitions)

    @_translated
    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        partitions = list(partitions)
        if partitions:
            self._c.resume([_rd(tp) for tp in partitions])
            self._paused.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        return self._paused & self.assignment()

    @_translated
    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._c.seek(_rd(partition, int(offset)))

    @_translated
    def seek_to_beginning(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._c.seek(_rd(tp, OFFSET_BEGINNING))

    def position(self, partition: TopicPartition) -> int | None:
        try:
            [p] = self._c.position([_rd(partition)])
        except (KafkaException, RuntimeError):
            return None
        return p.offset if p.offset >= 0 else None

    def highwater(self, partition: TopicPartition) -> int | None:
        try:
            _, high = self._c.get_watermark_offsets(_rd(partition), cached=True)
        except (KafkaException, RuntimeError):
            return None
        return high if high is not None and high >= 0 else None

    def close(self) -> None:
        self._closing = True
        try:
            self._c.close()
        except RuntimeError:   # closed already
            pass


# ---- producer --------------------------------------------------------------------------------------

class Producer(kafka.Producer):
    client = "confluent"

    def __init__(self, bootstrap: str, *, max_block_ms: int = 60_000, **settings):
        conf = librdkafka_settings(settings)
        self._max_block_s = max_block_ms / 1000
        self._failures: list[BaseException] = []
        self._partitions: dict[str, tuple[int, float]] = {}   # topic -> (count, when asked)
        self._p = _make(_RdProducer, _common(conf, bootstrap))

    def _settled(self, delivery: Delivery, err: KafkaError | None) -> None:
        if err is None:
            delivery._settle(None)
            return
        error = _error(err, "delivery failed: ", DeliveryFailed)
        delivery._settle(error)
        self._failures.append(error)

    def send(self, topic: str, value: bytes | None, key: bytes | None = None, headers=None,
             partition: int | None = None) -> Delivery:
        delivery = Delivery()
        deadline = None
        while True:
            try:
                self._p.produce(topic, value=value, key=key, partition=-1 if partition is None else int(partition),
                                on_delivery=lambda err, _msg: self._settled(delivery, err),
                                headers=list(headers) if headers else None)
                break
            except BufferError:
                # The local queue is full: serve deliveries until there is room, for at most max_block_ms.
                deadline = deadline or time.monotonic() + self._max_block_s
                if time.monotonic() >= deadline:
                    raise KafkaUnavailable(f"producer queue still full after {self._max_block_s:g} s "
                                           "(the broker does not take messages)") from None
                self._p.poll(0.05)
            except KafkaException as exc:
                raise translate_native(exc) from exc
        self._p.poll(0)   # serve delivery callbacks already due
        return delivery

    def flush(self, timeout_s: float | None = None) -> None:
        left = self._p.flush(-1 if timeout_s is None else max(0.0, timeout_s))
        if left:
            raise KafkaUnavailable(f"{left} message(s) not acknowledged within {timeout_s:g} s")
        if self._failures:
            first, count = self._failures[0], len(self._failures)
            self._failures.clear()
            raise DeliveryFailed(f"{count} message(s) failed; the first: {first}") from first

    @_translated
    def partitions(self, topic: str, timeout_s: float = 10.0) -> int | None:
        cached = self._partitions.get(topic)
        if cached is not None and time.monotonic() - cached[1] < 30.0:
            return cached[0]
        meta = self._p.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or (meta.error is not None and meta.error.code() in _MISSING_TOPIC_CODES):
            return None
        if meta.error is not None:
            raise _error(meta.error, f"metadata of {topic!r}: ")
        self._partitions[topic] = (len(meta.partitions), time.monotonic())
        return len(meta.partitions)

    def close(self, timeout_s: float | None = None) -> None:
        if timeout_s is not None and timeout_s <= 0:
            self._p.purge()      # drop what is queued or in flight: their deliveries fail
            self._p.flush(0)     # ... and are settled now
        else:
            self._p.flush(-1 if timeout_s is None else timeout_s)
        self._p.poll(0)


# ---- admin ------------------------------------------------------------------------------------------

class Admin(kafka.Admin):
    client = "confluent"

    def __init__(self, bootstrap: str, *, timeout_s: float = 10.0, request_timeout_ms: int | None = None,
                 **settings):
        from confluent_kafka.admin import AdminClient

        settings.pop("allow_auto_create_topics", None)   # a consumer/producer setting
        self._timeout = request_timeout_ms / 1000 if request_timeout_ms else timeout_s
        self._a = _make(AdminClient, _common(librdkafka_settings(settings), bootstrap))
        self._result(lambda: self._a.list_topics(timeout=timeout_s))   # proves a broker answers

    def _result(self, call):
        """Run `call` (a request, or a future's result) with our errors; serve queued log lines after."""
        try:
            return call()
        except KafkaException as exc:
            raise translate_native(exc) from exc
        except concurrent.futures.TimeoutError:
            raise KafkaUnavailable(f"no answer from the broker within {self._timeout:g} s") from None
        finally:
            self._a.poll(0)

    def create_topic(self, name: str, partitions: int, replication: int = 1) -> None:
        from confluent_kafka.admin import NewTopic

        futures = self._a.create_topics([NewTopic(name, num_partitions=int(partitions),
                                                  replication_factor=int(replication))],
                                        request_timeout=self._timeout, operation_timeout=self._timeout)
        try:
            self._result(lambda: futures[name].result(timeout=self._timeout + 5))
        except KafkaClientError as exc:
            cause = exc.__cause__
            if isinstance(cause, KafkaException) and cause.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                return
            raise

    def describe_topics(self, names: Sequence[str]) -> dict[str, TopicInfo | None]:
        from confluent_kafka import TopicCollection

        names = list(names)
        futures = self._result(lambda: self._a.describe_topics(TopicCollection(names), request_timeout=self._timeout))
        out: dict[str, TopicInfo | None] = {}
        for name in names:
            try:
                d = futures[name].result(timeout=self._timeout + 5)
            except KafkaException as exc:
                if exc.args[0].code() in _MISSING_TOPIC_CODES:
                    out[name] = None
                    continue
                raise translate_native(exc) from exc
            except concurrent.futures.TimeoutError:
                raise KafkaUnavailable(f"no answer from the broker within {self._timeout:g} s") from None
            out[name] = TopicInfo(name, len(d.partitions), _topic_id(d.topic_id))
        self._a.poll(0)
        return out

    def group_offsets(self, group_id: str) -> dict[TopicPartition, int]:
        from confluent_kafka import ConsumerGroupTopicPartitions

        futures = self._a.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group_id)],
                                                      request_timeout=self._timeout)
        try:
            answer = self._result(lambda: futures[group_id].result(timeout=self._timeout + 5))
        except KafkaClientError as exc:
            cause = exc.__cause__
            if isinstance(cause, KafkaException) and cause.args[0].code() == KafkaError.GROUP_ID_NOT_FOUND:
                return {}
            raise
        return {_tp(p): p.offset for p in answer.topic_partitions or [] if p.error is None and p.offset >= 0}

    def close(self) -> None:
        self._a.poll(0)


# ---- reading a topic without a group --------------------------------------------------------------------

def read_topic(bootstrap: str, topic: str, *, expected: int | None = None, timeout_s: float = 20.0,
               **settings) -> list[Record]:
    conf = librdkafka_settings(dict(max_partition_fetch_bytes=64 << 20, fetch_max_bytes=64 << 20,
                                    **settings))
    # librdkafka wants a group id even for a consumer that only assigns; nothing joins or commits.
    conf.update({"group.id": f"sponge-reader-{uuid.uuid4().hex}", "enable.auto.commit": False,
                 "auto.offset.reset": "earliest"})
    consumer = _make(_RdConsumer, _common(conf, bootstrap))
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        partitions = sorted(meta.partitions) if meta is not None and meta.error is None else []
        consumer.assign([_RdPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records: list[Record] = []
        deadline = time.monotonic() + timeout_s
        idle_polls = 0
        while partitions and time.monotonic() < deadline:
            batch = [m for m in consumer.consume(500, 0.5) if m.error() is None]
            records.extend(Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers() or [])
                           for m in batch)
            if expected is not None and len(records) >= expected:
                break
            idle_polls = 0 if batch else idle_polls + 1
            if expected is None and idle_polls >= 4:
                break
        return records
    except KafkaException as exc:
        raise translate_native(exc) from exc
    finally:
        consumer.close()
