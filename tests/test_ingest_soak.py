"""Soak: hours of continuous produce → serve with periodic kill -9, memory and exactness checked.

Runs only with `pytest --soak`; the duration comes from SPONGE_SOAK_SECONDS (default 600).
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from sponge.streams.synthetic import SyntheticConfig, produce

from test_ingest_service import _assert_exactly, _count, _serve, _wait  # noqa: E402

pytestmark = pytest.mark.soak


def test_soak_continuous_ingest_with_crashes(broker, topic, tmp_path):
    seconds = float(os.environ.get("SPONGE_SOAK_SECONDS", "600"))
    store_path = tmp_path / "store"
    expected: set[str] = set()
    proc = _serve(broker, topic, store_path, tmp_path / "serve.log")
    rss: list[int] = []
    deadline, wave, next_kill = time.monotonic() + seconds, 0, time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            expected |= produce(broker, topic, 5000, seed=1000 + wave, synthetic=SyntheticConfig())["good_ids"]
            wave += 1
            rss.append(psutil.Process(proc.pid).memory_info().rss)
            if time.monotonic() > next_kill:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                proc = _serve(broker, topic, store_path, tmp_path / "serve.log")
                next_kill = time.monotonic() + 60
            time.sleep(1.0)
        _wait(lambda: _count(store_path) == len(expected), 300, "the stream drained")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    _assert_exactly(store_path, expected)
    tail = rss[len(rss) // 4:]
    assert max(tail) < 2 * min(tail) + (256 << 20), f"RSS grew: {[r >> 20 for r in rss]} MiB"
