"""Selection for one run: the dynamic selector over the run's live rollouts, and their int ids.

`RunSelection` is the piece of curation that talks to `sponge.selectors`: every newly stored
rollout of the run goes in (its embedding, and a quality bonus when its GRPO group has reward
variance, the only groups that carry a learning signal); retention, removal and the per-run cap
take rollouts out; the subset is read out lazily, only when someone asks or a snapshot is due.
Its state is derived from the store: `rebuild` re-inserts the run's live rollouts (a run new since
the curator's rebuild starts from the rows handed to `add` instead: they are all of its stored rows).
The objective's reference vectors (facility-location clients) are the run's first embeddings, saved as
a shared object of the store (`selector/<run>/objective`) so a restart, or another host, optimises
the same f.

In shard mode (several services on one store, on one host or many, each owning some Kafka
partitions) each process selects over its own partitions and the run's subset is greedy over the
union of every shard's solution (a composable core-set, `sponge.service.shards`), exchanged as
shared objects of the store (`selector/<run>/shards/<shard>`): what the table's location holds,
not a local file, so hosts that share nothing but the store merge the same subset.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sponge.store.idmap import RolloutIdMap
from sponge.selectors import METHODS, FacilityLocation, Objective, Selector, params_bytes, selector_from_bytes
from sponge.selectors.process import HostedSelector, SelectorHost

if TYPE_CHECKING:
    from sponge.service.curation import CurationConfig
    from sponge.store import RolloutStore

__all__ = ["SELECTION_COLUMNS", "RunSelection", "embedding_matrix", "group_has_signal"]

#: Columns selection reads: the curation queue holds only these (not the text and token columns).
SELECTION_COLUMNS = ["rollout_id", "run_id", "prompt_id", "reward", "policy_version", "embedding"]


class RunSelection:
    """The selector over one run's live rollouts. Not thread-safe: the curator's lock guards it."""

    def __init__(self, run_id: str, store: RolloutStore, config: CurationConfig,
                 host: SelectorHost | None, partitions: set[int] | None = None,
                 shard: str | None = None, fresh: bool = False) -> None:
        self.run_id, self.store, self.config, self.host = run_id, store, config, host
        self.partitions, self.shard = partitions, shard
        self.key = f"selector/{run_id}"   # its shared objects: <key>/objective, <key>/shards/<shard>
        self.selector: Selector | HostedSelector | None = None
        self.ids = RolloutIdMap()
        self.references: list[np.ndarray] = []
        self.selection_version = 0
        self._solution = np.empty(0, dtype=np.int64)
        self._dirty = False
        self._merged: tuple | None = None
        self.evicted_total = 0
        #: `fresh` (the curator says so): every stored row of the run is also handed to `add` (a run
        #: first seen after the curator's rebuild, unsharded). The selector then starts from the rows
        #: handed to it, held here until the reference set is full, instead of re-reading the store:
        #: on a new run that read was most of a first batch's cost (a scan of everything stored so far).
        self._held: list[pa.Table] | None = [] if fresh else None

    # -- building -----------------------------------------------------------------------------------
    def rebuild(self, progress: bool = False) -> None:
        """A new selector over the run's live rollouts in the store (references from disk when saved)."""
        self.references = []
        saved = self.store.get_shared(f"{self.key}/objective")
        if saved is not None:
            self._held = None   # the run had a selector before: its rows may not all come through `add`
            self.references = list(selector_from_bytes(saved).objective.references)
        elif self._held is None:   # (a fresh run's rows all come through `add`: nothing to read)
            for batch in self.store.scan(columns=["embedding"], run=self.run_id):
                self._collect_references(pa.Table.from_batches([batch]))
                if len(self.references) >= self.config.n_references:
                    break
        self.close()
        if len(self.references) >= self._min_references():
            self._start(progress)

    def _min_references(self) -> int:
        # Shards must optimise one f: no reference refresh, the first shard's set is everyone's.
        return self.config.n_references if self.shard is not None else self.config.min_references

    def _collect_references(self, rows: pa.Table) -> None:
        room = self.config.n_references - len(self.references)
        if room > 0:
            valid = rows.filter(pc.is_valid(rows.column("embedding")))
            self.references.extend(embedding_matrix(valid.slice(0, room)))

    def _start(self, progress: bool = False) -> None:
        """A new selector over the current references, filled with every live rollout of the run."""
        objective = FacilityLocation(np.stack(self.references), m=self.config.neighbours,
                                     quality_weight=self.config.quality_weight)
        params = {"k": self.config.k, "seed": self.config.seed}
        if self.config.method == "dynamic":
            params["eps"] = self.config.eps
        objective = self._fix_objective(objective, params)
        if self.host is not None:
            self.selector = self.host.new_selector(self.config.method, objective, slot=self.run_id, **params)
        else:
            self.selector = METHODS[self.config.method](objective, **params)
        self.ids.close()
        self.ids = RolloutIdMap()
        self._solution = np.empty(0, dtype=np.int64)   # ints are reassigned: old answers mean nothing
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc=f"rebuilding selector of run {self.run_id}", unit="rollout")
        for rows in self._live_rows():
            if self.partitions is not None:
                rows = rows.filter(pc.is_in(rows.column("partition"), pa.array(sorted(self.partitions), pa.int32())))
            self._insert(rows)
            if bar is not None:
                bar.update(rows.num_rows)
        if bar is not None:
            bar.close()
        if self._held is not None and len(self.references) >= self.config.n_references:
            self._held = None   # f is final: no further start needs them
        self.changed()

    def _live_rows(self) -> Iterator[pa.Table]:
        """The run's live rollouts, for a start: the rows held (fresh run) or a scan of the store."""
        if self._held is not None:
            if self._held:
                yield pa.concat_tables(self._held, promote_options="default")
            return
        columns = ["rollout_id", "prompt_id", "reward", "policy_version", "partition", "embedding"]
        for batch in self.store.scan(columns=columns, run=self.run_id):
            yield pa.Table.from_batches([batch])

    def _fix_objective(self, objective: Objective, params: dict) -> Objective:
        """Save f's parameters as a shared object of the store. In shard mode the first shard to get
        here, on any host, fixes f for all: its parameters are the one put-once object every shard
        reads back (the winner's bytes come with the claim, so no shard waits on a winner that may
        have died, or optimises an f of its own)."""
        key = f"{self.key}/objective"
        mine = params_bytes(METHODS[self.config.method](objective, **params))
        if self.shard is not None:
            # b"": claimed by a version whose claims carried no data; its winner saved f beside it.
            fixed = self.store.put_shared_once(key, mine) or self.store.get_shared(key) or mine
            if fixed != mine:
                objective = selector_from_bytes(fixed).objective
                self.references = list(objective.references)
            mine = fixed
        self.store.put_shared(key, mine)   # what a rebuild reads (the same bytes from every shard)
        return objective

    # -- updates ----------------------------------------------------------------------------------
    def add(self, rows: pa.Table) -> None:
        """Insert durable rows of this run (rollout_id, prompt_id, reward, policy_version, embedding)."""
        rows = rows.filter(pc.is_valid(rows.column("embedding"))) if rows.column("embedding").null_count else rows
        if rows.num_rows == 0:
            return
        if self._held is not None:
            self._held.append(rows)
        before = len(self.references)
        self._collect_references(rows)
        target = self.config.n_references
        if (self.selector is None and len(self.references) >= self._min_references()) or (
                before < target <= len(self.references)):
            # First start, or the reference set just reached its full size: f changes, so the
            # selector is rebuilt over everything live (these rows are in the store already, and
            # held when the run is fresh).
            self._start()
        elif self.selector is not None:
            self._insert(rows)
        self._enforce_cap()
        self.changed()

    def _insert(self, rows: pa.Table) -> None:
        # A reference refresh rescans the store, which may hold rows whose hook has not run yet.
        new, ints = self.ids.assign(rows.column("rollout_id"), rows.column("policy_version").to_numpy())
        if not new.all():
            rows = rows.filter(pa.array(new))
        if rows.num_rows:
            self.selector.insert(ints, embedding_matrix(rows), quality=group_has_signal(rows))

    def forget(self, rollout_ids: pa.Array) -> int:
        """Take rollouts out of the selector (removal); returns how many it held."""
        if self._held:
            self._held = [t.filter(pc.invert(pc.is_in(t.column("rollout_id"), value_set=rollout_ids)))
                          for t in self._held]
        ints = np.unique(self.ids.lookup(rollout_ids))
        return self._forget_ints(ints[ints >= 0])

    def evict_below(self, version: int) -> int:
        """Retention: take out every rollout of a policy version below `version`."""
        if self._held:
            self._held = [t.filter(pc.greater_equal(t.column("policy_version"), version)) for t in self._held]
        n = self._forget_ints(self.ids.live_below(version))
        self.evicted_total += n
        return n

    def _enforce_cap(self) -> None:
        """Memory bound per run: past `max_live_per_run` the oldest arrivals leave the selector (not the store)."""
        excess = len(self.ids) - self.config.max_live_per_run
        if excess > 0:
            live = self.ids.live_below(np.iinfo(np.int64).max)
            self.evicted_total += self._forget_ints(live[:excess])

    def _forget_ints(self, ints: np.ndarray) -> int:
        ints = ints[self.ids.is_alive(ints)]
        if len(ints) and self.selector is not None:
            self.ids.forget(ints)
            self.selector.delete(ints)
            self.changed()
        return len(ints)

    def changed(self) -> None:
        """The live set changed: the solution is read again when next asked for."""
        if self.selector is None:
            return
        self._dirty = True
        if self.shard is not None:
            self.refresh()   # the other shards merge the solution this publishes: keep it current

    def refresh(self) -> bool:
        """Read the selector's solution if the live set changed; True (and the version bumped) if it moved."""
        if not self._dirty or self.selector is None:
            return False
        self._dirty = False
        solution = np.sort(self.selector.solution())
        if np.array_equal(solution, self._solution):
            return False
        self._solution = solution
        self.selection_version += 1
        if self.shard is not None:
            self._publish_shard_solution()
        return True

    # -- the subset ---------------------------------------------------------------------------------
    def subset_ids(self) -> list[str]:
        """The run's replay subset: this selector's solution, or in shard mode the merge of all shards'."""
        self.refresh()
        if self.selector is None:
            return []
        own = self.ids.strings(self._solution).to_pylist()
        return own if self.shard is None else self._merged_subset(own)[0]

    def value(self) -> float:
        """f(the run's replay subset); in shard mode f of the merged subset."""
        if self.selector is None:
            return 0.0
        if self.shard is not None:
            return self._merged_subset(self.ids.strings(self._solution).to_pylist())[1]
        return float(self.selector.value())

    def stats(self) -> dict:
        stats = self.selector.stats() if self.selector is not None else {}
        return {"n_live": int(stats.get("n_live", 0)), "oracle_queries": int(stats.get("queries", 0)),
                "references": len(self.references), "selection_version": self.selection_version,
                "evicted_total": self.evicted_total}

    def sync(self) -> None:
        """Wait until a selector process has applied everything handed to it."""
        if isinstance(self.selector, HostedSelector):
            self.selector.sync()

    def close(self) -> None:
        """Free the selector (in the selector process: its slot)."""
        if isinstance(self.selector, HostedSelector):
            self.selector.close()
        self.selector = None

    # -- shard merging ---------------------------------------------------------------------------------
    def _publish_shard_solution(self) -> None:
        """Share this shard's solution (ids + embeddings, Parquet bytes) for the others to merge."""
        table = self.store.rows_by_id(self.ids.strings(self._solution), ["rollout_id", "embedding"])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.store.put_shared(f"{self.key}/shards/{self.shard}", sink.getvalue().to_pybytes())

    def _merged_subset(self, own: list[str]) -> tuple[list[str], float]:
        from sponge.service.shards import merge_shard_solutions

        others = {k: t for k, t in self.store.list_shared(f"{self.key}/shards").items()
                  if k.rsplit("/", 1)[-1] != self.shard}
        key = (self.selection_version, tuple(sorted(others.items())))
        if self._merged is not None and self._merged[0] == key:
            return self._merged[1], self._merged[2]
        tables = [self.store.rows_by_id(pa.array(own, pa.string()), ["rollout_id", "embedding"])]
        for shared in sorted(others):
            blob = self.store.get_shared(shared)
            if blob is not None:
                tables.append(pq.read_table(pa.BufferReader(blob)))
        # One order on every shard: greedy breaks ties by position, and each shard lists its own
        # solution first, so unsorted unions of equal sets could merge to different subsets. A row
        # in two lists (a stale file during a rebalance) is kept once.
        union = pa.concat_tables(tables).sort_by("rollout_id")
        ids = union.column("rollout_id").combine_chunks()
        if len(ids) > 1:   # sorted: a repeat sits right after its first
            repeat = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
            union = union.filter(pa.array(np.concatenate([[True], ~repeat])))
        names = union.column("rollout_id").to_pylist()
        chosen, value = merge_shard_solutions(self.selector.objective,
                                              [(np.arange(len(names)), embedding_matrix(union))], self.config.k)
        merged = [names[int(i)] for i in chosen]
        self._merged = (key, merged, float(value))
        return merged, float(value)


def embedding_matrix(rows: pa.Table) -> np.ndarray:
    """The `embedding` column as an (n, d) float32 array, without per-row Python."""
    column = rows.column("embedding").combine_chunks()
    dim = column.type.list_size
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def group_has_signal(rows: pa.Table) -> np.ndarray:
    """1.0 for rollouts whose prompt group (within `rows`) has non-zero reward variance, else 0.0."""
    groups = rows.select(["prompt_id", "reward"]).group_by("prompt_id").aggregate(
        [("reward", "min"), ("reward", "max")])
    signal = pc.not_equal(groups.column("reward_min"), groups.column("reward_max"))
    index = pc.index_in(rows.column("prompt_id"), value_set=groups.column("prompt_id"))
    return pc.take(signal, index).to_numpy(zero_copy_only=False).astype(np.float32)
