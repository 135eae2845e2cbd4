"""Prometheus metrics of the ingest service, in a registry of its own (no global state).

`IngestMetrics.serve(port)` exposes them over HTTP at /metrics; `render()` returns the
text exposition for an HTTP API that serves them itself.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter("sponge_ingest_messages", "Kafka messages consumed", registry=r)
        self.ingested = Counter("sponge_ingest_rollouts", "Rollouts validated and written to the store",
                                registry=r)
        self.duplicates = Counter("sponge_ingest_duplicate_rollouts",
                                  "Rollouts skipped because the store already had their rollout_id", registry=r)
        self.retired = Counter("sponge_ingest_retired_rollouts",
                               "Rollouts refused because retention had retired their policy version", registry=r)
        self.rejected = Counter("sponge_ingest_rejected_rollouts",
                                "Rollouts rejected (dead-lettered), by the rule they broke", ["reason"], registry=r)
        self.rejected_messages = Counter("sponge_ingest_rejected_messages",
                                         "Messages sent to the dead-letter topic, by the first rule broken",
                                         ["reason"], registry=r)
        self.lag = Gauge("sponge_ingest_consumer_lag", "Records behind the partition's high watermark",
                         ["topic", "partition"], registry=r)
        self.flush_seconds = Histogram("sponge_ingest_flush_seconds",
                                       "Time to make one flush durable (segments + dead letters + commit)",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                       registry=r)
        self.segments = Counter("sponge_ingest_segments", "Parquet segments written", registry=r)
        self.buffered = Gauge("sponge_ingest_buffered_rollouts", "Rollouts buffered, not yet durable", registry=r)
        self._server = None

    def set_lag(self, lag: dict) -> None:
        """`lag` maps a TopicPartition (or (topic, partition)) to records behind."""
        for tp, value in lag.items():
            topic, partition = tp
            self.lag.labels(topic=topic, partition=str(partition)).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics on `port` (0 = any free port) in a daemon thread; returns the port."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
