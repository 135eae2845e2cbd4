"""Faults of the whole service: the broker killed and coming back empty, no broker at start, and a
kill -9 restart that rebuilds the selector to the same objective value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from helpers import wait_for

from sponge.service.api import ApiConfig
from sponge.service.curation import CurationConfig, Curator
from sponge.service.server import CurationServer, ServerConfig
from sponge.service.ingest import IngestConfig
from sponge.streams.broker import EmbeddedBroker, free_port
from sponge.streams.codec import ARROW_CONTENT_TYPE
from sponge.streams.dlq import read_dead_letters
from sponge.streams.producer import RolloutProducer
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts

SMALL = SyntheticConfig(response_tokens=40)
ARROW = ARROW_CONTENT_TYPE.encode()


def send(bootstrap: str, topic: str, rows) -> None:
    with RolloutProducer(bootstrap, topic, rows_per_message=32) as producer:
        producer.send(rows)
        producer.flush()


def readyz(server: CurationServer) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{server.http.url}/readyz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class _Serving:
    """A CurationServer on a thread; any exception that leaves its loop is kept in `error`."""

    def __init__(self, config: ServerConfig):
        self.server = CurationServer(config)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.server.run(self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc

    def alive(self) -> bool:
        if self.error is not None:
            raise AssertionError(f"the service's loop raised: {self.error!r}") from self.error
        return self.thread.is_alive()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        assert not self.thread.is_alive() and self.error is None, self.error


def bad_message(bootstrap: str, topic: str, marker: bytes) -> None:
    """One message that claims to be Arrow and is not: a whole-message dead letter."""
    with RolloutProducer(bootstrap, topic) as producer:
        producer.send_raw(b"not arrow " + marker, key=marker, headers=[("content-type", ARROW)])
        producer.flush()


@pytest.mark.slow
def test_broker_killed_and_restarted_under_the_service(tmp_path):
    """The broker is SIGKILLed under a running service and restarted empty on its port (the
    in-memory dev broker). While it is away /readyz is 503 with a reason; the service re-creates
    its topics, /readyz turns 200, and a bad message after the restart is dead-lettered (its
    producer id from before the restart made this raise out of the loop and kill the service)."""
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    port = broker.port
    serving = None
    try:
        config = ServerConfig(
            ingest=IngestConfig(bootstrap_servers=broker.bootstrap, topic="rollouts", group_id="faults",
                                store_path=str(tmp_path / "store"), partitions=2, flush_interval_s=0.2,
                                session_timeout_ms=6000, log_level="WARNING", broker_check_interval_s=0.5,
                                reconnect_backoff_max_s=1.0),
            curation=CurationConfig(k=8, n_references=32), api=ApiConfig(port=0))
        serving = _Serving(config)
        server = serving.server
        assert server.ready.wait(60)
        assert readyz(server)[0] == 200
        send(broker.bootstrap, "rollouts", synthetic_rollouts(96, seed=1, config=SMALL, id_prefix="before"))
        bad_message(broker.bootstrap, "rollouts", b"before")
        wait_for(lambda: serving.alive() and server.store.count() == 96 and dead_letters(server) == 1, 60,
                 "the first 96 rollouts and the first dead letter")

        broker.kill()
        wait_for(lambda: serving.alive() and readyz(server)[0] == 503, 30, "/readyz to say not ready")
        _, body = readyz(server)
        assert body["ready"] is False and "broker unreachable since" in body["reason"], body
        time.sleep(2.0)                      # the service polls a dead broker meanwhile
        assert serving.alive(), "the service died when the broker went away"

        broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker2.log").start()   # back, and empty
        wait_for(lambda: serving.alive() and readyz(server)[0] == 200, 60, "/readyz after the broker returned")
        bad_message(broker.bootstrap, "rollouts", b"after")
        send(broker.bootstrap, "rollouts", synthetic_rollouts(64, seed=2, config=SMALL, id_prefix="after"))
        wait_for(lambda: serving.alive() and server.store.count() == 160, 120,
                 "the 64 rollouts sent after the broker returned")
        wait_for(lambda: serving.alive() and dead_letters(server) == 2, 60, "the dead letter sent after the restart")
        # At least once on the topic (a re-read after the restart may send it again), one letter id.
        letters = read_dead_letters(broker.bootstrap, "rollouts.dlq")
        assert letters and {x["value"] for x in letters} == {b"not arrow after"}
        assert len({x["headers"]["letter-id"] for x in letters}) == 1
        wait_for(lambda: server.curator.describe()["n_live"] == 160, 30, "the selector to hold all 160")
        assert serving.alive() and server.ingest.totals.broker_outages >= 1
        serving.stop()
        serving = None
    finally:
        if serving is not None:
            serving.stop_event.set()
            serving.thread.join(60)
        broker.stop()


def dead_letters(server: CurationServer) -> int:
    return server.store.sql("SELECT count(*) AS n FROM dead_letters").column("n")[0].as_py()


def test_no_broker_at_start_exits_1_with_one_line(tmp_path):
    """No broker: `sponge serve` waits up to --broker-wait-s with /readyz 503 saying so, then exits
    1 with one line on stderr (no traceback) that says what to do."""
    bound = 6.0
    port = free_port()   # nothing listens here
    proc = subprocess.Popen(
        [sys.executable, "-m", "sponge.cli", "serve", "--bootstrap-servers", f"127.0.0.1:{port}",
         "--store", str(tmp_path / "store"), "--http-port", "0", "--broker-wait-s", str(bound),
         "--no-selection", "--no-embed"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any('"event": "http"' in line for line in lines) or proc.poll() is not None, 120,
                 "the HTTP server")
        up = time.monotonic()
        url = next(json.loads(line)["url"] for line in lines if '"event": "http"' in line)
        try:
            urllib.request.urlopen(f"{url}/readyz", timeout=10)
            raise AssertionError("/readyz was 200 with no broker")
        except urllib.error.HTTPError as e:
            status, body = e.code, json.loads(e.read())
        assert status == 503 and body["ready"] is False and "waiting for Kafka" in body["reason"], body
        code = proc.wait(120)
        waited = time.monotonic() - up
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    assert code == 1
    # It gave up near its bound (an attempt may run ~1 s past it; the rest is a loaded machine's slack).
    assert waited < bound + 30, waited
    plain = [line.rstrip("\n") for line in lines if not line.startswith("{")]
    assert len(plain) == 1, plain
    assert "no Kafka broker answered" in plain[0] and "sponge broker" in plain[0] and "--bootstrap-servers" in plain[0]
    assert not any("Traceback" in line for line in lines)
    events = [json.loads(line) for line in lines if line.startswith("{")]
    waits = [e for e in events if e["event"].startswith("waiting for Kafka")]
    assert waits and all(e["error"] for e in waits)   # one line per attempt, saying why


def test_offsets_wait_for_the_dead_letter_queue(broker, topic, tmp_path):
    """Offsets are never committed before the DLQ has acknowledged the batch's dead letters. The
    embedded broker takes any letter (it creates a missing topic on a produce), so a DLQ that
    refuses them is made with a topic name Kafka does not allow: the batch is held, nothing is
    stored or committed, consumption pauses (later messages are not read), the service stays up
    and says why. A service with a working DLQ then reads everything again and commits it."""
    from kafka import KafkaAdminClient, TopicPartition

    from sponge.service.ingest import IngestService

    send(broker, topic, synthetic_rollouts(32, seed=5, config=SMALL, id_prefix="held"))
    bad_message(broker, topic, b"held")
    base = dict(bootstrap_servers=broker, topic=topic, group_id=f"g-{topic}", store_path=str(tmp_path / "store"),
                create_topics=False, flush_interval_s=0.2, session_timeout_ms=6000, dlq_timeout_s=1.0,
                reconnect_backoff_max_s=1.0, broker_check_interval_s=0.5)
    service = IngestService(IngestConfig(**base, dlq_topic="no such topic!"))
    stop = threading.Event()
    errors: list[BaseException] = []
    thread = threading.Thread(target=_run_into, args=(service, stop, errors), daemon=True)
    thread.start()
    admin = KafkaAdminClient(bootstrap_servers=broker)

    def committed() -> int:
        stored = admin.list_group_offsets(f"g-{topic}").get(f"g-{topic}", {})
        return sum(max(0, entry.offset) for tp, entry in stored.items() if tp.topic == topic)

    try:
        wait_for(lambda: "dead letter(s) not acknowledged" in (service.health() or ""), 60, "the letter to be held")
        read_before = service.totals.messages
        send(broker, topic, synthetic_rollouts(32, seed=6, config=SMALL, id_prefix="later"))
        time.sleep(3.0)   # several retries, and polls of paused partitions, meanwhile
        assert not errors and thread.is_alive()
        assert service.store.count() == 0 and committed() == 0, "stored or committed before the DLQ acknowledged"
        assert service.totals.messages == read_before, "consumption did not pause while the letter was held"
    finally:
        stop.set()
        thread.join(60)
    assert not errors and not thread.is_alive()
    assert committed() == 0

    service = IngestService(IngestConfig(**base))
    stop = threading.Event()
    thread = threading.Thread(target=_run_into, args=(service, stop, errors), daemon=True)
    thread.start()
    try:
        # Nothing was committed, so this service reads every message from offset 0 and commits them all.
        wait_for(lambda: service.store.count() == 64 and committed() == service.totals.messages > 0, 60,
                 "everything stored and committed")
        [letter] = read_dead_letters(broker, f"{topic}.dlq", expected=1)
        assert letter["value"] == b"not arrow held"
    finally:
        stop.set()
        thread.join(60)
        admin.close()
    assert not errors


def _run_into(service, stop: threading.Event, errors: list) -> None:
    try:
        service.run(stop)
    except BaseException as exc:  # noqa: BLE001 - surfaced by the test
        errors.append(exc)


def test_selector_rebuilt_after_kill_matches(tmp_path, broker, topic):
    """State is derived: after a crash the selector rebuilt from the store reaches the value a
    selector that saw the same rollouts live reaches, within tolerance."""
    cfg = CurationConfig(k=16, n_references=64, seed=3)
    store_path = tmp_path / "store"
    config = ServerConfig(
        ingest=IngestConfig(bootstrap_servers=broker, topic=topic, group_id=f"g-{topic}",
                            store_path=str(store_path), flush_interval_s=0.2, session_timeout_ms=6000,
                            create_topics=False, log_level="WARNING"),
        curation=cfg, api=ApiConfig(port=0))
    server = CurationServer(config)
    stop = threading.Event()
    thread = threading.Thread(target=server.run, args=(stop,), daemon=True)
    thread.start()
    assert server.ready.wait(60)
    send(broker, topic, synthetic_rollouts(400, seed=4, config=SMALL, id_prefix="k"))
    wait_for(lambda: server.curator.describe()["n_live"] == 400, 60, "400 rollouts selected")
    live_values = {r["run_id"]: r["objective_value"] for r in server.curator.runs()}
    stop.set()
    thread.join(timeout=60)

    restarted = Curator(server.store, cfg)
    restarted.rebuild()
    assert restarted.describe()["n_live"] == 400
    rebuilt_values = {r["run_id"]: r["objective_value"] for r in restarted.runs()}
    assert live_values and rebuilt_values.keys() == live_values.keys()
    for run, value in live_values.items():
        assert rebuilt_values[run] == pytest.approx(value, rel=0.05), run
