"""Producer, consumer, admin, dead letters and the embedded broker against a real Tansu process,
through `sponge.streams.kafka` with each client (confluent-kafka and kafka-python)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
from helpers import wait_for

from sponge.record import Violation
from sponge.streams import kafka
from sponge.streams.broker import EmbeddedBroker, create_topic, free_port
from sponge.streams.codec import decode
from sponge.streams.dlq import (DeadLetter, DeadLetterPublisher, DeadLettersUnacknowledged, dead_letters_table,
                                letter_id, read_dead_letters)
from sponge.streams.producer import RolloutProducer, kafka_partition
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts

SMALL = SyntheticConfig(embedding_dim=16, response_tokens=30, prompt_tokens=10, group_size=4)


def _read_all(broker: str, topic: str, expected: int, client: str | None = None) -> list[kafka.Record]:
    return kafka.read_topic(broker, topic, expected=expected, client=client)


def _poll_until(consumer: kafka.Consumer, n: int, timeout_s: float = 30.0) -> list[kafka.Record]:
    records, deadline = [], time.monotonic() + timeout_s
    while len(records) < n and time.monotonic() < deadline:
        records.extend(consumer.poll(500))
    return records


def test_producer_batches_keep_groups_in_their_key_partition(broker, topic, kafka_client):
    table = synthetic_rollouts(200, config=SMALL)
    with RolloutProducer(broker, topic, rows_per_message=16, client=kafka_client) as producer:
        assert producer.client == kafka_client
        sent = producer.send(table)
    records = _read_all(broker, topic, sent, kafka_client)
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


def test_large_message_passes_through_the_broker(broker, topic, kafka_client):
    """The oversized-message path depends on the broker accepting messages above 8 MiB."""
    value = os.urandom(9 << 20)
    with RolloutProducer(broker, topic, client=kafka_client) as producer:
        delivery = producer.send_raw(value, key=b"k", partition=0)
    assert delivery.done and delivery.error is None
    [record] = _read_all(broker, topic, 1, kafka_client)
    assert record.value == value


def test_consumer_commits_only_what_it_is_told(broker, topic, kafka_client):
    with RolloutProducer(broker, topic, client=kafka_client) as producer:
        for i in range(10):
            producer.send_raw(b"m%d" % i, key=b"k", partition=1, headers=[("h", b"%d" % i)])
    group = f"g-{topic}"
    tp = kafka.TopicPartition(topic, 1)
    with kafka.consumer(broker, [topic], group, client=kafka_client, session_timeout_ms=6000) as consumer:
        records = _poll_until(consumer, 10)
        assert [r.value for r in records] == [b"m%d" % i for i in range(10)]
        assert [r.headers for r in records] == [[("h", b"%d" % i)] for i in range(10)]
        assert {(r.topic, r.partition, r.key) for r in records} == {(topic, 1, b"k")}
        assert consumer.committed([tp]) == {tp: None}
        consumer.commit({tp: records[6].offset + 1})
        assert consumer.committed([tp]) == {tp: 7}
        assert consumer.position(tp) == consumer.highwater(tp) == 10
        assert consumer.lag().get(tp) == 0
    with kafka.admin(broker, client=kafka_client) as admin:
        assert admin.group_offsets(group) == {tp: 7}
    # A new member of the group resumes right after the committed offset.
    with kafka.consumer(broker, [topic], group, client=kafka_client, session_timeout_ms=6000) as consumer:
        assert [r.value for r in _poll_until(consumer, 3)] == [b"m7", b"m8", b"m9"]


def test_start_offsets_pause_resume_and_seek(broker, topic, kafka_client):
    """on_assign's answer is where a partition begins; a paused partition hands out nothing while
    polls go on; seek and seek_to_beginning move the position."""
    with RolloutProducer(broker, topic, client=kafka_client) as producer:
        for p in (0, 1):
            for i in range(5):
                producer.send_raw(b"%d-%d" % (p, i), partition=p)
    tp0, tp1 = kafka.TopicPartition(topic, 0), kafka.TopicPartition(topic, 1)
    assigned: list = []

    def on_assign(partitions):
        assigned.append(sorted(partitions))
        return {tp1: 3}

    with kafka.consumer(broker, [topic], f"g-{topic}", client=kafka_client, session_timeout_ms=6000,
                        on_assign=on_assign) as consumer:
        records = _poll_until(consumer, 7)
        assert assigned == [[kafka.TopicPartition(topic, p) for p in range(4)]]
        assert sorted(r.value for r in records) == [b"0-%d" % i for i in range(5)] + [b"1-3", b"1-4"]
        consumer.pause([tp0])
        assert consumer.paused() == {tp0}
        consumer.seek(tp0, 1)
        consumer.seek_to_beginning([tp1])
        records = _poll_until(consumer, 5, timeout_s=10)
        assert sorted(r.value for r in records) == [b"1-%d" % i for i in range(5)], "a paused partition was read"
        consumer.resume([tp0])
        assert consumer.paused() == set()
        assert sorted(r.value for r in _poll_until(consumer, 4)) == [b"0-%d" % i for i in range(1, 5)]


def test_rebalance_moves_partitions_and_revoke_can_commit(broker, topic, kafka_client):
    """A second member takes half the partitions: the first sees them revoked (and, with confluent-kafka,
    commits from the revoke callback; kafka-python calls it on its IO thread, where a commit fails)."""
    if kafka_client == "kafka-python":
        # Seen with plain KafkaConsumers too: two members of one group in ONE process livelock in the
        # join against Tansu about half the time (the follower's SyncGroup never completes). Across
        # processes kafka-python rebalances fine: test_ingest_service's two-process test covers it.
        pytest.skip("kafka-python: two group members in one process livelock against Tansu")
    events: dict[str, list] = {"a": [], "b": []}
    commits: list = []

    def callbacks(name, consumer_of):
        def on_assign(partitions):
            events[name].append(("assign", sorted(p.partition for p in partitions)))

        def on_revoke(partitions):
            events[name].append(("revoke", sorted(p.partition for p in partitions)))
            try:
                consumer_of().commit({p: 0 for p in partitions}, timeout_s=5)
                commits.append("ok")
            except kafka.CommitFailed as exc:
                commits.append(exc)
        return dict(on_assign=on_assign, on_revoke=on_revoke)

    a = b = None
    try:
        a = kafka.consumer(broker, [topic], f"g-{topic}", client=kafka_client, session_timeout_ms=6000,
                           **callbacks("a", lambda: a))
        wait_for(lambda: a.poll(100) is not None and len(a.assignment()) == 4, 60, "the first member's assignment")
        b = kafka.consumer(broker, [topic], f"g-{topic}", client=kafka_client, session_timeout_ms=6000,
                           **callbacks("b", lambda: b))
        wait_for(lambda: a.poll(100) is not None and b.poll(100) is not None
                 and len(a.assignment()) == len(b.assignment()) == 2, 60, "the partitions split between both")
        owned_a, owned_b = a.assignment(), b.assignment()
    finally:
        for c in (b, a):
            if c is not None:
                c.close()
    assert not (owned_a & owned_b)
    assert ("revoke", [0, 1, 2, 3]) in events["a"]
    assert events["a"][-1] == ("assign", sorted(p.partition for p in owned_a))
    assert events["b"][-1] == ("assign", sorted(p.partition for p in owned_b))
    assert commits and commits[0] == "ok", commits


def test_admin_topics_ids_and_refusals(broker, kafka_client):
    """Topic creation is idempotent, ids read the same through either client, a missing topic is None;
    a setting the client does not know is a KafkaConfigError; no broker is KafkaUnavailable."""
    name = f"admin-{kafka_client}-{time.monotonic_ns()}"
    with kafka.admin(broker, client=kafka_client) as admin:
        admin.create_topic(name, 3)
        admin.create_topic(name, 5)   # exists: nothing happens
        info = admin.describe_topics([name, "no-such-topic"])
    assert info["no-such-topic"] is None
    assert info[name].partitions == 3 and info[name].topic_id
    other = "kafka-python" if kafka_client == "confluent" else "confluent"
    with kafka.admin(broker, client=other) as admin:
        assert admin.describe_topics([name])[name] == info[name]
    with pytest.raises(kafka.KafkaConfigError):
        kafka.consumer(broker, [name], "g", client=kafka_client, no_such_setting=1)
    with pytest.raises(kafka.KafkaUnavailable):
        kafka.admin(f"127.0.0.1:{free_port()}", client=kafka_client, timeout_s=1.0)


def test_settings_are_translated_for_each_client():
    given = {"security_protocol": "SASL_SSL", "sasl_plain_username": "u", "ssl_cafile": "/ca.pem",
             "ssl_check_hostname": False, "sasl.mechanism": "PLAIN", "linger_ms": 5}
    assert kafka.librdkafka_settings(given) == {
        "security.protocol": "SASL_SSL", "sasl.username": "u", "ssl.ca.location": "/ca.pem",
        "ssl.endpoint.identification.algorithm": "none", "sasl.mechanism": "PLAIN", "linger.ms": 5}
    assert kafka.kafka_python_settings(kafka.librdkafka_settings(given)) == {
        "security_protocol": "SASL_SSL", "sasl_plain_username": "u", "ssl_cafile": "/ca.pem",
        "ssl_check_hostname": False, "sasl_mechanism": "PLAIN", "linger_ms": 5}
    with pytest.raises(kafka.KafkaConfigError, match="unknown Kafka client"):
        kafka.check_client("kafka-go")



@pytest.mark.parametrize("spelling", ["kafka-python", "librdkafka"])
def test_sasl_and_tls_settings_reach_the_client(kafka_client, spelling):
    """SASL settings in either spelling are taken by either client (no broker here: confluent-kafka makes
    its clients without one, kafka-python gets as far as bootstrapping); a misspelled one is refused;
    a CA file that is not there is refused by librdkafka when the client is made, so the path got through."""
    dead = f"127.0.0.1:{free_port()}"
    sasl = (dict(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_plain_username="u",
                 sasl_plain_password="p") if spelling == "kafka-python" else
            {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.username": "u",
             "sasl.password": "p"})
    for make in (lambda **kw: kafka.producer(dead, client=kafka_client, bootstrap_timeout_ms=1000, **kw),
                 lambda **kw: kafka.consumer(dead, ["t"], "g", client=kafka_client, bootstrap_timeout_ms=1000, **kw)):
        try:
            make(**sasl).close()
        except kafka.KafkaConfigError:
            raise
        except kafka.KafkaUnavailable:
            assert kafka_client == "kafka-python"   # it bootstraps in its constructor
        with pytest.raises(kafka.KafkaConfigError):
            make(**sasl, sasl_plain_usernme="u")
    if kafka_client == "confluent":
        tls = {"security_protocol": "SSL", "ssl_cafile": "/no/such/ca.pem"} if spelling == "kafka-python" else \
            {"security.protocol": "SSL", "ssl.ca.location": "/no/such/ca.pem"}
        with pytest.raises(kafka.KafkaConfigError, match="ca.pem|ssl.ca.location|CA"):
            kafka.producer(dead, client=kafka_client, **tls)

def test_dead_letters_keep_bytes_and_say_why(broker, topic, kafka_client):
    letter = DeadLetter(topic, 2, 41, b"\x00raw bytes", b"key", [("content-type", b"application/json")],
                        [Violation("reward", "non-finite", "reward must be finite", 3)], {3: "r-3"})
    publisher = DeadLetterPublisher(lambda: kafka.producer(broker, client=kafka_client), f"{topic}.dlq")
    try:
        publisher.publish(letter)
        publisher.flush()
        assert publisher.pending == 0 and publisher.producers_made == 1
    finally:
        publisher.close()
    [got] = read_dead_letters(broker, f"{topic}.dlq", expected=1, client=kafka_client)
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


def test_dead_letter_publisher_survives_a_broker_restart(tmp_path, kafka_client):
    """The finding: after a broker restart the producer's id means nothing to the broker and the
    first letter failed with UnknownProducerIdError, which escaped the service's loop. The
    publisher must keep the letter while the broker is down, and replace its producer after."""
    broker = EmbeddedBroker(log_path=tmp_path / "b1.log").start()
    port = broker.port

    def make():
        return kafka.producer(broker.bootstrap, client=kafka_client, max_block_ms=2000, request_timeout_ms=3000,
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
        if kafka_client == "kafka-python":
            # Its producer id meant nothing to the new broker: only a new producer gets letters through.
            assert publisher.producers_made >= 2, "the producer of the old broker was not replaced"
        # (librdkafka's producer, not idempotent here, reconnects and delivers by itself; it is replaced
        # only if a letter failed, e.g. its delivery timeout passed while the broker was away.)
        got = read_dead_letters(broker.bootstrap, "t.dlq", expected=2, client=kafka_client)
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
        with kafka.admin(address) as admin:
            described = admin.describe_topics(["demo", "demo.dlq"])
        assert described["demo"].partitions == 4 and described["demo.dlq"].partitions == 1
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
