"""Talk to a running sponge service from a training script: the replay contract over HTTP + Kafka.

    from sponge.client import ServiceReplaySource
    source = ServiceReplaySource("http://127.0.0.1:8765", bootstrap_servers="127.0.0.1:9092")
    version = source.register("my-run-1", tokenizer_fingerprint(tokenizer))
    source.send(rollouts)              # → Kafka → the service's store (fresh rollouts)
    source.report_version(version + 1) # → retention, once the rollouts sent have arrived
    table = source.candidates(version + 1, unit="group")   # waits (bounded) for what it sent

`ServiceReplaySource` implements `sponge.contract.ReplaySource`, so sponge's trainer and the
TRL/TorchRL adapters use it like any in-process pool. Rollouts sent without an embedding get a
cheap one here (`sponge.features`: hashed token n-grams), so the service need not run its text
embedder on the trainer's hot path. It counts the rollouts it sends per policy
version and tells the service, so retention never retires a version whose rollouts are still on
their way, and a candidates request waits until they have arrived (read-your-writes), at most
`wait_s`; past that it goes on with what is there, logs a warning and counts `incomplete_draws`.
By default the wait covers every version of the window but the newest (unless it is the only one, or
the older ones leave nothing to draw): that version's rollouts were sent a moment ago, so waiting
for them would put the service's store-and-select latency on the trainer's step; they join the draw
as far as they have landed, and the next draw waits for them (`wait_newest=True` waits for them
too: strict read-your-writes).
The wait overlaps the trainer's own work: a version report, and then the candidates for that
version, go out on background threads while the trainer generates its next batch (it asks for them
after generating); an error of either is raised by the trainer's next call to this source.
When the trainer asks before those candidates have come (a report and a fetch take ~0.1 s, a tiny
model steps in ~0.3 s on a loaded 2-core machine), it gets the newest draw that has come, if that was
computed for a version at most `max_lag` behind; the draw being computed is kept for the next ask.
The trainer then waits on the service only for its first draw, the first after `clear`, and when the
service falls more than `max_lag` versions behind; the price is replay up to `max_lag` versions
staler than the window says (`max_lag=0`: always wait).

`ServiceClient` is the plain HTTP API (runs, candidates, legacy samples, SQL, removal).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sponge.contract import Unit
from sponge.features import with_embeddings

__all__ = ["ServiceClient", "ServiceError", "ServiceReplaySource"]

log = logging.getLogger("sponge.client")


class ServiceError(RuntimeError):
    """The service answered with an error; the message is the service's own."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ServiceClient:
    """The service's HTTP API, one method per route."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise ServiceError(f"{response.request.method} {response.request.url.path}: "
                               f"{response.status_code} {detail}", response.status_code)
        return response

    def ready(self) -> dict:
        return self._check(self._http.get("/readyz")).json()

    # -- runs ----------------------------------------------------------------------------------------
    def register_run(self, run_id: str, fingerprint: str = "", window: int | None = None) -> dict:
        body: dict[str, Any] = {"run_id": run_id, "fingerprint": fingerprint}
        if window is not None:
            body["window"] = int(window)
        return self._check(self._http.post("/runs", json=body)).json()

    def runs(self) -> list[dict]:
        return self._check(self._http.get("/runs")).json()["runs"]

    def run(self, run_id: str) -> dict:
        return self._check(self._http.get(f"/runs/{run_id}")).json()

    def delete_run(self, run_id: str) -> dict:
        return self._check(self._http.delete(f"/runs/{run_id}")).json()

    def report_version(self, run_id: str, version: int, sent: dict[int, int] | None = None) -> dict:
        body: dict[str, Any] = {"policy_version": int(version)}
        if sent:
            body["sent"] = {str(v): int(n) for v, n in sent.items()}
        return self._check(self._http.post(f"/runs/{run_id}/version", json=body)).json()

    def flush(self, run_id: str) -> None:
        """Ask the service to ingest and curate what has queued now (rollouts just sent)."""
        self._check(self._http.post(f"/runs/{run_id}/flush"))

    def candidates(self, run_id: str, version: int, unit: Unit = "group", expect: dict[int, int] | None = None,
                   wait_s: float = 0.0) -> tuple[pa.Table, dict]:
        """(candidate table, {"complete", "missing", "waited_s"}) for the run's trainer at `version`."""
        body: dict[str, Any] = {"version": int(version), "unit": unit, "wait_s": float(wait_s)}
        if expect:
            body["expect"] = {str(v): int(n) for v, n in expect.items()}
        response = self._check(self._http.post(f"/runs/{run_id}/candidates", json=body,
                                               timeout=self._http.timeout.read + wait_s))
        missing = response.headers.get("x-sponge-missing", "")
        info = {"complete": response.headers.get("x-sponge-complete") == "true",
                "missing": {int(v): int(n) for v, n in (p.split(":") for p in missing.split(",") if p)},
                "waited_s": float(response.headers.get("x-sponge-waited-s", "0")),
                "compute_s": float(response.headers.get("x-sponge-compute-s", "0"))}
        return _read_arrow(response.content), info

    # -- the rest of the API ------------------------------------------------------------------------
    def sample(self, n: int = 256, weighting: str = "uniform", seed: int | None = None,
               run: str | None = None) -> pa.Table:
        params: dict[str, Any] = {"n": n, "weighting": weighting}
        if seed is not None:
            params["seed"] = seed
        if run is not None:
            params["run"] = run
        return _read_arrow(self._check(self._http.get("/replay/sample", params=params)).content)

    def subset(self, run: str | None = None) -> pa.Table:
        params = {"format": "arrow", **({"run": run} if run is not None else {})}
        return _read_arrow(self._check(self._http.get("/replay/subset", params=params)).content)

    def sql(self, query: str, max_rows: int = 1000, timeout_s: float = 5.0) -> pa.Table:
        body = {"query": query, "max_rows": max_rows, "timeout_s": timeout_s, "format": "arrow"}
        return _read_arrow(self._check(self._http.post("/sql", json=body)).content)

    def report_policy_version(self, version: int, run: str | None = None) -> dict:
        """Legacy: the only live run's version (use `report_version` with a run id)."""
        return self._check(self._http.post("/policy", json={"policy_version": int(version), "run_id": run})).json()

    def remove(self, rollout_ids: list[str], reason: str = "explicit") -> dict:
        """Tombstone rollouts: {"removed": n, "unknown": [ids the store does not hold], ...}."""
        body = {"rollout_ids": list(rollout_ids), "reason": reason}
        return self._check(self._http.post("/rollouts/remove", json=body)).json()

    def close(self) -> None:
        self._http.close()


class ServiceReplaySource:
    """`sponge.contract.ReplaySource` backed by a sponge service: Kafka in, HTTP out.

    Args:
        url: the service's HTTP address (`sponge serve` prints it).
        bootstrap_servers: Kafka, for `send` (or pass `producer`, anything with send(table) and flush()).
        topic: the topic the service ingests.
        window: the run's replay and retention window in policy versions (None: the service's default).
        wait_s: how long `candidates` waits for the rollouts this source sent (read-your-writes).
        wait_newest: whether that wait also covers the newest version of the window, sent during the
            trainer's last step (True: every draw holds all it sent; False, the default: the trainer
            waits for the rollouts it has just sent only when the older versions of the window leave
            nothing to draw).
        max_lag: when the candidates for the trainer's version are still being computed, take the
            newest that have come if computed for a version at most this many behind (their rows then
            up to window + max_lag versions old); 0 always waits for the current version's.
        token: the service's bearer token, if it has one.
    """

    def __init__(self, url: str, bootstrap_servers: str | None = None, topic: str = "rollouts", *,
                 window: int | None = None, wait_s: float = 30.0, wait_newest: bool = False,
                 max_lag: int = 1, token: str | None = None, producer: Any = None,
                 client: ServiceClient | None = None) -> None:
        self.client = client or ServiceClient(url, token=token)
        if producer is None:
            if bootstrap_servers is None:
                raise ValueError("pass bootstrap_servers (the Kafka the service reads) or a producer")
            from sponge.streams.producer import RolloutProducer

            producer = RolloutProducer(bootstrap_servers, topic)
        self.producer = producer
        if isinstance(max_lag, bool) or not isinstance(max_lag, int) or max_lag < 0:
            raise ValueError(f"max_lag must be an integer >= 0 (policy versions), got {max_lag!r}")
        self.window, self.wait_s, self.wait_newest, self.max_lag = window, wait_s, wait_newest, max_lag
        self.run_id: str | None = None
        self.embedding_dim = 0
        self.fingerprint = ""
        self.version = 0                     # the version last registered or reported
        self.since = 0                       # clear(): candidates only from versions >= this
        self.sent: Counter = Counter()          # rollouts sent per policy version
        self.incomplete_draws = 0
        self.lagged_draws = 0                # draws computed for an older version (max_lag)
        self.last_draw: dict = {}
        #: report versions and fetch the next candidates on a background thread (see the module docstring)
        self.background = True
        self._unit: Unit = "group"                # the unit the trainer last asked for
        self._asked = False                       # the trainer asked for candidates since the last report
        self._executor: ThreadPoolExecutor | None = None
        self._background: list[Future] = []       # pushes and version reports in flight
        self._producer_lock = threading.Lock()    # the producer is shared with the background thread
        self._fetcher: ThreadPoolExecutor | None = None     # candidates fetches, one at a time
        self._pending: tuple[tuple, Future] | None = None   # ((version, unit), candidates being fetched)
        self._bypassed: tuple[tuple, Future] | None = None  # the last pending a lagged draw stood in for
        self._latest: tuple[int, Unit, pa.Table, dict] | None = None   # the newest fetch that came
        self._latest_lock = threading.Lock()

    # -- the contract --------------------------------------------------------------------------------
    def register(self, run_id: str, fingerprint: str) -> int:
        answer = self.client.register_run(run_id, fingerprint, self.window)
        self.run_id, self.fingerprint, self.window = run_id, fingerprint, answer["window"]
        self.version = int(answer["policy_version"])
        self.embedding_dim = int(answer["embedding_dim"])
        if not answer["created"]:
            log.info("resuming run %s at policy version %d", run_id, answer["policy_version"])
        return int(answer["policy_version"])

    def send(self, rollouts: pa.Table) -> None:
        self._registered()
        self._reap()
        run_ids = rollouts.column("run_id")
        if run_ids.null_count or not pc.all(pc.equal(run_ids, self.run_id)).as_py():
            raise ValueError(f"rollouts sent through this source must carry run_id {self.run_id!r}")
        versions, counts = np.unique(rollouts.column("policy_version").to_numpy(), return_counts=True)
        self.sent.update(dict(zip(versions.tolist(), counts.tolist())))
        if self.background:   # embedded, encoded and on their way while the trainer updates
            self._submit(self._push, rollouts)
        else:
            self._produce(rollouts)

    def _produce(self, rollouts: pa.Table) -> None:
        table = with_embeddings(rollouts, self.embedding_dim)
        with self._producer_lock:
            self.producer.send(table)

    def _push(self, rollouts: pa.Table) -> None:
        self._produce(rollouts)
        self._flush_producer()
        self.client.flush(self.run_id)

    def _flush_producer(self) -> None:
        with self._producer_lock:
            self.producer.flush()

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            # two threads: a push of fresh rollouts never queues behind a version report
            self._executor = ThreadPoolExecutor(2, thread_name_prefix="sponge-source")
        return self._executor

    def _submit(self, fn, *args) -> Future:
        self._reap()
        future = self._pool().submit(fn, *args)
        self._background.append(future)
        return future

    def _reap(self) -> None:
        """Forget finished background work, raising the first error it ended with."""
        done = [f for f in self._background if f.done()]
        self._background = [f for f in self._background if not f.done()]
        for future in done:
            future.result()

    def report_version(self, version: int) -> None:
        self._registered()
        self._settle()
        low = version - self.window if self.window is not None else min(self.sent, default=version)
        for v in [v for v in self.sent if v < low - 1]:
            del self.sent[v]    # retired for good: nothing will ever wait for them again
        sent = dict(self.sent)
        self.version = version
        if not self.background:
            self._send_report(version, sent)
            return
        report = self._submit(self._send_report, version, sent)
        if self._asked:   # the trainer will ask for these after its next generation
            if self._pending is not None:
                self._pending[1].cancel()   # an older version's, not started: nobody will ask for it
            if self._fetcher is None:
                self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="sponge-candidates")
            # after the report: its retention moves the run's selection onto the new window first
            self._pending = ((version, self._unit),
                             self._fetcher.submit(self._fetch_after, report, version, self._unit, dict(self.sent)))
        self._asked = False

    def _send_report(self, version: int, sent: dict[int, int]) -> None:
        self._flush_producer()   # what it says it sent must be on its way, not in a local buffer
        self.client.report_version(self.run_id, version, sent)

    def _settle(self) -> None:
        """Wait for the background pushes and reports, raising an error one ended with."""
        background, self._background = self._background, []
        for future in background:
            future.result()

    def candidates(self, version: int, unit: Unit = "group") -> pa.Table:
        self._registered()
        self._unit, self._asked = unit, True
        pending, self._pending = self._pending, None
        lagged = None
        if pending is not None and pending[0] == (version, unit) and not pending[1].done() and self.max_lag:
            lagged = self._lagged(version, unit)   # the pending fetch goes on: it is the next one's
            earlier, self._bypassed = self._bypassed, pending
            if lagged is None and earlier is not None and not earlier[1].done():
                # The fetch bypassed last time still runs, ahead of this one: it comes first.
                earlier[1].exception()
                lagged = self._lagged(version, unit)
        if lagged is not None:
            table, info = lagged
            self.lagged_draws += 1
            via = "lagged"
        elif pending is not None and pending[0] == (version, unit):
            table, info = pending[1].result()
            via = "prefetched"
        else:
            self._settle()   # a fresh fetch: the report before it must have landed
            table, info = self._fetch(version, unit, dict(self.sent))
            via = "fetched"
        self.last_draw = dict(info, via=via)
        if self.since and table.num_rows:
            table = table.filter(pc.greater_equal(table.column("policy_version"), self.since))
        if not info["complete"]:
            self.incomplete_draws += 1
            log.warning("run %s: replay candidates at version %d came after %.1f s without %d of the rollouts "
                        "this trainer sent (per version: %s); going on with what the service has",
                        self.run_id, version, info["waited_s"], sum(info["missing"].values()), info["missing"])
        return table

    def _lagged(self, version: int, unit: Unit) -> tuple[pa.Table, dict] | None:
        """The newest candidates that came, if computed for a version at most `max_lag` behind
        (None when there are none, or none since `clear`)."""
        with self._latest_lock:
            latest = self._latest
        if latest is None or latest[1] != unit or not version - self.max_lag <= latest[0] < version:
            return None
        table = latest[2]   # its own window: replay up to `max_lag` versions older than the window allows
        if self.since and table.num_rows:
            table = table.filter(pc.greater_equal(table.column("policy_version"), self.since))
        if table.num_rows == 0:
            return None
        return table, dict(latest[3], lag=version - latest[0])

    def _fetch_after(self, report: Future, version: int, unit: Unit, sent: dict[int, int]) -> tuple[pa.Table, dict]:
        t0 = time.perf_counter()
        report.result()
        waited = time.perf_counter() - t0
        table, info = self._fetch(version, unit, sent)
        info["report_wait_s"] = waited
        return table, info

    def _fetch(self, version: int, unit: Unit, sent: dict[int, int]) -> tuple[pa.Table, dict]:
        """Candidates at `version`, waiting (bounded) for the rollouts this source sent in the window
        (all of them with `wait_newest`; else all but the newest version's)."""
        t0 = time.perf_counter()
        self._flush_producer()
        low = max(version - self.window if self.window is not None else 0, self.since)
        window = [v for v in sent if low <= v < version]
        expect_all = {v: sent[v] for v in window}
        if self.wait_newest or len(window) < 2:
            table, info = self.client.candidates(self.run_id, version, unit, expect_all,
                                                 self.wait_s if expect_all else 0.0)
        else:
            # The newest version was sent during the trainer's last step: it joins as far as it has landed.
            expect = {v: n for v, n in expect_all.items() if v != max(window)}
            table, info = self.client.candidates(self.run_id, version, unit, expect, self.wait_s)
            if table.num_rows == 0:   # nothing to draw from the older versions: wait for the newest after all
                table, info = self.client.candidates(self.run_id, version, unit, expect_all, self.wait_s)
        info["fetch_s"] = time.perf_counter() - t0   # the HTTP round trips, the service's wait and work
        with self._latest_lock:
            if self._latest is None or version >= self._latest[0]:
                self._latest = (version, unit, table, info)
        return table, info

    def clear(self) -> None:
        """Forget what was sent so far: candidates come only from rollouts of this version on (the
        service keeps everything for SQL and other consumers)."""
        self.since = self.version

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "fingerprint": self.fingerprint, "window": self.window,
                "embedding_dim": self.embedding_dim,
                "since": self.since, "version": self.version,
                "sent": {str(v): n for v, n in self.sent.items()},
                "incomplete_draws": self.incomplete_draws, "lagged_draws": self.lagged_draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id, self.fingerprint = state["run_id"], state["fingerprint"]
        self.embedding_dim = int(state.get("embedding_dim", self.embedding_dim))
        self.window, self.since = state["window"], int(state.get("since", 0))
        self.version = int(state.get("version", self.version))
        self.sent = Counter({int(v): int(n) for v, n in state["sent"].items()})
        self.incomplete_draws = int(state.get("incomplete_draws", 0))
        self.lagged_draws = int(state.get("lagged_draws", 0))

    # -- housekeeping --------------------------------------------------------------------------------
    def _registered(self) -> None:
        if self.run_id is None:
            raise RuntimeError("register(run_id, fingerprint) first: the service keeps runs apart")

    def close(self) -> None:
        try:
            if self._fetcher is not None:     # candidates nobody will ask for; the last report still goes out
                self._fetcher.shutdown(wait=False, cancel_futures=True)
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            background, self._background = self._background, []
            for future in background:
                future.result()
            self.producer.close()
        finally:
            self.client.close()


def _read_arrow(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(payload).read_all()
