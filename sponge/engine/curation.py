"""Curation: keep the replay subset current as rollouts arrive, go stale and are removed.

The `Curator` sits between the store and a selector from `sponge.selectors`:

- every newly stored rollout goes into the selector (embedding + a quality bonus for rollouts
  whose GRPO group has non-zero reward variance, the only groups that carry a learning signal);
- deletions reach the selector from retention (policy_version older than current − window, applied
  when the trainer reports its version: the store retires those versions whole) and explicit
  removal; compaction only drops rows that are already retired or tombstoned, so it never changes
  the live set;
- the current subset is persisted as a store snapshot (`replay_subset` view) with its objective
  value and a selection version that bumps whenever the subset changes;
- replay samples are drawn from the subset with a weight column that travels with the rows.

The selector's state is derived: on restart `rebuild()` re-inserts the live rollouts from the store.
The objective's reference vectors (facility-location clients) are the first rollouts' embeddings
seen, saved beside the store, so a restart optimises the same f.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sponge.engine.idmap import RolloutIdMap, RolloutIdSet
from sponge.selectors import METHODS, FacilityLocation, Objective, Selector, load_params, save_params
from sponge.selectors.process import HostedSelector, SelectorHost

if TYPE_CHECKING:
    from sponge.engine.store import RolloutStore

#: Columns `Curator.add` reads: the curation queue holds only these (not the text and token columns).
SELECTION_COLUMNS = ["rollout_id", "prompt_id", "reward", "policy_version", "embedding"]

#: Columns a replay sample carries (plus `advantage`, and `weight`, `sample_prob` for samples).
SAMPLE_COLUMNS = ["rollout_id", "prompt_id", "prompt", "response", "prompt_tokens", "response_tokens",
                  "behavior_logprobs", "reward", "policy_version"]


@dataclass
class CurationConfig:
    #: Size of the replay subset the selector keeps.
    k: int = 64
    #: Approximation slack of the dynamic algorithm: f(S) >= (1/2 - eps) OPT; smaller eps, more instances.
    eps: float = 0.2
    #: Selection method: "dynamic" (default) or a baseline from sponge.selectors.METHODS.
    method: str = "dynamic"
    #: Reference vectors (facility-location clients): the first rollouts' embeddings seen.
    n_references: int = 256
    #: Selection starts once this many references exist; when the full n_references arrive the
    #: objective changes, so the selector is rebuilt once over the live rollouts.
    min_references: int = 16
    #: Each rollout covers only its m most similar references (one batched faiss search per insert).
    neighbours: int = 16
    #: Weight of the quality bonus (1 when the rollout's GRPO group has non-zero reward variance).
    quality_weight: float = 0.05
    #: Keep rollouts with policy_version >= current - window; None keeps everything.
    retention_window: int | None = 4
    #: Least time between two replay-subset snapshots written to the store.
    snapshot_interval_s: float = 1.0
    #: Seed of the selector's own RNG.
    seed: int = 0
    #: Name of this process's shard when several services share one consumer group and store:
    #: each keeps a selector over its own partitions and the global subset is greedy over the
    #: union of all shards' solutions. None = a single selector over everything.
    shard: str | None = None
    #: Run the selector in a child process (sponge.selectors.process): its CPU work then has a core
    #: and a GIL of its own instead of taking turns with ingest's decoding and Parquet writing.
    #: False keeps it in this process (cheaper to start; what a single-threaded script wants).
    selector_process: bool = True
    #: The selector takes new rollouts in batches of at least this many rows ...
    batch_rows: int = 16_384
    #: ... or of whatever has waited this long (the most a stored rollout waits to be selectable).
    #: A batch costs about one partial rebuild per instance whatever its size, so bigger is cheaper.
    batch_wait_s: float = 1.0


class Curator:
    """The selector over the store's live rollouts, safe to call from the ingest loop and HTTP threads."""

    def __init__(self, store: RolloutStore, config: CurationConfig | None = None) -> None:
        self.store = store
        self.config = config or CurationConfig()
        if self.config.method not in METHODS:
            raise ValueError(f"unknown selection method {self.config.method!r}; choose from {sorted(METHODS)}")
        self.state_dir = Path(store.root) / "selector"
        self.selector: Selector | HostedSelector | None = None
        self._host = SelectorHost() if self.config.selector_process else None
        self.policy_version = self._load_policy_version()
        self._selection_version = 0
        self._snapshot_version = -1      # the selection version the last snapshot holds
        self._dirty = False              # the live set changed since the solution was last read
        self._lock = threading.RLock()
        self._ids = RolloutIdMap()   # rollout_id <-> the selector's int ids (and each one's version)
        self._reference_pool: list[np.ndarray] = []
        self._last_solution = np.empty(0, dtype=np.int64)
        self._last_snapshot = 0.0
        self._sample_cache: tuple[tuple, pa.Table] | None = None
        self.rebuild_seconds: float | None = None
        self.evicted_total = 0
        # Explicit removals, kept out of the selector when rows queued before the removal arrive
        # (or the id is ingested after it). Retention needs no such list: it is caught by version.
        self._removed_ids = RolloutIdSet()
        self.partitions: set[int] | None = None          # shard mode: the partitions this process owns
        self._policy_mtime = 0.0
        self._merged_cache: tuple | None = None
        self._at_close: dict | None = None   # describe() as it was when close() ended the selector
        if self.config.shard is not None:
            if not self.config.shard.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"shard name must be letters, digits, '-' or '_', got {self.config.shard!r}")
            # Shards must optimise one f: no reference refresh, the first shard's set is everyone's.
            self.config = dataclasses.replace(self.config, min_references=self.config.n_references)

    # -- building ---------------------------------------------------------------------------------
    @property
    def lock(self) -> threading.RLock:
        """Held by every curator operation; hold it to change the store's files under the curator."""
        return self._lock

    def rebuild(self, progress: bool = False) -> float:
        """Rebuild the selector from the store's live rollouts; returns the seconds it took."""
        t0 = time.perf_counter()
        with self._lock:
            if self._host is not None:
                self._host.start()   # now, not in the middle of the first batch after a restart
            self.selector, self._at_close = None, None
            self._reference_pool = []
            if (self.state_dir / "selector.json").exists():
                saved = load_params(self.state_dir)
                self._reference_pool = list(saved.objective.references)
            else:
                for batch in self.store.scan(columns=["embedding"]):
                    self._collect_references(pa.Table.from_batches([batch]))
                    if len(self._reference_pool) >= self.config.n_references:
                        break
            if len(self._reference_pool) >= self.config.min_references:
                self._start_selector(progress=progress)
        self.rebuild_seconds = time.perf_counter() - t0
        return self.rebuild_seconds

    def add(self, rows: pa.Table) -> None:
        """Insert rollouts that are now durable in the store (needs rollout_id, prompt_id, reward, embedding)."""
        with self._lock:
            if rows.column("embedding").null_count:
                rows = rows.filter(pc.is_valid(rows.column("embedding")))
            if len(self._removed_ids):
                # Removed while these rows waited in the curation queue: keep them out.
                rows = rows.filter(pa.array(~self._removed_ids.contains(rows.column("rollout_id"))))
            if rows.num_rows == 0:
                return
            oldest = pc.min(rows.column("policy_version")).as_py()
            before = len(self._reference_pool)
            self._collect_references(rows)
            now = len(self._reference_pool)
            target, minimum = self.config.n_references, self.config.min_references
            if (self.selector is None and now >= minimum) or (before < target <= now):
                # First start, or the reference set just reached its full size: f changes, so
                # the selector is rebuilt over everything live (the new rows are in the store).
                self._start_selector()
            elif self.selector is not None:
                # A reference refresh rescans the store, which may already hold rows whose
                # segment hook has not run yet (one flush writes several partitions).
                new, ids = self._assign_ints(rows)
                if not new.all():
                    rows = rows.filter(pa.array(new))
                if rows.num_rows:
                    self.selector.insert(ids, embedding_matrix(rows), quality=_group_has_signal(rows))
            self._follow_shared_policy_version()
            if self._cutoff() is not None and oldest < self._cutoff():
                self._evict_stale()   # rows that arrive already out of the retention window
            self._changed()

    def on_segment(self, _write, rows: pa.Table) -> None:
        """`IngestService` hook: called with the rows of each durable segment that were new."""
        self.add(rows)

    def _collect_references(self, rows: pa.Table) -> None:
        """Keep the first `n_references` embeddings seen as facility-location clients."""
        room = self.config.n_references - len(self._reference_pool)
        if room > 0:
            valid = rows.filter(pc.is_valid(rows.column("embedding")))
            self._reference_pool.extend(embedding_matrix(valid.slice(0, room)))

    def _start_selector(self, progress: bool = False) -> None:
        """A new selector over the current reference pool, filled with every live rollout in the store."""
        objective = FacilityLocation(np.stack(self._reference_pool), m=self.config.neighbours,
                                     quality_weight=self.config.quality_weight)
        params = {"k": self.config.k, "seed": self.config.seed}
        if self.config.method == "dynamic":
            params["eps"] = self.config.eps
        objective = self._fix_objective(objective, params)
        self.selector = self._new_selector(objective, params)
        self._ids.close()
        self._ids = RolloutIdMap()
        self._last_solution = np.empty(0, dtype=np.int64)   # ints are reassigned: old answers mean nothing
        self._dirty = True
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=self.store.count(), desc="rebuilding selector", unit="rollout")
        for batch in self.store.scan(columns=["rollout_id", "prompt_id", "reward", "policy_version",
                                              "partition", "embedding"]):
            rows = pa.Table.from_batches([batch])
            if rows.column("embedding").null_count:
                rows = rows.filter(pc.is_valid(rows.column("embedding")))
            if self.partitions is not None:
                rows = rows.filter(pc.is_in(rows.column("partition"), pa.array(sorted(self.partitions), pa.int32())))
            if rows.num_rows:
                _, ids = self._assign_ints(rows)
                self.selector.insert(ids, embedding_matrix(rows), quality=_group_has_signal(rows))
            if bar is not None:
                bar.update(batch.num_rows)
        if bar is not None:
            bar.close()
        self._changed(force=True)

    def _fix_objective(self, objective: Objective, params: dict) -> Objective:
        """Save f's parameters beside the store; in shard mode the first shard to get here fixes f
        for all (an exclusive claim file, so two shards starting at once cannot both win) and the
        others load it."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        saved = self.state_dir / "selector.json"
        if self.config.shard is not None:
            try:
                os.close(os.open(self.state_dir / "objective.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                deadline = time.monotonic() + 30.0   # the claimant writes it right after claiming
                while not saved.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if saved.exists():
                    objective = load_params(self.state_dir).objective
                    self._reference_pool = list(objective.references)
                    return objective
        save_params(METHODS[self.config.method](objective, **params), self.state_dir)
        return objective

    def _new_selector(self, objective: Objective, params: dict) -> Selector | HostedSelector:
        if self._host is not None:
            return self._host.new_selector(self.config.method, objective, **params)
        return METHODS[self.config.method](objective, **params)

    def close(self) -> None:
        """End the selector's child process (if any). The selector goes with it (`describe` then reports
        its state at close); `rebuild` makes a new one."""
        with self._lock:
            if self.selector is not None:
                self._at_close = self.describe()
            if self._host is not None:
                self._host.close()
            self.selector = None

    def _assign_ints(self, rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(which rows are new to the selector, selector ids for those), remembering their versions."""
        return self._ids.assign(rows.column("rollout_id"), rows.column("policy_version").to_numpy())

    @property
    def selector_pid(self) -> int | None:
        """The selector's child process, None when it runs in this process (or has not started)."""
        return self._host.pid if self._host is not None else None

    def sync(self) -> None:
        """Wait until the selector has applied every insert and delete handed to it (a selector
        process applies them asynchronously); raises what any of them raised."""
        with self._lock:
            if isinstance(self.selector, HostedSelector):
                self.selector.sync()

    def set_partitions(self, partitions: set[int]) -> float:
        """Shard mode: this process now owns `partitions`; rebuild over their rollouts only."""
        with self._lock:
            self.partitions = set(partitions)
        return self.rebuild()

    # -- deletions --------------------------------------------------------------------------------
    def remove(self, rollout_ids: list[str], reason: str = "explicit") -> int:
        """Tombstone rollouts in the store and drop them from the selector; returns how many were live."""
        with self._lock:
            live = self._count_live(rollout_ids)
            self.store.delete(rollout_ids, reason=reason)
            self._removed_ids.add(rollout_ids)
            self._forget(rollout_ids)
            self._changed(force=True)
        return live

    def _count_live(self, rollout_ids: list[str]) -> int:
        conn = self.store.connect()
        conn.register("ids", pa.table({"rollout_id": pa.array(list(rollout_ids), pa.string())}))
        return int(conn.sql("SELECT count(*) FROM rollouts JOIN (SELECT DISTINCT rollout_id FROM ids) "
                            "USING (rollout_id)").fetchall()[0][0])

    def _forget(self, rollout_ids) -> None:
        ints = np.unique(self._ids.lookup(rollout_ids))
        self._forget_ints(ints[ints >= 0])

    def _forget_ints(self, ints: np.ndarray) -> None:
        ints = ints[self._ids.is_alive(ints)]
        if len(ints) and self.selector is not None:
            self._ids.forget(ints)
            self.selector.delete(ints)

    def report_policy_version(self, version: int) -> int:
        """The trainer now generates with `version`; evict what falls out of the window. Returns evictions."""
        with self._lock:
            if version < self.policy_version:
                raise ValueError(f"policy version went backwards: {version} < {self.policy_version}")
            self.policy_version = int(version)
            self._save_policy_version()
            return self._evict_stale()

    def _cutoff(self) -> int | None:
        window = self.config.retention_window
        return None if window is None else self.policy_version - window

    def _evict_stale(self) -> int:
        cutoff = self._cutoff()
        if cutoff is None or cutoff <= 0:
            return 0
        retired = self.store.retire_below(cutoff)
        # What this selector holds below the cutoff: the store's rows just retired, and any that
        # another shard retired first.
        stale_here = self._ids.live_below(cutoff)
        if not retired and not len(stale_here):
            return 0
        self._forget_ints(stale_here)
        self._changed(force=True)
        self.evicted_total += retired
        return retired

    def _follow_shared_policy_version(self) -> None:
        """Shards share the store, so a version reported to any of them is seen by all."""
        path = self.state_dir / "policy.json"
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime != self._policy_mtime:
            self._policy_mtime = mtime
            self.policy_version = max(self.policy_version, self._load_policy_version())

    # -- the subset -------------------------------------------------------------------------------
    def subset_ids(self) -> list[str]:
        """The replay subset: this selector's solution, or in shard mode the merge of all shards'."""
        with self._lock:
            self._refresh()
            own = self._own_subset_ids()
            if self.config.shard is None or self.selector is None:
                return own
            return self._merged_subset_ids()

    def _own_subset_ids(self) -> list[str]:
        if self.selector is None:
            return []
        return self._ids.strings(self._last_solution).to_pylist()   # read by _refresh

    def _shard_dir(self) -> Path:
        return self.state_dir / "shards"

    def _publish_shard_solution(self) -> None:
        """Write this shard's solution (ids + embeddings) for the others to merge; atomic."""
        import pyarrow.parquet as pq

        table = self._rows_with_embeddings(self._own_subset_ids())
        self._shard_dir().mkdir(parents=True, exist_ok=True)
        tmp = self._shard_dir() / f".{self.config.shard}.parquet.tmp"
        pq.write_table(table, tmp)
        tmp.replace(self._shard_dir() / f"{self.config.shard}.parquet")

    def _rows_with_embeddings(self, ids: list[str]) -> pa.Table:
        conn = self.store.connect()
        conn.register("wanted", pa.table({"rollout_id": pa.array(ids, pa.string())}))
        return conn.sql("SELECT rollout_id, embedding FROM rollouts JOIN wanted USING (rollout_id) "
                        "ORDER BY rollout_id").to_arrow_table()

    def _merged_subset_ids(self) -> list[str]:
        import pyarrow.parquet as pq

        from sponge.engine.shards import merge_shard_solutions

        files = sorted(p for p in self._shard_dir().glob("*.parquet")
                       if p.stem != self.config.shard) if self._shard_dir().exists() else []
        key = (self._selection_version, tuple((p.name, p.stat().st_mtime_ns) for p in files))
        if self._merged_cache is not None and self._merged_cache[0] == key:
            return self._merged_cache[1]
        tables = [self._rows_with_embeddings(self._own_subset_ids())]
        for path in files:
            try:
                tables.append(pq.read_table(path))
            except FileNotFoundError:
                continue
        union = pa.concat_tables(tables)
        names = union.column("rollout_id").to_pylist()
        ids, value = merge_shard_solutions(self.selector.objective,
                                           [(np.arange(len(names)), embedding_matrix(union))], self.config.k)
        merged = [names[int(i)] for i in ids]
        self._merged_cache = (key, merged, value)
        return merged

    def value(self) -> float:
        """f(replay subset); in shard mode f of the merged global subset."""
        with self._lock:
            if self.selector is None:
                return 0.0
            if self.config.shard is not None:
                self._merged_subset_ids()
                return float(self._merged_cache[2])
            return float(self.selector.value())

    @property
    def selection_version(self) -> int:
        """Bumps whenever the replay subset changes (read now: any pending change is looked at first)."""
        with self._lock:
            self._refresh()
            return self._selection_version

    def _changed(self, force: bool = False) -> None:
        """The live set changed. The selector's answer is read (a lazy greedy over its instances'
        solutions) only when a snapshot is due, when forced, or when someone asks for the subset:
        reading it after every batch costs more than the batch itself at 10^5 rollouts."""
        if self.selector is None:
            return
        self._dirty = True
        if self.config.shard is not None:
            self._refresh()   # the other shards merge the solution this publishes: keep it current
        if force or self._snapshot_due():
            self._publish(always=force)

    def tick(self) -> None:
        """Write the snapshot of a change that arrived since the last one, once it is due.
        The curation worker calls this when idle, so the last batch before a pause is published."""
        with self._lock:
            if self.selector is not None and self._snapshot_due():
                self._publish()

    def _snapshot_due(self) -> bool:
        return (time.monotonic() - self._last_snapshot >= self.config.snapshot_interval_s
                or self._snapshot_version < 0)

    def _refresh(self) -> None:
        """Read the selector's solution if the live set changed; bump the version if the subset moved."""
        if not self._dirty or self.selector is None:
            return
        self._dirty = False
        solution = np.sort(self.selector.solution())
        if not np.array_equal(solution, self._last_solution):
            self._last_solution = solution
            self._selection_version += 1
            if self.config.shard is not None:
                self._publish_shard_solution()

    def _publish(self, always: bool = False) -> None:
        self._refresh()
        if always or self._snapshot_version != self._selection_version:
            self.snapshot()

    def snapshot(self) -> None:
        """Persist the current subset for the `replay_subset` view."""
        with self._lock:
            if self.selector is None:
                return
            stats = self.selector.stats()
            self.store.write_replay_snapshot(
                self.subset_ids(), objective_value=self.value(), selection_version=self._selection_version,
                extra={"method": self.config.method, "n_live": stats.get("n_live"),
                       "queries": stats.get("queries"), "policy_version": self.policy_version})
            self._last_snapshot = time.monotonic()
            self._snapshot_version = self._selection_version

    def sample(self, n: int, weighting: str = "uniform", seed: int | None = None) -> pa.Table:
        """Draw n rows from the subset (with replacement) with probability ∝ weight.

        weighting: "uniform"; "recency" (halves per policy version behind the current one);
        "quality" (reward-variance groups twice as likely). The returned `weight` is the
        draw's importance weight relative to uniform (1/(k·p)), so a trainer that wants an
        unbiased average over the subset multiplies by it; `sample_prob` is p itself.
        """
        with self._lock:
            rows = self._subset_rows()
            current = self.policy_version
        if rows.num_rows == 0:
            raise ValueError("the replay subset is empty: no rollouts have been curated yet")
        if weighting == "uniform":
            score = np.ones(rows.num_rows)
        elif weighting == "recency":
            behind = current - rows.column("policy_version").to_numpy().astype(np.float64)
            score = np.exp2(-np.maximum(behind, 0.0))
        elif weighting == "quality":
            score = 1.0 + _group_has_signal(rows).astype(np.float64)
        else:
            raise ValueError(f"unknown weighting {weighting!r}: use uniform, recency or quality")
        prob = score / score.sum()
        rng = np.random.default_rng(seed)
        idx = rng.choice(rows.num_rows, size=n, replace=True, p=prob)
        drawn = rows.take(pa.array(idx))
        drawn = drawn.append_column("sample_prob", pa.array(prob[idx], pa.float64()))
        return drawn.append_column("weight", pa.array(1.0 / (rows.num_rows * prob[idx]), pa.float64()))

    def subset_rows(self) -> pa.Table:
        """The subset's rows (SAMPLE_COLUMNS), read from the store once per selection version."""
        with self._lock:
            return self._subset_rows()

    def _subset_rows(self) -> pa.Table:
        ids = self.subset_ids()
        key = (self._selection_version, tuple(ids))   # in shard mode other shards move the subset too
        if self._sample_cache is not None and self._sample_cache[0] == key:
            return self._sample_cache[1]
        conn = self.store.connect()
        conn.register("subset_ids", pa.table({"rollout_id": pa.array(ids, pa.string())}))
        # The GRPO advantage of a curated rollout comes from its whole stored group, not from
        # the subset (which rarely holds two rollouts of one prompt): population std, as GRPO.
        columns = ", ".join(f"r.{c}" for c in SAMPLE_COLUMNS)
        rows = conn.sql(f"""
            WITH groups AS (
                SELECT prompt_id, avg(reward) AS mean, stddev_pop(reward) AS std
                FROM rollouts WHERE prompt_id IN (
                    SELECT prompt_id FROM rollouts JOIN subset_ids USING (rollout_id))
                GROUP BY prompt_id)
            SELECT {columns}, CAST((r.reward - g.mean) / (coalesce(g.std, 0) + 1e-6) AS FLOAT) AS advantage
            FROM rollouts r JOIN subset_ids USING (rollout_id) JOIN groups g USING (prompt_id)
            ORDER BY r.rollout_id""").to_arrow_table()
        self._sample_cache = (key, rows)
        return rows

    def describe(self) -> dict:
        with self._lock:
            if self.selector is None and self._at_close is not None:
                return dict(self._at_close)
            stats = self.selector.stats() if self.selector is not None else {}
            return {"method": self.config.method, "k": self.config.k, "selection_version": self.selection_version,
                    "objective_value": self.value(), "policy_version": self.policy_version,
                    "n_live": int(stats.get("n_live", 0)), "oracle_queries": int(stats.get("queries", 0)),
                    "references": len(self._reference_pool), "evicted_total": self.evicted_total,
                    "retired_below": self.store.retired_below, "rebuild_seconds": self.rebuild_seconds,
                    "shard": self.config.shard,
                    "partitions": sorted(self.partitions) if self.partitions is not None else None}

    # -- persistence of the trainer's version -----------------------------------------------------
    def _load_policy_version(self) -> int:
        path = self.state_dir / "policy.json"
        return int(json.loads(path.read_text())["policy_version"]) if path.exists() else 0

    def _save_policy_version(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / "policy.json.tmp"
        tmp.write_text(json.dumps({"policy_version": self.policy_version}))
        tmp.replace(self.state_dir / "policy.json")




def embedding_matrix(rows: pa.Table) -> np.ndarray:
    """The `embedding` column as an (n, d) float32 array, without per-row Python."""
    column = rows.column("embedding").combine_chunks()
    dim = column.type.list_size
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def _group_has_signal(rows: pa.Table) -> np.ndarray:
    """1.0 for rollouts whose prompt group (within `rows`) has non-zero reward variance, else 0.0."""
    groups = rows.select(["prompt_id", "reward"]).group_by("prompt_id").aggregate(
        [("reward", "min"), ("reward", "max")])
    signal = pc.not_equal(groups.column("reward_min"), groups.column("reward_max"))
    index = pc.index_in(rows.column("prompt_id"), value_set=groups.column("prompt_id"))
    return pc.take(signal, index).to_numpy(zero_copy_only=False).astype(np.float32)
