"""The curation worker (sponge.service.worker) over a real curator and store: batching, kicks, drains,
backpressure, and recovery from a curator failure without stopping its caller."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from helpers import wait_for

from sponge.service.curation import SELECTION_COLUMNS, CurationConfig, Curator
from sponge.store import RolloutStore
from sponge.service.worker import CurationWorker
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts

RUN = "synthetic"


@pytest.fixture
def curator(tmp_path):
    cur = Curator(RolloutStore(tmp_path / "store"), CurationConfig(k=8, n_references=32, selector_process=False))
    cur.rebuild()
    yield cur
    cur.close()


def stored(curator: Curator, n: int, seed: int, first: int = 0) -> pa.Table:
    """n rollouts written to the curator's store (durable, as ingest hands them over)."""
    rows = synthetic_rollouts(n, seed=seed, config=SyntheticConfig(response_tokens=20), id_prefix=f"w{seed}")
    curator.store.write_segment(rows, topic="rollouts", partition=0, offsets=np.arange(first, first + n),
                                first_offset=first, last_offset=first + n - 1)
    return rows.select(SELECTION_COLUMNS)


def live(curator: Curator) -> int:
    runs = curator.runs()
    return runs[0]["n_live"] if runs else 0


def test_small_submissions_wait_for_a_batch_then_go_in_together(curator):
    worker = CurationWorker(curator, batch_rows=10_000, batch_wait_s=0.6).start()
    try:
        t0 = time.monotonic()
        for i in range(3):
            worker.submit(stored(curator, 40, seed=i, first=100 * i))
        wait_for(lambda: live(curator) == 120, 30, "the three submissions in the selector")
        assert time.monotonic() - t0 >= 0.5          # held back until the oldest had waited batch_wait_s
        assert worker.batches == 1                   # ... and handed over as one batch
    finally:
        worker.stop()


def test_a_kick_hands_over_what_queues_next_without_the_wait(curator):
    worker = CurationWorker(curator, batch_rows=10_000, batch_wait_s=30.0).start()
    try:
        worker.submit(stored(curator, 40, seed=1))
        time.sleep(0.3)
        assert live(curator) == 0                    # held back: batch_wait_s is 30 s
        worker.kick()
        wait_for(lambda: live(curator) == 40, 10, "the queued rows after a kick")
        worker.submit(stored(curator, 40, seed=2, first=100))   # within the kick's window: straight in
        wait_for(lambda: live(curator) == 80, 10, "rows submitted just after the kick")
        assert worker.drain(10)
    finally:
        worker.stop()


def test_drain_returns_once_everything_is_inside_the_selector(curator):
    worker = CurationWorker(curator, batch_rows=10_000, batch_wait_s=30.0).start()
    try:
        worker.submit(stored(curator, 64, seed=3))
        assert worker.drain(30)
        assert live(curator) == 64 and worker.pending_rows == 0
    finally:
        worker.stop()


def test_submit_blocks_when_selection_falls_behind(curator):
    release = threading.Event()
    real_add = curator.add

    def slow_add(rows):
        release.wait(30)
        real_add(rows)

    curator.add = slow_add
    worker = CurationWorker(curator, max_pending_rows=50, batch_rows=1).start()
    try:
        worker.submit(stored(curator, 40, seed=4))            # taken by the worker, which now blocks
        wait_for(lambda: worker.pending_rows == 0, 10, "the first batch taken")
        worker.submit(stored(curator, 60, seed=5, first=100))  # queued: 60 >= the bound of 50
        blocked = threading.Thread(target=worker.submit, args=(stored(curator, 10, seed=6, first=200),))
        blocked.start()
        time.sleep(0.5)
        assert blocked.is_alive()                              # backpressure instead of memory growth
        release.set()
        blocked.join(30)
        assert not blocked.is_alive()
        assert worker.drain(30) and live(curator) == 110
    finally:
        release.set()
        worker.stop()


def test_a_curator_failure_marks_it_unhealthy_and_it_is_rebuilt_from_the_store(curator):
    """The one fault injected here (a curator that raises once) cannot be caused from outside."""
    health: list[bool] = []
    real_add = curator.add
    failures = {"left": 1}

    def failing_add(rows):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("injected: the selector broke")
        real_add(rows)

    curator.add = failing_add
    worker = CurationWorker(curator, batch_rows=1, retry_after_s=0.2, on_health=health.append).start()
    try:
        worker.submit(stored(curator, 30, seed=7))   # fails inside the worker; the caller never sees it
        wait_for(lambda: health[-2:] == [False, True], 30, "unhealthy, then rebuilt and healthy")
        assert live(curator) == 30                   # the rebuild read the rows from the store
        worker.submit(stored(curator, 20, seed=8, first=100))
        assert worker.drain(30) and live(curator) == 50
    finally:
        worker.stop()
