"""What every rollout store shares: its errors, its results, its knobs, its legal names and checks.

The store itself is `sponge.store.delta.DeltaRolloutStore` (Delta Lake tables, format 3), exported as
`sponge.store.RolloutStore`; `sponge.store.parquet` keeps the older format-2 layout only for
`sponge store migrate`. Both import what they share from here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sponge.store.sql import SqlLimits

#: Where every command looks for the store unless told otherwise (flag or SPONGE_STORE_PATH).
DEFAULT_STORE_PATH = "sponge-data"
#: The run of a rollout that names none.
DEFAULT_RUN = "default"
#: Largest policy version (int64, what the record's column holds).
MAX_VERSION = np.iinfo(np.int64).max
MANIFEST_NAME = "_sponge_store.json"

TOMBSTONE_SCHEMA = pa.schema([
    pa.field("rollout_id", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("deleted_at", pa.timestamp("ms", tz="UTC")),
])
REPLAY_SCHEMA = pa.schema([
    pa.field("rollout_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string()),
    pa.field("selection_version", pa.int64()),
    pa.field("objective_value", pa.float64()),
    pa.field("selected_at", pa.timestamp("ms", tz="UTC")),
])

_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")  # Kafka's legal topic names: no '/', no '+'
#: A run id names a directory and a URL path segment: letters, digits and . _ : - only.
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class StoreError(ValueError):
    """A store operation was given something it cannot store; the message names what."""


@dataclass(frozen=True)
class StoreConfig:
    """Knobs of the rollout store. The defaults suit 384-d embeddings and ~300-token rollouts."""

    #: Parquet codec. zstd level 1 costs little CPU and shrinks text and token ids well.
    compression: str = "zstd"
    compression_level: int | None = 1
    #: Columns written without compression: dense floats barely shrink (+22% bytes on disk) but
    #: compressing them was 40% of segment-write time, which bounds ingest throughput.
    uncompressed_columns: tuple[str, ...] = ("embedding", "behavior_logprobs")
    #: Rows per Parquet row group: the unit a scan or a query reads at a time.
    row_group_size: int = 16_384
    #: Replay snapshots to keep on disk (older ones are removed after each new one).
    replay_keep: int = 5
    #: Tombstone files beyond this count are merged into one by compact().
    max_tombstone_files: int = 16
    #: Temporary files older than this are removed on open/compact even if their writer's
    #: liveness cannot be checked (another host on shared storage).
    stale_temp_age_s: float = 3600.0
    #: Bounds for user SQL (store.sql / store.query / `sponge sql`).
    sql_limits: SqlLimits = field(default_factory=SqlLimits)


@dataclass(frozen=True)
class SegmentWrite:
    """What one write_segment(s) call did."""

    paths: list[Path]
    rows_written: int
    rows_skipped_duplicate: int
    #: rollout_ids written by this call (string array), for the selector to insert.
    new_ids: pa.Array
    #: rows refused because their run's retention had retired their policy_version, per run.
    retired: dict[str, int] = field(default_factory=dict)
    #: rows skipped because the store already held (or had tombstoned) their rollout_id, per run.
    duplicates: dict[str, int] = field(default_factory=dict)

    @property
    def rows_skipped_retired(self) -> int:
        return sum(self.retired.values())

    @classmethod
    def merged(cls, writes: Sequence[SegmentWrite]) -> SegmentWrite:
        """One result for several writes (a store that writes segments one at a time)."""
        def add(dicts):
            total: dict[str, int] = {}
            for d in dicts:
                for run, n in d.items():
                    total[run] = total.get(run, 0) + n
            return total
        return cls([p for w in writes for p in w.paths], sum(w.rows_written for w in writes),
                   sum(w.rows_skipped_duplicate for w in writes),
                   pa.concat_arrays([w.new_ids.cast(pa.string()) for w in writes]) if writes
                   else pa.array([], pa.string()),
                   add(w.retired for w in writes), add(w.duplicates for w in writes))


@dataclass
class Segment:
    """The rollouts of one consumed Kafka range: what `write_segments` takes, one per partition.

    `rows` are validated rollouts (the rollout schema), `offsets` the Kafka offset each row came
    from, `first_offset..last_offset` the consumed range including bad messages."""

    rows: pa.Table
    topic: str
    partition: int
    offsets: np.ndarray
    first_offset: int
    last_offset: int

    def checked(self) -> Segment:
        """The segment with its numbers as int64/int, or a StoreError saying what is wrong."""
        check_topic(self.topic)
        partition, first, last = int(self.partition), int(self.first_offset), int(self.last_offset)
        if partition < 0 or first < 0 or last < first:
            raise StoreError(f"bad segment range: partition={partition}, offsets {first}-{last} "
                             "(need partition >= 0 and 0 <= first_offset <= last_offset)")
        offsets = np.asarray(self.offsets, dtype=np.int64)
        if offsets.shape != (self.rows.num_rows,):
            raise StoreError(f"offsets has shape {offsets.shape}, expected ({self.rows.num_rows},): one per row")
        if self.rows.num_rows and (offsets.min() < first or offsets.max() > last):
            raise StoreError(f"row offsets fall outside the consumed range {first}-{last}")
        return Segment(self.rows, self.topic, partition, offsets, first, last)


@dataclass(frozen=True)
class Removal:
    """What one delete() call did."""

    #: distinct live rollouts tombstoned
    removed: int
    #: the ids asked for that the store does not hold (never stored, retired or already removed)
    unknown: list[str]


@dataclass(frozen=True)
class CompactionResult:
    """What one compact() call did."""

    segments_rewritten: int
    segments_removed: int
    rows_removed: int
    tombstone_files_merged: int
    bytes_before: int
    bytes_after: int




def mark_of_each_row(run_ids: pa.ChunkedArray | pa.Array, marks: dict[str, int]) -> pa.Array:
    """Each row's run's retention mark (-1 for a run with none), vectorised."""
    runs = list(marks)
    at = pc.index_in(run_ids, value_set=pa.array(runs, pa.string()))
    values = pa.array([marks[r] for r in runs] + [-1], pa.int64())
    return pc.take(values, pc.fill_null(at, len(runs)))


def check_version(version, what: str) -> int:
    """`version` as a policy version (an int64 >= 0), or a StoreError saying why not."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
        raise StoreError(f"{what} must be an integer, got {version!r}")
    if not 0 <= int(version) <= MAX_VERSION:
        raise StoreError(f"{what} {version} is out of range: a policy version is an int64 >= 0")
    return int(version)


def check_run(run: str) -> str:
    if not isinstance(run, str) or not RUN_ID_RE.match(run):
        raise StoreError(f"run id {run!r} is not legal: letters, digits and . _ : - (at most 128, not "
                         "starting with a symbol)")
    return run


def as_string_array(ids: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if isinstance(ids, pa.Array):
        if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
            raise StoreError(f"rollout ids must be strings, got {ids.type}")
        return ids.cast(pa.string())
    if isinstance(ids, (str, bytes)):
        raise StoreError("pass a sequence of rollout ids, not a single string")
    try:
        return pa.array(list(ids), pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise StoreError(f"rollout ids must be strings: {exc}") from None


def check_topic(topic: str) -> None:
    if not isinstance(topic, str) or not _TOPIC_RE.match(topic):
        raise StoreError(f"topic {topic!r} is not a legal Kafka topic name ([A-Za-z0-9._-], 1-249 chars)")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def conform_rows(rows: pa.Table, expected: pa.Schema) -> pa.Table:
    """`rows` checked against the rollout schema `expected` and cast to it, with a missing run_id set to
    the default run; a StoreError naming the first problem otherwise."""
    if not isinstance(rows, pa.Table):
        if isinstance(rows, pa.RecordBatch):
            rows = pa.Table.from_batches([rows])
        else:
            raise StoreError(f"rows must be a pyarrow Table, got {type(rows).__name__}")
    if rows.schema.names != expected.names:
        missing = [n for n in expected.names if n not in rows.schema.names]
        extra = [n for n in rows.schema.names if n not in expected.names]
        raise StoreError(f"rows do not have the rollout schema: missing {missing}, unexpected {extra}"
                         + ("" if missing or extra else ", columns out of order"))
    for got, want in zip(rows.schema, expected):
        if got.type != want.type:
            raise StoreError(f"column '{got.name}' has type {got.type}, the rollout schema says {want.type}")
    for name in ("rollout_id", "policy_version"):
        if rows.column(name).null_count:
            raise StoreError(f"column '{name}' has nulls: pass rows through sponge.record.validate first")
    rows = rows.cast(expected)
    run_id = rows.column("run_id")
    if run_id.null_count:   # a rollout that names no run belongs to the default one
        rows = rows.set_column(rows.schema.get_field_index("run_id"), expected.field("run_id"),
                               pc.fill_null(run_id, DEFAULT_RUN))
    bad = pc.invert(pc.match_substring_regex(rows.column("run_id"), RUN_ID_RE.pattern))
    if pc.any(bad).as_py():
        example = rows.column("run_id").filter(bad)[0].as_py()
        raise StoreError(f"run_id {example!r} is not a legal run id ({RUN_ID_RE.pattern}): "
                         "pass rows through sponge.record.validate first")
    return rows


def with_store_columns(rows: pa.Table, stored_schema: pa.Schema, topic: str, partition: int,
                       offsets: np.ndarray) -> pa.Table:
    """`rows` with the columns the store adds (topic, partition, offset, ingested_at), in `stored_schema`."""
    n = rows.num_rows
    now = pa.scalar(int(time.time() * 1000), pa.timestamp("ms", tz="UTC"))
    extra = {"topic": pa.repeat(pa.scalar(topic, pa.string()), n),
             "partition": pa.repeat(pa.scalar(partition, pa.int32()), n),
             "offset": pa.array(offsets), "ingested_at": pa.repeat(now, n)}
    columns = [rows.column(f.name) if f.name in rows.schema.names else extra[f.name] for f in stored_schema]
    return pa.Table.from_arrays(columns, schema=stored_schema)
