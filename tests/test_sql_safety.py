"""User SQL is read-only, reads only the store's files, and is bounded in rows, time and memory."""

from __future__ import annotations

import time

import duckdb
import numpy as np
import pytest
from test_store_fixtures import make_rollouts

from sponge.store.sql import (
    SqlError,
    SqlLimits,
    check_read_only,
    open_locked_connection,
)
from sponge.store import RolloutStore, StoreConfig

DIM = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    store = RolloutStore(root, embedding_dim=DIM)
    table = make_rollouts(500, dim=DIM, policy_versions=(0, 1))
    store.write_segment(table, topic="rollouts", partition=0, offsets=np.arange(500),
                        first_offset=0, last_offset=499)
    return store


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A Parquet file and a text file outside the store."""
    directory = tmp_path_factory.mktemp("outside")
    conn = duckdb.connect()
    conn.execute(f"COPY (SELECT 42 AS secret) TO '{directory}/secret.parquet' (FORMAT parquet)")
    (directory / "secret.csv").write_text("secret\n42\n")
    return directory


@pytest.mark.parametrize("statement, kind", [
    ("INSERT INTO rollouts SELECT * FROM rollouts", "INSERT"),
    ("UPDATE rollouts SET reward = 0", "UPDATE"),
    ("DELETE FROM rollouts", "DELETE"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("CREATE VIEW v AS SELECT 1", "CREATE"),
    ("DROP VIEW rollouts", "DROP"),
    ("ALTER VIEW rollouts RENAME TO r", "ALTER"),
    ("COPY (SELECT * FROM rollouts) TO '/tmp/out.csv'", "COPY"),
    ("COPY rollouts FROM '/etc/passwd'", "COPY"),
    ("ATTACH '/tmp/x.duckdb' AS x", "ATTACH"),
    ("DETACH x", "DETACH"),
    ("INSTALL httpfs", "EXTENSION|LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("PRAGMA enable_profiling", "PRAGMA"),
    ("SET enable_external_access = true", "SET"),
    ("RESET memory_limit", "SET"),
    ("EXPORT DATABASE '/tmp/export'", "EXPORT"),
    ("CALL pragma_version()", "CALL"),
    ("EXPLAIN ANALYZE SELECT 1", "EXPLAIN"),
    ("CHECKPOINT", "CALL"),  # DuckDB parses it as a CALL
    ("BEGIN TRANSACTION", "TRANSACTION"),
    ("VACUUM", "VACUUM"),
])
def test_every_non_select_statement_is_refused(store, statement, kind):
    with pytest.raises(SqlError, match=rf"({kind}) statements are not allowed"):
        store.sql(statement)


@pytest.mark.parametrize("query, message", [
    ("SELECT 1; SELECT 2", "exactly one statement"),
    ("SELECT 1; DROP VIEW rollouts", "exactly one statement"),
    ("", "empty query"),
    ("   -- just a comment", "empty query|exactly one statement"),
    ("SELEC 1", "syntax error"),
    ("WITH x AS (DELETE FROM rollouts RETURNING *) SELECT * FROM x", "DELETE inside a query"),
    ("WITH x AS (INSERT INTO rollouts SELECT * FROM rollouts RETURNING *) SELECT 1", "INSERT inside a query"),
    ("SELECT * FROM query('SELECT 1')", r"query\(\) is not allowed"),
])
def test_multi_statement_and_hidden_writes_are_refused(store, query, message):
    with pytest.raises(SqlError, match=message):
        store.sql(query)


def test_reads_outside_the_store_are_refused(store, outside):
    for query in [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_blob('/etc/hostname')",
        f"SELECT * FROM read_parquet('{outside}/secret.parquet')",
        f"SELECT * FROM read_csv_auto('{outside}/secret.csv')",
        f"SELECT * FROM parquet_metadata('{outside}/secret.parquet')",
        f"SELECT * FROM read_parquet('{store.root}/../{outside.name}/secret.parquet')",  # traversal
        f"SELECT * FROM read_parquet('{store.root}x/a.parquet')",  # a sibling sharing the prefix
        "SELECT * FROM glob('/etc/*')",
        "SELECT * FROM read_parquet('https://example.com/x.parquet')",
    ]:
        with pytest.raises(SqlError, match="only the rollout store's own files can be read"):
            store.sql(query)
    # A path used as a table name: not resolved as a file (no replacement scan), or refused.
    for query in ["SELECT * FROM '/etc/passwd'", f"SELECT * FROM '{outside}/secret.parquet'"]:
        with pytest.raises(SqlError, match="does not exist|only the rollout store's own files can be read"):
            store.sql(query)


def test_the_engine_itself_enforces_the_lock_without_the_parser(store, outside):
    """Bypass the statement guard: the locked connection still refuses files, writes out and settings."""
    conn = open_locked_connection(store.view_sql(), store.root, SqlLimits(), datasets=store.datasets())
    try:
        with pytest.raises(duckdb.PermissionException):
            conn.execute(f"SELECT * FROM read_parquet('{outside}/secret.parquet')").fetchall()
        with pytest.raises(duckdb.PermissionException):
            conn.execute(f"COPY (SELECT 1) TO '{outside}/leak.csv'")
        with pytest.raises(duckdb.Error, match="locked"):
            conn.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.Error, match="locked"):
            conn.execute("SET memory_limit = '100GB'")
        with pytest.raises(duckdb.Error):
            conn.execute(f"ATTACH '{outside}/x.duckdb'")
        with pytest.raises(duckdb.Error):
            conn.execute("LOAD httpfs")
        assert conn.execute("SELECT count(*) FROM rollouts").fetchone()[0] == 500
    finally:
        conn.close()
    assert not (outside / "leak.csv").exists()


def test_reading_the_stores_own_files_directly_is_allowed(store):
    got = store.sql(f"SELECT count(*) AS n FROM read_parquet('{store.root}/rollouts/**/*.parquet')")
    assert got.column("n")[0].as_py() == 500


def test_runaway_queries_are_stopped_by_the_time_bound(store):
    for query in [
        "SELECT count(*) FROM range(1000000000000)",
        "SELECT count(*) FROM rollouts a, rollouts b, rollouts c, rollouts d WHERE a.reward + b.reward > d.reward",
        # All its time is in the optimizer's constant folding, where interrupt() is never checked:
        # in-process this ran to the end (~20 s); the worker is killed at the deadline.
        "SELECT levenshtein(repeat('a', 60000), repeat('b', 60000)) + 0 AS d",
    ]:
        start = time.perf_counter()
        with pytest.raises(SqlError, match=r"stopped after 0\.5 s \(time limit\)"):
            store.sql(query, timeout_s=0.5)
        assert time.perf_counter() - start < 5


def test_memory_bound(tmp_path):
    config = StoreConfig(sql_limits=SqlLimits(memory_limit="32MB"))
    store = RolloutStore(tmp_path, embedding_dim=DIM, config=config)
    with pytest.raises(SqlError, match="memory limit"):
        store.sql("SELECT count(DISTINCT x) FROM (SELECT range::VARCHAR || 'padding-padding' AS x "
                  "FROM range(20000000))", timeout_s=30)


def test_rows_are_bounded_and_truncation_is_reported(store):
    result = store.query("SELECT rollout_id FROM rollouts ORDER BY rollout_id", max_rows=7)
    assert result.truncated and result.table.num_rows == 7
    assert result.table.column(0).to_pylist() == [f"r-{i:09d}" for i in range(7)]
    table = store.sql("SELECT * FROM range(100000000)", max_rows=3)  # stops early, never materialised
    assert table.num_rows == 3 and table.schema.metadata[b"sponge.truncated"] == b"true"
    exact = store.sql("SELECT rollout_id FROM rollouts", max_rows=500)
    assert exact.num_rows == 500 and exact.schema.metadata[b"sponge.truncated"] == b"false"


@pytest.mark.parametrize("query", [
    "SELECT policy_version, count(*) AS n FROM rollouts GROUP BY ALL ORDER BY 1",
    "WITH g AS (SELECT prompt_id, avg(reward) AS r FROM rollouts GROUP BY 1) SELECT count(*) FROM g",
    "FROM rollouts SELECT rollout_id LIMIT 2",
    "DESCRIBE rollouts",
    "SUMMARIZE SELECT reward FROM rollouts",
    "SELECT array_cosine_similarity(embedding, embedding) AS s FROM rollouts LIMIT 1",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
    "SELECT 1;",
])
def test_ordinary_read_queries_work(store, query):
    assert store.sql(query).num_rows > 0
    assert check_read_only(query).rstrip().endswith(";") is False


def test_limits_are_validated():
    with pytest.raises(SqlError, match="timeout"):
        SqlLimits(timeout_s=0)
    with pytest.raises(SqlError, match="max_rows"):
        SqlLimits(max_rows=-1)
