"""Soak: the whole service (ingest + selection + HTTP) under a steady stream for an hour, bounded by retention.

Runs only with `pytest --soak`. Duration: SPONGE_SOAK_SECONDS (default 3600); rate: SPONGE_SOAK_RATE
rollouts/s (default 500); the policy version advances every SPONGE_SOAK_VERSION_SECONDS (default 30).
Memory (RSS of the service process and of its selector child), consumer lag, store size and selector size
are sampled every 5 s into `soak.csv` (in SPONGE_SOAK_REPORT, default the test's tmp dir) and must stay
bounded: over the second half of a run of 20 minutes or more, neither process's RSS may trend upwards by
more than a quarter of its size per hour.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from test_ingest_service import _serve, _wait

from sponge.store import RolloutStore
from sponge.streams.producer import RolloutProducer
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts

pytestmark = pytest.mark.soak


def _service_url(log: Path) -> str | None:
    for line in log.read_text().splitlines():
        if '"http"' in line:
            try:
                return json.loads(line)["url"]
            except (ValueError, KeyError):
                continue
    return None


def _lag(metrics_text: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(r'^sponge_ingest_consumer_lag\{[^}]*\} (\S+)$',
                                                       metrics_text, re.MULTILINE))


def test_soak_steady_stream_bounded_by_retention(broker, topic, tmp_path):
    seconds = float(os.environ.get("SPONGE_SOAK_SECONDS", "3600"))
    rate = float(os.environ.get("SPONGE_SOAK_RATE", "500"))
    version_every = float(os.environ.get("SPONGE_SOAK_VERSION_SECONDS", "30"))
    report = Path(os.environ.get("SPONGE_SOAK_REPORT", tmp_path))
    report.mkdir(parents=True, exist_ok=True)
    window = 2
    store_path, log = tmp_path / "store", tmp_path / "serve.log"
    proc = _serve(broker, topic, store_path, log, retention_window=window)
    url = _wait(lambda: _service_url(log), 120, "the service's HTTP address")
    http = httpx.Client(base_url=url, timeout=30)
    _wait(lambda: http.get("/readyz").status_code == 200, 120, "readiness")
    producer = RolloutProducer(broker, topic, rows_per_message=64)
    samples, t0, sent, version, batch = [], time.monotonic(), 0, 0, max(1, int(rate))
    next_sample = t0
    try:
        while time.monotonic() - t0 < seconds:
            tick = time.monotonic()
            new_version = int((tick - t0) // version_every)
            if new_version != version:
                version = new_version
                http.post("/policy", json={"policy_version": version}).raise_for_status()
            rows = synthetic_rollouts(batch, seed=sent, id_prefix=f"soak{sent}",
                                      config=SyntheticConfig(policy_version=version, response_tokens=120))
            producer.send(rows)
            sent += batch
            if tick >= next_sample:
                next_sample = tick + 5
                ready = http.get("/readyz").json()
                service = psutil.Process(proc.pid)
                samples.append({"t_s": round(tick - t0, 1), "sent": sent, "policy_version": version,
                                "rss_mib": service.memory_info().rss / 2**20,
                                "selector_rss_mib": sum(c.memory_info().rss for c in service.children()) / 2**20,
                                "lag": _lag(http.get("/metrics").text), "stored_live": ready["rollouts"],
                                "selector_live": ready["n_live"], "evicted_total": ready["evicted_total"]})
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))   # one batch per second: a steady rate
        producer.flush()
    finally:
        producer.close()
        with open(report / "soak.csv", "w", newline="") as f:
            if samples:
                writer = csv.DictWriter(f, fieldnames=list(samples[0]))
                writer.writeheader()
                writer.writerows(samples)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        http.close()

    assert len(samples) >= 3, samples
    # Retention bounds the store: at most (window + 1) versions' worth of rollouts live (+ one of slack).
    bound = (window + 2) * version_every * rate
    assert max(s["stored_live"] for s in samples) <= bound, samples[-3:]
    assert RolloutStore(store_path).count() <= bound
    tail = [s["rss_mib"] for s in samples[len(samples) // 4:]]
    assert max(tail) < 1.5 * min(tail) + 256, f"RSS grew: {tail}"
    if seconds >= 1200:
        half = samples[len(samples) // 2:]
        minutes = np.array([s["t_s"] for s in half]) / 60
        for column in ("rss_mib", "selector_rss_mib"):
            rss = np.array([s[column] for s in half])
            per_hour = np.polyfit(minutes, rss, 1)[0] * 60
            assert per_hour < 0.25 * np.median(rss), f"{column} trends up {per_hour:.0f} MiB/h: {rss}"
    # The service keeps up: lag at the end is below a few seconds' worth of the stream.
    assert samples[-1]["lag"] <= 10 * rate / 64 + 10, samples[-3:]
