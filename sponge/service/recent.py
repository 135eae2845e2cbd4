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
    """The replay columns of one run's rollouts of recent versions (see the module docstring)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.complete_from: int | None = None   # None: not started, nothing can be answered
        self._parts: list[pa.Table] = []
        self._rows = 0
        self._joined: pa.Table | None = None    # the parts as one table, until the next change
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
        with self._lock:
            self._parts.append(rows.select(list(REPLAY_COLUMNS)))
            self._rows += rows.num_rows
            self._joined = None
            if self._rows > self.max_rows:
                self._shed()

    def _shed(self) -> None:
        """Over `max_rows`: drop the oldest versions until under it (they are then read from the store)."""
        table = self._table()
        versions, counts = np.unique(table.column("policy_version").to_numpy(), return_counts=True)
        held_from_each = np.cumsum(counts[::-1])[::-1]          # rows held if kept from each version on
        fits = np.flatnonzero(held_from_each <= self.max_rows)
        keep_from = int(versions[fits[0]]) if fits.size else int(versions[-1]) + 1
        self._filter(pc.greater_equal(table.column("policy_version"), keep_from))
        self.complete_from = max(self.complete_from or 0, keep_from)

    def reset(self, newest_stored: int | None) -> None:
        """Forget everything held and start again (after rows below the retention mark came back)."""
        with self._lock:
            self._parts, self._rows, self._joined = [], 0, None
        self.start(newest_stored)

    def drop_below(self, version: int) -> None:
        """Retention: versions below `version` are no longer live."""
        with self._lock:
            if self._rows:
                table = self._table()
                self._filter(pc.greater_equal(table.column("policy_version"), version))

    def drop_ids(self, rollout_ids: pa.Array) -> None:
        """Removal: these rollouts are no longer live."""
        with self._lock:
            if self._rows and len(rollout_ids):
                table = self._table()
                self._filter(pc.invert(pc.is_in(table.column("rollout_id"), value_set=rollout_ids)))

    def groups_of(self, rollout_ids: pa.Array, low: int, high: int) -> pa.Table | None:
        """Every held row of the groups `rollout_ids` belong to, for versions in [low, high), ordered as
        the store orders them; None when versions from `low` on are not all held (read the store)."""
        with self._lock:
            if self.complete_from is None or low < self.complete_from or not self._parts:
                return None   # (nothing ever held: the store says what an empty answer looks like)
            table = self._table()
        versions = table.column("policy_version")
        window = table.filter(pc.and_(pc.greater_equal(versions, low), pc.less(versions, high)))
        chosen = window.filter(pc.is_in(window.column("rollout_id"), value_set=rollout_ids))
        groups = window.filter(pc.is_in(group_id_column(window), value_set=group_id_column(chosen)))
        return groups.sort_by([("policy_version", "ascending"), ("prompt_id", "ascending"),
                               ("rollout_id", "ascending")])

    def _table(self) -> pa.Table:
        if self._joined is None:
            self._joined = pa.concat_tables(self._parts, promote_options="permissive")
            self._parts = [self._joined]
        return self._joined

    def _filter(self, keep: pa.ChunkedArray | pa.Array) -> None:
        table = self._table().filter(keep)
        self._parts, self._rows, self._joined = [table], table.num_rows, table
