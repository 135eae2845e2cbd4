"""Faults of the whole service: the broker going away and coming back, and a kill -9 restart that
rebuilds the selector to the same objective value."""

from __future__ import annotations

import threading
import time

import pytest
from helpers import wait_for

from sponge.engine.api import ApiConfig
from sponge.engine.curation import CurationConfig, Curator
from sponge.engine.server import CurationServer, ServerConfig
from sponge.engine.service import IngestConfig
from sponge.streams.broker import EmbeddedBroker, create_topic
from sponge.streams.producer import RolloutProducer
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts

SMALL = SyntheticConfig(response_tokens=40)


def send(bootstrap: str, topic: str, rows) -> None:
    with RolloutProducer(bootstrap, topic, rows_per_message=32) as producer:
        producer.send(rows)
        producer.flush()


@pytest.mark.slow
def test_broker_goes_away_and_returns(tmp_path):
    """The in-memory broker restarts empty on the same port; the service reconnects and goes on."""
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    port = broker.port
    try:
        create_topic(broker.bootstrap, "rollouts", partitions=2)
        config = ServerConfig(
            ingest=IngestConfig(bootstrap_servers=broker.bootstrap, topic="rollouts", group_id="faults",
                                store_path=str(tmp_path / "store"), partitions=2, flush_interval_s=0.2,
                                session_timeout_ms=6000, log_level="WARNING"),
            curation=CurationConfig(k=8, n_references=32), api=ApiConfig(port=0))
        server = CurationServer(config)
        stop = threading.Event()
        thread = threading.Thread(target=server.run, args=(stop,), daemon=True)
        thread.start()
        assert server.ready.wait(60)
        send(broker.bootstrap, "rollouts", synthetic_rollouts(96, seed=1, config=SMALL, id_prefix="before"))
        wait_for(lambda: server.store.count() == 96, 60, "the first 96 rollouts")

        broker.stop()
        time.sleep(2.0)                      # the service polls a dead broker meanwhile
        assert thread.is_alive(), "the service died when the broker went away"
        broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker2.log").start()
        create_topic(broker.bootstrap, "rollouts", partitions=2)
        # The dev broker keeps everything in memory: it comes back empty, offsets restart at 0 and the
        # group must be re-joined (the service's old positions mean nothing there). A durable Kafka keeps
        # both; here we give the service a session timeout to notice before sending again.
        time.sleep(1.0)
        send(broker.bootstrap, "rollouts", synthetic_rollouts(64, seed=2, config=SMALL, id_prefix="after"))
        wait_for(lambda: server.store.count() == 160, 120, "the 64 rollouts sent after the broker returned")
        wait_for(lambda: server.curator.describe()["n_live"] == 160, 30, "the selector to hold all 160")
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        broker.stop()


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
    live_value = server.curator.value()
    stop.set()
    thread.join(timeout=60)

    restarted = Curator(server.store, cfg)
    restarted.rebuild()
    assert restarted.describe()["n_live"] == 400
    assert restarted.value() == pytest.approx(live_value, rel=0.05)
