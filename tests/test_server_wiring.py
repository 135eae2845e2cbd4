"""How `sponge serve` puts its parts together (sponge.service.server), on a real broker: settings from
flags reach the part they configure, a waiting trainer hurries ingest and selection, readiness
follows the parts, and /metrics carries the per-run figures."""

from __future__ import annotations

import argparse
import time

import httpx
from helpers import wait_for

from sponge.client import ServiceClient
from sponge.service.server import ServerConfig, add_arguments, config_from_args, serve_in_thread
from sponge.streams.producer import RolloutProducer
from sponge.streams.synthetic import synthetic_rollouts


def flags(broker: str, topic: str, store, *extra: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args([
        "--bootstrap-servers", broker, "--topic", topic, "--group", f"g-{topic}", "--store", str(store),
        "--http-port", "0", "--no-create-topics", "--no-embed", "--log-level", "WARNING", *extra]))


def test_settings_from_flags_reach_the_parts_they_configure(broker, topic, tmp_path):
    config = flags(broker, topic, tmp_path / "store", "--k", "12", "--flush-interval-s", "0.7",
                   "--sql-timeout-s", "3", "--max-runs", "5", "--token", "t0k")
    with serve_in_thread(config) as server:
        assert server.curator.config.k == 12 and server.curator.config.max_runs == 5
        assert server.ingest.config.flush_interval_s == 0.7
        assert server.store.config.sql_limits.timeout_s == 3.0
        assert server.enrich is None                         # --no-embed
        assert httpx.get(f"{server.http.url}/readyz").status_code == 401   # --token reached the API
        assert httpx.get(f"{server.http.url}/readyz", headers={"authorization": "Bearer t0k"}).json()["ready"]
    assert not server.ready.is_set()                         # not ready once stopped


def test_a_waiting_trainer_hurries_ingest_and_selection(broker, topic, tmp_path):
    # Deadlines far away: only the hurry can bring the rollouts in quickly.
    config = flags(broker, topic, tmp_path / "store", "--flush-interval-s", "60", "--batch-wait-s", "60")
    with serve_in_thread(config) as server:
        client = ServiceClient(server.http.url)
        client.register_run("synthetic")
        rows = synthetic_rollouts(48, seed=5)                # run "synthetic", policy version 0
        with RolloutProducer(broker, topic, rows_per_message=16) as producer:
            producer.send(rows)
            producer.flush()
        t0 = time.monotonic()
        table, info = client.candidates("synthetic", 1, expect={0: 48}, wait_s=30)
        assert info["complete"] and time.monotonic() - t0 < 20
        assert client.run("synthetic")["arrived"] == {"0": 48}
        metrics = httpx.get(f"{server.http.url}/metrics").text
        assert 'sponge_run_live_rollouts{run="synthetic"} 48.0' in metrics
        assert "sponge_ingest_rollouts_total 48.0" in metrics
        client.close()


def test_readiness_waits_for_the_parts_and_says_why_not(broker, topic, tmp_path):
    config = flags(broker, topic, tmp_path / "store")
    with serve_in_thread(config) as server:
        assert server.ready.is_set() and server.ready.reason() is None
        server._curator_health(False)                        # the worker reports a broken curator
        body = httpx.get(f"{server.http.url}/readyz").json()
        assert body["ready"] is False and "curator" in body["reason"]
        server._curator_health(True)
        wait_for(lambda: httpx.get(f"{server.http.url}/readyz").status_code == 200, 10, "ready again")
