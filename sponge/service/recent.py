"""A run's recent rollouts in memory, so a replay-candidates request needs no store read.

Every candidates request is answered with the whole groups the run's selected rollouts belong to,
from the run's window of policy versions. Read from the store, that is a DuckDB connection over the
table's files and a scan: ~0.13 s per request on a 2-core machine, on the CPU the trainer beside it
also needs, once per training step. The curator therefore keeps, per run, the replay columns of
the rollouts it has seen stored since it started following the run: versions below the run's
retention mark leave, removed ids leave, and at most `max_rows` rows stay (the oldest versions go
first). A request whose window it does not hold whole is answered from the store, as before.

`complete_from`: every stored row of the run with a policy version >= complete_from is held (rows
stored before the curator started following the run are not). It starts one past the newest
version stored at that moment; rows that arrive in between are held as well, so nothing is missed.
Thread-safe: ingest adds from its thread, the curator drops and reads under its own lock.
"""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sponge.contract import REPLAY_COLUMNS
from sponge.groups import group_id_column

__all__ = ["RecentRows"]


class RecentRows:
    """The replay columns of one run's rollouts of recent versions (see the module docstring).

    Held as the batches they arrived in, each with its lowest and highest version, so retention
    drops whole batches and copies at most the one or two that straddle its mark (a table of up to
    `max_rows` rows is never rewritten per training step)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.complete_from: int | None = None   # None: not started, nothing can be answered
        self._parts: list[tuple[pa.Table, int, int]] = []   # (rows, lowest version, highest version)
        self._rows = 0
        self._schema: pa.Schema | None = None   # of the rows held, once any arrived
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._rows

    def start(self, newest_stored: int | None) -> None:
        """Held from here on: every version after `newest_stored` (None: the run has no rows yet)."""
        with self._lock:
            self.complete_from = 0 if newest_stored is None else newest_stored + 1

    def add(self, rows: pa.Table) -> None:
        """Rows of this run just stored (each id once: the store refuses repeats)."""
        if self.max_rows <= 0 or rows.num_rows == 0:
            return
        part = rows.select(list(REPLAY_COLUMNS))
        low, high = pc.min_max(part.column("policy_version")).values()
        with self._lock:
            self._schema = self._schema or part.schema
            self._parts.append((part, low.as_py(), high.as_py()))
            self._rows += part.num_rows
            if self._rows > self.max_rows:
                self._shed()

    def _shed(self) -> None:
        """Over `max_rows`: drop the oldest versions until at most 3/4 of it is held (so the next
        batches do not shed again at once); those versions are then read from the store."""
        versions, counts = np.unique(np.concatenate([t.column("policy_version").to_numpy()
                                                     for t, _, _ in self._parts]), return_counts=True)
        held_from_each = np.cumsum(counts[::-1])[::-1]          # rows held if kept from each version on
        fits = np.flatnonzero(held_from_each <= self.max_rows * 3 // 4)
        keep_from = int(versions[fits[0]]) if fits.size else int(versions[-1]) + 1
        self._drop_below(keep_from)
        self.complete_from = max(self.complete_from or 0, keep_from)

    def reset(self, newest_stored: int | None) -> None:
        """Forget everything held and start again (after rows below the retention mark came back)."""
        with self._lock:
            self._parts, self._rows = [], 0
        self.start(newest_stored)

    def drop_below(self, version: int) -> None:
        """Retention: versions below `version` are no longer live."""
        with self._lock:
            self._drop_below(version)

    def _drop_below(self, version: int) -> None:
        kept = []
        for table, low, high in self._parts:
            if high < version:
                continue
            if low < version:
                table = table.filter(pc.greater_equal(table.column("policy_version"), version))
                low = version
            kept.append((table, low, high))
        self._set(kept)

    def drop_ids(self, rollout_ids: pa.Array) -> None:
        """Removal: these rollouts are no longer live."""
        if not len(rollout_ids):
            return
        with self._lock:
            kept = []
            for table, low, high in self._parts:
                gone = pc.is_in(table.column("rollout_id"), value_set=rollout_ids)
                if pc.any(gone).as_py():
                    table = table.filter(pc.invert(gone))
                kept.append((table, low, high))
            self._set(kept)

    def groups_of(self, rollout_ids: pa.Array, low: int, high: int) -> pa.Table | None:
        """Every held row of the groups `rollout_ids` belong to, for versions in [low, high), ordered as
        the store orders them; None when versions from `low` on are not all held (read the store)."""
        with self._lock:
            if self.complete_from is None or low < self.complete_from or self._schema is None:
                return None   # (nothing ever held: the store says what an empty answer looks like)
            parts = [t for t, lo, hi in self._parts if hi >= low and lo < high]
            schema = self._schema
        table = pa.concat_tables(parts, promote_options="permissive") if parts else schema.empty_table()
        versions = table.column("policy_version")
        window = table.filter(pc.and_(pc.greater_equal(versions, low), pc.less(versions, high)))
        chosen = window.filter(pc.is_in(window.column("rollout_id"), value_set=rollout_ids))
        groups = window.filter(pc.is_in(group_id_column(window), value_set=group_id_column(chosen)))
        return groups.sort_by([("policy_version", "ascending"), ("prompt_id", "ascending"),
                               ("rollout_id", "ascending")])

    def _set(self, parts: list[tuple[pa.Table, int, int]]) -> None:
        self._parts = [p for p in parts if p[0].num_rows]
        self._rows = sum(p[0].num_rows for p in self._parts)
