"""Curation: per run, keep the replay subset current as rollouts arrive, go stale and are removed,
and hand trainers their replay candidates.

The `Curator` composes, for every live run (`sponge.service.runs`):

- selection (`RunSelection`): the dynamic selector over the run's live rollouts;
- retention: the trainer's version reports retire the run's versions older than current − window
  (a range delete in the store). Retention never races the trainer's own rollouts: a report says how
  many rollouts of each version the trainer sent, and a version is retired only once they have all
  arrived (or `retention_grace_s` after the report, when the missing ones are counted as late);
- candidates: the groups (one prompt, one policy version) the run's selected rollouts belong to,
  whole, with GRPO advantages over each group and zero-variance groups left out; a trainer can wait,
  bounded, until everything it sent up to a version is in (read-your-writes);
- the subset's snapshot in the store (`replay_subset` view) and legacy weighted samples.

Runs appear when a trainer registers one (`register_run`) or when rollouts of an unknown run arrive
(up to `max_runs` live runs; beyond it they are stored and queryable, but not curated). Every
refusal is counted per run and reason. All state but the run registry is derived from the store:
`rebuild()` re-creates it after a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sponge.contract import CANDIDATE_COLUMNS
from sponge.store.idmap import RolloutIdSet
from sponge.service.recent import RecentRows
from sponge.service.runs import RunError, RunRecord, RunRegistry, check_run_id, check_version
from sponge.service.selection import SELECTION_COLUMNS, RunSelection, embedding_matrix, group_has_signal
from sponge.store import DEFAULT_RUN, Removal
from sponge.groups import with_group_columns
from sponge.selectors import METHODS
from sponge.selectors.process import SelectorHost

if TYPE_CHECKING:
    from sponge.store import RolloutStore, SegmentWrite

__all__ = ["SELECTION_COLUMNS", "Candidates", "CurationConfig", "Curator", "embedding_matrix",
           "group_has_signal"]

log = logging.getLogger("sponge.curation")


@dataclass
class CurationConfig:
    """Per-run selection, retention and replay candidates."""

    #: Size of each run's replay subset (rollouts the selector keeps; each pulls its group along).
    k: int = 64
    #: Approximation slack of the dynamic algorithm: f(S) >= (1/2 - eps) OPT; smaller eps, more instances.
    eps: float = 0.2
    #: Selection method: "dynamic" (default) or a baseline from sponge.selectors.METHODS.
    method: Literal["dynamic", "lazy_greedy", "sieve", "random"] = "dynamic"
    #: Reference vectors (facility-location clients): the run's first rollouts' embeddings.
    n_references: int = 256
    #: Selection starts once this many references exist; when the full n_references arrive the
    #: objective changes, so the selector is rebuilt once over the run's live rollouts.
    min_references: int = 16
    #: Each rollout covers only its m most similar references (one batched faiss search per insert).
    neighbours: int = 16
    #: Weight of the quality bonus (1 when the rollout's GRPO group has non-zero reward variance).
    quality_weight: float = 0.05
    #: Retention window of a run that does not say its own: keep versions >= current - window
    #: (None keeps everything).
    retention_window: int | None = 4
    #: Least time between two replay-subset snapshots written to the store.
    snapshot_interval_s: float = 1.0
    #: Seed of the selectors' own RNG.
    seed: int = 0
    #: Name of this process's shard when several services share one consumer group and store:
    #: each keeps a selector over its own partitions and a run's subset is greedy over the union
    #: of all shards' solutions. None = one selector per run over everything.
    shard: str | None = None
    #: Run the selectors in a child process (sponge.selectors.process): their CPU work then has a
    #: core and a GIL of its own instead of taking turns with ingest's decoding and Parquet writing.
    #: False keeps them in this process (cheaper to start; what a single-threaded script wants).
    selector_process: bool = True
    #: The selector takes new rollouts in batches of at least this many rows ...
    batch_rows: int = 16_384
    #: ... or of whatever has waited this long (the most a stored rollout waits to be selectable,
    #: unless a trainer waits for it: then at once).
    batch_wait_s: float = 1.0
    #: Most live runs (registered, not deleted). Rollouts of further runs are stored, not curated.
    max_runs: int = 16
    #: Most rollouts one run's selector holds (memory bound per run, ~5 KB each with 384-d
    #: embeddings); past it the oldest arrivals leave the selector (not the store).
    max_live_per_run: int = 200_000
    #: Largest step of a run's policy version in one report (a typo or a garbage value beyond
    #: it is refused with 400 instead of retiring everything); 0 = no bound.
    max_version_jump: int = 1_000_000
    #: Retention waits for rollouts the trainer said it sent at most this long after the report
    #: that would retire them; then it retires anyway and counts the missing ones as late.
    retention_grace_s: float = 120.0
    #: Longest a candidates request may wait for the trainer's own rollouts to arrive.
    max_wait_s: float = 60.0
    #: Most rows of a run's recent versions held in memory to answer candidates without a store
    #: read (sponge.service.recent; ~5 KB each with 300-token responses: tokens, log-probs, text),
    #: so at most ~80 MB per run; past it the oldest versions are read from the store. 0 = always
    #: read the store. Shards always read the store (a subset merged over shards names rows other
    #: processes stored).
    recent_rows: int = 16_384


@dataclass
class Candidates:
    """A run's replay candidates and whether they include everything the trainer asked to wait for."""

    table: pa.Table
    complete: bool
    #: per policy version, rollouts the trainer sent that had not arrived when the wait ended
    missing: dict[int, int]
    #: seconds spent waiting for the trainer's rollouts to arrive
    waited_s: float
    #: seconds spent after that: the curator's lock and computing the groups (0 when cached)
    compute_s: float = 0.0


@dataclass
class _Run:
    """What the curator keeps of one live run while it runs (all derived, or counters)."""

    record: RunRecord
    selection: RunSelection
    #: rollouts handed to selection, per policy version (read-your-writes counts these)
    arrived: Counter = field(default_factory=Counter)
    #: ids whose arrival was counted from the store when the run was first seen while ingest ran:
    #: those still queued for `add` must not be counted again there (None: nothing to skip)
    counted_from_store: RolloutIdSet | None = None
    #: rollouts the trainer said it sent, per policy version (from its version reports)
    expected: dict = field(default_factory=dict)
    #: refused or not curated, per reason
    refused: Counter = field(default_factory=Counter)
    #: retention the trainer asked for (current - window) and when; applied once its rollouts are in
    target_mark: int | None = None
    target_since: float = 0.0
    incomplete_draws: int = 0
    #: the run's rows of recent versions, for candidates (sponge.service.recent)
    recent: RecentRows = field(default_factory=lambda: RecentRows(0))
    candidate_cache: tuple | None = None
    subset_cache: tuple | None = None

    def count_arrivals(self, rows: pa.Table) -> dict[int, int]:
        """Per policy version, how many of `rows` (handed to `add`) are new arrivals."""
        if self.counted_from_store is not None:
            rows = rows.filter(pa.array(~self.counted_from_store.contains(rows.column("rollout_id"))))
        versions, counts = np.unique(rows.column("policy_version").to_numpy(), return_counts=True)
        return dict(zip(versions.tolist(), counts.tolist()))

    def forget_counted_below(self, mark: int) -> None:
        """Retention: ids of versions below `mark` can no longer arrive (the store refuses them)."""
        if self.counted_from_store is not None:
            self.counted_from_store.drop_below(0, mark)
            if len(self.counted_from_store) == 0:
                self.counted_from_store.close()
                self.counted_from_store = None

    def close(self) -> None:
        self.selection.close()
        if self.counted_from_store is not None:
            self.counted_from_store.close()
            self.counted_from_store = None


class Curator:
    """Per-run selection, retention and replay over a store; safe to call from ingest and HTTP threads."""

    def __init__(self, store: RolloutStore, config: CurationConfig | None = None) -> None:
        self.store = store
        self.config = config or CurationConfig()
        if self.config.method not in METHODS:
            raise ValueError(f"unknown selection method {self.config.method!r}; choose from {sorted(METHODS)}")
        if self.config.shard is not None and not self.config.shard.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"shard name must be letters, digits, '-' or '_', got {self.config.shard!r}")
        self.registry = RunRegistry(store)
        self._host = SelectorHost() if self.config.selector_process else None
        self._lock = threading.RLock()
        self._arrivals = threading.Condition()   # read-your-writes waiters; its own lock, not the curator's
        self._runs: dict[str, _Run] = {}
        self._removed_ids = RolloutIdSet()         # explicit removals, kept out of batches still queued
        self.partitions: set[int] | None = None   # shard mode: the partitions this process owns
        self.uncurated: Counter = Counter()        # rows of runs beyond the cap, per run
        self.rebuild_seconds: float | None = None
        #: runs with rows in the store at the last rebuild (None: no rebuild yet); a run outside it,
        #: unsharded and never refused for the cap, is fresh: all its stored rows come through `add`
        self._stored_runs: set[str] | None = None
        #: ingest runs (`ingest_started`, or stored rows were handed to `remember`): from then on rows
        #: the store holds may still be queued for `add`
        self._ingest_seen = False
        self._snapshot_seq = 0
        self._snapshot_versions: dict[str, int] = {}
        self._last_snapshot = 0.0
        self._closed = False
        self._at_close: dict | None = None   # describe() as it was when close() ended the selectors
        #: called (without locks held) when a trainer starts waiting for its rollouts: the server
        #: flushes ingest and hands queued rows to selection at once instead of at their deadlines
        self.on_wait = None

    @property
    def lock(self) -> threading.RLock:
        """Held by every curator operation; hold it to change the store's files under the curator."""
        return self._lock

    # -- runs ---------------------------------------------------------------------------------------
    def register_run(self, run_id: str, fingerprint: str = "", window: int | None = None) -> tuple[RunRecord, bool]:
        """Start (or resume) a run: (its record, whether it is new). A new run starts at version 0."""
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
            raise RunError(f"window must be an integer >= 0 (policy versions), got {window!r}")
        with self._lock:
            record, created = self.registry.register(
                run_id, fingerprint, self.config.retention_window if window is None else window,
                self.config.max_runs)
            self._ensure(run_id).record = record
            return record, created

    def delete_run(self, run_id: str) -> int:
        """Retire all of a run's data and forget its selection; returns how many rollouts went."""
        with self._lock:
            self.registry.delete(run_id)
            retired = self.store.retire_below(np.iinfo(np.int64).max, run=run_id)
            run = self._runs.pop(run_id, None)
            if run is not None:
                run.close()
            self._snapshot_versions.pop(run_id, None)
            return retired

    def runs(self) -> list[dict]:
        with self._lock:
            return [self.describe_run(r) for r in sorted(self.registry.live())]

    def resolve_run(self, run_id: str | None) -> str:
        """The run a request means: the one it names, or the only live run (`default` when none)."""
        if run_id is not None:
            return check_run_id(run_id)
        live = sorted(self.registry.live())
        if len(live) == 1:
            return live[0]
        if not live:
            return DEFAULT_RUN
        raise RunError(f"this service has {len(live)} runs ({', '.join(live[:8])}{', ...' if len(live) > 8 else ''}): "
                       "say which with ?run=<run_id>")

    def _ensure(self, run_id: str, progress: bool = False) -> _Run:
        """The live state of a registered run, created (and rebuilt from the store) on first use."""
        run = self._runs.get(run_id)
        if run is None:
            record = self.registry.get(run_id)
            if record is None or record.deleted:
                raise RunError(f"no live run {run_id!r}", status=404)
            fresh = (self._stored_runs is not None and run_id not in self._stored_runs
                     and self.config.shard is None and not self.uncurated[f"{run_id}:run_cap"])
            selection = RunSelection(run_id, self.store, self.config, self._host, self.partitions,
                                     self.config.shard, fresh=fresh)
            run = _Run(record, selection, recent=RecentRows(0 if self.config.shard else self.config.recent_rows))
            self._runs[run_id] = run   # from here on `remember` holds the run's new rows ...
            selection.rebuild(progress=progress)
            if fresh or not self._ingest_seen:
                counts = self.store.version_counts(run_id)   # ... so this read misses none of them
            else:   # rows stored and still queued for `add` are counted here: `add` must skip them
                counts = self._counted_from_store(run)
            run.recent.start(max(counts, default=None))
            if not fresh:   # a fresh run's stored rows all come through `add`, which counts them there
                with self._arrivals:   # what is already stored has arrived (after a restart, say)
                    run.arrived.update(counts)
        return run

    def _counted_from_store(self, run: _Run) -> dict[int, int]:
        """The run's stored rollouts per version, their ids kept so that `add` does not count again
        those still queued for it (ingest stores a row before the curation worker hands it over)."""
        stored = self.store.run_rollout_versions(run.record.run_id)
        values, which, counts = np.unique(stored.column("policy_version").to_numpy(), return_inverse=True,
                                          return_counts=True)
        if len(values):
            run.counted_from_store = RolloutIdSet()
            for i, v in enumerate(values.tolist()):   # one tag per version: retention drops them by version
                run.counted_from_store.add(stored.column("rollout_id").filter(pa.array(which == i)), version=v)
        return dict(zip(values.tolist(), counts.tolist()))

    def _run(self, run_id: str) -> _Run:
        """A live run's state, following a registry another process may have changed."""
        record = self.registry.get(run_id)
        if record is None:
            raise RunError(f"no run {run_id!r}: register it first (POST /runs)", status=404)
        if record.deleted:
            raise RunError(f"run {run_id!r} was deleted", status=410)
        run = self._ensure(run_id)
        run.record = record
        return run

    # -- building -----------------------------------------------------------------------------------
    def rebuild(self, progress: bool = False) -> float:
        """Rebuild every live run's selector from the store; returns the seconds it took."""
        t0 = time.perf_counter()
        with self._lock:
            if self._host is not None:
                self._host.start()   # now, not in the middle of the first batch after a restart
            for run in self._runs.values():
                run.close()
            self._runs = {}
            self._closed = False
            self._stored_runs = None   # while rebuilding, every run reads the store
            stored = set(self.store.run_ids())
            for run_id in sorted(self.registry.live()):
                self._ensure(run_id, progress=progress)
            for run_id in sorted(stored):   # stored rows of runs never registered (older stores)
                if self.registry.get(run_id) is None:
                    self._auto_register(run_id)
            self._stored_runs = stored
        self.rebuild_seconds = time.perf_counter() - t0
        return self.rebuild_seconds

    def set_partitions(self, partitions: set[int]) -> float:
        """Shard mode: this process now owns `partitions`; rebuild over their rollouts only."""
        with self._lock:
            self.partitions = set(partitions)
        return self.rebuild()

    def close(self) -> None:
        """End the selector process (if any); `rebuild` starts again."""
        with self._lock:
            if not self._closed:
                self._at_close = self.describe()
            for run in self._runs.values():
                run.close()
            if self._host is not None:
                self._host.close()
            self._closed = True

    @property
    def selector_pid(self) -> int | None:
        """The selectors' child process, None when they run in this process (or have not started)."""
        return self._host.pid if self._host is not None else None

    def selection(self, run_id: str) -> RunSelection:
        """A live run's selection (its selector, objective and id map), e.g. for a benchmark."""
        with self._lock:
            return self._run(run_id).selection

    def sync(self) -> None:
        """Wait until every selector has applied what it was handed; raises what any of them raised."""
        with self._lock:
            for run in self._runs.values():
                run.selection.sync()

    # -- arrivals ------------------------------------------------------------------------------------
    def count_refused(self, write: SegmentWrite) -> None:
        """Count what the store refused in one segment write, per run and reason (ingest calls this)."""
        with self._lock:
            for reason, counts in (("retired", write.retired), ("duplicate", write.duplicates)):
                for run_id, n in counts.items():
                    run = self._runs.get(run_id)
                    if run is not None:
                        run.refused[reason] += n
                    else:
                        self.uncurated[f"{run_id}:{reason}"] += n

    def on_segment(self, write: SegmentWrite, rows: pa.Table) -> None:
        """`IngestService` hook (in-process use): count refusals, then curate the new rows."""
        self.count_refused(write)
        self.remember(rows)
        self.add(rows)

    def ingest_started(self) -> None:
        """Ingest may store rows from now on (called before it starts): a run read from the store
        after this keeps the ids it counted, so that `add` does not count queued ones again."""
        self._ingest_seen = True

    def remember(self, rows: pa.Table) -> None:
        """Hold the replay columns of rollouts just stored (all the rollout columns) for their runs'
        candidates. Called on ingest's thread right after the segment write, without the curator's
        lock: a run's recent rows have their own."""
        self._ingest_seen = True
        for run_id, part in _by_run(rows):
            run = self._runs.get(run_id)
            if run is not None:
                run.recent.add(part)

    def add(self, rows: pa.Table) -> None:
        """Curate rollouts that are now durable in the store (SELECTION_COLUMNS at least)."""
        with self._lock:
            if len(self._removed_ids):
                # Removed while these rows waited in the curation queue: keep them out.
                rows = rows.filter(pa.array(~self._removed_ids.contains(rows.column("rollout_id"))))
            if rows.num_rows == 0:
                return
            for run_id, part in _by_run(rows):
                run = self._run_for_arrivals(run_id, part.num_rows)
                if run is None:
                    continue
                run.selection.add(part)
                missing = part.column("embedding").null_count
                if missing:
                    run.refused["no_embedding"] += missing
                versions = part.column("policy_version").to_numpy()
                with self._arrivals:
                    run.arrived.update(run.count_arrivals(part))
                    self._arrivals.notify_all()
                self._apply_retention(run)
                # Out of the window, or retired by another process of the store (a version report
                # made to another host): either way nothing below this may stay in the selector.
                floor = max(self._cutoff(run) or 0, self.store.retired_below(run_id) or 0)
                if floor and (int(versions.min()) < floor or run.selection.ids.live_below(floor).size):
                    run.selection.evict_below(floor)
                    run.recent.drop_below(floor)

    def _run_for_arrivals(self, run_id: str, n: int) -> _Run | None:
        record = self.registry.get(run_id)
        if record is None:
            record = self._auto_register(run_id)
        if record is None or record.deleted:
            self.uncurated[f"{run_id}:{'deleted_run' if record else 'run_cap'}"] += n
            return None
        return self._run(run_id)

    def _auto_register(self, run_id: str) -> RunRecord | None:
        """A run whose rollouts arrive before (or without) a trainer registering it."""
        try:
            record, _ = self.registry.register(run_id, "", self.config.retention_window, self.config.max_runs)
        except RunError as exc:
            log.warning("rollouts of run %r are stored but not curated: %s", run_id, exc)
            return None
        return record

    # -- retention -------------------------------------------------------------------------------------
    def report_version(self, run_id: str, version: int, sent: dict[int, int] | None = None) -> dict:
        """The run's trainer now generates with `version`; `sent` counts its rollouts per version so far.
        Retires what falls out of the run's window once the rollouts it sent have arrived."""
        check_version(version)
        with self._lock:
            run = self._run(run_id)
            jump = version - run.record.policy_version
            if self.config.max_version_jump and jump > self.config.max_version_jump:
                raise RunError(f"policy version {version} is {jump} past run {run_id!r}'s current "
                               f"{run.record.policy_version}: more than the largest jump allowed "
                               f"({self.config.max_version_jump}, --max-version-jump)")
            run.record = self.registry.set_version(run_id, version)
            for v, n in (sent or {}).items():
                run.expected[int(v)] = max(int(n), run.expected.get(int(v), 0))
            cutoff = self._cutoff(run)
            if cutoff is not None and (run.target_mark is None or cutoff > run.target_mark):
                run.target_mark, run.target_since = cutoff, time.monotonic()
            evicted = self._apply_retention(run)
            return {"run_id": run_id, "policy_version": version, "evicted": evicted,
                    "retired_below": self.store.retired_below(run_id),
                    "retention_deferred_to": run.target_mark}

    def _cutoff(self, run: _Run) -> int | None:
        window = run.record.window
        return None if window is None else run.record.policy_version - window

    def _apply_retention(self, run: _Run) -> int:
        """Retire the run's versions below its target mark whose rollouts have all arrived (or whose
        grace has passed); returns how many stored rollouts were retired."""
        target = run.target_mark
        if target is None or target <= 0:
            return 0
        mark = target
        overdue = time.monotonic() - run.target_since > self.config.retention_grace_s
        with self._arrivals:
            in_flight = [v for v, n in run.expected.items() if v < target and run.arrived[v] < n]
        if in_flight and not overdue:
            mark = min(in_flight)
        elif in_flight:
            late = sum(run.expected[v] - run.arrived[v] for v in in_flight)
            run.refused["late_after_grace"] += late
            log.warning("run %r: retiring versions below %d after %.0f s although %d rollouts the trainer "
                        "sent have not arrived", run.record.run_id, target, self.config.retention_grace_s, late)
        if mark >= target:
            run.target_mark = None
        current = self.store.retired_below(run.record.run_id)
        if current is not None and mark <= current:
            return 0
        retired = self.store.retire_below(mark, run=run.record.run_id)
        run.selection.evict_below(mark)
        run.recent.drop_below(mark)
        with self._arrivals:
            for v in [v for v in run.expected if v < mark]:
                del run.expected[v]
            for v in [v for v in run.arrived if v < mark]:
                del run.arrived[v]
        run.forget_counted_below(mark)
        run.candidate_cache = run.subset_cache = None
        return retired

    def lower_retention(self, run_id: str, version: int) -> int:
        """Admin: lower a run's retention mark raised by mistake; returns rollouts restored."""
        check_version(version)
        with self._lock:
            run = self._run(run_id)
            restored = self.store.lower_retirement(version, run=run_id)
            run.target_mark = None
            run.selection.rebuild()
            run.recent.reset(max(self.store.version_counts(run_id), default=None))
            run.candidate_cache = run.subset_cache = None
            return restored

    # -- removal -------------------------------------------------------------------------------------
    def remove(self, rollout_ids, reason: str = "explicit") -> Removal:
        """Tombstone rollouts in the store and take them out of selection; unknown ids are reported."""
        with self._lock:
            removal = self.store.delete(rollout_ids, reason=reason)
            asked = pa.array(list(rollout_ids), pa.string())
            gone = asked.filter(pc.invert(pc.is_in(asked, value_set=pa.array(removal.unknown, pa.string()))))
            self._removed_ids.add(gone)
            for run in self._runs.values():
                run.recent.drop_ids(gone)
                if run.selection.forget(gone):
                    run.candidate_cache = run.subset_cache = None
            return removal

    # -- replay ----------------------------------------------------------------------------------------
    def wait_for(self, run_id: str, expect: dict[int, int], timeout_s: float) -> dict[int, int]:
        """Wait until the run's rollouts of each version in `expect` have arrived (as many as the
        trainer sent); returns what is still missing per version when the time is up ({} = all in)."""
        run = self._run(run_id)
        deadline = time.monotonic() + max(0.0, min(timeout_s, self.config.max_wait_s))
        mark = self.store.retired_below(run_id) or 0

        def missing() -> dict[int, int]:
            return {v: n - run.arrived[v] for v, n in expect.items() if v >= mark and run.arrived[v] < n}

        while True:
            with self._arrivals:
                gap = missing()
                remaining = deadline - time.monotonic()
                if not gap or remaining <= 0:
                    return gap
            if self.on_wait is not None:
                self.on_wait()   # outside every lock: ingest flushes, the worker hands over (cheap flags)
            with self._arrivals:
                if missing():
                    self._arrivals.wait(min(remaining, 0.1))

    def hurry(self, run_id: str) -> None:
        """A run's trainer just sent rollouts it will soon wait for: have them ingested and curated now."""
        self._run(run_id)
        if self.on_wait is not None:
            self.on_wait()

    def candidates(self, run_id: str, version: int, unit: str = "group", expect: dict[int, int] | None = None,
                   wait_s: float = 0.0) -> Candidates:
        """Replay candidates for the run's trainer at `version`: the groups its selected rollouts
        belong to, from versions [version - window, version), whole (unit "group") or only the selected
        rollouts (unit "rollout"), with advantages over each whole group; never groups without signal."""
        check_version(version)
        if unit not in ("group", "rollout"):
            raise RunError(f"unit must be 'group' or 'rollout', got {unit!r}")
        t0 = time.monotonic()
        gap = self.wait_for(run_id, expect, wait_s) if expect else {}
        t1 = time.monotonic()
        with self._lock:
            run = self._run(run_id)
            if gap:
                run.incomplete_draws += 1
            window = run.record.window
            low = 0 if window is None else max(0, version - window)
            ids = run.selection.subset_ids()
            key = (run.selection.selection_version, version, unit, tuple(ids))
            cached = run.candidate_cache
        if cached is not None and cached[0] == key:
            table = cached[1]
        else:
            # Outside the curator's lock: ingest's hand-overs and version reports go on.
            table = self._candidate_rows(run, ids, low, version, unit)
            with self._lock:
                run.candidate_cache = (key, table)
        return Candidates(table, not gap, gap, t1 - t0, time.monotonic() - t1)

    def _candidate_rows(self, run: _Run, ids: list[str], low: int, high: int, unit: str) -> pa.Table:
        wanted = pa.array(ids, pa.string())
        groups = run.recent.groups_of(wanted, low, high)
        if groups is None:   # versions not held in memory (from before a restart, say): a store read
            groups = self.store.group_rows(run.record.run_id, wanted, low, high)
        table = with_group_columns(groups, drop_no_signal=True)
        if unit == "rollout":
            table = table.filter(pc.is_in(table.column("rollout_id"), value_set=wanted))
        return table.select(list(CANDIDATE_COLUMNS))

    def subset_ids(self, run_id: str | None = None) -> list[str]:
        with self._lock:
            return self._run(self.resolve_run(run_id)).selection.subset_ids()

    def subset_rows(self, run_id: str | None = None) -> pa.Table:
        """The subset's rows of a run, each with its advantage over its whole stored group."""
        with self._lock:
            run_id = self.resolve_run(run_id)
            run = self._run(run_id)
            subset = run.selection.subset_ids()
            key = ("subset", run.selection.selection_version, tuple(subset))
            if run.subset_cache is not None and run.subset_cache[0] == key:
                return run.subset_cache[1]   # read from the store once per selection version
            ids = pa.array(subset, pa.string())
            groups = with_group_columns(self.store.group_rows(run_id, ids, 0, np.iinfo(np.int64).max),
                                        drop_no_signal=False)
            rows = groups.filter(pc.is_in(groups.column("rollout_id"), value_set=ids)).select(list(CANDIDATE_COLUMNS))
            run.subset_cache = (key, rows)
            return rows

    def sample(self, n: int, weighting: str = "uniform", seed: int | None = None,
               run_id: str | None = None) -> pa.Table:
        """Draw n rows from a run's subset (with replacement) with probability ∝ weight.

        weighting: "uniform"; "recency" (halves per policy version behind the run's current one);
        "quality" (reward-variance groups twice as likely). The returned `weight` is the draw's
        importance weight relative to uniform (1/(k·p)); `sample_prob` is p itself.
        """
        if weighting not in ("uniform", "recency", "quality"):
            raise ValueError(f"unknown weighting {weighting!r}: use uniform, recency or quality")
        run_id = self.resolve_run(run_id)
        rows = self.subset_rows(run_id)
        if rows.num_rows == 0:
            raise ValueError(f"the replay subset of run {run_id!r} is empty: no rollouts have been curated yet")
        if weighting == "uniform":
            score = np.ones(rows.num_rows)
        elif weighting == "recency":
            current = self.registry.get(run_id).policy_version
            behind = current - rows.column("policy_version").to_numpy().astype(np.float64)
            score = np.exp2(-np.maximum(behind, 0.0))
        else:
            score = 1.0 + group_has_signal(rows).astype(np.float64)
        prob = score / score.sum()
        idx = np.random.default_rng(seed).choice(rows.num_rows, size=n, replace=True, p=prob)
        drawn = rows.take(pa.array(idx))
        drawn = drawn.append_column("sample_prob", pa.array(prob[idx], pa.float64()))
        return drawn.append_column("weight", pa.array(1.0 / (rows.num_rows * prob[idx]), pa.float64()))

    def selection_version(self, run_id: str | None = None) -> int:
        with self._lock:
            selection = self._run(self.resolve_run(run_id)).selection
            selection.refresh()
            return selection.selection_version

    # -- snapshots -------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Write a snapshot of the subsets if one moved and one is due (the worker calls this when idle)."""
        with self._lock:
            if time.monotonic() - self._last_snapshot >= self.config.snapshot_interval_s:
                self.snapshot(only_if_changed=True)

    def snapshot(self, only_if_changed: bool = False) -> None:
        """Persist every run's current subset for the `replay_subset` view."""
        with self._lock:
            if self._closed:
                return
            versions = {}
            for run_id, run in self._runs.items():
                run.selection.refresh()
                versions[run_id] = run.selection.selection_version
            if only_if_changed and versions == self._snapshot_versions:
                return
            parts = []
            for run_id, run in sorted(self._runs.items()):
                ids = run.selection.subset_ids()
                parts.append(pa.table({
                    "rollout_id": pa.array(ids, pa.string()),
                    "run_id": pa.array([run_id] * len(ids), pa.string()),
                    "selection_version": pa.array([versions[run_id]] * len(ids), pa.int64()),
                    "objective_value": pa.array([run.selection.value()] * len(ids), pa.float64())}))
            self._snapshot_seq += 1
            self.store.write_replay_snapshot(pa.concat_tables(parts) if parts else None, seq=self._snapshot_seq)
            self._snapshot_versions = versions
            self._last_snapshot = time.monotonic()

    # -- describing --------------------------------------------------------------------------------------
    def describe_run(self, run_id: str) -> dict:
        with self._lock:
            run = self._run(run_id)
            record = run.record
            with self._arrivals:
                arrived = {str(v): n for v, n in sorted(run.arrived.items())}
                expected = {str(v): n for v, n in sorted(run.expected.items())}
            return {"run_id": record.run_id, "fingerprint": record.fingerprint, "window": record.window,
                    "policy_version": record.policy_version, "created_at": record.created_at,
                    "retired_below": self.store.retired_below(run_id),
                    "retention_deferred_to": run.target_mark, "arrived": arrived, "expected": expected,
                    "refused": dict(run.refused), "incomplete_draws": run.incomplete_draws,
                    "recent_rows": len(run.recent), "recent_from": run.recent.complete_from,
                    "embedding_dim": self.store.embedding_dim,
                    "k": self.config.k, "objective_value": run.selection.value(),
                    "subset_size": len(run.selection.subset_ids()), **run.selection.stats()}

    def describe(self) -> dict:
        """The service's curation at a glance (what /readyz shows)."""
        with self._lock:
            if self._closed and self._at_close is not None:
                return dict(self._at_close)
            runs = {r: self.describe_run(r) for r in sorted(self.registry.live())}
            return {"method": self.config.method, "k": self.config.k, "runs": len(runs),
                    "n_live": sum(r["n_live"] for r in runs.values()),
                    "evicted_total": sum(r["evicted_total"] for r in runs.values()),
                    "oracle_queries": sum(r["oracle_queries"] for r in runs.values()),
                    "policy_versions": {r: d["policy_version"] for r, d in runs.items()},
                    "uncurated": dict(self.uncurated), "rebuild_seconds": self.rebuild_seconds,
                    "shard": self.config.shard,
                    "partitions": sorted(self.partitions) if self.partitions is not None else None}


def _by_run(rows: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """(run_id, its rows) for each run in `rows`; rows without a run belong to DEFAULT_RUN."""
    run_ids = pc.fill_null(rows.column("run_id"), DEFAULT_RUN)
    for run_id in pc.unique(run_ids).to_pylist():
        same = pc.equal(run_ids, run_id)
        yield run_id, rows if pc.all(same).as_py() else rows.filter(same)
