"""Read-only SQL over the rollout store: the guard, the locked-down connection, the bounds.

User SQL gets three layers of protection, so no single mistake opens the store up:

1. The parser: the text must be exactly one statement that DuckDB's own parser classifies as
   SELECT (plain SELECT, WITH, FROM-first, VALUES, DESCRIBE, SUMMARIZE, SHOW), and its syntax
   tree (``json_serialize_sql``) may hold only SELECT / set-operation / CTE query nodes, which
   rules out data-modifying CTEs such as ``WITH x AS (INSERT ... RETURNING *) SELECT ...``.
2. The engine: each query runs on its own in-memory connection whose views are created first;
   then ``enable_external_access=false`` with ``allowed_directories=[store root]`` makes DuckDB
   itself refuse every file outside the store (``read_csv('/etc/passwd')``, ``'/tmp/x'`` as a
   table, ATTACH, INSTALL/LOAD, http), extension auto-install/-load is off, spilling to disk is
   off, and ``lock_configuration=true`` freezes all of that for the rest of the connection.
3. The bounds: ``memory_limit`` and ``threads`` per query, a row bound (at most ``max_rows``
   rows come back, flagged as truncated) and a time bound (a timer calls
   ``connection.interrupt()``), each reported as a clear ``SqlError``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

#: Query-node kinds a read-only statement may contain anywhere in its syntax tree.
_READ_ONLY_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})
#: Table functions that run SQL from a string, which the syntax-tree check cannot see into.
_REFUSED_TABLE_FUNCTIONS = frozenset({"query", "query_table"})


class SqlError(ValueError):
    """A query was refused or failed; the message says why in one line."""


@dataclass(frozen=True)
class SqlLimits:
    """Bounds applied to every user query."""

    #: At most this many rows come back; more are cut off and the result says it was truncated.
    max_rows: int = 10_000
    #: Wall-clock seconds before the query is interrupted.
    timeout_s: float = 10.0
    #: DuckDB memory_limit for the query's connection (no spilling to disk: over the limit fails).
    memory_limit: str = "1GB"
    #: Worker threads for the query.
    threads: int = 2

    def __post_init__(self) -> None:
        if self.max_rows < 0:
            raise SqlError(f"max_rows must be >= 0, got {self.max_rows}")
        if not self.timeout_s > 0:
            raise SqlError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        if self.threads < 1:
            raise SqlError(f"threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class QueryResult:
    """What a user query returned."""

    table: pa.Table
    #: True when the query had more than max_rows rows and only the first max_rows came back.
    truncated: bool
    elapsed_s: float


def check_read_only(query: str) -> str:
    """Return the single SELECT statement in `query`, or raise SqlError saying why it is refused."""
    if not isinstance(query, str) or not query.strip():
        raise SqlError("empty query: give one SELECT (or WITH ... SELECT) statement")
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise SqlError(f"syntax error: {_first_line(exc)}") from None
    if len(statements) != 1:
        raise SqlError(
            f"exactly one statement is allowed, got {len(statements)}: "
            "send a single SELECT (or WITH ... SELECT) without ';'-separated extras"
        )
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        kind = statement.type.name.replace("_", " ")
        raise SqlError(
            f"{kind} statements are not allowed: the rollout store is read-only over SQL; "
            "only a single SELECT (or WITH ... SELECT) runs"
        )
    text = statement.query.strip().rstrip(";").strip()
    _check_syntax_tree(text)
    return text


def _check_syntax_tree(text: str) -> None:
    with duckdb.connect(":memory:") as conn:
        serialized = conn.execute("SELECT json_serialize_sql($1)", [text]).fetchone()[0]
    tree = json.loads(serialized)
    if tree.get("error"):
        raise SqlError(f"query refused: {tree.get('error_message', 'not a plain SELECT')}")
    for node in _walk(tree):
        node_type = node.get("type")
        # Query nodes (the SELECT bodies, CTE bodies, set operations) are the dicts with a cte_map.
        if "cte_map" in node and node_type not in _READ_ONLY_NODES:
            verb = str(node_type).removesuffix("_NODE").removesuffix("_QUERY").replace("_", " ")
            raise SqlError(f"{verb} inside a query is not allowed: the rollout store is read-only over SQL")
        if node_type == "TABLE_FUNCTION":
            name = str((node.get("function") or {}).get("function_name", "")).lower()
            if name in _REFUSED_TABLE_FUNCTIONS:
                raise SqlError(f"table function {name}() is not allowed: write the query directly")


def _walk(value: Any) -> Iterable[dict]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def open_locked_connection(
    setup_sql: Iterable[str], allowed_dir: str | Path, limits: SqlLimits
) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the views from `setup_sql`, then locked to `allowed_dir`.

    The setup statements are trusted (they create the views); after them nothing can read
    outside `allowed_dir`, load extensions, spill to disk or change any setting.
    """
    allowed = str(Path(allowed_dir).resolve()).rstrip("/") + "/"
    conn = duckdb.connect(
        ":memory:",
        config={"autoload_known_extensions": False, "autoinstall_known_extensions": False},
    )
    try:
        for statement in setup_sql:
            conn.execute(statement)
        conn.execute("SET temp_directory = ''")  # no spilling: over memory_limit fails instead
        conn.execute(f"SET memory_limit = {_literal(limits.memory_limit)}")
        conn.execute(f"SET threads = {int(limits.threads)}")
        conn.execute(f"SET allowed_directories = [{_literal(allowed)}]")
        conn.execute("SET enable_external_access = false")
        conn.execute("SET allow_community_extensions = false")
        conn.execute("SET lock_configuration = true")
    except BaseException:
        conn.close()
        raise
    return conn


def run_read_only(
    query: str, *, setup_sql: Iterable[str], allowed_dir: str | Path, limits: SqlLimits
) -> QueryResult:
    """Check `query`, run it on a fresh locked connection within `limits`, return Arrow."""
    text = check_read_only(query)
    started = time.perf_counter()
    conn = open_locked_connection(setup_sql, allowed_dir, limits)
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        conn.interrupt()

    timer = threading.Timer(limits.timeout_s, stop)
    timer.daemon = True
    timer.start()
    try:
        # The relation is lazy: limit() wraps the user's query, so at most max_rows + 1 rows are
        # ever produced and DuckDB stops early instead of materialising a huge result.
        table = conn.sql(text).limit(limits.max_rows + 1).to_arrow_table()
    except duckdb.InterruptException:
        raise SqlError(
            f"query stopped after {limits.timeout_s:g} s (time limit): narrow it with WHERE/LIMIT "
            "or allow more time (--timeout)"
        ) from None
    except duckdb.OutOfMemoryException:
        raise SqlError(
            f"query needed more than the {limits.memory_limit} memory limit: aggregate or filter more"
        ) from None
    except duckdb.PermissionException as exc:
        raise SqlError(
            f"query refused: only the rollout store's own files can be read ({_first_line(exc)})"
        ) from None
    except duckdb.Error as exc:
        if timed_out.is_set():
            raise SqlError(f"query stopped after {limits.timeout_s:g} s (time limit)") from None
        raise SqlError(f"query failed: {_first_line(exc)}") from None
    finally:
        timer.cancel()
        conn.close()
    truncated = table.num_rows > limits.max_rows
    if truncated:
        table = table.slice(0, limits.max_rows)
    metadata = dict(table.schema.metadata or {})
    metadata[b"sponge.truncated"] = b"true" if truncated else b"false"
    metadata[b"sponge.max_rows"] = str(limits.max_rows).encode()
    table = table.replace_schema_metadata(metadata)
    return QueryResult(table=table, truncated=truncated, elapsed_s=time.perf_counter() - started)


def _literal(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
