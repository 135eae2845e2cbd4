"""Read-only SQL over the rollout store: the guard, the locked-down connection, the bounds.

User SQL gets four layers of protection, so no single mistake opens the store up or takes the
caller down:

1. The parser: the text must be exactly one statement that DuckDB's own parser classifies as
   SELECT (plain SELECT, WITH, FROM-first, VALUES, DESCRIBE, SUMMARIZE, SHOW), and its syntax
   tree (``json_serialize_sql``) may hold only SELECT / set-operation / CTE query nodes, which
   rules out data-modifying CTEs such as ``WITH x AS (INSERT ... RETURNING *) SELECT ...``.
2. The engine: each query runs on its own in-memory connection whose views are created first;
   then ``enable_external_access=false`` with ``allowed_directories=[store root]`` makes DuckDB
   itself refuse every file outside the store (``read_csv('/etc/passwd')``, ``'/tmp/x'`` as a
   table, ATTACH, INSTALL/LOAD, http), extension auto-install/-load is off, spilling to disk is
   off, and ``lock_configuration=true`` freezes all of that for the rest of the connection.
3. The engine's bounds: ``memory_limit`` and ``threads`` per query, a row bound (at most
   ``max_rows`` rows come back, flagged as truncated) and a result-size bound.
4. The operating system's bounds (`sponge.store.sql_worker`): layers 1-3 run in a child
   process with an address-space limit, killed with SIGKILL at the deadline, so an allocation
   DuckDB does not count (a list from ``range(10^9)``, ``repeat('x', 10^9)``) or a plan that
   never checks for interruption cannot grow or stall the caller.

`run_read_only` is layers 1-3 in the calling process; it is what the worker child runs. Errors
are `SqlError` (refused or failed) or one of its kinds: `SqlLimitError` (a bound stopped it),
`SqlBusy` (too many queries at once), `SqlUnavailable` (shutting down, or retry).

duckdb and pyarrow are imported inside the functions that use them, so `sponge sql` can start
its worker before paying for those imports itself.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

#: Query-node kinds a read-only statement may contain anywhere in its syntax tree.
_READ_ONLY_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})
#: Table functions that run SQL from a string, which the syntax-tree check cannot see into.
_REFUSED_TABLE_FUNCTIONS = frozenset({"query", "query_table"})
#: DuckDB column types whose Arrow export loses information (UHUGEINT above 2^127 wraps, BIT and
#: BIGNUM come out as opaque bytes, TIMETZ drops its offset): top-level columns of these types
#: come back as their DuckDB text instead.
_TEXT_TYPES = frozenset({"UHUGEINT", "BIT", "BIGNUM", "VARINT", "TIME WITH TIME ZONE"})
#: Bytes per unit in a memory_limit string (DuckDB's convention: KB = 1000, KiB = 1024).
_UNITS = {"": 1, "b": 1, "bytes": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class SqlError(ValueError):
    """A query was refused or failed; the message says why in one line (HTTP 400)."""


class SqlLimitError(SqlError):
    """A bound stopped the query: time, memory or result size (HTTP 422)."""


class SqlBusy(SqlError):
    """As many queries as allowed are already running; retry shortly (HTTP 429)."""


class SqlUnavailable(SqlError):
    """SQL cannot run now: shutting down, the worker could not start, or the store changed (HTTP 503)."""


#: Error kinds a worker may report, by name (anything else is reported as a plain SqlError).
ERROR_KINDS: dict[str, type[SqlError]] = {
    cls.__name__: cls for cls in (SqlError, SqlLimitError, SqlBusy, SqlUnavailable)
}


@dataclass(frozen=True)
class SqlLimits:
    """Bounds applied to every user query, and the worker pool that runs them."""

    #: At most this many rows come back; more are cut off and the result says it was truncated.
    max_rows: int = field(default=10_000, metadata={"name": "sql_max_rows"})
    #: Wall-clock seconds from handing the query to a worker (parse, guard, views, plan, run,
    #: result) until the worker is killed.
    timeout_s: float = field(default=10.0, metadata={"name": "sql_timeout_s"})
    #: Memory for the query: DuckDB's memory_limit (no spilling to disk: over it fails) and,
    #: plus a fixed headroom for threads and the Arrow export, the worker's address-space limit.
    memory_limit: str = field(default="1GB", metadata={"name": "sql_memory_limit"})
    #: Worker threads for the query.
    threads: int = field(default=2, metadata={"name": "sql_threads"})
    #: Largest result (Arrow IPC bytes) a query may return; larger fails with a clear error.
    max_result_bytes: int = field(default=128 * 2**20, metadata={"name": "sql_max_result_bytes"})
    #: Queries that may run at once per worker pool (a process); more are refused (SqlBusy).
    max_concurrent: int = field(default=2, metadata={"name": "sql_max_concurrent"})

    def __post_init__(self) -> None:
        if self.max_rows < 0:
            raise SqlError(f"max_rows must be >= 0, got {self.max_rows}")
        if not self.timeout_s > 0:
            raise SqlError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        if self.threads < 1:
            raise SqlError(f"threads must be >= 1, got {self.threads}")
        if self.max_result_bytes < 1:
            raise SqlError(f"max_result_bytes must be >= 1, got {self.max_result_bytes}")
        if self.max_concurrent < 1:
            raise SqlError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        memory_bytes(self.memory_limit)

    @property
    def memory_bytes(self) -> int:
        return memory_bytes(self.memory_limit)

    def narrowed(self, *, max_rows: int | None = None, timeout_s: float | None = None) -> SqlLimits:
        """These limits with a caller's own row and time bounds (None keeps the configured one)."""
        changes: dict[str, Any] = {}
        if max_rows is not None:
            changes["max_rows"] = int(max_rows)
        if timeout_s is not None:
            changes["timeout_s"] = float(timeout_s)
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class QueryResult:
    """What a user query returned."""

    table: pa.Table
    #: True when the query had more than max_rows rows and only the first max_rows came back.
    truncated: bool
    elapsed_s: float


def memory_bytes(limit: str) -> int:
    """Bytes in a DuckDB-style memory size such as '1GB', '512 MiB' or '100000000'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(limit))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise SqlError(f"memory_limit must be a size such as '1GB' or '512MiB', got {limit!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def check_read_only(query: str, conn: duckdb.DuckDBPyConnection | None = None) -> str:
    """Return the single SELECT statement in `query`, or raise SqlError saying why it is refused.

    `conn` is a connection to parse on (nothing runs on it); by default a fresh in-memory one.
    """
    import duckdb

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
    _check_syntax_tree(text, conn)
    return text


def _check_syntax_tree(text: str, conn: duckdb.DuckDBPyConnection | None) -> None:
    import duckdb

    if conn is None:
        with duckdb.connect(":memory:") as own:
            [(serialized,)] = own.execute("SELECT json_serialize_sql($1)", [text]).fetchall()
    else:   # fetchall: a result left unfinished would block the connection's next statement
        [(serialized,)] = conn.execute("SELECT json_serialize_sql($1)", [text]).fetchall()
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


def new_connection() -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB that will not install or load extensions by itself.

    A new in-memory database costs tens of milliseconds (its catalog is built), which is why
    the SQL worker makes one ahead of the query.
    """
    import duckdb

    return duckdb.connect(
        ":memory:",
        config={"autoload_known_extensions": False, "autoinstall_known_extensions": False},
    )


def open_locked_connection(
    setup_sql: Iterable[str], allowed_dir: str | Path, limits: SqlLimits,
    conn: duckdb.DuckDBPyConnection | None = None, datasets: dict | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the views from `setup_sql`, then locked to `allowed_dir`.

    The setup statements are trusted (they create the views); after them nothing can read
    outside `allowed_dir`, load extensions, spill to disk or change any setting. `conn`: a
    fresh `new_connection()` to lock (by default one is made). `datasets`: Arrow datasets
    (`sponge.store.datasets` specs or their JSON, by name) registered before the views, which
    select from them; they stay readable after the lock (pyarrow reads their files, not DuckDB).
    """
    allowed = str(Path(allowed_dir).resolve()).rstrip("/") + "/"
    conn = conn if conn is not None else new_connection()
    try:
        if datasets:
            from sponge.store.datasets import register_datasets

            register_datasets(conn, datasets)
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
    query: str, *, setup_sql: Iterable[str], allowed_dir: str | Path, limits: SqlLimits,
    conn: duckdb.DuckDBPyConnection | None = None, datasets: dict | None = None,
) -> QueryResult:
    """Check `query`, run it on a fresh locked connection within `limits`, return Arrow.

    This runs in the calling process, bounded by DuckDB alone (layers 1-3); user SQL from the
    store, the CLI and the HTTP API goes through `sponge.store.sql_worker` instead, which runs
    this function in a child process the OS bounds. `conn`: a fresh `new_connection()` to use
    (for the guard's parse too, before any view exists); it is closed at the end.
    """
    import duckdb

    started = time.perf_counter()
    conn = conn if conn is not None else new_connection()
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        conn.interrupt()

    timer = threading.Timer(limits.timeout_s, stop)
    timer.daemon = True
    timer.start()
    try:
        text = check_read_only(query, conn)   # parse only: nothing runs before the guard passes
        conn = open_locked_connection(setup_sql, allowed_dir, limits, conn, datasets)
        # The relation is lazy: limit() wraps the user's query, so at most max_rows + 1 rows are
        # ever produced and DuckDB stops early instead of materialising a huge result.
        relation = _as_text_where_lossy(conn.sql(text))
        table = relation.limit(limits.max_rows + 1).to_arrow_table()
    except duckdb.InterruptException:
        raise SqlLimitError(time_limit_message(limits.timeout_s)) from None
    except (duckdb.OutOfMemoryException, MemoryError):
        raise SqlLimitError(memory_limit_message(limits.memory_limit)) from None
    except duckdb.PermissionException as exc:
        raise SqlError(
            f"query refused: only the rollout store's own files can be read ({_first_line(exc)})"
        ) from None
    except duckdb.IOException as exc:
        if "No such file" in str(exc):  # a segment vanished under the query (compaction): transient
            raise SqlUnavailable(f"the store changed during the query, retry: {_first_line(exc)}") from None
        raise SqlError(f"query failed: {_first_line(exc)}") from None
    except duckdb.Error as exc:
        if timed_out.is_set():
            raise SqlLimitError(time_limit_message(limits.timeout_s)) from None
        if "std::bad_alloc" in str(exc) or "out of memory" in str(exc).lower():
            raise SqlLimitError(memory_limit_message(limits.memory_limit)) from None
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


def _as_text_where_lossy(relation: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """Cast top-level columns whose Arrow export would lose information to VARCHAR."""
    types = [str(t) for t in relation.types]
    if not _TEXT_TYPES.intersection(types):
        return relation
    columns = relation.columns
    if len(set(columns)) != len(columns):
        return relation  # duplicate names cannot be addressed one by one; leave as DuckDB exports them
    exprs = [f"CAST({_ident(c)} AS VARCHAR) AS {_ident(c)}" if t in _TEXT_TYPES else _ident(c)
             for c, t in zip(columns, types)]
    return relation.project(", ".join(exprs))


def time_limit_message(timeout_s: float) -> str:
    return (f"query stopped after {timeout_s:g} s (time limit): narrow it with WHERE/LIMIT "
            "or allow more time (--timeout / timeout_s)")


def memory_limit_message(memory_limit: str) -> str:
    return f"query needed more than the {memory_limit} memory limit: aggregate or filter more"


def _literal(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def _ident(name: str) -> str:
    """A SQL identifier (double quotes doubled)."""
    return '"' + str(name).replace('"', '""') + '"'


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
