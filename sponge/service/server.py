"""`sponge serve`: one process that ingests, curates and serves replay.

It composes the pieces, each usable alone:

    IngestService  (Kafka → validated Parquet segments, exactly once by rollout_id)
      └─ embed_missing: rollouts that arrive without an embedding get one (all-MiniLM-L6-v2)
      └─ on_segment → CurationWorker (own thread, bounded queue) → Curator.add (the dynamic
         selector keeps the replay subset current without holding up ingest)
    Curator        (retention on policy-version reports, removal, snapshots, replay samples)
    ApiServer      (HTTP: health, readiness, metrics, replay as Arrow, SQL, policy, removal)

On start the curator is rebuilt from the store (its state is derived), then the HTTP API
reports ready and the ingest loop runs until SIGTERM/SIGINT or `stop_event`, when it
flushes, commits and closes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sponge.service import ingest
from sponge.service.api import ApiConfig, ApiServer, create_app
from sponge.service.curation import SELECTION_COLUMNS, CurationConfig, Curator
from sponge.store.delta import DeltaStoreConfig
from sponge.service.worker import CurationWorker

HELP = "run the service: ingest rollouts from Kafka, curate the replay subset, serve it over HTTP"

log = logging.getLogger("sponge.server")


@dataclass
class ServerConfig:
    """The service's configuration: one section per part."""

    ingest: ingest.IngestConfig = field(default_factory=ingest.IngestConfig)
    store: DeltaStoreConfig = field(default_factory=DeltaStoreConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    #: Keep a dynamic selector over the stored rollouts (off: plain ingest + SQL).
    selection: bool = True
    #: Compute an embedding for rollouts that arrive without one.
    embed_missing: bool = field(default=True, metadata={"alias": "embed"})
    #: Local sentence-embedding model; None = the bundled all-MiniLM-L6-v2.
    embedding_model: str | None = None
    #: Rewrite segments without tombstoned rows, and delete retired policy versions' files, this
    #: often (seconds; 0 = never). Retention and removal hide rows at once; compaction reclaims
    #: their disk space later.
    compact_interval_s: float = 300.0
    #: glibc malloc arenas for this process (None or 0: glibc's default, 8 per core). With the
    #: default, each of the service's threads grows a heap of its own that fragments: in an hour
    #: at 500 rollouts/s RSS crept 0.5 MiB/min with Python's own memory flat; with 2 a 20-minute
    #: soak's RSS was flat (see the README's soak figures).
    malloc_arenas: int | None = 2


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas for this process (mallopt M_ARENA_MAX); False where there is no
    glibc. Arenas that exist stay; call it before the threads start."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_arena_max = -8   # <malloc.h>
    return bool(mallopt(m_arena_max, int(arenas)))


class MissingEmbeddings:
    """Fills null embeddings from the prompt and response text, one batched forward pass per segment."""

    def __init__(self, model_path: str | None, dim: int) -> None:
        self.model_path, self.dim = model_path, dim
        self._embedder = None  # loaded on first use: a stream that carries embeddings never pays for it

    @property
    def embedder(self):
        if self._embedder is None:
            from sponge.service.embedder import EmbedderConfig, TextEmbedder

            embedder = TextEmbedder(EmbedderConfig(model_path=self.model_path))
            if embedder.dim != self.dim:
                raise ValueError(f"embedding model gives {embedder.dim}-d vectors but the store holds {self.dim}-d")
            self._embedder = embedder
        return self._embedder

    def warm_up(self) -> None:
        """Load the model and run one batch through it (the first call pays for lazy initialisation)."""
        self.embedder.embed(["warm up"])

    def __call__(self, rows: pa.Table) -> pa.Table:
        if rows.column("embedding").null_count == 0:
            return rows   # the common case: the producer sent embeddings (no copy of the column)
        column = rows.column("embedding").combine_chunks()
        missing = pc.is_null(column).to_numpy(zero_copy_only=False)
        if not missing.any():
            return rows
        idx = np.flatnonzero(missing)
        texts = pc.binary_join_element_wise(
            pc.take(rows.column("prompt"), idx), pc.take(rows.column("response"), idx), "\n").to_pylist()
        filled = np.zeros((rows.num_rows, self.dim), dtype=np.float32)
        have = ~missing
        if have.any():
            filled[have] = pc.list_flatten(column.filter(pa.array(have))).to_numpy(
                zero_copy_only=False).reshape(-1, self.dim)
        filled[idx] = self.embedder.embed(texts)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(filled.reshape(-1)), self.dim)
        return rows.set_column(rows.schema.get_field_index("embedding"),
                               rows.schema.field("embedding"), embedding)


class Readiness(threading.Event):
    """What /readyz answers. The flag is set once the service has started (cleared while the
    curator is unhealthy, and on close); ready also needs ingest to report no fault (broker
    reachable, dead letters acknowledged, topics there). `reason()` says why not ready."""

    def __init__(self, ingest_health: Callable[[], str | None]) -> None:
        super().__init__()
        self._ingest_health = ingest_health
        self.cause = "starting"   # why the flag is clear

    def is_set(self) -> bool:
        return super().is_set() and self._ingest_health() is None

    def reason(self) -> str | None:
        return self._ingest_health() or (None if super().is_set() else self.cause)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if not super().wait(0.2 if left is None else min(0.2, left)):
                continue
            time.sleep(0.05 if left is None else min(0.05, max(0.0, left)))   # flag set, ingest not yet healthy
        return True


class CurationMetrics:
    """The curator's figures in /metrics, read from it at each scrape: per run its policy version,
    live rollouts, subset value, refusals per reason and incomplete draws (a custom collector, so
    a deleted run's series go away with it)."""

    def __init__(self, registry, curator: Curator) -> None:
        self.curator = curator
        registry.register(self)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        version = GaugeMetricFamily("sponge_run_policy_version", "Latest policy version the run reported",
                                    labels=["run"])
        live = GaugeMetricFamily("sponge_run_live_rollouts", "Rollouts in the run's selector", labels=["run"])
        objective = GaugeMetricFamily("sponge_run_selection_objective", "f(the run's replay subset)",
                                      labels=["run"])
        selection = GaugeMetricFamily("sponge_run_selection_version", "Bumps whenever the run's subset changes",
                                      labels=["run"])
        refused = CounterMetricFamily("sponge_run_refused_rollouts", "Rollouts of the run refused or not "
                                      "curated, by reason", labels=["run", "reason"])
        incomplete = CounterMetricFamily("sponge_run_incomplete_draws", "Candidate requests that ended "
                                         "before the trainer's own rollouts had all arrived", labels=["run"])
        uncurated = CounterMetricFamily("sponge_uncurated_rollouts", "Rollouts stored but not curated "
                                        "(run cap, deleted run), by run:reason", labels=["key"])
        for run in self.curator.runs():
            r = run["run_id"]
            version.add_metric([r], run["policy_version"])
            live.add_metric([r], run["n_live"])
            objective.add_metric([r], run["objective_value"])
            selection.add_metric([r], run["selection_version"])
            incomplete.add_metric([r], run["incomplete_draws"])
            for reason, n in run["refused"].items():
                refused.add_metric([r, reason], n)
        for key, n in self.curator.uncurated.items():
            uncurated.add_metric([key], n)
        yield from (version, live, objective, selection, refused, incomplete, uncurated)


class CurationServer:
    """Ingest + curation + HTTP in one process; `run(stop_event)` until stopped."""

    def __init__(self, config: ServerConfig) -> None:
        from sponge.store import RolloutStore

        if config.malloc_arenas:
            limit_malloc_arenas(config.malloc_arenas)
        self.config = config
        self.store = RolloutStore(config.ingest.store_path, embedding_dim=config.ingest.embedding_dim,
                                  config=config.store)
        self.curator = Curator(self.store, config.curation) if config.selection else None
        enrich = MissingEmbeddings(config.embedding_model, config.ingest.embedding_dim) \
            if config.embed_missing else None
        self.ingest = ingest.IngestService(
            config.ingest, store=self.store, enrich=enrich,
            on_segment=self._on_segment if self.curator is not None else None,
            on_assign=self._on_assign if self.curator is not None and config.curation.shard else None)
        self.worker = CurationWorker(self.curator, on_health=self._curator_health,
                                     batch_rows=config.curation.batch_rows,
                                     batch_wait_s=config.curation.batch_wait_s) if self.curator else None
        self.curation_metrics = CurationMetrics(self.ingest.metrics.registry, self.curator) if self.curator else None
        if self.curator is not None:
            self.curator.on_wait = self._hurry
        self.enrich = enrich
        self.ready = Readiness(self.ingest.health)
        self._worker_started = False   # close() after a failed start must not join a thread never started
        self._last_compaction = time.monotonic()
        self._compaction: threading.Thread | None = None
        app = create_app(self.store, self.curator, config.api,
                         metrics_text=self._metrics_text, ready=self.ready)
        self.http = ApiServer(app, config.api)

    def _maybe_compact(self) -> None:
        """Start a compaction on its own thread when one is due (ingest never waits for it)."""
        interval = self.config.compact_interval_s
        now = time.monotonic()
        if interval <= 0 or now - self._last_compaction < interval:
            return
        if self._compaction is not None and self._compaction.is_alive():
            return
        self._last_compaction = now
        self._compaction = threading.Thread(target=self._compact, name="sponge-compaction", daemon=True)
        self._compaction.start()

    def _compact(self) -> None:
        t0 = time.monotonic()
        try:
            # Files change under the curator's lock: its queries list segment files and must not
            # see one vanish. compact() holds it only while files change, not while it searches.
            result = self.store.compact(guard=self.curator.lock if self.curator is not None else None)
        except Exception as exc:  # noqa: BLE001 - disk housekeeping must never stop ingest
            ingest.log_event(logging.ERROR, "compaction failed; will retry", error=repr(exc))
            return
        if result.segments_rewritten or result.segments_removed:
            ingest.log_event(logging.INFO, "compacted", seconds=round(time.monotonic() - t0, 3),
                          rows_removed=result.rows_removed, segments_rewritten=result.segments_rewritten,
                          segments_removed=result.segments_removed,
                          bytes_freed=result.bytes_before - result.bytes_after)

    def _on_segment(self, write, rows: pa.Table) -> None:
        self.curator.count_refused(write)
        self.curator.remember(rows)      # the replay columns of recent versions, for candidates
        self.worker.submit(rows.select(SELECTION_COLUMNS))   # zero-copy; the queue holds no text

    def _hurry(self) -> None:
        """A trainer waits for its own rollouts: flush what ingest buffers and hand queued rows to
        selection now, not at their flush/batch deadlines."""
        self.ingest.request_flush()
        self.worker.kick()

    def _on_assign(self, partitions: set[int]) -> None:
        """Shard mode: after a rebalance, finish queued work, then rebuild over the owned partitions."""
        self.worker.drain()
        seconds = self.curator.set_partitions(partitions)
        ingest.log_event(logging.INFO, "shard selector rebuilt", shard=self.config.curation.shard,
                      partitions=sorted(partitions), seconds=round(seconds, 3))

    def _curator_health(self, healthy: bool) -> None:
        self.ready.cause = "curator unhealthy (selector being rebuilt)"
        (self.ready.set if healthy else self.ready.clear)()

    def _metrics_text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST

        return self.ingest.metrics.render(), CONTENT_TYPE_LATEST

    def start(self, stop_event: threading.Event | None = None) -> CurationServer:
        self.http.start()
        ingest.log_event(logging.INFO, "http", url=self.http.url)
        if self.enrich is not None:
            # Loaded and warmed now, before /readyz: loaded on the first rollout without an embedding
            # it held up that flush (36 s seen on a loaded machine) while trainers raced ahead.
            t0 = time.monotonic()
            self.enrich.warm_up()
            ingest.log_event(logging.INFO, "embedder ready", seconds=round(time.monotonic() - t0, 3))
        if self.curator is not None:
            seconds = self.curator.rebuild()
            ingest.log_event(logging.INFO, "selector rebuilt", seconds=round(seconds, 3),
                          rollouts=self.curator.describe()["n_live"])
            self.worker.start()
            self._worker_started = True
            self.curator.ingest_started()
        self.ingest.start(stop_event)   # waits for the broker (up to broker_wait_s) with /readyz false
        self.ready.set()
        return self

    def run(self, stop_event: threading.Event | None = None) -> ingest.IngestTotals:
        stop_event = stop_event or threading.Event()
        try:
            self.start(stop_event)
            while not stop_event.is_set():
                self.ingest.poll_once()
                self._maybe_compact()
        finally:
            self.close()
        return self.ingest.totals

    def close(self) -> None:
        self.ready.cause = "stopping"
        self.ready.clear()
        if self._compaction is not None:
            self._compaction.join()
        try:
            self.ingest.close()
        finally:
            try:
                if self.worker is not None and self._worker_started:
                    self.worker.stop()
                    self.curator.snapshot()
            finally:
                self.http.stop()
                if self.curator is not None:
                    self.curator.close()


@contextmanager
def serve_in_thread(config: ServerConfig, ready_timeout_s: float = 180.0) -> Iterator[CurationServer]:
    """Run the service on a thread of this process until the block ends (a notebook, a test, the demo):

        with serve_in_thread(ServerConfig(api=ApiConfig(port=0))) as server:
            client = ServiceClient(server.http.url)

    Waits until the service is ready (raises if it is not within `ready_timeout_s`); on leaving it
    flushes, commits and stops, and raises if it did not stop within a minute."""
    server = CurationServer(config)
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            failure.append(exc)

    thread = threading.Thread(target=run, name="sponge-service", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not server.ready.wait(0.2):
            if failure:
                raise failure[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service was not ready within {ready_timeout_s:g} s: {server.ready.reason()}")
        yield server
    finally:
        stop.set()
        thread.join(timeout=60)
    if thread.is_alive():
        raise RuntimeError("the service did not stop within 60 s of its stop event")
    if failure:
        raise failure[0]


# ---- command line --------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sponge.config import add_flags

    parser.description = (HELP + ". Every knob of every section is a flag, a SPONGE_* environment variable "
                          "and a key of the --config file (flags win, then the environment, then the file).")
    add_flags(parser, ServerConfig)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    from sponge.config import load

    return load(ServerConfig, args)


def run(args: argparse.Namespace) -> int:
    from sponge.store import StoreError

    try:
        config = config_from_args(args)
    except (ValueError, OSError) as exc:   # a bad flag value, config file or environment variable: final
        print(f"sponge serve: error: {exc}", file=sys.stderr, flush=True)
        return 2
    ingest.configure_json_logging(config.ingest.log_level)
    stop = threading.Event()

    def _stop(signum, _frame):
        ingest.log_event(logging.INFO, "signal received; flushing and stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        server = CurationServer(config)
    except (StoreError, ValueError) as exc:   # a store of another format, an unreadable mark: final
        print(f"sponge serve: error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        totals = server.run(stop)
    except (ingest.BrokerUnavailable, ingest.IngestConfigError) as exc:
        print(f"sponge serve: {exc}", file=sys.stderr, flush=True)   # one line, no traceback
        return ingest.exit_status(exc)
    print(json.dumps({"event": "totals", **dataclasses.asdict(totals)}), flush=True)
    return 0
