"""The reads every rollout store answers the same way, through its DuckDB views.

A store class inherits `ViewReads` and provides `connect()` (an in-memory DuckDB connection with the
views `rollouts`, `tombstones`, ...), `query()` (bounded user SQL) and `_stored_schema`. Every read here
opens its own connection through `_read` and closes it; a store whose files can vanish under a reader
(the Parquet store's compaction) overrides `_read` to retry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import duckdb
import pyarrow as pa

from sponge.contract import REPLAY_COLUMNS
from sponge.store.common import (
    StoreError,
    as_string_array,
    check_run,
    quote_ident,
    sql_str,
)

T = TypeVar("T")


class ViewReads:
    _stored_schema: pa.Schema

    def connect(self) -> duckdb.DuckDBPyConnection:   # provided by the store
        raise NotImplementedError

    def query(self, query: str, *, max_rows: int, timeout_s: float):   # provided by the store
        raise NotImplementedError

    def _read(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """`fn` on a fresh connection to the views, closed afterwards."""
        conn = self.connect()
        try:
            return fn(conn)
        finally:
            conn.close()

    def sql(self, query: str, *, max_rows: int = 10_000, timeout_s: float = 10.0) -> pa.Table:
        """Run user SQL read-only (single SELECT, store tables only, bounded rows/time/memory).

        The result's schema metadata has `sponge.truncated` = b"true" when rows were cut off.
        Raises sponge.store.sql.SqlError with a one-line reason when refused or failed.
        """
        return self.query(query, max_rows=max_rows, timeout_s=timeout_s).table

    def scan(self, columns: list[str] | None = None, batch_size: int = 65_536,
             run: str | None = None) -> Iterator[pa.RecordBatch]:
        """Stream the live rollouts (of one run, if given) in batches with the stored schema's types."""
        names = self._check_columns(columns)
        target = pa.schema([self._stored_schema.field(c) for c in names])
        conn = self.connect()
        try:
            where = "" if run is None else f" WHERE run_id = {sql_str(check_run(run))}"
            reader = conn.sql(f"SELECT {', '.join(quote_ident(c) for c in names)} FROM rollouts{where}"
                              ).to_arrow_reader(int(batch_size))
            for batch in reader:
                if batch.num_rows:
                    yield batch.cast(target)
        finally:
            conn.close()

    def _check_columns(self, columns: Sequence[str] | None) -> list[str]:
        names = list(columns) if columns is not None else self._stored_schema.names
        unknown = [c for c in names if c not in self._stored_schema.names]
        if unknown:
            raise StoreError(f"unknown column(s) {unknown}; the rollouts have {self._stored_schema.names}")
        return names

    def rows_by_id(self, rollout_ids: Sequence[str] | pa.Array, columns: list[str]) -> pa.Table:
        """The live rows of `rollout_ids` (those the store holds), ordered by id."""
        names = self._check_columns(columns)
        wanted = pa.table({"rollout_id": as_string_array(rollout_ids)})
        cols = ", ".join(f"r.{quote_ident(c)}" for c in names)

        def read(conn: duckdb.DuckDBPyConnection) -> pa.Table:
            conn.register("wanted", wanted)
            return conn.sql(f"SELECT {cols} FROM rollouts r JOIN (SELECT DISTINCT rollout_id FROM wanted) "
                            "USING (rollout_id) ORDER BY r.rollout_id").to_arrow_table()
        return self._read(read)

    def group_rows(self, run: str, rollout_ids: Sequence[str] | pa.Array, low: int, high: int,
                   columns: Sequence[str] = REPLAY_COLUMNS) -> pa.Table:
        """Every live row of the GRPO groups (run, prompt_id, policy_version) that `rollout_ids` belong
        to, for versions in [low, high): whole groups, so advantages can be computed over them."""
        names = self._check_columns(columns)
        wanted = pa.table({"rollout_id": as_string_array(rollout_ids)})
        cols = ", ".join(f"r.{quote_ident(c)}" for c in names)
        params = [check_run(run), int(low), int(high)]

        def read(conn: duckdb.DuckDBPyConnection) -> pa.Table:
            conn.register("wanted", wanted)
            return conn.sql(
                "WITH g AS (SELECT DISTINCT prompt_id, policy_version FROM rollouts JOIN wanted USING (rollout_id) "
                "WHERE run_id = $1 AND policy_version >= $2 AND policy_version < $3) "
                f"SELECT {cols} FROM rollouts r JOIN g USING (prompt_id, policy_version) WHERE r.run_id = $1 "
                "ORDER BY r.policy_version, r.prompt_id, r.rollout_id", params=params).to_arrow_table()
        return self._read(read)

    def run_rollout_versions(self, run: str) -> pa.Table:
        """(rollout_id, policy_version) of every live rollout of `run`."""
        return self._read(lambda conn: conn.sql(
            "SELECT rollout_id, policy_version FROM rollouts WHERE run_id = $1", params=[check_run(run)]).to_arrow_table())

    def version_counts(self, run: str) -> dict[int, int]:
        """Live rollouts of `run` per policy version."""
        rows = self._read(lambda conn: conn.execute(
            "SELECT policy_version, count(*) FROM rollouts WHERE run_id = $1 GROUP BY 1", [check_run(run)]).fetchall())
        return {int(v): int(n) for v, n in rows}

    def _first_column(self, query: str) -> pa.Array:
        """The first column of a query over the store's views, as one array."""
        return self._read(lambda conn: conn.sql(query).to_arrow_table().column(0).combine_chunks())

    def run_ids(self) -> list[str]:
        """The runs with live rollouts in the store."""
        return sorted(self._first_column("SELECT DISTINCT run_id FROM rollouts").to_pylist())

    def rollout_ids(self) -> pa.Array:
        """The ids of all live (not tombstoned) rollouts."""
        return self._first_column("SELECT rollout_id FROM rollouts").cast(pa.string())

    def count(self) -> int:
        """Number of live rollouts."""
        return int(self._read(lambda conn: conn.execute("SELECT count(*) FROM rollouts").fetchone()[0]))


