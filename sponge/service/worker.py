"""Runs the curator on a thread of its own, so ingest never waits for selection.

The ingest loop hands each durable segment's new rows to `submit`; the worker thread
coalesces what has queued into one batch and inserts it. It holds back until `batch_rows`
rows have queued or the oldest has waited `batch_wait_s`: a batch costs the dynamic selector
about one partial rebuild per instance whatever its size, so at 10^5 rollouts batches of ~20k
cost a third less per rollout than one flush's per-partition segments of ~5k. The queue is
bounded in rows: when selection falls that far behind, `submit` blocks, which slows ingest
instead of growing memory without bound.

A failure inside the curator never reaches ingest: the rows are already durable, so the
worker marks itself broken (the service reports not-ready), waits, and rebuilds the
selector from the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import pyarrow as pa

log = logging.getLogger("sponge.curation")


class CurationWorker:
    def __init__(self, curator, max_pending_rows: int = 100_000, retry_after_s: float = 5.0,
                 on_health=None, batch_rows: int = 1, batch_wait_s: float = 0.0) -> None:
        self.curator = curator
        self.max_pending_rows = max_pending_rows
        #: hold back until this many rows have queued ...
        self.batch_rows = batch_rows
        #: ... or the oldest queued rows have waited this long
        self.batch_wait_s = batch_wait_s
        self.retry_after_s = retry_after_s
        #: called with True/False when the curator becomes healthy/broken
        self.on_health = on_health
        self._queue: deque[pa.Table] = deque()
        self._pending_rows = 0
        self._oldest = 0.0         # when the oldest queued rows arrived
        self._draining = 0         # drain() callers waiting: hand everything over now
        self._kicked_until = 0.0   # kick(): until then, hand batches over without holding back
        self._busy = False
        self._cond = threading.Condition()
        self._stop = False
        self.broken_since: float | None = None
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name="sponge-curation", daemon=True)

    def start(self) -> CurationWorker:
        self._thread.start()
        return self

    def submit(self, rows: pa.Table) -> None:
        """Queue durable rows for selection; blocks while `max_pending_rows` are already queued."""
        with self._cond:
            while self._pending_rows >= self.max_pending_rows and not self._stop:
                self._cond.wait(0.1)
            if not self._queue:
                self._oldest = time.monotonic()
            self._queue.append(rows)
            self._pending_rows += rows.num_rows
            self._cond.notify_all()

    def kick(self) -> None:
        """Hand what queues in the next `batch_wait_s` to the curator at once instead of at its batch
        deadline (non-blocking): what a trainer waits for should go straight in."""
        with self._cond:
            self._kicked_until = time.monotonic() + max(self.batch_wait_s, 0.1)
            self._cond.notify_all()

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait until everything submitted is inside the selector; False on timeout or when the
        selector failed (the worker then rebuilds it from the store, as for any curator failure)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._draining += 1
            self._cond.notify_all()
            try:
                while self._queue or self._busy:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(min(remaining, 0.1))
            finally:
                self._draining -= 1
        try:
            self.curator.sync()   # a selector process applies what it was handed asynchronously
        except Exception:
            log.exception("the selector failed while draining; it will be rebuilt from the store")
            return False
        return True

    def stop(self, timeout_s: float = 60.0) -> None:
        """Finish what is queued, then end the thread."""
        self.drain(timeout_s)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._stop and self.broken_since is None:
                    self._cond.wait(0.5)
                while self._holding_back():
                    self._cond.wait(max(0.001, self._oldest + self.batch_wait_s - time.monotonic()))
                if self._stop and not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
                self._pending_rows = 0
                self._busy = True
                self._cond.notify_all()
            try:
                if self.broken_since is not None:
                    self._recover()        # the rebuild reads the store, which holds `batch` too
                elif batch:
                    self.curator.add(pa.concat_tables(batch, promote_options="default"))
                    self.batches += 1
                else:
                    self.curator.tick()   # idle: publish what the last batches changed
            except Exception:
                log.exception("curation failed; ingest goes on, the selector will be rebuilt from the store")
                self.broken_since = time.monotonic()
                if self.on_health is not None:
                    self.on_health(False)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _holding_back(self) -> bool:
        """Wait for a bigger batch? (never when stopping, draining or broken)"""
        return (bool(self._queue) and self._pending_rows < self.batch_rows and not self._stop
                and not self._draining and time.monotonic() >= self._kicked_until and self.broken_since is None
                and time.monotonic() - self._oldest < self.batch_wait_s)

    def _recover(self) -> None:
        wait = self.retry_after_s - (time.monotonic() - self.broken_since)
        if wait > 0:
            time.sleep(min(wait, 0.5))
            return
        seconds = self.curator.rebuild()
        log.warning("selector rebuilt after a failure in %.2fs", seconds)
        self.broken_since = None
        if self.on_health is not None:
            self.on_health(True)
