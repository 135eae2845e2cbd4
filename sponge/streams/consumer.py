"""A kafka-python consumer wrapper with manual commits and rebalance hooks.

Auto-commit is always off: the owner commits explicit offsets once the records before
them are durable. `on_revoke` runs inside `poll()` before partitions move to another
group member, which is the last moment this member may still commit them. `on_lost` runs
when the group has already dropped this member (e.g. the broker restarted): the partitions
are gone, nothing can be committed, and kafka-python calls it on its IO thread, where any
blocking consumer call raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata


class _Listener(ConsumerRebalanceListener):
    def __init__(self, on_revoke, on_assign, on_lost):
        self._on_revoke, self._on_assign, self._on_lost = on_revoke, on_assign, on_lost

    def on_partitions_revoked(self, revoked):
        if self._on_revoke:
            self._on_revoke(list(revoked))

    def on_partitions_lost(self, lost):
        if self._on_lost:
            self._on_lost(list(lost))
        else:
            self.on_partitions_revoked(lost)

    def on_partitions_assigned(self, assigned):
        if self._on_assign:
            self._on_assign(list(assigned))


class RolloutConsumer:
    """Subscribe to `topics` in `group_id` and hand out raw records; commit only on request.

    Extra keyword arguments go to `kafka.KafkaConsumer` (fetch sizes, SASL/TLS, ...).
    """

    def __init__(self, bootstrap_servers: str | Sequence[str], topics: Sequence[str], group_id: str, *,
                 on_revoke: Callable[[list[TopicPartition]], None] | None = None,
                 on_assign: Callable[[list[TopicPartition]], None] | None = None,
                 on_lost: Callable[[list[TopicPartition]], None] | None = None,
                 **kafka_config):
        # fetch_max_wait_ms: a fetch the broker holds for new data answers within 100 ms (kafka-python's
        # 500 ms default was most of the time a trainer waited for its own rollouts to be stored).
        config = dict(auto_offset_reset="earliest", session_timeout_ms=10_000, heartbeat_interval_ms=1_000,
                      max_partition_fetch_bytes=16 << 20, fetch_max_bytes=64 << 20, fetch_max_wait_ms=100)
        config.update(kafka_config)
        config["enable_auto_commit"] = False
        self.group_id = group_id
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=group_id, **config)
        self._consumer.subscribe(list(topics), listener=_Listener(on_revoke, on_assign, on_lost))

    @property
    def kafka(self) -> KafkaConsumer:
        """The underlying KafkaConsumer, for anything this wrapper does not cover."""
        return self._consumer

    def poll(self, timeout_ms: int = 500, max_records: int | None = None) -> list:
        """Fetched records (kafka ConsumerRecord), in partition order."""
        batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        return [record for records in batches.values() for record in records]

    def commit(self, next_offsets: dict[TopicPartition, int], timeout_ms: int | None = None) -> None:
        """Commit, for each partition, the offset of the next record to read (last processed + 1).

        Raises a kafka error if the commit fails or takes longer than `timeout_ms` (default: the
        consumer's request timeout).
        """
        if next_offsets:
            self._consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in next_offsets.items()},
                                  timeout_ms=timeout_ms)

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    def lag(self) -> dict[TopicPartition, int]:
        """Records behind the partition end, per assigned partition, from the last fetch's high watermark."""
        out = {}
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = self._consumer.position(tp, timeout_ms=1000)
            except Exception:  # noqa: BLE001 - position unknown right after a rebalance
                continue
            if position is not None:
                out[tp] = max(0, high - position)
        return out

    def close(self) -> None:
        self._consumer.close(autocommit=False)

    def __enter__(self) -> "RolloutConsumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
