"""Producer, consumer, dead letters and the embedded broker against a real Tansu process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
from kafka import KafkaConsumer, TopicPartition

from sponge.record import Violation
from sponge.streams.broker import EmbeddedBroker, create_topic
from sponge.streams.codec import decode
from sponge.streams.consumer import RolloutConsumer
from sponge.streams.dlq import (DeadLetter, DeadLetterPublisher, DeadLettersUnacknowledged, dead_letters_table,
                                letter_id, read_dead_letters)
from sponge.streams.producer import RolloutProducer, kafka_partition
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts

SMALL = SyntheticConfig(embedding_dim=16, response_tokens=30, prompt_tokens=10, group_size=4)


def _read_all(broker: str, topic: str, expected: int, timeout_s: float = 20.0) -> list:
    consumer = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False, auto_offset_reset="earliest",
                             max_partition_fetch_bytes=32 << 20, fetch_max_bytes=64 << 20)
    try:
        consumer.assign([TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))])
        records, deadline = [], time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for rs in consumer.poll(500).values():
                records.extend(rs)
        return records
    finally:
        consumer.close(autocommit=False)


def test_producer_batches_keep_groups_in_their_key_partition(broker, topic):
    table = synthetic_rollouts(200, config=SMALL)
    with RolloutProducer(broker, topic, rows_per_message=16) as producer:
        sent = producer.send(table)
    records = _read_all(broker, topic, sent)
    assert len(records) == sent < table.num_rows
    tables = []
    for r in records:
        t = decode(r.value, r.headers)
        prompt_ids = set(t.column("prompt_id").to_pylist())
        # Every prompt of the message hashes to the partition it is in, its key among them.
        assert {kafka_partition(p.encode(), 4) for p in prompt_ids} == {r.partition}
        assert r.key.decode() in prompt_ids
        tables.append(t)
    got = pa.concat_tables(tables).sort_by("rollout_id")
    assert got.equals(table.sort_by("rollout_id"))


def test_large_message_passes_through_the_broker(broker, topic):
    """The oversized-message path depends on the broker accepting messages above 8 MiB."""
    value = os.urandom(9 << 20)
    with RolloutProducer(broker, topic) as producer:
        producer.send_raw(value, key=b"k", partition=0)
    [record] = _read_all(broker, topic, 1)
    assert record.value == value


def test_consumer_commits_only_what_it_is_told(broker, topic):
    with RolloutProducer(broker, topic) as producer:
        for i in range(10):
            producer.send_raw(b"m%d" % i, key=b"k", partition=1)
    group = f"g-{topic}"
    consumer = RolloutConsumer(broker, [topic], group, session_timeout_ms=6000)
    try:
        records, deadline = [], time.monotonic() + 20
        while len(records) < 10 and time.monotonic() < deadline:
            records.extend(consumer.poll(500))
        assert [r.value for r in records] == [b"m%d" % i for i in range(10)]
        consumer.commit({TopicPartition(topic, 1): records[6].offset + 1})
        assert consumer.lag().get(TopicPartition(topic, 1)) == 0
    finally:
        consumer.close()
    # A new member of the group resumes right after the committed offset.
    consumer = RolloutConsumer(broker, [topic], group, session_timeout_ms=6000)
    try:
        records, deadline = [], time.monotonic() + 20
        while len(records) < 3 and time.monotonic() < deadline:
            records.extend(consumer.poll(500))
        assert [r.value for r in records] == [b"m7", b"m8", b"m9"]
    finally:
        consumer.close()


def test_dead_letters_keep_bytes_and_say_why(broker, topic):
    from kafka import KafkaProducer

    letter = DeadLetter(topic, 2, 41, b"\x00raw bytes", b"key", [("content-type", b"application/json")],
                        [Violation("reward", "non-finite", "reward must be finite", 3)], {3: "r-3"})
    publisher = DeadLetterPublisher(lambda: KafkaProducer(bootstrap_servers=broker), f"{topic}.dlq")
    try:
        publisher.publish(letter)
        publisher.flush()
        assert publisher.pending == 0 and publisher.producers_made == 1
    finally:
        publisher.close()
    [got] = read_dead_letters(broker, f"{topic}.dlq", expected=1)
    assert got["value"] == b"\x00raw bytes" and got["key"] == b"key"
    assert got["headers"]["source-partition"] == b"2" and got["headers"]["source-offset"] == b"41"
    assert got["headers"]["source-topic"] == topic.encode()
    assert got["headers"]["content-type"] == b"application/json"
    assert got["headers"]["letter-id"] == f"{topic}/2/41/".encode() + got["headers"]["letter-id"][-32:]
    assert got["headers"]["letter-id"].decode() == letter.letter_id == letter_id(topic, 2, 41, b"\x00raw bytes")
    assert got["reason"] == [{"field": "reward", "rule": "non-finite", "detail": "reward must be finite",
                              "row": 3, "rollout_id": "r-3"}]
    table = dead_letters_table([letter])
    assert table.column("value")[0].as_py() == b"\x00raw bytes"
    assert table.column("offset")[0].as_py() == 41
    assert table.column("letter_id")[0].as_py() == letter.letter_id


def test_letter_id_the_store_computes_for_old_files_matches_the_python_one(tmp_path):
    """Files written before letter ids existed have no letter_id column: the dead_letters view
    computes it in SQL, and it must be the id the service puts on new letters, or a replayed
    letter would show twice across an upgrade."""
    from sponge.store import RolloutStore

    letters = [DeadLetter("rollouts", 3, 17, b"\x00\xffbytes"), DeadLetter("rollouts", 0, 5, None)]
    old = dead_letters_table(letters).drop_columns(["letter_id"])
    store = RolloutStore(tmp_path, embedding_dim=16)
    store.write_dead_letters(old)                       # as an old service wrote it
    store.write_dead_letters(dead_letters_table(letters))  # the same letters again, replayed by a new one
    got = store.sql("SELECT letter_id FROM dead_letters ORDER BY \"offset\"").column("letter_id").to_pylist()
    assert got == [letter_id("rollouts", 0, 5, None), letter_id("rollouts", 3, 17, b"\x00\xffbytes")]


def test_dead_letter_publisher_survives_a_broker_restart(tmp_path):
    """The finding: after a broker restart the producer's id means nothing to the broker and the
    first letter failed with UnknownProducerIdError, which escaped the service's loop. The
    publisher must keep the letter while the broker is down, and replace its producer after."""
    from kafka import KafkaProducer

    broker = EmbeddedBroker(log_path=tmp_path / "b1.log").start()
    port = broker.port

    def make():
        return KafkaProducer(bootstrap_servers=broker.bootstrap, max_block_ms=2000, request_timeout_ms=3000,
                             delivery_timeout_ms=6000, bootstrap_timeout_ms=2000, reconnect_backoff_max_ms=500)

    publisher = DeadLetterPublisher(make, "t.dlq")
    try:
        create_topic(broker.bootstrap, "t.dlq", partitions=1)
        publisher.publish(DeadLetter("t", 0, 1, b"first"))
        publisher.flush(timeout_s=20)
        assert publisher.producers_made == 1

        broker.stop()
        publisher.publish(DeadLetter("t", 0, 2, b"while down"))
        with pytest.raises(DeadLettersUnacknowledged):
            publisher.flush(timeout_s=3)
        assert publisher.pending == 1, "a letter the broker did not take was dropped"

        broker = EmbeddedBroker(port=port, log_path=tmp_path / "b2.log").start()   # back, empty
        create_topic(broker.bootstrap, "t.dlq", partitions=1)
        publisher.publish(DeadLetter("t", 0, 3, b"after"))
        publisher.flush(timeout_s=60)
        assert publisher.pending == 0
        assert publisher.producers_made >= 2, "the producer of the old broker was not replaced"
        got = read_dead_letters(broker.bootstrap, "t.dlq", expected=2)
        assert sorted(g["value"] for g in got) == [b"after", b"while down"]
    finally:
        publisher.close(timeout_s=1)
        broker.stop()


def test_embedded_broker_context_manager_starts_and_stops():
    with EmbeddedBroker() as b:
        create_topic(b.bootstrap, "x", partitions=2)
        create_topic(b.bootstrap, "x", partitions=2)  # idempotent
        assert b.running
        process = b._process
    assert process.poll() is not None and not b.running


def test_sponge_broker_command_prints_address_and_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "sponge.cli", "broker", "--port", "0", "--topic", "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().strip()
        host, port = address.split(":")
        assert host == "127.0.0.1" and int(port) > 0
        consumer = KafkaConsumer(bootstrap_servers=address)
        assert {"demo", "demo.dlq"} <= consumer.topics()
        consumer.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "broker stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sponge_produce_command_reports_what_it_sent(broker, topic):
    out = subprocess.run([sys.executable, "-m", "sponge.cli", "produce", "--bootstrap-servers", broker,
                          "--topic", topic, "--rollouts", "128", "--embedding-dim", "16", "--response-tokens", "20",
                          "--bad-fraction", "0.5", "--max-message-bytes", "200000"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "128 valid rollouts" in out.stdout and "malformed messages" in out.stdout
