"""`sponge sql`: run one read-only SQL query over a rollout store and print the result.

    sponge sql "SELECT policy_version, count(*), avg(reward) FROM rollouts GROUP BY 1" --store ./sponge-data

Views: rollouts, tombstones, dead_letters, replay_subset, segments. Output as a terminal table
(long strings and embeddings shortened), CSV, JSON Lines or an Arrow IPC stream. A refused or
failed query prints one line to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import os
import shutil
import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:   # imported when needed: the worker starts before this process pays for pyarrow
    import pyarrow as pa

HELP = "run a read-only SQL query over the rollout store"
#: Widest a table cell gets before it is shortened with an ellipsis.
MAX_CELL = 40
#: List values shown before "…" in table output.
MAX_LIST_ITEMS = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0] + (
        " Views: rollouts, tombstones, dead_letters, replay_subset, segments."
    )
    parser.add_argument("query", help="one SELECT (or WITH ... SELECT) statement")
    from sponge.store import DEFAULT_STORE_PATH

    parser.add_argument("--store", default=os.environ.get("SPONGE_STORE_PATH", DEFAULT_STORE_PATH),
                        help="rollout store directory, as for `sponge serve` (env SPONGE_STORE_PATH)")
    parser.add_argument("--format", choices=("table", "csv", "json", "arrow"), default="table",
                        help="table for a terminal; csv; json = JSON Lines, one object per row; "
                             "arrow = Arrow IPC stream (binary: use --output or a pipe)")
    parser.add_argument("--max-rows", type=int, default=10_000, help="return at most this many rows")
    parser.add_argument("--timeout", type=float, default=10.0, help="stop the query after this many seconds")
    parser.add_argument("--output", "-o", default=None, help="write the result to this file instead of stdout")


def run(args: argparse.Namespace) -> int:
    from sponge.store.sql import SqlError, SqlLimits
    from sponge.store.sql_worker import SqlWorkers

    # Start the worker first: it imports duckdb while this process opens the store.
    with SqlWorkers(SqlLimits(max_concurrent=1)).start() as workers:
        from sponge.store import RolloutStore, StoreError

        try:
            store = RolloutStore.open(args.store)
            result = store.query(args.query, max_rows=args.max_rows, timeout_s=args.timeout, workers=workers)
        except (SqlError, StoreError) as exc:
            print(f"sponge sql: error: {exc}", file=sys.stderr)
            return 2
    import pyarrow as pa

    table = result.table
    if args.format == "arrow":
        if args.output is None and sys.stdout.isatty():
            print("sponge sql: error: refusing to write binary Arrow to a terminal; use --output FILE or a pipe",
                  file=sys.stderr)
            return 2
        with contextlib.ExitStack() as stack:
            sink: Any = stack.enter_context(open(args.output, "wb")) if args.output else sys.stdout.buffer
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
    else:
        with contextlib.ExitStack() as stack:
            out: TextIO = (stack.enter_context(open(args.output, "w", newline=""))
                           if args.output else sys.stdout)
            if args.format == "table":
                out.write(format_table(table))
                out.write(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''}"
                          f"{', truncated at --max-rows' if result.truncated else ''}; {result.elapsed_s:.3f} s)\n")
            elif args.format == "csv":
                write_csv(table, out)
            else:
                write_json_lines(table, out)
    if result.truncated and args.format != "table":
        print(f"sponge sql: note: result truncated to {args.max_rows} rows (--max-rows)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- formatting


def format_table(table: pa.Table, max_cell: int = MAX_CELL) -> str:
    """A plain-text grid that fits a terminal: long strings and lists are shortened."""
    names = table.column_names
    columns = [_column_values(c) for c in table.columns]
    rows = [[_cell(v, max_cell) for v in row] for row in zip(*columns)]
    widths = [len(n) for n in names]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    # Shrink the widest columns until the table fits the terminal (but keep each >= 8).
    budget = shutil.get_terminal_size((160, 24)).columns - 3 * len(names) - 1
    while sum(widths) > budget and max(widths, default=0) > 8:
        i = widths.index(max(widths))
        widths[i] -= 1
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(_fit(c, w).ljust(w) for c, w in zip(cells, widths)) + " |"
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [rule, line(names), rule] + [line(r) for r in rows] + [rule]
    return "\n".join(out) + "\n"


def _column_values(column: pa.ChunkedArray) -> list[Any]:
    """Python values for display; a column Python cannot hold (an infinite date) as its JSON text."""
    import pyarrow as pa

    try:
        return column.to_pylist()
    except (OverflowError, ValueError, pa.ArrowException):
        from sponge.store.sql_json import json_column

        return json_column(column)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _cell(value: Any, max_cell: int) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_cell(v, max_cell) for v in value[:MAX_LIST_ITEMS])
        more = f", … ({len(value)})" if len(value) > MAX_LIST_ITEMS else ""
        return _fit(f"[{shown}{more}]", max_cell)
    if isinstance(value, bytes):
        return _fit(f"<{len(value)} bytes>", max_cell)
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="milliseconds")
    return _fit(str(value).replace("\n", "\\n"), max_cell)


def write_json_lines(table: pa.Table, out: TextIO) -> None:
    """One JSON object per row, every type encoded as `sponge.store.sql_json` documents."""
    from sponge.store.sql_json import write_json_lines as write

    write(table, out)


def write_csv(table: pa.Table, out: TextIO) -> None:
    """CSV with a header; values as in JSON output (lists/structs/maps as JSON text, NaN empty)."""
    from sponge.store.sql_json import json_column

    writer = csv.writer(out)
    writer.writerow(table.column_names)
    columns = [json_column(c) for c in table.columns]
    for row in zip(*columns):
        writer.writerow(["" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v for v in row])
