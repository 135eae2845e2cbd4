"""The format-2 rollout store (Parquet segments), which nothing writes any more: `sponge store
migrate` reads a store of this format into Delta tables (`sponge.store.delta`, format 3).

Format 2 (immutable Parquet segments, tombstones and DuckDB views over them):

Layout under the store root (every file is written to a temporary name in its own directory,
fsynced and renamed, so a reader or a crash never sees half a file):

    _sponge_store.json                      format version and embedding dimension
    _retired.json                           retention: per run, every policy_version below its mark is gone
    rollouts/run=R/policy_version=V/<topic>+<partition>+<first>-<last>.parquet
    tombstones/<time>-<uuid>.parquet        deleted rollout ids (rollout_id, reason, deleted_at)
    dead_letters/<time>-<uuid>.parquet      rejected messages (topic, partition, offset, reason, value, received_at)
    replay/selection-<seq>.parquet          curated replay subsets of every run, the last few kept
    _locks/<topic>+<partition>.lock         advisory locks between writer processes

Every rollout belongs to a run (its `run_id`; a rollout without one belongs to the run named
`default`), and the run is the first level of the layout: each run's versions are retired, and its
files deleted, on their own.

Exactly-once by rollout_id: the store keeps an in-memory index of every rollout id it holds or
has tombstoned (a `RolloutIdSet`: two independent 64-bit hashes per id), refreshed from files
other processes wrote before every segment write, under a per-(topic, partition) file lock. A
replayed Kafka range therefore writes nothing twice, and a deleted rollout never comes back.

Retention is a range delete per run, not a tombstone per rollout: `retire_below(v, run)` records
one number for the run, the views hide the run's policy_versions below it (DuckDB prunes those
hive directories), writes refuse such rows, compaction deletes their directories whole, and the
id index forgets their ids (a re-delivered one is refused by its version). Per-id tombstones for
retention would make every query anti-join, and the index hold, every rollout the store ever
evicted: a store under a steady stream would grow without bound.

SQL never opens a DuckDB database file: every reader gets its own in-memory connection with the
views (`rollouts`, `tombstones`, `dead_letters`, `replay_subset`, `segments`) over the files, so
the ingest service, the trainer and a user's query never contend for a lock. The same files are
plain hive-partitioned Parquet for Spark, Trino, Polars or Ray Data.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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
    check_version,
    conform_rows,
    mark_of_each_row,
    quote_ident,
    sql_str,
    with_store_columns,
)
from sponge.store.idmap import RolloutIdSet, first_occurrence
from sponge.store.reads import ViewReads
from sponge.store.sql import QueryResult
from sponge.store.sql_worker import SqlWorkers

#: 2: rollouts under run=R/policy_version=V and retention marks per run (1: no run level). The
#: Parquet layout's own version; Delta stores are format 3 (delta_store.STORE_FORMAT_VERSION).
STORE_FORMAT_VERSION = 2
RETIRED_NAME = "_retired.json"
ROLLOUTS_DIR = "rollouts"
TOMBSTONES_DIR = "tombstones"
DEAD_LETTERS_DIR = "dead_letters"
REPLAY_DIR = "replay"
LOCKS_DIR = "_locks"

_SEGMENT_RE = re.compile(r"^(?P<topic>[A-Za-z0-9._-]+)\+(?P<partition>\d+)\+(?P<first>\d+)-(?P<last>\d+)\.parquet$")
_GLOB_CHARS = set("*?[]{}")
def _retry_if_a_segment_vanished(method):
    """Re-run a read whose segment file disappeared between listing and opening.

    Compaction removes segments left empty; a reader that listed the files a moment before
    then fails to open one. Nothing is wrong with the store, so the read is simply repeated.
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        for attempt in range(3):
            try:
                return method(*args, **kwargs)
            except duckdb.IOException as exc:
                if "No such file" not in str(exc) or attempt == 2:
                    raise
                time.sleep(0.05)

    return wrapper


class ParquetRolloutStore(ViewReads):
    """Format 2: rollouts as Parquet segments with tombstones, queried through DuckDB views (read by
    `sponge store migrate`; new stores are Delta tables, see `RolloutStore`).

    Safe for several processes on one root (the ingest services of one consumer group, the
    curation service, a user's SQL): writers take a per-partition file lock and refresh what
    others wrote; readers use their own in-memory DuckDB connections. Within a process, the
    methods are thread-safe.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        embedding_dim: int = DEFAULT_EMBEDDING_DIM,
        *,
        config: StoreConfig | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        if _GLOB_CHARS & set(str(self.root)):
            raise StoreError(f"store path {self.root} contains a glob character ({''.join(sorted(_GLOB_CHARS))})")
        if int(embedding_dim) <= 0:
            raise StoreError(f"embedding_dim must be positive, got {embedding_dim}")
        self.embedding_dim = int(embedding_dim)
        self.config = config or StoreConfig()
        self._rollout_schema = rollout_schema(self.embedding_dim)
        self._stored_schema = stored_schema(self.embedding_dim)
        self._file_schema = pa.schema(
            [f for f in self._stored_schema if f.name != "policy_version"], metadata=self._stored_schema.metadata
        )
        for sub in (ROLLOUTS_DIR, TOMBSTONES_DIR, DEAD_LETTERS_DIR, REPLAY_DIR, LOCKS_DIR):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._check_manifest()
        self._lock = threading.RLock()
        self._index = RolloutIdSet()                        # every id held or tombstoned, tagged (run, version)
        self._run_codes: dict[str, int] = {}                # run_id -> the index's run tag
        self._known_files: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) whose ids are indexed
        self._marks: tuple[tuple, dict[str, int]] = ((), {})  # _retired.json as last read: ((inode, mtime), marks)
        self._index_marks: dict[str, int] = {}              # the marks the index was last cut at
        self.remove_stale_temp_files()
        with self._lock:
            self._refresh_index()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, root: str | os.PathLike, *, config: StoreConfig | None = None) -> ParquetRolloutStore:
        """Open an existing store, taking the embedding dimension from its manifest."""
        manifest = Path(root) / MANIFEST_NAME
        if not manifest.is_file():
            hint = ("it is not a directory" if Path(root).exists() and not Path(root).is_dir()
                    else f"no {MANIFEST_NAME} there")
            raise StoreError(f"no rollout store at {Path(root).resolve()} ({hint}): pass --store with the "
                             "directory `sponge serve` writes to (env SPONGE_STORE_PATH)")
        dim, _ = _read_manifest(manifest)
        return cls(root, embedding_dim=dim, config=config)

    def _check_manifest(self) -> None:
        path = self.root / MANIFEST_NAME
        if path.is_file():
            dim, _ = _read_manifest(path)
            if dim != self.embedding_dim:
                raise StoreError(
                    f"store {self.root} holds {dim}-d embeddings, opened with embedding_dim={self.embedding_dim}"
                )
            return
        body = json.dumps({"format_version": STORE_FORMAT_VERSION, "embedding_dim": self.embedding_dim}, indent=2)
        atomic_write(path, body.encode())

    # ------------------------------------------------------------------ writing rollouts

    def write_segments(self, segments: Sequence[Segment]) -> SegmentWrite:
        """The segments one after the other (this format commits one partition's range at a time)."""
        return SegmentWrite.merged([self.write_segment(seg.rows, topic=seg.topic, partition=seg.partition,
                                                       offsets=seg.offsets, first_offset=seg.first_offset,
                                                       last_offset=seg.last_offset) for seg in segments])

    def write_segment(
        self,
        rows: pa.Table,
        *,
        topic: str,
        partition: int,
        offsets: np.ndarray,
        first_offset: int,
        last_offset: int,
    ) -> SegmentWrite:
        """Store the rollouts of one consumed Kafka range, each rollout_id at most once ever.

        `rows` are validated rollouts (the rollout schema), `offsets` the Kafka offset each row
        came from, `first_offset..last_offset` the consumed range including bad messages, so a
        replayed range maps to the same file name. Rows whose id is already stored or
        tombstoned, and repeats within `rows`, are skipped. One file per policy_version.
        """
        rows = self._conform_rows(rows)
        seg = Segment(rows, topic, partition, offsets, first_offset, last_offset).checked()
        partition, offsets, first_offset, last_offset = seg.partition, seg.offsets, seg.first_offset, seg.last_offset

        with self._lock, self._partition_lock(topic, partition):
            self._refresh_index()
            retired: dict[str, int] = {}
            marks = self.retirement_marks()
            if marks and rows.num_rows:
                current = pc.greater_equal(rows.column("policy_version"),
                                           mark_of_each_row(rows.column("run_id"), marks))
                if not pc.all(current).as_py():
                    gone = rows.filter(pc.invert(current)).column("run_id")
                    retired = {r["values"]: r["counts"] for r in pc.value_counts(gone).to_pylist()}
                    rows, offsets = rows.filter(current), offsets[current.to_numpy(zero_copy_only=False)]
            h1, h2 = self._index.hash(rows.column("rollout_id"))
            keep = ~self._index.contains_hashed(h1, h2) & first_occurrence(h1, h2)
            n_keep = int(keep.sum())
            duplicates = {} if n_keep == rows.num_rows else {
                r["values"]: r["counts"]
                for r in pc.value_counts(rows.column("run_id").filter(pa.array(~keep))).to_pylist()}
            if n_keep == 0:
                return SegmentWrite([], 0, rows.num_rows, pa.array([], pa.string()), retired, duplicates)
            new_rows = rows if n_keep == rows.num_rows else rows.filter(pa.array(keep))
            new_offsets = offsets[keep]
            table = self._with_store_columns(new_rows, topic, partition, new_offsets)
            name = f"{topic}+{partition}+{first_offset}-{last_offset}.parquet"
            paths = []
            for run, version, part in _split_by_run_and_version(table):
                path = self.root / ROLLOUTS_DIR / f"run={run}" / f"policy_version={version}" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                part_h1, part_h2 = self._index.hash(part.column("rollout_id"))
                if path.exists():
                    # This range was written before and now brings rows the store lacks (its
                    # earlier rows are all held, so they were skipped above): never overwrite
                    # what is there, keep it and add the new rows.
                    part = pa.concat_tables([pq.read_table(path, schema=self._file_schema), part])
                self._write_parquet(part, path)
                paths.append(path)
                # Indexed file by file, so a failure on a later policy version leaves the index
                # exactly matching the files that did get written, and a retry skips those rows.
                self._remember_file(path)
                self._index.add_hashed(part_h1, part_h2, run=self._run_code(run), version=version)
            return SegmentWrite(
                paths=paths,
                rows_written=n_keep,
                rows_skipped_duplicate=rows.num_rows - n_keep,
                new_ids=new_rows.column("rollout_id").combine_chunks(),
                retired=retired,
                duplicates=duplicates,
            )

    def _conform_rows(self, rows: pa.Table) -> pa.Table:
        return conform_rows(rows, self._rollout_schema)

    def _with_store_columns(self, rows: pa.Table, topic: str, partition: int, offsets: np.ndarray) -> pa.Table:
        return with_store_columns(rows, self._stored_schema, topic, partition, offsets)

    def delete(self, rollout_ids: Sequence[str] | pa.Array | pa.ChunkedArray, reason: str) -> Removal:
        """Tombstone those of `rollout_ids` the store holds (one atomic file per call).

        Tombstoned ids disappear from every view at once and can never be stored again, even
        if their Kafka messages are replayed. Ids the store does not hold (never stored, retired
        or already removed) are reported in `Removal.unknown` and nothing is written for them.
        """
        if not isinstance(reason, str) or not reason:
            raise StoreError("delete needs a non-empty reason")
        ids = as_string_array(rollout_ids)
        ids = pc.drop_null(ids)
        ids = pc.unique(ids.filter(pc.not_equal(ids, "")))
        if len(ids) == 0:
            return Removal(0, [])
        with self._lock:
            live = self.live_ids(ids)
            unknown = ids.filter(pc.invert(pc.is_in(ids, value_set=live))).to_pylist()
            if len(live) == 0:
                return Removal(0, unknown)
            now = int(time.time() * 1000)
            table = pa.Table.from_arrays(
                [live, pa.array([reason] * len(live), pa.string()),
                 pa.array(np.full(len(live), now, dtype=np.int64)).cast(pa.timestamp("ms", tz="UTC"))],
                schema=TOMBSTONE_SCHEMA,
            )
            path = self.root / TOMBSTONES_DIR / f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
            self._write_parquet(table, path)
            self._remember_file(path)
            self._index.add(live)   # tagged FOREVER: retention never forgets a tombstoned id
        return Removal(len(live), unknown)

    @_retry_if_a_segment_vanished
    def live_ids(self, rollout_ids: Sequence[str] | pa.Array) -> pa.Array:
        """Those of `rollout_ids` that are live rollouts in the store (distinct)."""
        conn = self.connect()
        try:
            conn.register("wanted", pa.table({"rollout_id": as_string_array(rollout_ids)}))
            return conn.sql("SELECT DISTINCT rollout_id FROM rollouts JOIN wanted USING (rollout_id)"
                            ).to_arrow_table().column(0).combine_chunks().cast(pa.string())
        finally:
            conn.close()

    # ------------------------------------------------------------------ retention, per run

    def retirement_marks(self) -> dict[str, int]:
        """Retention's marks: for each run, every policy_version below its mark is gone."""
        path = self.root / RETIRED_NAME
        try:
            st = path.stat()
        except FileNotFoundError:
            return {}
        signature = (st.st_ino, st.st_mtime_ns)   # each write is a new file (renamed over): a new inode
        if signature != self._marks[0]:
            self._marks = (signature, _read_marks(path))
        return dict(self._marks[1])

    def retired_below(self, run: str = DEFAULT_RUN) -> int | None:
        """The run's retention mark (None: nothing of it retired yet)."""
        return self.retirement_marks().get(run)

    def retire_below(self, version: int, run: str = DEFAULT_RUN) -> int:
        """Retention: drop every rollout of `run` with policy_version < `version`, at once, from every
        view, and refuse such rows from now on; compact() then deletes their files. The mark only
        rises (a lower `version` does nothing). Returns how many live rollouts were retired."""
        version = check_version(version, "retention mark")
        check_run(run)
        with self._lock, self._partition_lock("_retired", 0):
            marks = self.retirement_marks()
            if run in marks and version <= marks[run]:
                return 0
            retired = self._count_run_below(run, version)
            self._write_marks({**marks, run: version})
        return retired

    def lower_retirement(self, version: int, run: str = DEFAULT_RUN) -> int:
        """Admin: lower a run's retention mark raised by mistake (0 clears it). Versions between the
        new and the old mark whose files compaction has not deleted yet come back; the others are
        gone for good. Returns how many rollouts came back into the views."""
        version = check_version(version, "retention mark")
        check_run(run)
        with self._lock, self._partition_lock("_retired", 0):
            marks = self.retirement_marks()
            old = marks.get(run)
            if old is None or version >= old:
                return 0
            self._write_marks({**{r: m for r, m in marks.items() if r != run}, **({run: version} if version else {})})
            self._index_marks.pop(run, None)
            self._refresh_index()   # re-index the run's files that are visible again
            return self._count_run_below(run, old) - self._count_run_below(run, version)

    def _write_marks(self, marks: dict[str, int]) -> None:
        body = json.dumps({"format_version": STORE_FORMAT_VERSION, "runs": marks}, sort_keys=True)
        atomic_write(self.root / RETIRED_NAME, body.encode())
        self._refresh_index()

    def _count_run_below(self, run: str, version: int) -> int:
        conn = self.connect()
        try:
            return int(conn.execute("SELECT count(*) FROM rollouts WHERE run_id = $1 AND policy_version < $2",
                                    [run, version]).fetchone()[0])
        finally:
            conn.close()

    def _retired_segments(self) -> list[tuple[Path, str, int, int]]:
        """Segment files of retired policy versions, as (path, topic, partition, rows)."""
        marks = self.retirement_marks()
        if not marks:
            return []
        out = []
        for path in self._segment_files():
            match = _SEGMENT_RE.match(path.name)
            run, version = _segment_run_and_version(path)
            if match is None or version >= marks.get(run, -1):
                continue
            try:
                rows = pq.ParquetFile(path).metadata.num_rows
            except FileNotFoundError:
                continue   # another process compacted it first
            out.append((path, match["topic"], int(match["partition"]), rows))
        return out

    def _unlink_whole(self, segments: list, guard: AbstractContextManager) -> tuple[int, int, int]:
        """Delete whole segments, given as (path, topic, partition, rows), under `guard` and their
        partitions' locks; returns (files removed, rows removed, bytes freed)."""
        removed = rows_removed = freed = 0
        if not segments:
            return 0, 0, 0
        with guard, self._lock, ExitStack() as locks:
            for topic, partition in sorted({(t, p) for _, t, p, _ in segments}):
                locks.enter_context(self._partition_lock(topic, partition))
            for path, _, _, rows in segments:
                try:
                    size = path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    continue   # another process compacted it first
                self._known_files.pop(str(path), None)
                freed += size
                rows_removed += rows
                removed += 1
            for directory in {path.parent for path, *_ in segments}:
                fsync_dir(directory)   # one fsync per directory, not per file
        return removed, rows_removed, freed

    def compact(self, guard: AbstractContextManager | None = None) -> CompactionResult:
        """Remove segments whose rows are all tombstoned, rewrite those with some; merge small
        tombstone files.

        Finding the segments to change is one DuckDB query and takes no lock. Files change only
        inside `guard` (a lock that readers listing segment files hold, e.g. the curator's) and
        the partition locks: once for all the segments removed whole (the common case: retention
        tombstones whole policy versions, and a segment holds one), once per segment rewritten.
        Each rewrite is atomic (temporary file + rename). Tombstones stay, so deleted ids remain
        refused.
        """
        self.remove_stale_temp_files()
        guard = guard if guard is not None else nullcontext()
        rewritten = bytes_after = 0
        # Retired policy versions first: no query needed, their rows are already out of every view.
        retired = self._retired_segments()
        removed, rows_removed, bytes_before = self._unlink_whole(retired, guard)
        for directory in {path.parent for path, *_ in retired}:
            for empty in (directory, directory.parent):   # the version's directory, then the run's
                try:
                    empty.rmdir()
                except OSError:
                    break   # not empty: a writer that had not seen the mark yet (or other versions)
        whole, partial = self._segments_with_tombstones()
        n, rows, size = self._unlink_whole(whole, guard)
        removed, rows_removed, bytes_before = removed + n, rows_removed + rows, bytes_before + size
        if partial:
            dead_ids = self._first_column("SELECT DISTINCT rollout_id FROM tombstones")
            for path, topic, partition, _ in partial:
                with guard, self._lock, self._partition_lock(topic, partition):
                    if not path.exists():
                        continue
                    size = path.stat().st_size
                    table = pq.read_table(path, schema=self._file_schema)
                    kept = table.filter(pc.invert(pc.is_in(table.column("rollout_id"), value_set=dead_ids)))
                    self._write_parquet(kept, path)
                    self._remember_file(path)
                    bytes_before += size
                    bytes_after += path.stat().st_size
                    rows_removed += table.num_rows - kept.num_rows
                    rewritten += 1
        with self._lock:
            merged = self._merge_tombstone_files()
        return CompactionResult(rewritten, removed, rows_removed, merged, bytes_before, bytes_after)

    @_retry_if_a_segment_vanished
    def _segments_with_tombstones(self) -> tuple[list, list]:
        """Segments holding tombstoned rows as (path, topic, partition, dead rows): (all dead, some dead)."""
        if not self._segment_files():
            return [], []
        conn = self.connect()
        try:
            counts = conn.execute(
                f"SELECT s.filename, count(*) AS n, count(t.rollout_id) AS dead "
                f"FROM read_parquet({sql_str(self._segment_glob())}, filename=true) s "
                "LEFT JOIN (SELECT DISTINCT rollout_id FROM tombstones) t USING (rollout_id) "
                "GROUP BY s.filename HAVING count(t.rollout_id) > 0").fetchall()
        finally:
            conn.close()
        whole, partial = [], []
        for file, n, dead in sorted(counts):
            path = Path(file)
            match = _SEGMENT_RE.match(path.name)
            if match is None:
                continue
            entry = (path, match["topic"], int(match["partition"]), int(dead))
            (whole if dead == n else partial).append(entry)
        return whole, partial

    @_retry_if_a_segment_vanished
    def _read(self, fn):
        """ViewReads' reads, repeated when compaction removed a segment the views had listed."""
        return super()._read(fn)

    def _merge_tombstone_files(self) -> int:
        files = sorted(p for p in (self.root / TOMBSTONES_DIR).glob("*.parquet"))
        if len(files) <= self.config.max_tombstone_files:
            return 0
        table = pa.concat_tables([pq.read_table(p, schema=TOMBSTONE_SCHEMA) for p in files])
        # Keep the first tombstone of each id (its original reason and time).
        conn = duckdb.connect(":memory:")
        try:
            conn.register("t", table)
            table = conn.sql(
                "SELECT rollout_id, arg_min(reason, deleted_at) AS reason, min(deleted_at) AS deleted_at "
                "FROM t GROUP BY rollout_id ORDER BY rollout_id"
            ).to_arrow_table().cast(TOMBSTONE_SCHEMA)
        finally:
            conn.close()
        # The merged file is written before the inputs go, so readers always see every tombstone.
        merged = self.root / TOMBSTONES_DIR / f"{time.time_ns():020d}-merged-{uuid.uuid4().hex[:8]}.parquet"
        self._write_parquet(table, merged)
        self._remember_file(merged)
        for path in files:
            path.unlink(missing_ok=True)
            self._known_files.pop(str(path), None)
        fsync_dir(merged.parent)
        return len(files)

    # ------------------------------------------------------------------ other files

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
            table = table.select(DEAD_LETTER_SCHEMA.names).cast(DEAD_LETTER_SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise StoreError(f"dead letters do not fit {DEAD_LETTER_SCHEMA}: {exc}") from None
        path = self.root / DEAD_LETTERS_DIR / f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        self._write_parquet(table, path)

    def write_replay_snapshot(self, subsets: pa.Table | None, *, seq: int, extra: dict | None = None) -> Path:
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
        now = pa.scalar(int(time.time() * 1000), pa.timestamp("ms", tz="UTC"))
        table = subsets.append_column("selected_at", pa.repeat(now, subsets.num_rows)).select(
            REPLAY_SCHEMA.names).cast(REPLAY_SCHEMA)
        try:
            extra_json = json.dumps(extra or {}, sort_keys=True)
        except TypeError as exc:
            raise StoreError(f"replay snapshot extra is not JSON-serialisable: {exc}") from None
        table = table.replace_schema_metadata({b"sponge.extra": extra_json.encode()})
        path = self.root / REPLAY_DIR / f"selection-{seq:012d}.parquet"
        self._write_parquet(table, path)
        snapshots = sorted((self.root / REPLAY_DIR).glob("selection-*.parquet"))
        for old in snapshots[: max(0, len(snapshots) - self.config.replay_keep)]:
            old.unlink(missing_ok=True)
        return path

    def latest_replay_snapshot(self) -> tuple[pa.Table, dict] | None:
        """The newest replay snapshot as (table, extra), or None when there is none."""
        snapshots = sorted((self.root / REPLAY_DIR).glob("selection-*.parquet"))
        for path in reversed(snapshots):  # newest first; one may vanish under a concurrent prune
            try:
                table = pq.read_table(path, schema=REPLAY_SCHEMA)
                metadata = pq.read_schema(path).metadata or {}
            except FileNotFoundError:
                continue
            return table, json.loads(metadata.get(b"sponge.extra", b"{}"))
        return None

    # ------------------------------------------------------------------ reading

    def view_sql(self) -> list[str]:
        """CREATE VIEW statements for `rollouts`, `tombstones`, `dead_letters`, `replay_subset`, `segments`.

        Each view unions its files with a typed empty row set, so an empty store answers with
        typed empty results; the file globs are re-read on every query, so new segments appear.
        """
        dim = self.embedding_dim
        rollouts_glob = sql_str(self._segment_glob())
        columns = []
        for f in self._stored_schema:
            if f.name == "embedding":
                columns.append(f"CAST(embedding AS FLOAT[{dim}]) AS embedding")
            else:
                columns.append(quote_ident(f.name))
        # Retention, per run: a predicate on the hive columns alone, so DuckDB skips the retired
        # directories' files without opening them.
        marks = self.retirement_marks()
        retired = " OR ".join(f"(run = {sql_str(run)} AND policy_version < {int(mark)})"
                              for run, mark in sorted(marks.items()))
        rollouts_all = (
            f"SELECT {', '.join(columns)} FROM (SELECT *, NULL::VARCHAR AS run FROM "
            f"{_typed_empty(self._stored_schema, dim)} UNION ALL BY NAME "
            f"SELECT * FROM read_parquet({rollouts_glob}, allow_empty=true, hive_partitioning=true, "
            "hive_types={'run': 'VARCHAR', 'policy_version': 'BIGINT'}))"
            + (f" WHERE NOT ({retired})" if retired else "")
        )

        def flat(directory: str, pattern: str, schema: pa.Schema) -> str:
            glob = sql_str(str(self.root / directory / pattern))
            cols = ", ".join(quote_ident(n) for n in schema.names)
            return (f"SELECT {cols} FROM ({_typed_empty(schema, dim)} UNION ALL BY NAME "
                    f"SELECT * FROM read_parquet({glob}, allow_empty=true, hive_partitioning=false))")

        replay_glob = sql_str(str(self.root / REPLAY_DIR / "selection-*.parquet"))
        replay_all = (f"SELECT {', '.join(quote_ident(n) for n in REPLAY_SCHEMA.names)}, filename FROM "
                      f"(SELECT *, NULL::VARCHAR AS filename FROM {_typed_empty(REPLAY_SCHEMA, dim)} "
                      "UNION ALL BY NAME SELECT * FROM read_parquet("
                      f"{replay_glob}, allow_empty=true, hive_partitioning=false, union_by_name=true, "
                      "filename=true))")
        segment_counts = (
            f"SELECT filename, count(*) AS n FROM ((SELECT NULL::VARCHAR AS filename WHERE false) UNION ALL BY NAME "
            f"SELECT * FROM read_parquet({rollouts_glob}, allow_empty=true, hive_partitioning=false, filename=true)) "
            "GROUP BY filename"
        )
        rollouts = (f"SELECT * FROM ({rollouts_all}) "
                    "WHERE rollout_id NOT IN (SELECT rollout_id FROM tombstones)")
        replay_subset = (f"SELECT * EXCLUDE (filename) FROM ({replay_all}) "
                         f"WHERE filename = (SELECT max(filename) FROM ({replay_all}))")
        segments = (
            "SELECT b.filename AS file, "
            "regexp_extract(b.filename, '/run=([^/]+)/', 1) AS run_id, "
            "CAST(regexp_extract(b.filename, 'policy_version=(-?[0-9]+)/', 1) AS BIGINT) AS policy_version, "
            "coalesce(c.n, 0)::BIGINT AS rows, b.size::BIGINT AS bytes "
            f"FROM read_blob({rollouts_glob}) b LEFT JOIN ({segment_counts}) c ON b.filename = c.filename"
        )
        return [
            f"CREATE OR REPLACE VIEW tombstones AS {flat(TOMBSTONES_DIR, '*.parquet', TOMBSTONE_SCHEMA)}",
            f"CREATE OR REPLACE VIEW rollouts AS {rollouts}",
            # Dead letters are at-least-once (a replay sends one again): the view shows each letter_id
            # once. Files from before letter ids lack the column (read by name); theirs is computed
            # here as sponge.streams.dlq.letter_id computes it.
            "CREATE OR REPLACE VIEW dead_letters AS SELECT * FROM (SELECT topic, partition, \"offset\", reason, "
            "value, received_at, coalesce(letter_id, concat_ws('/', topic, partition, \"offset\", "
            "left(sha256(coalesce(value, ''::BLOB)), 32))) AS letter_id "
            f"FROM ({_typed_empty(DEAD_LETTER_SCHEMA, dim)} UNION ALL BY NAME SELECT * FROM read_parquet("
            f"{sql_str(str(self.root / DEAD_LETTERS_DIR / '*.parquet'))}, allow_empty=true, "
            "hive_partitioning=false, union_by_name=true))) "
            "QUALIFY row_number() OVER (PARTITION BY letter_id ORDER BY received_at) = 1",
            f"CREATE OR REPLACE VIEW replay_subset AS {replay_subset}",
            f"CREATE OR REPLACE VIEW segments AS {segments}",
        ]

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A trusted in-memory DuckDB connection with the store's views (internal use; close it)."""
        conn = duckdb.connect(":memory:")
        for statement in self.view_sql():
            conn.execute(statement)
        return conn

    def query(self, query: str, *, max_rows: int | None = None, timeout_s: float | None = None,
              workers: SqlWorkers | None = None) -> QueryResult:
        """Run user SQL read-only within the configured bounds; returns the table and whether it was cut.

        The query runs in a child process (`sponge.store.sql_worker`) with an address-space
        limit and a SIGKILL at the deadline; `workers` is the pool to use (default: this store's
        own, started on first use). A segment that vanishes under it is retried in the child.
        """
        limits = self.config.sql_limits.narrowed(max_rows=max_rows, timeout_s=timeout_s)
        if workers is None:
            # setdefault is atomic: two first queries at once share one pool (which starts lazily).
            workers = self.__dict__.setdefault("_sql_workers", SqlWorkers(self.config.sql_limits))
        return workers.run(query, setup_sql=self.view_sql(), allowed_dir=self.root, limits=limits)

    @_retry_if_a_segment_vanished
    def stats(self) -> dict:
        """Segment count, live rows, stored rows, tombstones, dead letters and bytes on disk."""
        conn = self.connect()
        try:
            segments, stored_rows, segment_bytes = conn.execute(
                "SELECT count(*), coalesce(sum(rows), 0), coalesce(sum(bytes), 0) FROM segments"
            ).fetchone()
            live = conn.execute("SELECT count(*) FROM rollouts").fetchone()[0]
            tombstones = conn.execute("SELECT count(DISTINCT rollout_id) FROM tombstones").fetchone()[0]
            dead_letters = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        finally:
            conn.close()
        total_bytes = sum(p.stat().st_size for p in self.root.rglob("*.parquet") if p.is_file())
        return {
            "segments": int(segments),
            "rows": int(live),
            "stored_rows": int(stored_rows),
            "tombstones": int(tombstones),
            "dead_letters": int(dead_letters),
            "segment_bytes": int(segment_bytes),
            "bytes": int(total_bytes),
            "embedding_dim": self.embedding_dim,
            "retirement_marks": self.retirement_marks(),
        }

    # ------------------------------------------------------------------ housekeeping

    def remove_stale_temp_files(self) -> int:
        """Remove temporary files left by crashed writers; returns how many were removed.

        A temp file is stale when its writer (pid on this host) is gone, or when it is older
        than `stale_temp_age_s` (writer on another host). Views never read temp files.
        """
        removed = 0
        host = socket.gethostname()
        now = time.time()
        for path in self.root.rglob(f".*{TEMP_SUFFIX}"):
            parts = path.name[1:-len(TEMP_SUFFIX)].split("~")
            writer_host, writer_pid = (parts[1], parts[2]) if len(parts) == 4 else ("", "")
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            dead_writer = writer_host == host and writer_pid.isdigit() and not pid_alive(int(writer_pid))
            if dead_writer or age > self.config.stale_temp_age_s:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _segment_glob(self) -> str:
        return str(self.root / ROLLOUTS_DIR / "*" / "*" / "*.parquet")

    def _segment_files(self) -> list[Path]:
        out = []
        for run_dir in _subdirs(self.root / ROLLOUTS_DIR, "run="):
            for version_dir in _subdirs(run_dir, "policy_version="):
                try:
                    with os.scandir(version_dir) as files:
                        out.extend(Path(f.path) for f in files if f.name.endswith(".parquet")
                                   and not f.name.startswith("."))
                except FileNotFoundError:
                    continue   # compaction removed it meanwhile
        return out

    def _run_code(self, run: str) -> int:
        """The id index's tag for `run`."""
        return self._run_codes.setdefault(run, len(self._run_codes))

    def _refresh_index(self) -> None:
        """Index ids from segment and tombstone files this object has not read yet (or that changed),
        and forget those of versions retired since the last call."""
        marks = self.retirement_marks()
        for run, mark in marks.items():
            if mark > self._index_marks.get(run, -1):
                self._index.drop_below(self._run_code(run), mark)
        self._index_marks = marks
        segments = [p for p in self._segment_files()
                    if (rv := _segment_run_and_version(p))[1] >= marks.get(rv[0], -1)]
        candidates = segments + [
            p for p in (self.root / TOMBSTONES_DIR).glob("*.parquet")
        ]
        present = set()
        todo = []
        for path in candidates:
            key = str(path)
            present.add(key)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if self._known_files.get(key) != (st.st_size, st.st_mtime_ns):
                todo.append((path, (st.st_size, st.st_mtime_ns)))
        for key in [k for k in self._known_files if k not in present]:
            del self._known_files[key]  # removed by compaction; its ids stay indexed (tombstoned)
        if not todo:
            return
        for path, signature in todo:
            try:
                ids = pq.read_table(path, columns=["rollout_id"]).column(0)
            except FileNotFoundError:
                continue  # compacted away between listing and reading
            if path.parent.name == TOMBSTONES_DIR:
                self._index.add(ids)
            else:
                run, version = _segment_run_and_version(path)
                self._index.add(ids, run=self._run_code(run), version=version)
            self._known_files[str(path)] = signature

    def _remember_file(self, path: Path) -> None:
        st = path.stat()
        self._known_files[str(path)] = (st.st_size, st.st_mtime_ns)

    @contextmanager
    def _partition_lock(self, topic: str, partition: int) -> Iterator[None]:
        """An exclusive advisory lock shared by every process writing this topic+partition."""
        path = self.root / LOCKS_DIR / f"{topic}+{partition}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _write_parquet(self, table: pa.Table, path: Path) -> None:
        """Write `table` to `path` atomically (sponge.files.atomic_write: temp file, fsync, rename)."""
        is_rollouts = "embedding" in table.schema.names
        codec, level = self.config.compression, self.config.compression_level
        if set(self.config.uncompressed_columns) & set(table.schema.names):
            packed = [n for n in table.schema.names if n not in self.config.uncompressed_columns]
            codec = {n: ("none" if n in self.config.uncompressed_columns else codec) for n in table.schema.names}
            level = None if level is None else {n: level for n in packed}
        atomic_write(path, lambda tmp: pq.write_table(
            table, tmp, compression=codec, compression_level=level, row_group_size=self.config.row_group_size,
            # Dictionary encoding pays for repeated strings, not for floats or token ids.
            use_dictionary=["prompt_id", "run_id", "topic", "prompt"] if is_rollouts else True,
            write_statistics=(["rollout_id", "prompt_id", "run_id", "reward", "created_at", "topic",
                               "partition", "offset", "ingested_at"] if is_rollouts else True)))


# ---------------------------------------------------------------------- helpers


def _segment_run_and_version(path: Path) -> tuple[str, int]:
    """The run and policy_version of a segment file, from its hive directory names."""
    return path.parent.parent.name.partition("=")[2], int(path.parent.name.partition("=")[2])


def _subdirs(directory: Path, prefix: str) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return [e.path for e in entries if e.name.startswith(prefix) and e.is_dir()]
    except FileNotFoundError:
        return []


def _read_manifest(path: Path) -> tuple[int, int]:
    """(embedding_dim, format_version) of a store manifest, or a StoreError saying what is wrong."""
    try:
        manifest = json.loads(path.read_text())
        dim, version = int(manifest["embedding_dim"]), int(manifest.get("format_version", 1))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise StoreError(f"unreadable store manifest {path}: {exc}") from None
    if version != STORE_FORMAT_VERSION:
        if version < STORE_FORMAT_VERSION:
            raise StoreError(f"the store at {path.parent} has format {version}; this sponge reads format "
                             f"{STORE_FORMAT_VERSION}: run `sponge store migrate {path.parent}` once")
        raise StoreError(f"the store at {path.parent} has format {version}, newer than this sponge reads "
                         f"({STORE_FORMAT_VERSION}): upgrade sponge")
    return dim, version


def _read_marks(path: Path) -> dict[str, int]:
    """The retention marks file, checked: a corrupt or out-of-range mark is a clear StoreError (at
    start, never a crash loop: `sponge store retention --run R --lower V` or deleting the file
    mends it)."""
    try:
        body = json.loads(path.read_text())
        marks = body["runs"]
        if not isinstance(marks, dict):
            raise TypeError("'runs' is not a mapping")
        out = {check_run(run): check_version(mark, f"retention mark of run {run!r}") for run, mark in marks.items()}
    except (ValueError, KeyError, TypeError, OSError, StoreError) as exc:
        raise StoreError(f"unreadable retention marks {path}: {exc}; fix or delete the file (deleting it "
                         "brings back retired rollouts compaction has not removed yet)") from None
    return out


def _split_by_run_and_version(table: pa.Table) -> Iterator[tuple[str, int, pa.Table]]:
    """(run_id, policy_version, rows without policy_version) for each pair, in ascending order."""
    runs = pc.dictionary_encode(table.column("run_id").combine_chunks())
    run_index = runs.indices.to_numpy(zero_copy_only=False)
    names = runs.dictionary.to_pylist()
    versions = table.column("policy_version").to_numpy()
    body = table.drop_columns(["policy_version"])
    order = np.lexsort((versions, np.argsort(np.argsort(names))[run_index]))
    keys = np.stack([run_index[order], versions[order]], axis=1)
    starts = np.flatnonzero(np.r_[True, (np.diff(keys, axis=0) != 0).any(axis=1)])
    ends = np.r_[starts[1:], len(order)]
    sorted_body = body if len(starts) == 1 else body.take(pa.array(order))
    for start, end in zip(starts, ends):
        yield (names[int(keys[start, 0])], int(keys[start, 1]),
               sorted_body.slice(int(start), int(end - start)))


def _typed_empty(schema: pa.Schema, dim: int) -> str:
    """SELECT of typed NULL columns with no rows: the schema an empty view still reports."""
    cols = ", ".join(f"NULL::{_duckdb_type(f.type, dim)} AS {quote_ident(f.name)}" for f in schema)
    return f"(SELECT {cols} WHERE false)"


def _duckdb_type(t: pa.DataType, dim: int) -> str:
    if pa.types.is_string(t):
        return "VARCHAR"
    if pa.types.is_binary(t):
        return "BLOB"
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_float32(t):
        return "FLOAT"
    if pa.types.is_float64(t):
        return "DOUBLE"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    if pa.types.is_fixed_size_list(t):
        return f"{_duckdb_type(t.value_type, dim)}[]"  # read as a list, cast to FLOAT[dim] in the view
    if pa.types.is_list(t):
        return f"{_duckdb_type(t.value_type, dim)}[]"
    raise TypeError(f"no DuckDB type for {t}")



def migrate(root: str | os.PathLike, progress: bool = False) -> int:
    """Turn a format-1 store (rollouts/policy_version=V/, one retention mark) into this format
    (rollouts/run=R/policy_version=V/, a mark per run) in place; returns the segment files moved.

    Safe to stop and rerun: each old file's rows are written under the new layout (atomically)
    before the old file goes, and the manifest says format 2 only once every file has moved."""
    root = Path(root).resolve()
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise StoreError(f"no rollout store at {root} (no {MANIFEST_NAME} there)")
    body = json.loads(manifest.read_text())
    if int(body.get("format_version", 1)) == STORE_FORMAT_VERSION:
        return 0
    if int(body.get("format_version", 1)) != 1:
        raise StoreError(f"cannot migrate a store of format {body.get('format_version')}")
    old = sorted(p for p in (root / ROLLOUTS_DIR).glob("policy_version=*/*.parquet") if not p.name.startswith("."))
    from tqdm.auto import tqdm

    runs: set[str] = set()
    for path in tqdm(old, desc="migrating segments", unit="file", disable=not progress):
        version = int(path.parent.name.partition("=")[2])
        table = pq.read_table(path)
        run_ids = pc.fill_null(table.column("run_id"), DEFAULT_RUN)
        table = table.set_column(table.schema.get_field_index("run_id"), "run_id", run_ids)
        for run in pc.unique(run_ids).to_pylist():
            check_run(run)
            runs.add(run)
            target = root / ROLLOUTS_DIR / f"run={run}" / f"policy_version={version}" / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            part = table.filter(pc.equal(table.column("run_id"), run))
            tmp = target.parent / f".{target.name}~migrate{TEMP_SUFFIX}"
            pq.write_table(part, tmp, compression="zstd")
            os.replace(tmp, target)
            fsync_dir(target.parent)
        path.unlink()
        try:
            path.parent.rmdir()
        except OSError:
            pass
    retired = root / RETIRED_NAME
    if retired.is_file():
        below = json.loads(retired.read_text()).get("below")
        if below is not None:
            marks = {run: check_version(int(below), "retention mark") for run in runs}
            atomic_write(retired, json.dumps({"format_version": STORE_FORMAT_VERSION, "runs": marks}).encode())
    atomic_write(manifest, json.dumps({**body, "format_version": STORE_FORMAT_VERSION}, indent=2).encode())
    return len(old)
