"""The rollout store as Delta Lake tables (delta-rs) on a local directory or an S3-compatible store.

Layout under the store location (a directory, or `s3://bucket/prefix` with the usual AWS_*
settings and AWS_ENDPOINT_URL for a store other than AWS):

    rollouts/        Delta table of rollouts, partitioned by run_id and policy_version
    tombstones/      Delta table of removed rollout ids (rollout_id, reason, deleted_at)
    dead_letters/    Delta table of rejected messages
    replay/selection-<seq>.parquet   curated replay subsets of every run, the last few kept

Any Delta reader (Spark, Polars, DuckDB over `DeltaTable.to_pyarrow_dataset()`) reads the tables.

How today's promises map onto Delta:

* A segment (the rows of one consumed Kafka range) is ONE commit of the rollouts table: a Parquet
  file per (run, policy version), written first and committed together with two app
  transactions: `sponge.offset:<topic>:<partition>` = the highest offset the table holds for that
  partition (`table_offset()`, so a restarted consumer can seek from what the table holds) and
  `sponge.ingest`, shared by every writer.
* Exactly-once by rollout_id: each store object keeps an index of the ids the table holds or has
  tombstoned (a `RolloutIdSet`), refreshed from the files added since it last looked, and filters
  a segment against it. Delta's conflict check fails a commit when a commit that landed after the
  writer's snapshot carries an app transaction of the same id, so two writers that both saw
  version v cannot both commit `sponge.ingest` on top of it: the loser refreshes its index from
  the winner's files, filters again and retries. Every committed segment has therefore been
  checked against every segment committed before it, on any host. Safe on an object store
  because delta-rs commits version N by a put-if-absent of `_delta_log/N.json` (on S3 a
  conditional PUT with `If-None-Match: *`; the server must honour it, as AWS S3, MinIO, R2 and
  SeaweedFS do).
* Retention per run: the run's mark is a table property (`sponge.retired.<run>`); the change is a
  metadata commit, which fails every concurrent segment commit, so no writer commits rows of a
  version retired under it. Then one partition-predicate delete removes the retired versions'
  files from the table (a metadata-only commit). The views filter by the marks too, so nothing
  retired shows in between; vacuum deletes the files later.
* Explicit removal: the ids are appended to the tombstones table first (they are hidden at once
  and can never be stored again), then deleted from the rollouts table by rewriting the files
  that hold them (one commit removing those files and adding their survivors). A removal whose
  rewrite failed is finished by the next compaction.
* Compaction: pending removals and retired partitions, then OPTIMIZE (small files merged), VACUUM
  (files no snapshot of the last `vacuum_retention_hours` needs), a checkpoint and log cleanup, so
  the log stays short.
* SQL: each reader registers the tables' current files as Arrow datasets on its own in-memory
  DuckDB connection (`sponge.store.datasets`); the views `rollouts`, `tombstones`,
  `dead_letters`, `replay_subset`, `segments` select from them. User SQL runs in a bounded child
  process that gets the same dataset descriptions.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import (
    CommitProperties,
    DeltaTable,
    PostCommitHookProperties,
    Transaction,
    WriterProperties,
    write_deltalake,
)
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, RemoveAction

from sponge.files import TEMP_SUFFIX, atomic_write, fsync_dir, pid_alive
from sponge.record import (
    DEAD_LETTER_SCHEMA,
    DEFAULT_EMBEDDING_DIM,
    rollout_schema,
    stored_schema,
)
from sponge.store.common import (
    DEFAULT_RUN,
    MANIFEST_NAME,
    REPLAY_SCHEMA,
    TOMBSTONE_SCHEMA,
    CompactionResult,
    Removal,
    Segment,
    SegmentWrite,
    StoreConfig,
    StoreError,
    as_string_array,
    check_run,
    check_topic,
    check_version,
    conform_rows,
    mark_of_each_row,
    quote_ident,
    sql_str,
    with_store_columns,
)
from sponge.store.datasets import DatasetSpec, FileSystemSpec
from sponge.store.idmap import RolloutIdSet, first_occurrence
from sponge.store.reads import T, ViewReads
from sponge.store.sql import QueryResult
from sponge.store.sql_worker import SqlWorkers

log = logging.getLogger(__name__)

#: 3: Delta tables (2: Parquet segments and JSON marks; `sponge store migrate` converts).
STORE_FORMAT_VERSION = 3
ROLLOUTS = "rollouts"
TOMBSTONES = "tombstones"
DEAD_LETTERS = "dead_letters"
REPLAY = "replay"
#: Small objects every host of a store reads (shard solutions, the objective's parameters).
SHARED = "_shared"
PARTITION_BY = ["run_id", "policy_version"]
#: Table properties sponge keeps on the rollouts table.
DIM_KEY = "sponge.embedding_dim"
FORMAT_KEY = "sponge.format"
MARK_PREFIX = "sponge.retired."
#: Connections to the views kept for reuse by `_read` (one per thread reading at once, about).
IDLE_CONNECTIONS = 4
#: The app transaction every segment commit carries: two writers on one snapshot conflict on it.
INGEST_APP_ID = "sponge.ingest"
OFFSET_APP_PREFIX = "sponge.offset:"
#: Names the views select from (Arrow datasets registered on each connection).
DATASET_NAMES = {ROLLOUTS: "_sponge_rollouts", TOMBSTONES: "_sponge_tombstones",
                 DEAD_LETTERS: "_sponge_dead_letters", REPLAY: "_sponge_replay", "segments": "_sponge_segments"}
_SHARED_KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")
#: The Arrow types a Delta table stores (no fixed-size lists; microsecond timestamps).
_TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class DeltaStoreConfig(StoreConfig):
    """Knobs of the Delta-backed store (on top of `StoreConfig`'s Parquet and SQL knobs)."""

    #: Settings for an s3:// location (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
    #: AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, AWS_SESSION_TOKEN); unset ones come from the environment.
    storage_options: dict = field(default_factory=dict)
    #: Local directory for what is not table data (the run registry, selector state) when the
    #: store is on an object store; default ./sponge-state/<bucket>/<prefix>.
    local_dir: str | None = None
    #: Segment commits retried after losing a race to another writer (each retry refreshes).
    commit_attempts: int = 50
    #: When a removal deletes its rows from the table (rewrites the files holding them), and a
    #: retention mark its versions' files: "background" (a thread of the store, right after delete()
    #: or retire_below() returns), "now" (inside the call), or "compaction". The rows are hidden from
    #: sponge's views and refused at once in every case.
    removal_rewrite: str = "background"
    #: VACUUM keeps files that snapshots of the last this many hours still need (readers with
    #: an older snapshot, writers whose file is written but not yet committed). 0 only in tests.
    vacuum_retention_hours: int = 1
    #: Log entries older than this are deleted at checkpoints (the log stays short).
    log_retention_s: int = 3600
    #: A checkpoint every this many commits (Delta's default is 100).
    checkpoint_interval: int = 100
    #: OPTIMIZE merges files smaller than this per partition: the small segments of quiet periods,
    #: not the usual ones (rewriting those would double the write cost of every rollout).
    target_file_bytes: int = 8 * 2**20
    #: A segment's rows of one (run, version) are written as up to this many files at once, on
    #: threads of the store (Parquet encoding lets go of the GIL; on an object store the uploads
    #: run side by side, which a single PUT stream's latency makes worth it). None: 1 for a
    #: local table (on a busy 2-core machine a second encoder only competes), 2 on S3 ...
    write_threads: int | None = None
    #: ... each of at least this many bytes of Arrow data (smaller parts stay one file).
    split_bytes: int = 12 * 2**20


def _is_remote(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


@dataclass(frozen=True)
class _Location:
    """A store location: the URI delta-rs opens, the pyarrow file system and base path of the
    same place, the storage options, and the local directory for non-table state."""

    uri: str
    fs: pafs.FileSystem
    base: str
    storage_options: dict | None
    fs_spec: FileSystemSpec
    local_dir: Path

    @property
    def remote(self) -> bool:
        return self.fs_spec.kind != "local"

    def table_uri(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"

    def path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts])


def _resolve_location(root: str | os.PathLike, config: DeltaStoreConfig) -> _Location:
    text = str(root)
    if not _is_remote(text):
        path = Path(text.removeprefix("file://")).resolve()
        return _Location(str(path), pafs.LocalFileSystem(), str(path), None, FileSystemSpec(), path)
    scheme, _, rest = text.partition("://")
    if scheme not in ("s3", "s3a"):
        raise StoreError(f"store location {text!r}: only local directories and s3:// are supported")
    given = {k.upper(): str(v) for k, v in (config.storage_options or {}).items()}

    def setting(*names: str) -> str:
        for name in names:
            if given.get(name):
                return given[name]
        for name in names:
            if os.environ.get(name):
                return os.environ[name]
        return ""

    endpoint = setting("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
    region = setting("AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1"
    access, secret = setting("AWS_ACCESS_KEY_ID"), setting("AWS_SECRET_ACCESS_KEY")
    token = setting("AWS_SESSION_TOKEN")
    options = {**given, "AWS_REGION": region}
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options.setdefault("AWS_ALLOW_HTTP", "true")
    if access:
        options.update(AWS_ACCESS_KEY_ID=access, AWS_SECRET_ACCESS_KEY=secret)
    if token:
        options["AWS_SESSION_TOKEN"] = token
    spec = FileSystemSpec("s3", endpoint, region, access, secret, token)
    local = Path(config.local_dir) if config.local_dir else Path("sponge-state") / rest.strip("/")
    local = local.resolve()
    local.mkdir(parents=True, exist_ok=True)
    uri = f"s3://{rest.rstrip('/')}"
    return _Location(uri, spec.open(), rest.rstrip("/"), options, spec, local)


def _delta_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
        return pa.list_(_delta_type(t.value_type))
    if pa.types.is_timestamp(t):
        return _TS
    return t


def _delta_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` in the types a Delta table stores and returns (lists, microsecond timestamps)."""
    return pa.schema([pa.field(f.name, _delta_type(f.type), f.nullable) for f in schema])


def _is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, CommitFailedError)


class DeltaRolloutStore(ViewReads):
    """Rollouts in Delta tables, queried through DuckDB views over Arrow datasets.

    Safe for many processes on many hosts writing one location (the ingest services of one
    consumer group, the curator, a user's SQL): commits are serialised by the table's log, readers
    read snapshots. Within a process the methods are thread-safe.
    """

    def __init__(self, root: str | os.PathLike, embedding_dim: int = DEFAULT_EMBEDDING_DIM, *,
                 config: StoreConfig | None = None, create: bool = True, _check_format: bool = True) -> None:
        if int(embedding_dim) <= 0:
            raise StoreError(f"embedding_dim must be positive, got {embedding_dim}")
        if config is None or not isinstance(config, DeltaStoreConfig):
            config = DeltaStoreConfig(**vars(config)) if config is not None else DeltaStoreConfig()
        self.config: DeltaStoreConfig = config
        self.embedding_dim = int(embedding_dim)
        self._loc = _resolve_location(root, config)
        self.uri = self._loc.uri
        self._write_threads = max(1, config.write_threads or (2 if self._loc.remote else 1))
        #: Local directory for state that is not table data (the table itself when local).
        self.root = self._loc.local_dir
        self._stored_schema = stored_schema(self.embedding_dim)
        self._rollout_schema = rollout_schema(self.embedding_dim)
        self._table_schema = _delta_schema(self._stored_schema)
        self._file_schema = pa.schema([f for f in self._table_schema if f.name not in PARTITION_BY])
        self._tomb_schema = _delta_schema(TOMBSTONE_SCHEMA)
        self._dlq_schema = _delta_schema(DEAD_LETTER_SCHEMA)
        if _check_format:
            self._check_old_format()
        self._lock = threading.RLock()        # the writer table, the index, retention marks
        self._maint_lock = threading.RLock()  # removals' rewrites and compaction (own table objects)
        self._read_lock = threading.Lock()    # the reader table objects, the idle connections
        self._idle: list[duckdb.DuckDBPyConnection] = []   # connections to the views, for `_read`
        self._writer = self._open_or_create(ROLLOUTS, self._table_schema, PARTITION_BY, create)
        self._check_dim(self._writer)
        self._tomb_writer = self._open_or_create(TOMBSTONES, self._tomb_schema, [], True)
        self._dlq_writer = self._open_or_create(DEAD_LETTERS, self._dlq_schema, [], True)
        self._readers = {name: self._table(name) for name in (ROLLOUTS, TOMBSTONES, DEAD_LETTERS)}
        self._index = RolloutIdSet()            # every id held or tombstoned, tagged (run, version)
        self._run_codes: dict[str, int] = {}
        self._known: set[str] = set()           # rollouts-table files whose ids are indexed
        self._known_tombs: set[str] = set()
        self._index_marks: dict[str, int] = {}
        self._indexed_at: tuple[int, int] = (-1, -1)   # (rollouts version, tombstones version)
        self._datasets: dict[str, tuple[tuple, object]] = {}   # name -> (its files, the opened dataset)
        self._removal_cv = threading.Condition()
        self._removals: list[pa.Table] = []     # removals whose rows are not yet deleted from the table
        self._retirements: dict[str, int] = {}  # per run, the retention mark whose delete has not run yet
        self._removals_taken = 0
        self._removal_thread: threading.Thread | None = None
        with self._lock:
            self._refresh_index()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, root: str | os.PathLike, *, config: StoreConfig | None = None) -> DeltaRolloutStore:
        """Open an existing store, taking the embedding dimension from its table."""
        probe = config if isinstance(config, DeltaStoreConfig) else (
            DeltaStoreConfig(**vars(config)) if config is not None else DeltaStoreConfig())
        loc = _resolve_location(root, probe)
        if not loc.remote:
            manifest = Path(loc.uri) / MANIFEST_NAME
            if manifest.is_file():
                cls._raise_old_format(manifest)
        try:
            table = DeltaTable(loc.table_uri(ROLLOUTS), storage_options=loc.storage_options)
        except TableNotFoundError:
            where = Path(loc.uri)
            hint = ("it is not a directory" if not loc.remote and where.exists() and not where.is_dir()
                    else f"no Delta table at {loc.table_uri(ROLLOUTS)}")
            raise StoreError(f"no rollout store at {loc.uri} ({hint}): pass --store with the location "
                             "`sponge serve` writes to (env SPONGE_STORE_PATH)") from None
        dim = table.metadata().configuration.get(DIM_KEY)
        if dim is None:
            raise StoreError(f"the table at {loc.table_uri(ROLLOUTS)} is not a sponge store (no {DIM_KEY})")
        return cls(root, embedding_dim=int(dim), config=probe, create=False)

    @staticmethod
    def _raise_old_format(manifest: Path) -> None:
        try:
            version = int(json.loads(manifest.read_text()).get("format_version", 1))
        except (ValueError, OSError, AttributeError) as exc:
            raise StoreError(f"unreadable store manifest {manifest}: {exc}") from None
        if version < STORE_FORMAT_VERSION:
            raise StoreError(f"the store at {manifest.parent} has format {version} (Parquet segments); this "
                             f"sponge reads format {STORE_FORMAT_VERSION} (Delta tables): run "
                             f"`sponge store migrate --store {manifest.parent}` once")

    def _check_old_format(self) -> None:
        if not self._loc.remote:
            manifest = Path(self._loc.uri) / MANIFEST_NAME
            if manifest.is_file():
                self._raise_old_format(manifest)

    def _table(self, name: str, version: int | None = None) -> DeltaTable:
        """One of the store's tables: at `version`, or kept current (`_LiveTable`) when None."""
        if version is not None:
            return DeltaTable(self._loc.table_uri(name), version=version, storage_options=self._loc.storage_options)
        return _LiveTable(lambda: DeltaTable(self._loc.table_uri(name), storage_options=self._loc.storage_options))

    def _open_or_create(self, name: str, schema: pa.Schema, partition_by: list[str], create: bool) -> DeltaTable:
        try:
            return self._table(name)
        except TableNotFoundError:
            if not create:
                raise StoreError(f"no Delta table at {self._loc.table_uri(name)}") from None
        if not self._loc.remote:
            Path(self._loc.uri).mkdir(parents=True, exist_ok=True)
        cfg = self.config
        configuration = {
            "delta.checkpointInterval": str(cfg.checkpoint_interval),
            "delta.logRetentionDuration": f"interval {int(cfg.log_retention_s)} seconds",
            "delta.deletedFileRetentionDuration": f"interval {int(cfg.vacuum_retention_hours)} hours",
            "delta.enableExpiredLogCleanup": "true",
        }
        DeltaTable.create(self._loc.table_uri(name), schema=schema, partition_by=partition_by or None,
                          mode="ignore", configuration=configuration, storage_options=self._loc.storage_options)
        table = self._table(name)
        if name == ROLLOUTS:
            self._set_properties(table, {DIM_KEY: str(self.embedding_dim), FORMAT_KEY: str(STORE_FORMAT_VERSION)},
                                 only_missing=True)
        return table

    def _set_properties(self, table: DeltaTable, properties: dict[str, str], only_missing: bool = False) -> None:
        """Commit table properties, retried when another commit lands first."""
        for attempt in range(self.config.commit_attempts):
            table.update_incremental()
            current = table.metadata().configuration
            wanted = {k: v for k, v in properties.items() if not (only_missing and k in current)}
            if all(current.get(k) == v for k, v in wanted.items()):
                return
            try:
                table.alter.set_table_properties(wanted, raise_if_not_exists=False)
                return
            except CommitFailedError:
                _backoff(attempt)
        raise StoreError(f"could not commit table properties {sorted(properties)}: too many concurrent commits")

    def _check_dim(self, table: DeltaTable) -> None:
        dim = table.metadata().configuration.get(DIM_KEY)
        if dim is not None and int(dim) != self.embedding_dim:
            raise StoreError(f"store {self.uri} holds {dim}-d embeddings, opened with "
                             f"embedding_dim={self.embedding_dim}")

    # ------------------------------------------------------------------ writing rollouts

    def write_segment(self, rows: pa.Table, *, topic: str, partition: int, offsets: np.ndarray,
                      first_offset: int, last_offset: int) -> SegmentWrite:
        """Store the rollouts of one consumed Kafka range, each rollout_id at most once ever
        (`write_segments` with one segment)."""
        return self.write_segments([Segment(rows, topic, partition, offsets, first_offset, last_offset)])

    def write_segments(self, segments: Sequence[Segment]) -> SegmentWrite:
        """Store the rollouts of consumed Kafka ranges (one per partition), each rollout_id at most
        once ever, in one commit: a file per (run, policy_version) and every partition's last
        offset, all or nothing. Rows whose id is already stored or tombstoned, repeats (within and
        across the segments: the first is kept), and rows of retired versions are skipped.

        One commit for a whole flush, not one per partition: a commit costs the same for 100 rows
        as for 10,000 (~50 ms here), and a trainer's step spreads its rollouts over every partition.
        """
        segments = [seg.checked() for seg in segments]
        if not segments:
            raise StoreError("write_segments needs at least one segment")
        table = pa.concat_tables([self._with_store_columns(self._conform_rows(seg.rows), seg.topic, seg.partition,
                                                           seg.offsets) for seg in segments])
        last: dict[str, int] = {}
        for seg in segments:
            app = f"{OFFSET_APP_PREFIX}{seg.topic}:{seg.partition}"
            last[app] = max(seg.last_offset, last.get(app, -1))
        ranges = [f"{seg.topic}/{seg.partition}/{seg.first_offset}-{seg.last_offset}" for seg in segments]
        first = segments[0]
        name = f"{first.topic}+{first.partition}+{first.first_offset}-{first.last_offset}"
        if len(segments) > 1:
            name += f"+{len(segments) - 1}more"
        return self._write_rows(table, name, sorted(last.items()),
                                {"sponge.operation": "segment", "sponge.range": ",".join(ranges)})

    def _write_rows(self, rows: pa.Table, name: str, offsets: list[tuple[str, int]], metadata: dict) -> SegmentWrite:
        """Commit the rows (stored schema) the table does not hold yet, in one commit.

        Under the store's lock: filter against the index (refreshed from the table), and commit.
        The files are encoded and written outside it, so segments of other partitions encode at
        the same time; if the filter's answer changed meanwhile (another writer's commit, a
        retention mark), the files are written again for the new answer. A commit that loses a
        race with another writer's segment commit is retried the same way (module docstring)."""
        all_h1, all_h2 = self._index.hash(rows.column("rollout_id"))
        first = first_occurrence(all_h1, all_h2)
        written: tuple[bytes, list] | None = None   # (which rows, their files) from an earlier pass
        for attempt in range(self.config.commit_attempts):
            with self._lock:
                # The first pass filters on the index as it is (the files are encoded next, outside
                # the lock); the pass that commits refreshes it first and checks the answer again.
                if written is not None or attempt > 0:
                    self._refresh_index()
                marks = self._marks_of(self._writer)
                current = np.ones(rows.num_rows, bool)
                if marks and rows.num_rows:
                    current = pc.greater_equal(rows.column("policy_version"), mark_of_each_row(
                        rows.column("run_id"), marks)).to_numpy(zero_copy_only=False)
                keep = current & first & ~self._index.contains_hashed(all_h1, all_h2)
                retired = _counts_by_run(rows, ~current)
                duplicates = _counts_by_run(rows, current & ~keep)
                n_keep = int(keep.sum())
                if n_keep == 0 and (written is not None or attempt > 0):   # an answer on a fresh index
                    return SegmentWrite([], 0, int(current.sum()), pa.array([], pa.string()), retired, duplicates)
                if n_keep == 0:
                    continue
                kept = rows if n_keep == rows.num_rows else rows.filter(pa.array(keep))
                if written is not None and written[0] == keep.tobytes():
                    read_version = self._writer.version()
                    txns = [Transaction(INGEST_APP_ID, read_version + 1)]
                    for app, last_offset in offsets:   # each partition's offset, never lowered
                        previous = self._writer.transaction_version(app)
                        txns.append(Transaction(app, max(last_offset, -1 if previous is None else previous)))
                    try:
                        self._commit(self._writer, [a for a, *_ in written[1]], self._table_schema, PARTITION_BY,
                                     txns, metadata, attempts=1)
                    except CommitFailedError:
                        # Another writer committed (or retention moved) since our snapshot: re-check.
                        _backoff(attempt)
                        continue
                    kept_h1, kept_h2 = all_h1[keep], all_h2[keep]
                    for add, run, version, at in written[1]:
                        self._known.add(unquote(add.path))
                        self._index.add_hashed(kept_h1[at], kept_h2[at], run=self._run_code(run), version=version)
                    if self._writer.version() == read_version + 1 and self._indexed_at[0] == read_version:
                        # Only our own commit since the last refresh: the index holds it already.
                        self._indexed_at = (read_version + 1, self._indexed_at[1])
                    return SegmentWrite(paths=[self._physical(add.path) for add, *_ in written[1]],
                                        rows_written=n_keep, rows_skipped_duplicate=int(current.sum()) - n_keep,
                                        new_ids=kept.column("rollout_id").combine_chunks(), retired=retired,
                                        duplicates=duplicates)
            written = (keep.tobytes(), self._write_rollout_files(kept, name))   # outside the lock
        raise StoreError(f"could not commit segment {name} after {self.config.commit_attempts} attempts: "
                         "other writers keep committing first")

    def table_offset(self, topic: str, partition: int) -> int | None:
        """The highest Kafka offset of (topic, partition) whose segment the table holds (None: none).

        Recorded in the same commit as the segment, so a consumer that seeks to this + 1 after a
        restart neither skips nor repeats a committed range (repeats would be skipped anyway)."""
        check_topic(topic)
        with self._read_lock:
            reader = self._readers[ROLLOUTS]
            reader.update_incremental()
            return reader.transaction_version(f"{OFFSET_APP_PREFIX}{topic}:{int(partition)}")

    def _conform_rows(self, rows: pa.Table) -> pa.Table:
        return conform_rows(rows, self._rollout_schema)

    def _with_store_columns(self, rows: pa.Table, topic: str, partition: int, offsets: np.ndarray) -> pa.Table:
        return with_store_columns(rows, self._stored_schema, topic, partition, offsets)

    def _write_rollout_files(self, table: pa.Table, name: str) -> list[tuple[AddAction, str, int, np.ndarray]]:
        """Parquet files for the rows of `table`, not yet committed: per (run, policy_version), split
        in up to `write_threads` files of at least `split_bytes`, encoded and written at once on
        the store's threads (pyarrow lets go of the GIL); each with its rows' positions in `table`."""
        jobs = []
        for run, version, rows in _split_rows(table):
            part_bytes = table.nbytes * len(rows) / max(table.num_rows, 1)
            pieces = int(max(1, min(self._write_threads, part_bytes // max(self.config.split_bytes, 1))))
            jobs.extend((run, version, chunk) for chunk in np.array_split(rows, pieces) if len(chunk))

        def write(job: tuple[str, int, np.ndarray]) -> tuple[AddAction, str, int, np.ndarray]:
            run, version, rows = job
            part = table if len(rows) == table.num_rows else table.take(pa.array(rows))
            body = part.drop_columns(["run_id", "policy_version"]).cast(self._file_schema)
            rel = f"run_id={_escape(run)}/policy_version={version}/{name}-{uuid.uuid4().hex[:12]}.parquet"
            add = self._write_file(ROLLOUTS, rel, body, _stats(body, ["rollout_id", "offset"]),
                                   {"run_id": run, "policy_version": str(version)})
            return add, run, version, rows

        if len(jobs) == 1:
            return [write(jobs[0])]
        if "_pool" not in self.__dict__:
            self.__dict__.setdefault("_pool", ThreadPoolExecutor(max_workers=self._write_threads,
                                                                 thread_name_prefix="sponge-store-write"))
        return list(self._pool.map(write, jobs))

    def _write_file(self, table_name: str, rel: str, body: pa.Table, stats: dict,
                    partition_values: dict) -> AddAction:
        """Write a Parquet file into a table's directory (durably) and describe it for a commit."""
        cfg = self.config
        names = body.schema.names
        codec: str | dict = cfg.compression
        level = cfg.compression_level
        if set(cfg.uncompressed_columns) & set(names):
            packed = [n for n in names if n not in cfg.uncompressed_columns]
            codec = {n: ("none" if n in cfg.uncompressed_columns else cfg.compression) for n in names}
            level = None if level is None else {n: level for n in packed}
        is_rollouts = table_name == ROLLOUTS
        options = {"compression": codec, "compression_level": level, "row_group_size": cfg.row_group_size,
                   "use_dictionary": ["prompt_id", "topic", "prompt"] if is_rollouts else True,
                   "write_statistics": (["rollout_id", "prompt_id", "reward", "created_at", "topic", "partition",
                                         "offset", "ingested_at"] if is_rollouts else True)}
        path = self._loc.path(table_name, rel)
        if self._loc.remote:
            with self._loc.fs.open_output_stream(path) as out:   # a multipart upload, complete on close
                pq.write_table(body, out, **options)
                size = out.tell()
        else:
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            with open(path, "wb") as fh:
                pq.write_table(body, fh, **options)
                fh.flush()
                os.fsync(fh.fileno())
                size = fh.tell()
            fsync_dir(directory)
        return AddAction(rel, int(size), partition_values, int(time.time() * 1000), True, json.dumps(stats))

    def _commit(self, table: DeltaTable, actions: list, schema: pa.Schema, partition_by: list[str],
                txns: list[Transaction] | None = None, metadata: dict | None = None, attempts: int | None = None,
                guard: AbstractContextManager | None = None) -> None:
        """Commit file actions to `table` on its current snapshot; durable on return.

        `attempts` > 1 retries a commit that lost a race (a blind append or a removal whose
        files are still there: delta-rs's own conflict check decides)."""
        attempts = attempts or self.config.commit_attempts
        before = table.version()
        for attempt in range(attempts):
            try:
                with guard if guard is not None else nullcontext():
                    table.create_write_transaction(
                        actions, mode="append", schema=schema, partition_by=partition_by or None,
                        commit_properties=CommitProperties(custom_metadata=metadata, app_transactions=txns),
                        post_commithook_properties=PostCommitHookProperties(create_checkpoint=True,
                                                                            cleanup_expired_logs=True))
                break
            except CommitFailedError:
                if attempt == attempts - 1:
                    raise
                _backoff(attempt)
                table.update_incremental()
        table.update_incremental()
        if not self._loc.remote:
            self._fsync_log(table, before)

    def _fsync_log(self, table: DeltaTable, before: int) -> None:
        """Make the log entries since `before` durable (delta-rs renames them in, without fsync)."""
        log_dir = Path(unquote(table.table_uri.removeprefix("file://"))) / "_delta_log"
        for version in range(before + 1, table.version() + 1):
            path = log_dir / f"{version:020d}.json"
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(log_dir)

    def _physical(self, rel: str) -> Path | str:
        path = self._loc.path(ROLLOUTS, unquote(rel))
        return Path(path) if not self._loc.remote else f"s3://{path}"

    # ------------------------------------------------------------------ the exactly-once index

    def _run_code(self, run: str) -> int:
        return self._run_codes.setdefault(run, len(self._run_codes))

    @staticmethod
    def _marks_of(table: DeltaTable) -> dict[str, int]:
        out = {}
        for key, value in table.metadata().configuration.items():
            if key.startswith(MARK_PREFIX) and value not in (None, "", "0"):
                try:
                    out[check_run(key[len(MARK_PREFIX):])] = check_version(int(value), "retention mark")
                except (ValueError, StoreError) as exc:
                    raise StoreError(f"unreadable retention mark {key}={value!r} on the rollouts table: {exc}; "
                                     "mend it with `sponge store retention --run R --lower-to V`") from None
        return out

    def _refresh_index(self) -> None:
        """Index the ids of files committed since the last call (by anyone), drop those of versions
        retired since, and add tombstoned ids. Called under self._lock."""
        self._writer.update_incremental()
        self._tomb_writer.update_incremental()
        at = (self._writer.version(), self._tomb_writer.version())
        if at == self._indexed_at:
            return
        marks = self._marks_of(self._writer)
        for run, mark in marks.items():
            if mark > self._index_marks.get(run, -1):
                self._index.drop_below(self._run_code(run), mark)
        self._index_marks = marks
        adds = _adds(self._writer)
        paths = [unquote(p) for p in adds.column("path").to_pylist()]
        runs = adds.column("partition.run_id").to_pylist() if adds.num_rows else []
        versions = adds.column("partition.policy_version").to_pylist() if adds.num_rows else []
        todo = [(p, r, int(v)) for p, r, v in zip(paths, runs, versions)
                if p not in self._known and int(v) >= marks.get(r, -1)]
        if todo:
            for run, version, ids in self._read_ids(ROLLOUTS, todo):
                self._index.add(ids, run=self._run_code(run), version=version)
            self._known.update(p for p, _, _ in todo)
        self._known &= set(paths)   # files removed since (their ids stay indexed: tombstoned or compacted)
        tomb_paths = [unquote(p) for p in _adds(self._tomb_writer).column("path").to_pylist()]
        new_tombs = [(p, "", 0) for p in tomb_paths if p not in self._known_tombs]
        for _, _, ids in self._read_ids(TOMBSTONES, new_tombs):
            self._index.add(ids, retag=True)   # tagged FOREVER: retention never forgets a tombstoned id
        self._known_tombs = set(tomb_paths)
        self._indexed_at = at

    def _read_ids(self, table_name: str, files: list[tuple[str, str, int]]) -> Iterator[tuple[str, int, pa.Array]]:
        """(run, version, rollout_ids) per partition of `files` (relative paths with their run and
        version). One multi-threaded scan of the id column; if a file vanished meanwhile (VACUUM,
        after it was removed from the table: its ids are tombstoned, retired or in the file that
        replaced it) the files are read one by one and the missing one skipped."""
        if not files:
            return
        specs = DatasetSpec(pa.schema([("rollout_id", pa.string()), ("run_id", pa.string()),
                                       ("policy_version", pa.int64())]),
                            [self._loc.path(table_name, p) for p, _, _ in files],
                            {"run_id": [r for _, r, _ in files], "policy_version": [v for _, _, v in files]},
                            self._loc.fs_spec)
        try:
            parts = [specs.open().to_table(use_threads=True)]
        except (FileNotFoundError, OSError):
            parts = []
            for path, (_, run, version) in zip(specs.paths, files):
                try:
                    ids = pq.read_table(path, columns=["rollout_id"], filesystem=self._loc.fs).column(0)
                except (FileNotFoundError, OSError):
                    continue
                parts.append(pa.table({"rollout_id": ids, "run_id": pa.repeat(run, len(ids)).cast(pa.string()),
                                       "policy_version": pa.repeat(pa.scalar(version, pa.int64()), len(ids))}))
        for part in parts:
            groups = part.group_by(["run_id", "policy_version"]).aggregate([]).to_pylist()
            for group in groups:
                mask = pc.and_(pc.equal(part.column("run_id"), group["run_id"]),
                               pc.equal(part.column("policy_version"), group["policy_version"]))
                yield group["run_id"], int(group["policy_version"]), part.column("rollout_id").filter(mask)

    # ------------------------------------------------------------------ removal

    def delete(self, rollout_ids: Sequence[str] | pa.Array | pa.ChunkedArray, reason: str) -> Removal:
        """Remove those of `rollout_ids` the store holds: tombstoned (hidden at once, never stored
        again, even from a replay), then deleted from the rollouts table. Ids the store does not
        hold (never stored, retired or already removed) come back in `Removal.unknown`."""
        if not isinstance(reason, str) or not reason:
            raise StoreError("delete needs a non-empty reason")
        ids = pc.drop_null(as_string_array(rollout_ids))
        ids = pc.unique(ids.filter(pc.not_equal(ids, "")))
        if len(ids) == 0:
            return Removal(0, [])
        with self._lock:
            live = self._live_rows(ids)
            live_ids = live.column("rollout_id").combine_chunks()
            unknown = ids.filter(pc.invert(pc.is_in(ids, value_set=live_ids))).to_pylist()
            if len(live_ids) == 0:
                return Removal(0, unknown)
            now = pa.array(np.full(len(live_ids), int(time.time() * 1_000_000), np.int64)).cast(_TS)
            body = pa.Table.from_arrays([live_ids, pa.array([reason] * len(live_ids), pa.string()), now],
                                        schema=self._tomb_schema)
            rel = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
            add = self._write_file(TOMBSTONES, rel, body, {"numRecords": body.num_rows}, {})
            self._commit(self._tomb_writer, [add], self._tomb_schema, [])
            self._known_tombs.add(rel)
            self._index.add(live_ids, retag=True)   # tagged FOREVER
        if self.config.removal_rewrite == "now":
            self._purge_logged(live)
        elif self.config.removal_rewrite == "background":
            with self._removal_cv:
                self._removals.append(live)
                self._start_removal_thread()
        return Removal(len(live_ids), unknown)

    def _start_removal_thread(self) -> None:
        """(under _removal_cv) Have the background thread pick up what was just queued."""
        if self._removal_thread is None:
            self._removal_thread = threading.Thread(target=self._removal_loop, name="sponge-removals", daemon=True)
            self._removal_thread.start()
        self._removal_cv.notify_all()

    def _purge_logged(self, rows: pa.Table) -> None:
        try:
            self._purge(rows)
        except Exception as exc:  # noqa: BLE001 - hidden already; compaction finishes the job
            log.warning("removed rollouts are tombstoned but their rewrite failed (compaction will finish it): %s",
                        exc)

    def _delete_retired_logged(self, run: str, version: int) -> None:
        try:
            self._delete_retired(run, version)
        except Exception as exc:  # noqa: BLE001 - hidden and refused already; compaction finishes the job
            log.warning("retired versions of run %r stay in the table until compaction: %s", run, exc)

    def _removal_loop(self) -> None:
        """The background deletes: the retention deletes queued (the newest mark of each run), then
        every removal queued since the last rewrite, in one commit."""
        while True:
            with self._removal_cv:
                if not self._removals and not self._retirements:
                    self._removal_thread = None
                    self._removal_cv.notify_all()
                    return
                retirements = dict(self._retirements)
                batch = pa.concat_tables(self._removals) if self._removals else None
                self._removals_taken = len(self._removals)
            for run, version in retirements.items():
                self._delete_retired_logged(run, version)
            if batch is not None:
                self._purge_logged(batch)
            with self._removal_cv:
                del self._removals[:self._removals_taken]
                for run, version in retirements.items():
                    if self._retirements.get(run) == version:
                        del self._retirements[run]
                self._removal_cv.notify_all()

    def wait_for_removals(self, timeout_s: float | None = None) -> bool:
        """Wait until every removal and retention so far is deleted from the table (True) or
        `timeout_s` passes."""
        with self._removal_cv:
            return self._removal_cv.wait_for(lambda: not self._removals and not self._retirements, timeout_s)

    def _live_rows(self, ids: pa.Array) -> pa.Table:
        def read(conn: duckdb.DuckDBPyConnection) -> pa.Table:
            conn.register("wanted", pa.table({"rollout_id": ids}))
            return conn.sql("SELECT DISTINCT rollout_id, run_id, policy_version FROM rollouts "
                            "JOIN wanted USING (rollout_id)").to_arrow_table().cast(
                pa.schema([("rollout_id", pa.string()), ("run_id", pa.string()), ("policy_version", pa.int64())]))
        return self._read(read)

    def live_ids(self, rollout_ids: Sequence[str] | pa.Array) -> pa.Array:
        """Those of `rollout_ids` that are live rollouts in the store (distinct)."""
        return self._live_rows(as_string_array(rollout_ids)).column("rollout_id").combine_chunks()

    def _purge(self, dead: pa.Table, guard: AbstractContextManager | None = None) -> tuple[int, int, int, int, int]:
        """Delete rows (rollout_id, run_id, policy_version) from the rollouts table: each file that holds
        some is replaced by its survivors, all in one commit. Returns (files rewritten, files removed,
        rows removed, bytes before, bytes after)."""
        if dead.num_rows == 0:
            return 0, 0, 0, 0, 0
        with self._maint_lock:
            table = self._table(ROLLOUTS)
            for attempt in range(self.config.commit_attempts):
                table.update_incremental()
                adds = _adds(table)
                wanted = {(r, int(v)) for r, v in zip(dead.column("run_id").to_pylist(),
                                                      dead.column("policy_version").to_pylist())}
                dead_ids = dead.column("rollout_id").combine_chunks()
                lo, hi = pc.min(dead_ids).as_py(), pc.max(dead_ids).as_py()
                actions, rewritten, removed, rows_removed, before, after = [], 0, 0, 0, 0, 0
                for row in adds.select(["path", "size_bytes", "partition.run_id", "partition.policy_version",
                                        "min.rollout_id", "max.rollout_id"]).to_pylist():
                    key = (row["partition.run_id"], int(row["partition.policy_version"]))
                    if key not in wanted or (row["max.rollout_id"] is not None and (
                            row["max.rollout_id"] < lo or row["min.rollout_id"] > hi)):
                        continue
                    rel = unquote(row["path"])
                    path = self._loc.path(ROLLOUTS, rel)
                    try:
                        body = pq.read_table(path, filesystem=self._loc.fs, schema=self._file_schema)
                    except (FileNotFoundError, OSError):
                        continue
                    gone = pc.is_in(body.column("rollout_id"), value_set=dead_ids)
                    n_gone = pc.sum(gone).as_py() or 0
                    if n_gone == 0:
                        continue
                    actions.append(RemoveAction(rel, True, int(time.time() * 1000), int(row["size_bytes"]),
                                                {"run_id": key[0], "policy_version": str(key[1])}))
                    before += int(row["size_bytes"])
                    rows_removed += n_gone
                    kept = body.filter(pc.invert(gone))
                    if kept.num_rows:
                        new_rel = f"{rel.rsplit('/', 1)[0]}/rewrite-{uuid.uuid4().hex[:12]}.parquet"
                        add = self._write_file(ROLLOUTS, new_rel, kept, _stats(kept, ["rollout_id", "prompt_id",
                                                                                       "offset", "reward"]),
                                               {"run_id": key[0], "policy_version": str(key[1])})
                        actions.append(add)
                        after += add.size
                        rewritten += 1
                    else:
                        removed += 1
                if not actions:
                    return 0, 0, 0, 0, 0
                try:
                    self._commit(table, actions, self._table_schema, PARTITION_BY,
                                 metadata={"sponge.operation": "remove"}, attempts=1, guard=guard)
                    return rewritten, removed, rows_removed, before, after
                except CommitFailedError:
                    _backoff(attempt)   # a file we rewrote was replaced meanwhile (optimize): again
                except Exception as exc:
                    if not _log_entry_missing(exc):
                        raise
                    # The commits since our snapshot were cleaned from the log (it is kept for
                    # log_retention_s) before the conflict check read them: start from a fresh one.
                    table = self._table(ROLLOUTS)
        raise StoreError("could not commit a removal: the files kept changing under it")

    # ------------------------------------------------------------------ retention, per run

    def retirement_marks(self) -> dict[str, int]:
        """Retention's marks: for each run, every policy_version below its mark is gone."""
        with self._read_lock:
            reader = self._readers[ROLLOUTS]
            reader.update_incremental()
            return self._marks_of(reader)

    def retired_below(self, run: str = DEFAULT_RUN) -> int | None:
        """The run's retention mark (None: nothing of it retired yet)."""
        return self.retirement_marks().get(run)

    def retire_below(self, version: int, run: str = DEFAULT_RUN) -> int:
        """Retention: drop every rollout of `run` with policy_version < `version` from every view at
        once, refuse such rows from now on, and delete them from the table (a partition-predicate
        delete). The mark only rises. Returns how many live rollouts were retired."""
        version = check_version(version, "retention mark")
        check_run(run)
        with self._lock:
            self._writer.update_incremental()
            marks = self._marks_of(self._writer)
            if run in marks and version <= marks[run]:
                return 0
            # The index holds every stored id, a live one tagged with its run and version (tombstoned
            # ones FOREVER, retired ones forgotten): counting there costs no table scan.
            self._refresh_index()
            retired = self._index.count_below(self._run_code(run), version)
            self._set_properties(self._writer, {MARK_PREFIX + run: str(version)})
            self._refresh_index()
        # The mark hides and refuses the rows already; deleting their files can wait for a store thread
        # (a trainer reports a version every step and should not wait for a second commit each time).
        if self.config.removal_rewrite == "background":
            with self._removal_cv:
                self._retirements[run] = max(version, self._retirements.get(run, 0))
                self._start_removal_thread()
        elif self.config.removal_rewrite == "now":
            self._delete_retired(run, version)
        return retired

    def _delete_retired(self, run: str, version: int, guard: AbstractContextManager | None = None) -> tuple[int, int]:
        """The partition-predicate delete of a run's retired versions; (files removed, rows removed)."""
        with self._maint_lock:
            table = self._table(ROLLOUTS)
            for attempt in range(self.config.commit_attempts):
                table.update_incremental()
                try:
                    with guard if guard is not None else nullcontext():
                        result = table.delete(
                            f"run_id = {sql_str(run)} AND policy_version < {int(version)}",
                            commit_properties=CommitProperties(custom_metadata={
                                "sponge.operation": "retire", "sponge.run": run, "sponge.below": str(version)}))
                    if not self._loc.remote:
                        self._fsync_log(table, table.version() - 1)
                    return int(result.get("num_removed_files", 0)), int(result.get("num_deleted_rows", 0))
                except CommitFailedError as exc:
                    if attempt == self.config.commit_attempts - 1:
                        log.warning("retired versions of run %r stay in the table until compaction: %s", run, exc)
                        return 0, 0
                    _backoff(attempt)
        return 0, 0

    def lower_retirement(self, version: int, run: str = DEFAULT_RUN) -> int:
        """Admin: lower a run's retention mark raised by mistake (0 clears it). The files of the
        versions between the new and the old mark that VACUUM has not deleted yet are put back in
        the table (Delta time travel); the others are gone for good. Returns how many rollouts came
        back into the views."""
        version = check_version(version, "retention mark")
        check_run(run)
        with self._lock:
            self._writer.update_incremental()
            old = self._marks_of(self._writer).get(run)
            if old is None or version >= old:
                return 0
            before = self._count_run_below(run, old, ignore_marks=True)
            self._restore_retired(run, version, old)
            self._set_properties(self._writer, {MARK_PREFIX + run: str(version)})
            self._index_marks.pop(run, None)
            self._indexed_at = (-1, -1)
            self._refresh_index()   # index the run's files that are visible again
            return self._count_run_below(run, old, ignore_marks=True) - before - self._count_run_below(
                run, version, ignore_marks=True)

    def _restore_retired(self, run: str, low: int, high: int) -> None:
        """Re-add the files that retention deletes removed from the run's versions in [low, high),
        found in the snapshots just before those deletes, if VACUUM has not deleted them."""
        table = self._writer
        live = {unquote(p) for p in _adds(table).column("path").to_pylist()}
        restore: dict[str, AddAction] = {}
        for entry in table.history():
            if entry.get("sponge.operation") != "retire" or entry.get("sponge.run") != run:
                continue
            try:
                past = self._table(ROLLOUTS, version=int(entry["version"]) - 1)
            except Exception as exc:  # noqa: BLE001 - the log before it was cleaned up: nothing to restore
                log.info("cannot read the table before retention commit %s: %s", entry.get("version"), exc)
                continue
            adds = _adds(past)
            for row in adds.to_pylist():
                rel = unquote(row["path"])
                v = int(row["partition.policy_version"])
                if row["partition.run_id"] != run or not low <= v < high or rel in live or rel in restore:
                    continue
                if self._loc.fs.get_file_info(self._loc.path(ROLLOUTS, rel)).type == pafs.FileType.NotFound:
                    continue
                stats = {"numRecords": int(row["num_records"])}
                restore[rel] = AddAction(rel, int(row["size_bytes"]), {"run_id": run, "policy_version": str(v)},
                                         int(time.time() * 1000), True, json.dumps(stats))
        if restore:
            self._commit(table, list(restore.values()), self._table_schema, PARTITION_BY,
                         [Transaction(INGEST_APP_ID, table.version() + 1)],
                         {"sponge.operation": "restore", "sponge.run": run}, attempts=1)

    def _count_run_below(self, run: str, version: int, ignore_marks: bool = False) -> int:
        return self._read(lambda conn: int(conn.execute(
            "SELECT count(*) FROM rollouts WHERE run_id = $1 AND policy_version < $2", [run, version]).fetchone()[0]),
            ignore_marks=ignore_marks)

    # ------------------------------------------------------------------ compaction

    def compact(self, guard: AbstractContextManager | None = None) -> CompactionResult:
        """Finish pending removals and retention deletes, merge small files (OPTIMIZE), VACUUM what
        no recent snapshot needs, checkpoint and clean the logs of all three tables.

        Readers never need `guard`: they read a snapshot whose files VACUUM keeps for
        `vacuum_retention_hours`. It is held around the commits that delete rows, for callers
        that want those moments under their own lock.
        """
        self.remove_stale_temp_files()
        rewritten = removed = rows_removed = before = after = 0
        # Removals whose rewrite did not happen (removal_rewrite="compaction", or it failed).
        pending = self._pending_removals()
        if pending.num_rows:
            r, m, n, b, a = self._purge(pending, guard=guard)
            rewritten, removed, rows_removed, before, after = r, m, n, b, a
        # Retention deletes that did not happen (a crash between the mark and the delete).
        with self._read_lock:
            reader = self._readers[ROLLOUTS]
            reader.update_incremental()
            marks = self._marks_of(reader)
            adds = _adds(reader)
        stale = {}
        for run, v, size in zip(adds.column("partition.run_id").to_pylist() if adds.num_rows else [],
                                adds.column("partition.policy_version").to_pylist() if adds.num_rows else [],
                                adds.column("size_bytes").to_pylist() if adds.num_rows else []):
            if run in marks and int(v) < marks[run]:
                stale[run] = marks[run]
                before += int(size)
        for run, mark in stale.items():
            files, rows = self._delete_retired(run, mark, guard=guard)
            removed += files
            rows_removed += rows
        merged = 0
        with self._maint_lock:
            table = self._table(ROLLOUTS)
            props = WriterProperties(compression="ZSTD", compression_level=self.config.compression_level or 1)
            try:
                metrics = table.optimize.compact(target_size=self.config.target_file_bytes, writer_properties=props)
                rewritten += int(metrics.get("numFilesAdded", 0))
                removed += int(metrics.get("numFilesRemoved", 0))
            except CommitFailedError as exc:
                log.info("optimize lost a race with another commit; next compaction retries: %s", exc)
            for name in (TOMBSTONES, DEAD_LETTERS):
                other = self._table(name)
                if len(other.file_uris()) > self.config.max_tombstone_files:
                    try:
                        metrics = other.optimize.compact(writer_properties=props)
                        if name == TOMBSTONES:
                            merged += int(metrics.get("numFilesRemoved", 0))
                    except CommitFailedError as exc:
                        log.info("optimize of %s lost a race; next compaction retries: %s", name, exc)
            for name in (ROLLOUTS, TOMBSTONES, DEAD_LETTERS):
                other = self._table(name)
                # full: also files no commit ever named (a writer killed between its file and its
                # commit), once older than the retention, so an in-flight segment is never taken.
                other.vacuum(retention_hours=int(self.config.vacuum_retention_hours), dry_run=False,
                             enforce_retention_duration=False, full=True)
                other.create_checkpoint()
                other.cleanup_metadata()
        return CompactionResult(rewritten, removed, rows_removed, merged, before, after)

    def _pending_removals(self) -> pa.Table:
        """(rollout_id, run_id, policy_version) of tombstoned rows still in the rollouts table."""
        conn = self.connect()
        try:
            return conn.sql(f"SELECT DISTINCT r.rollout_id, r.run_id, r.policy_version FROM "
                            f"{DATASET_NAMES[ROLLOUTS]} r JOIN tombstones t USING (rollout_id)").to_arrow_table()
        finally:
            conn.close()

    # ------------------------------------------------------------------ other tables and files

    def write_dead_letters(self, table: pa.Table) -> None:
        """Append rejected messages (topic, partition, offset, reason JSON, value bytes, received_at, letter_id).

        Without a `letter_id` column the view computes each row's id from its source and value.
        """
        if not isinstance(table, pa.Table):
            raise StoreError(f"dead letters must be a pyarrow Table, got {type(table).__name__}")
        if "letter_id" not in table.column_names:
            table = table.append_column("letter_id", pa.nulls(table.num_rows, pa.string()))
        missing = [n for n in DEAD_LETTER_SCHEMA.names if n not in table.column_names]
        if missing:
            raise StoreError(f"dead letters lack column(s) {missing}; need {DEAD_LETTER_SCHEMA.names}")
        if table.num_rows == 0:
            return
        try:
            table = table.select(DEAD_LETTER_SCHEMA.names).cast(DEAD_LETTER_SCHEMA).cast(self._dlq_schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise StoreError(f"dead letters do not fit {DEAD_LETTER_SCHEMA}: {exc}") from None
        rel = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        with self._maint_lock:   # the dead-letter writer table object is not shared across threads
            add = self._write_file(DEAD_LETTERS, rel, table, {"numRecords": table.num_rows}, {})
            self._dlq_writer.update_incremental()
            self._commit(self._dlq_writer, [add], self._dlq_schema, [])

    def write_replay_snapshot(self, subsets: pa.Table | None, *, seq: int, extra: dict | None = None) -> str:
        """Persist the curated replay subsets of every run (rollout_id, run_id, selection_version,
        objective_value); the `replay_subset` view shows the newest file. `seq` numbers the files;
        `extra` (JSON-serialisable) goes into the file's metadata under `sponge.extra`."""
        seq = int(seq)
        if seq < 0:
            raise StoreError(f"snapshot seq must be >= 0, got {seq}")
        if subsets is None:
            subsets = REPLAY_SCHEMA.empty_table().drop_columns(["selected_at"])
        if subsets.column("rollout_id").null_count:
            raise StoreError("replay snapshot rollout_ids contain nulls")
        try:
            extra_json = json.dumps(extra or {}, sort_keys=True)
        except TypeError as exc:
            raise StoreError(f"replay snapshot extra is not JSON-serialisable: {exc}") from None
        now = pa.scalar(int(time.time() * 1000), pa.timestamp("ms", tz="UTC"))
        table = subsets.append_column("selected_at", pa.repeat(now, subsets.num_rows)).select(
            REPLAY_SCHEMA.names).cast(REPLAY_SCHEMA).replace_schema_metadata({b"sponge.extra": extra_json.encode()})
        name = f"selection-{seq:012d}.parquet"
        path = self._loc.path(REPLAY, name)
        if self._loc.remote:
            with self._loc.fs.open_output_stream(path) as out:
                pq.write_table(table, out)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        snapshots = self._replay_files()
        for old in snapshots[: max(0, len(snapshots) - self.config.replay_keep)]:
            try:
                self._loc.fs.delete_file(old)
            except (FileNotFoundError, OSError):
                pass
        return path if not self._loc.remote else f"s3://{path}"

    def _replay_files(self) -> list[str]:
        selector = pafs.FileSelector(self._loc.path(REPLAY), allow_not_found=True)
        return sorted(info.path for info in self._loc.fs.get_file_info(selector)
                      if info.type == pafs.FileType.File and info.base_name.startswith("selection-")
                      and info.base_name.endswith(".parquet"))

    def latest_replay_snapshot(self) -> tuple[pa.Table, dict] | None:
        """The newest replay snapshot as (table, extra), or None when there is none."""
        for path in reversed(self._replay_files()):  # newest first; one may vanish under a concurrent prune
            try:
                table = pq.read_table(path, schema=REPLAY_SCHEMA, filesystem=self._loc.fs)
                metadata = pq.read_schema(path, filesystem=self._loc.fs).metadata or {}
            except (FileNotFoundError, OSError):
                continue
            return table, json.loads(metadata.get(b"sponge.extra", b"{}"))
        return None

    # ------------------------------------------------------------------ shared objects (many hosts)

    def _shared_path(self, key: str) -> str:
        parts = key.split("/")
        if not key or any(not part or part in (".", "..") or not _SHARED_KEY_RE.match(part) for part in parts):
            raise StoreError(f"shared object key {key!r} is not legal: '/'-separated names of letters, digits "
                             "and . _ : - (no empty, '.' or '..' parts)")
        return self._loc.path(SHARED, *parts)

    def put_shared(self, key: str, data: bytes) -> None:
        """Store a small object beside the tables, where every host of the store reads it (a
        shard's selector solution, the objective's parameters); replaces it atomically."""
        path = self._shared_path(key)
        if self._loc.remote:
            with self._loc.fs.open_output_stream(path) as out:   # a PUT: all or nothing
                out.write(data)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, bytes(data))

    def get_shared(self, key: str) -> bytes | None:
        """A shared object's bytes, or None when there is none."""
        try:
            with self._loc.fs.open_input_stream(self._shared_path(key)) as stream:
                return stream.read()
        except (FileNotFoundError, OSError):
            return None

    def list_shared(self, prefix: str) -> dict[str, int]:
        """The shared objects under `prefix`/ as {key: modification time in ns} (changes when replaced)."""
        base = self._shared_path(prefix)
        infos = self._loc.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return {f"{prefix}/{info.path[len(base) + 1:]}": int(info.mtime_ns or 0) for info in infos
                if info.type == pafs.FileType.File and not info.base_name.startswith(".")}

    def put_shared_once(self, key: str, data: bytes) -> bytes:
        """Put `data` under `key` unless another caller, in any process on any host, did first;
        return what is there: one caller's bytes, the same for every caller. The object is the
        only commit of a small Delta table, whose first log entry is a put-if-absent, so a caller
        that wins and then dies leaves its bytes behind, never a claim with nothing in it (which
        the others could only wait on and then guess)."""
        self._shared_path(key)   # checks the key
        uri = self._loc.table_uri(f"{SHARED}/claims/{key}")
        try:
            # No commit retries: a caller that loses the race for version 0 would otherwise have its
            # write retried, and appended, as version 1, and return its own bytes as the winner's.
            write_deltalake(uri, pa.table({"data": pa.array([bytes(data)], pa.binary())}), mode="error",
                            storage_options=self._loc.storage_options,
                            commit_properties=CommitProperties(max_commit_retries=0))
            return bytes(data)
        except Exception as exc:  # noqa: BLE001 - delta-rs says "already exists" in several error types
            if not DeltaTable.is_deltatable(uri, storage_options=self._loc.storage_options):
                raise StoreError(f"could not put {key!r}: {exc}") from None
        # The first commit is the claim (a table written before retries were off may hold a second).
        table = DeltaTable(uri, version=0, storage_options=self._loc.storage_options).to_pyarrow_table()
        if "data" not in table.column_names or table.num_rows == 0:
            return b""   # a claim made before claims carried data: taken, contents unknown
        return table.column("data")[0].as_py()

    def remove_stale_temp_files(self) -> int:
        """Remove temporary replay-snapshot files left by crashed writers (a local store's only temp
        files: data files are invisible until committed, and VACUUM removes orphaned ones)."""
        if self._loc.remote:
            return 0
        import socket


        removed, host, now = 0, socket.gethostname(), time.time()
        for path in Path(self._loc.uri).rglob(f".*{TEMP_SUFFIX}"):
            if "_delta_log" in path.parts:
                continue
            parts = path.name[1:-len(TEMP_SUFFIX)].split("~")
            writer_host, writer_pid = (parts[1], parts[2]) if len(parts) == 4 else ("", "")
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            dead = writer_host == host and writer_pid.isdigit() and not pid_alive(int(writer_pid))
            if dead or age > self.config.stale_temp_age_s:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # ------------------------------------------------------------------ reading

    def _snapshot(self, ignore_marks: bool = False) -> tuple[dict[str, DatasetSpec], list[str]]:
        """The tables' current files as dataset specs, and the views over them (one consistent read)."""
        with self._read_lock:
            for reader in self._readers.values():
                reader.update_incremental()
            rollouts = self._readers[ROLLOUTS]
            marks = {} if ignore_marks else self._marks_of(rollouts)
            adds = _adds(rollouts)
            tomb_paths = _adds(self._readers[TOMBSTONES]).column("path").to_pylist()
            dlq_paths = _adds(self._readers[DEAD_LETTERS]).column("path").to_pylist()
        fs = self._loc.fs_spec
        paths = [self._loc.path(ROLLOUTS, unquote(p)) for p in adds.column("path").to_pylist()]
        runs = adds.column("partition.run_id").to_pylist() if adds.num_rows else []
        versions = [int(v) for v in adds.column("partition.policy_version").to_pylist()] if adds.num_rows else []
        replay = self._replay_files()
        segments = pa.table({
            "file": pa.array([p if not self._loc.remote else f"s3://{p}" for p in paths], pa.string()),
            "run_id": pa.array(runs, pa.string()),
            "policy_version": pa.array(versions, pa.int64()),
            "rows": pa.array(adds.column("num_records").to_pylist() if adds.num_rows else [], pa.int64()),
            "bytes": pa.array(adds.column("size_bytes").to_pylist() if adds.num_rows else [], pa.int64()),
        })
        specs = {
            DATASET_NAMES[ROLLOUTS]: DatasetSpec(self._table_schema, paths,
                                                 {"run_id": runs, "policy_version": versions}, fs),
            DATASET_NAMES[TOMBSTONES]: DatasetSpec(self._tomb_schema, [self._loc.path(TOMBSTONES, unquote(p))
                                                                       for p in tomb_paths], {}, fs),
            DATASET_NAMES[DEAD_LETTERS]: DatasetSpec(self._dlq_schema, [self._loc.path(DEAD_LETTERS, unquote(p))
                                                                        for p in dlq_paths], {}, fs),
            DATASET_NAMES[REPLAY]: DatasetSpec(REPLAY_SCHEMA, replay[-1:], {}, fs),
            DATASET_NAMES["segments"]: DatasetSpec(segments.schema, table=segments),
        }
        return specs, self._views(marks)

    def _views(self, marks: dict[str, int]) -> list[str]:
        dim = self.embedding_dim
        columns = ", ".join(f"CAST(embedding AS FLOAT[{dim}]) AS embedding" if f.name == "embedding"
                            else quote_ident(f.name) for f in self._stored_schema)
        # Retention, per run: a predicate on the partition columns, so the scan skips those files.
        retired = " OR ".join(f"(run_id = {sql_str(run)} AND policy_version < {int(mark)})"
                              for run, mark in sorted(marks.items()))
        where = f"WHERE NOT ({retired}) AND " if retired else "WHERE "
        n = DATASET_NAMES
        return [
            f"CREATE OR REPLACE VIEW tombstones AS SELECT rollout_id, reason, deleted_at FROM {n[TOMBSTONES]}",
            (f"CREATE OR REPLACE VIEW rollouts AS SELECT {columns} FROM {n[ROLLOUTS]} "
            f"{where}rollout_id NOT IN (SELECT rollout_id FROM {n[TOMBSTONES]})"),
            # Dead letters are at-least-once (a replay sends one again): the view shows each letter_id
            # once; a letter without an id gets the one sponge.streams.dlq.letter_id computes.
            ("CREATE OR REPLACE VIEW dead_letters AS SELECT * FROM (SELECT topic, partition, \"offset\", reason, "
            "value, received_at, coalesce(letter_id, concat_ws('/', topic, partition, \"offset\", "
            f"left(sha256(coalesce(value, ''::BLOB)), 32))) AS letter_id FROM {n[DEAD_LETTERS]}) "
            "QUALIFY row_number() OVER (PARTITION BY letter_id ORDER BY received_at) = 1"),
            (f"CREATE OR REPLACE VIEW replay_subset AS SELECT {', '.join(quote_ident(c) for c in REPLAY_SCHEMA.names)} "
            f"FROM {n[REPLAY]}"),
            f"CREATE OR REPLACE VIEW segments AS SELECT file, run_id, policy_version, rows, bytes FROM {n['segments']}",
        ]

    def view_sql(self) -> list[str]:
        """CREATE VIEW statements for `rollouts`, `tombstones`, `dead_letters`, `replay_subset`,
        `segments`; they select from the Arrow datasets `datasets()` describes."""
        return self._snapshot()[1]

    def datasets(self) -> dict[str, DatasetSpec]:
        """The Arrow datasets (current table files) the views select from, by registered name."""
        return self._snapshot()[0]

    def _opened_dataset(self, name: str, spec: DatasetSpec):
        """The spec's dataset, the same object while its files are the same: pyarrow keeps the
        Parquet footers it has read in it, so a query does not fetch them again (on S3 a GET per
        file and query)."""
        if spec.table is not None:
            return spec.table
        key = tuple(spec.paths)
        with self._read_lock:
            cached = self._datasets.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
        dataset = spec.open()
        with self._read_lock:
            self._datasets[name] = (key, dataset)
        return dataset

    def connect(self, ignore_marks: bool = False) -> duckdb.DuckDBPyConnection:
        """A trusted in-memory DuckDB connection with the store's views (internal use; close it)."""
        conn = duckdb.connect(":memory:")
        try:
            self._set_views(conn, ignore_marks)
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_views(self, conn: duckdb.DuckDBPyConnection, ignore_marks: bool = False) -> None:
        """Register the current snapshot's datasets on `conn` and (re)create the views over them."""
        specs, views = self._snapshot(ignore_marks)
        for name, spec in specs.items():
            conn.register(name, self._opened_dataset(name, spec))
        for statement in views:
            conn.execute(statement)

    def _read(self, fn: Callable[[duckdb.DuckDBPyConnection], T], ignore_marks: bool = False) -> T:
        """`fn` on a connection to the views as they are now: an idle one set up again, or a new one.
        (Opening a DuckDB connection costs ~36 ms on a 2-core machine, setting one up again ~5 ms:
        a trainer's version report and the reads around it come every training step.)"""
        with self._read_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = duckdb.connect(":memory:")
        try:
            self._set_views(conn, ignore_marks)
            result = fn(conn)
            conn.abort()   # the rest of a result `fn` left unread (a read-only one): the connection is free
        except BaseException:
            conn.close()   # in an unknown state: not reused
            raise
        with self._read_lock:
            if len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(conn)
                conn = None
        if conn is not None:
            conn.close()
        return result

    def query(self, query: str, *, max_rows: int | None = None, timeout_s: float | None = None,
              workers: SqlWorkers | None = None) -> QueryResult:
        """Run user SQL read-only within the configured bounds; returns the table and whether it was cut.

        The query runs in a child process (`sponge.store.sql_worker`) with an address-space limit
        and a SIGKILL at the deadline; it opens the same table files as Arrow datasets."""
        limits = self.config.sql_limits.narrowed(max_rows=max_rows, timeout_s=timeout_s)
        if workers is None:
            workers = self.__dict__.setdefault("_sql_workers", SqlWorkers(self.config.sql_limits))
        specs, views = self._snapshot()
        return workers.run(query, setup_sql=views, allowed_dir=self.root, limits=limits,
                           datasets={name: spec.to_json() for name, spec in specs.items()})

    def stats(self) -> dict:
        """Files, live rows, stored rows, tombstones, dead letters, bytes, table versions."""
        conn = self.connect()
        try:
            segments, stored_rows, segment_bytes = conn.execute(
                "SELECT count(*), coalesce(sum(rows), 0), coalesce(sum(bytes), 0) FROM segments").fetchone()
            live = conn.execute("SELECT count(*) FROM rollouts").fetchone()[0]
            tombstones = conn.execute("SELECT count(DISTINCT rollout_id) FROM tombstones").fetchone()[0]
            dead_letters = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        finally:
            conn.close()
        with self._read_lock:
            versions = {name: reader.version() for name, reader in self._readers.items()}
            marks = self._marks_of(self._readers[ROLLOUTS])
        return {
            "location": self.uri,
            "format_version": STORE_FORMAT_VERSION,
            "segments": int(segments),
            "rows": int(live),
            "stored_rows": int(stored_rows),
            "tombstones": int(tombstones),
            "dead_letters": int(dead_letters),
            "segment_bytes": int(segment_bytes),
            "bytes": int(sum(self._tree_bytes(name) for name in (ROLLOUTS, TOMBSTONES, DEAD_LETTERS, REPLAY))),
            "embedding_dim": self.embedding_dim,
            "retirement_marks": marks,
            "table_versions": versions,
        }

    def _tree_bytes(self, name: str) -> int:
        selector = pafs.FileSelector(self._loc.path(name), recursive=True, allow_not_found=True)
        return sum(info.size or 0 for info in self._loc.fs.get_file_info(selector) if info.type == pafs.FileType.File)


# ---------------------------------------------------------------------- helpers


class _LiveTable:
    """A DeltaTable that catches up with the log, and is loaded afresh when the log entries it
    would catch up from were cleaned up meanwhile (a process idle for longer than the log
    retention: the entries between its version and the last checkpoint are gone)."""

    def __init__(self, open_table) -> None:
        self._open = open_table
        self.dt: DeltaTable = open_table()

    def update_incremental(self) -> None:
        try:
            self.dt.update_incremental()
        except Exception as exc:  # noqa: BLE001 - delta-rs reports a missing log entry in several types
            log.info("reloading a Delta table whose log moved past it: %s", str(exc).splitlines()[0])
            self.dt = self._open()

    def __getattr__(self, name: str):
        return getattr(self.dt, name)


def _log_entry_missing(exc: BaseException) -> bool:
    """Whether delta-rs failed because a log entry it needed was cleaned up meanwhile."""
    text = str(exc)
    return "_delta_log" in text and "not found" in text.lower()


def _adds(table: DeltaTable) -> pa.Table:
    """The table's live files with their partition values and statistics, as a pyarrow Table."""
    return pa.table(table.get_add_actions(flatten=True))


def _backoff(attempt: int) -> None:
    time.sleep(min(0.2, 0.002 * 2 ** min(attempt, 7)) * (0.5 + random.random()))


def _split_rows(table: pa.Table) -> list[tuple[str, int, np.ndarray]]:
    """(run_id, policy_version, row positions) for each pair in `table`, in ascending order."""
    runs = pc.dictionary_encode(table.column("run_id").combine_chunks())
    run_index = runs.indices.to_numpy(zero_copy_only=False)
    names = runs.dictionary.to_pylist()
    versions = table.column("policy_version").to_numpy()
    if len(names) == 1 and (versions == versions[0]).all():
        return [(names[0], int(versions[0]), np.arange(table.num_rows))]
    order = np.lexsort((versions, np.argsort(np.argsort(names))[run_index]))
    keys = np.stack([run_index[order], versions[order]], axis=1)
    starts = np.flatnonzero(np.r_[True, (np.diff(keys, axis=0) != 0).any(axis=1)])
    ends = np.r_[starts[1:], len(order)]
    return [(names[int(keys[a, 0])], int(keys[a, 1]), order[a:b]) for a, b in zip(starts, ends)]


def _escape(value: str) -> str:
    """A partition value as a directory name (':' is the one legal run-id character to escape)."""
    return value.replace("%", "%25").replace(":", "%3A")


def _counts_by_run(rows: pa.Table, mask: np.ndarray) -> dict[str, int]:
    if not mask.any():
        return {}
    runs = rows.column("run_id").filter(pa.array(mask))
    return {r["values"]: r["counts"] for r in pc.value_counts(runs).to_pylist()}


def _stats(body: pa.Table, columns: list[str]) -> dict:
    """Delta file statistics: row count and min/max/null count of `columns` (for file pruning)."""
    stats: dict = {"numRecords": body.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    for name in columns:
        if name not in body.column_names or body.num_rows == 0:
            continue
        column = body.column(name)
        bounds = pc.min_max(column)
        lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
        if lo is not None:
            stats["minValues"][name], stats["maxValues"][name] = lo, hi
        stats["nullCount"][name] = column.null_count
    return stats


# ---------------------------------------------------------------------- migration

FORMAT2_DIR = "_format2"


def migrate_to_delta(root: str | os.PathLike, target: str | os.PathLike | None = None, *,
                     config: StoreConfig | None = None, progress: bool = False) -> dict:
    """Turn a Parquet-segment store (format 1 or 2) into Delta tables; returns what it moved.

    In place by default: the old directories move under `_format2/` first, the tables are filled
    from them, and only then do the old manifest and files go, so a stopped migration is simply
    run again (rows already in the table are skipped by id). With `target` (a directory or an
    s3:// location) the old store is left as it is. Live rollouts keep their (run, version)
    partitions, topic/partition/offset columns and ids; tombstoned ids stay refused; retention
    marks, dead letters and replay snapshots come along; each (topic, partition)'s highest
    offset becomes the table's offset for it.
    """
    import shutil

    from tqdm.auto import tqdm

    from sponge.store.parquet import RETIRED_NAME, ParquetRolloutStore
    from sponge.store.parquet import migrate as migrate_format1

    root = Path(root).resolve()
    manifest = root / MANIFEST_NAME
    old_root = root / FORMAT2_DIR
    if not manifest.is_file():
        if (root / ROLLOUTS / "_delta_log").is_dir() and target is None:
            return {"migrated_segments": 0, "already": "a Delta store"}
        raise StoreError(f"no Parquet-segment store at {root} (no {MANIFEST_NAME} there)")
    body = json.loads(manifest.read_text())
    if int(body.get("format_version", 1)) < 2:
        migrate_format1(root, progress=progress)
        body = json.loads(manifest.read_text())
    dim = int(body["embedding_dim"])
    in_place = target is None or Path(str(target)).resolve() == root
    if in_place:
        old_root.mkdir(exist_ok=True)
        for name in (ROLLOUTS, TOMBSTONES, DEAD_LETTERS):
            if (root / name).is_dir() and not (root / name / "_delta_log").is_dir() and not (old_root / name).exists():
                os.replace(root / name, old_root / name)
        for name in (MANIFEST_NAME, RETIRED_NAME):
            if (root / name).is_file():
                shutil.copyfile(root / name, old_root / name)
        fsync_dir(root)
        source = old_root
    else:
        source = root
    old = ParquetRolloutStore(source, embedding_dim=dim)
    new = DeltaRolloutStore(root if in_place else target, embedding_dim=dim, config=config, _check_format=False)
    marks = old.retirement_marks()
    conn = old.connect()
    try:
        dead_ids = conn.sql("SELECT DISTINCT rollout_id FROM tombstones").to_arrow_table().column(0).combine_chunks()
        tombstones = conn.sql("SELECT rollout_id, arg_min(reason, deleted_at) AS reason, min(deleted_at) AS deleted_at "
                              "FROM tombstones GROUP BY 1").to_arrow_table()
        letters = conn.sql("SELECT * FROM dead_letters").to_arrow_table()
    finally:
        conn.close()
    # Tombstones first: from here on a replayed removed rollout is refused by the new store too.
    if tombstones.num_rows:
        new._refresh_index()
        known = new._index.contains(tombstones.column("rollout_id"))
        todo = tombstones.filter(pa.array(~known))
        if todo.num_rows:
            body = todo.cast(TOMBSTONE_SCHEMA).cast(new._tomb_schema)
            add = new._write_file(TOMBSTONES, f"{time.time_ns():020d}-migrated.parquet", body,
                                  {"numRecords": body.num_rows}, {})
            new._commit(new._tomb_writer, [add], new._tomb_schema, [])
    if marks:
        new._set_properties(new._writer, {MARK_PREFIX + run: str(mark) for run, mark in marks.items()})
    segments = old._segment_files()
    moved = rows_written = 0
    for path in tqdm(sorted(segments), desc="migrating segments", unit="file", disable=not progress):
        run, version = path.parent.parent.name.partition("=")[2], int(path.parent.name.partition("=")[2])
        table = pq.read_table(path, schema=old._file_schema)
        table = table.append_column("policy_version", pa.repeat(pa.scalar(version, pa.int64()), table.num_rows))
        table = table.select(new._stored_schema.names).cast(new._stored_schema)
        table = table.filter(pc.invert(pc.is_in(table.column("rollout_id"), value_set=dead_ids)))
        offsets = []
        if table.num_rows:
            topic = table.column("topic")[0].as_py()
            partition = table.column("partition")[0].as_py()
            offsets = [(f"{OFFSET_APP_PREFIX}{topic}:{partition}", int(pc.max(table.column("offset")).as_py()))]
        result = new._write_rows(table, path.stem, offsets, {"sponge.operation": "migrate", "sponge.run": run})
        rows_written += result.rows_written
        moved += 1
    if letters.num_rows:
        new.write_dead_letters(letters)
    if not in_place:
        for snapshot in sorted((root / REPLAY).glob("selection-*.parquet")):
            table = pq.read_table(snapshot)
            extra = json.loads((table.schema.metadata or {}).get(b"sponge.extra", b"{}"))
            seq = int(snapshot.stem.partition("-")[2])
            new.write_replay_snapshot(table.drop_columns(["selected_at"]), seq=seq, extra=extra)
    else:
        (root / MANIFEST_NAME).unlink()
        (root / RETIRED_NAME).unlink(missing_ok=True)
        fsync_dir(root)
        shutil.rmtree(old_root, ignore_errors=True)
        shutil.rmtree(root / "_locks", ignore_errors=True)
    return {"migrated_segments": moved, "migrated_rows": rows_written, "tombstones": int(tombstones.num_rows),
            "dead_letters": int(letters.num_rows), "retirement_marks": marks}
