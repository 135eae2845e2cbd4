"""What the Delta Lake store adds or does differently: concurrent writer processes, snapshots that
other readers (DuckDB over Arrow datasets, `deltalake`) see, offsets in the table's log, atomic
segment commits, uncommitted files, compaction of files and log, marks as table properties."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake
from test_store_fixtures import make_rollouts

from sponge.store.delta import (
    DeltaRolloutStore,
    DeltaStoreConfig,
    migrate_to_delta,
)
from sponge.store import ParquetRolloutStore, StoreError

DIM = 8


def store_at(root, **config) -> DeltaRolloutStore:
    return DeltaRolloutStore(root, embedding_dim=DIM, config=DeltaStoreConfig(**{"vacuum_retention_hours": 0, **config}))


def write(store, table: pa.Table, first: int, partition: int = 0, topic: str = "rollouts"):
    offsets = np.arange(first, first + table.num_rows, dtype=np.int64)
    return store.write_segment(table, topic=topic, partition=partition, offsets=offsets,
                               first_offset=first, last_offset=first + table.num_rows - 1)


def table_ids(root) -> list[str]:
    """The ids a plain Delta reader sees (no sponge involved)."""
    return DeltaTable(str(root / "rollouts")).to_pyarrow_table(columns=["rollout_id"]).column(0).to_pylist()


def _writer_process(root: str, seed: int, chunks: int, out) -> None:
    """Consume the same two partition logs as the other writer, in its own random chunking."""
    from test_store_fixtures import make_rollouts as rollouts

    store = DeltaRolloutStore(root, embedding_dim=DIM)
    rng = np.random.default_rng(seed)
    logs = {p: rollouts(300, dim=DIM, id_prefix=f"p{p}", policy_versions=(0, 1, 2)) for p in (0, 1)}
    written = 0
    for _ in range(chunks):
        partition = int(rng.integers(0, 2))
        first = int(rng.integers(0, 280))
        length = int(rng.integers(1, 60))
        rows = logs[partition].slice(first, length)
        written += write(store, rows, first, partition).rows_written
    for partition in (0, 1):   # finally the whole logs, so together they hold everything
        written += write(store, logs[partition], 0, partition).rows_written
    out.put(written)


def test_two_writer_processes_at_once_store_each_rollout_exactly_once(tmp_path):
    """Real processes committing to one table at the same time, over overlapping ranges."""
    root = tmp_path / "store"
    store_at(root)   # created once, so both processes open the same table
    ctx = mp.get_context("spawn")   # delta-rs's runtime does not survive fork
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer_process, args=(str(root), seed, 25, out)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    written = [out.get(timeout=5) for _ in procs]
    ids = table_ids(root)
    assert len(ids) == len(set(ids)) == 600 == sum(written)
    history = DeltaTable(str(root / "rollouts")).history()
    segments = [h for h in history if h.get("sponge.operation") == "segment"]
    assert len(segments) >= 2


def test_a_segment_is_one_commit_with_its_partitions_offset(tmp_path):
    store = store_at(tmp_path)
    table = make_rollouts(40, dim=DIM, policy_versions=(0, 1, 2))
    result = write(store, table, first=100, partition=3)
    assert result.rows_written == 40 and len(result.paths) == 3   # a file per version ...
    dt = DeltaTable(str(tmp_path / "rollouts"))
    assert dt.history(1)[0]["sponge.operation"] == "segment"      # ... in one commit
    assert store.table_offset("rollouts", 3) == 139 == dt.transaction_version("sponge.offset:rollouts:3")
    assert store.table_offset("rollouts", 0) is None
    write(store, table.slice(0, 10), first=100, partition=3)      # a replay writes nothing, moves nothing
    assert store.table_offset("rollouts", 3) == 139
    write(store, make_rollouts(5, dim=DIM, start=500), first=140, partition=3)
    assert DeltaRolloutStore.open(tmp_path).table_offset("rollouts", 3) == 144


def test_a_flush_of_several_partitions_is_one_commit_with_every_partitions_offset(tmp_path):
    from sponge.store import Segment

    store = store_at(tmp_path)
    table = make_rollouts(60, dim=DIM, policy_versions=(0, 1))
    a, b = table.slice(0, 30), table.slice(30, 30)
    again = table.slice(25, 10)                  # five rows of partition 0's and five of partition 1's, resent
    segments = [Segment(a, "rollouts", 0, np.arange(30), 0, 29),
                Segment(b, "rollouts", 1, np.arange(30), 0, 29),
                Segment(again, "rollouts", 2, np.arange(10) + 7, 7, 16)]
    before = DeltaTable(str(tmp_path / "rollouts")).version()
    result = store.write_segments(segments)
    dt = DeltaTable(str(tmp_path / "rollouts"))
    assert dt.version() == before + 1                              # one commit for the three partitions
    assert result.rows_written == 60 and result.rows_skipped_duplicate == 10
    assert len(result.paths) == 2                                  # a file per version, not per partition
    assert [store.table_offset("rollouts", p) for p in (0, 1, 2)] == [29, 29, 16]
    assert sorted(store.rollout_ids().to_pylist()) == sorted(table.column("rollout_id").to_pylist())
    stored = store.sql("SELECT partition, count(*) AS n FROM rollouts GROUP BY 1 ORDER BY 1").to_pydict()
    assert stored == {"partition": [0, 1], "n": [30, 30]}          # the first copy of each id is kept
    # A replay of the same flush after a crash between the commit and Kafka's: nothing twice.
    assert store.write_segments(segments).rows_written == 0 and store.count() == 60


def test_a_failed_commit_leaves_nothing_visible_and_the_retry_stores_everything(tmp_path, monkeypatch):
    """Fault injection (the commit fails: the object store refused it, say) after the files were written."""
    store = store_at(tmp_path)
    table = make_rollouts(30, dim=DIM, policy_versions=(0, 1))

    def refuse(*args, **kwargs):
        raise OSError("injected: commit failed")

    monkeypatch.setattr(DeltaTable, "create_write_transaction", refuse)
    with pytest.raises(OSError, match="injected"):
        write(store, table, first=0)
    monkeypatch.undo()
    assert store.count() == 0 and table_ids(tmp_path) == []
    assert len(list((tmp_path / "rollouts").glob("*/*/*.parquet"))) == 2   # written, never committed
    assert write(store, table, first=0).rows_written == 30
    store.compact()                                                          # VACUUM takes the orphans
    assert len(list((tmp_path / "rollouts").glob("*/*/*.parquet"))) == 2
    assert sorted(table_ids(tmp_path)) == sorted(table.column("rollout_id").to_pylist())


def test_a_file_a_killed_writer_left_uncommitted_is_never_read(tmp_path):
    store = store_at(tmp_path)
    write(store, make_rollouts(10, dim=DIM), first=0)
    orphan = tmp_path / "rollouts" / "run_id=run-a" / "policy_version=0" / "rollouts+0+10-19-deadbeef0000.parquet"
    pq.write_table(pq.read_table(next(orphan.parent.glob("*.parquet"))), orphan)
    assert store.count() == 10 and len(table_ids(tmp_path)) == 10
    assert store.sql("SELECT count(*) FROM rollouts").column(0)[0].as_py() == 10
    store.compact()
    assert not orphan.exists() and store.count() == 10


def test_readers_opened_before_see_retention_and_removal_and_old_snapshots_stay_readable(tmp_path):
    store = store_at(tmp_path, vacuum_retention_hours=1)
    table = make_rollouts(60, dim=DIM, policy_versions=(0, 1, 2))
    write(store, table, first=0)
    reader = DeltaRolloutStore.open(tmp_path)                 # another process's store object
    plain = DeltaTable(str(tmp_path / "rollouts"))            # a plain Delta reader (Spark, Polars alike)
    old_conn = reader.connect()                               # a query connection over the snapshot of now
    removed = table.column("rollout_id").to_pylist()[1:3]     # versions 1 and 2
    store.delete(removed, reason="bad")
    assert not set(removed) & set(reader.rollout_ids().to_pylist())   # hidden at once ...
    assert store.wait_for_removals(60)                                 # ... deleted by the store's thread
    assert store.retire_below(1, run="run-a") == 20
    assert reader.count() == 38 and not set(removed) & set(reader.rollout_ids().to_pylist())
    assert reader.retired_below("run-a") == 1
    plain.update_incremental()
    seen = plain.to_pyarrow_table(columns=["rollout_id", "policy_version"])
    assert seen.num_rows == 38 and min(seen.column("policy_version").to_pylist()) == 1
    assert not set(removed) & set(seen.column("rollout_id").to_pylist())
    # DuckDB over the Arrow dataset of the old snapshot still reads it whole (VACUUM keeps its files).
    assert old_conn.execute("SELECT count(*) FROM rollouts").fetchone()[0] == 60
    store.compact()
    assert old_conn.execute("SELECT count(*) FROM rollouts").fetchone()[0] == 60
    old_conn.close()


def test_retention_counts_the_live_rows_it_retires_without_the_removed_ones(tmp_path):
    store = store_at(tmp_path)
    table = make_rollouts(60, dim=DIM, policy_versions=(0, 1, 2))
    write(store, table, first=0)
    old = table.filter(pc.less(table.column("policy_version"), 2)).column("rollout_id").to_pylist()
    store.delete(old[:3], reason="bad")          # three of the rows about to be retired, removed first
    live_below = store.sql("SELECT count(*) AS n FROM rollouts WHERE policy_version < 2").column("n")[0].as_py()
    assert live_below == len(old) - 3
    assert store.retire_below(2, run="run-a") == live_below
    assert store.retire_below(2, run="run-a") == 0 and store.count() == 60 - len(old)


def test_readers_see_only_committed_data(tmp_path, monkeypatch):
    """While a segment's files are written but not committed, no reader sees any of its rows."""
    store = store_at(tmp_path)
    write(store, make_rollouts(10, dim=DIM), first=0)
    seen = {}
    real = DeltaTable.create_write_transaction

    def look_then_commit(self, *args, **kwargs):
        seen["store"] = DeltaRolloutStore.open(tmp_path).count()
        seen["sql"] = store.sql("SELECT count(*) FROM rollouts").column(0)[0].as_py()
        seen["delta"] = len(table_ids(tmp_path))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "create_write_transaction", look_then_commit)
    write(store, make_rollouts(25, dim=DIM, start=10), first=10)
    monkeypatch.undo()
    assert seen == {"store": 10, "sql": 10, "delta": 10}
    assert store.count() == 35


def test_a_removal_can_wait_for_compaction_and_stays_hidden_meanwhile(tmp_path):
    store = store_at(tmp_path, removal_rewrite="compaction")
    table = make_rollouts(30, dim=DIM)
    write(store, table, first=0)
    doomed = table.column("rollout_id").to_pylist()[:4]
    assert store.delete(doomed, reason="x").removed == 4
    assert store.count() == 26 and set(doomed) <= set(table_ids(tmp_path))    # hidden, still in the table
    assert write(store, table, first=0).rows_written == 0                      # and refused
    result = store.compact()
    assert result.rows_removed == 4 and result.segments_rewritten >= 1
    assert not set(doomed) & set(table_ids(tmp_path)) and store.count() == 26


def test_compaction_merges_small_files_and_keeps_the_log_short(tmp_path):
    store = store_at(tmp_path, checkpoint_interval=10, log_retention_s=0)
    for i in range(40):   # forty tiny segments: forty files, forty commits
        write(store, make_rollouts(5, dim=DIM, start=5 * i), first=5 * i)
    log_dir = tmp_path / "rollouts" / "_delta_log"
    assert len(list((tmp_path / "rollouts").glob("*/*/*.parquet"))) == 40
    for i in range(3):
        store.delete([f"r-{i:09d}"], reason=f"reason {i}")    # three tombstone files
    result = store.compact()
    assert result.segments_removed >= 40 and store.count() == 197
    assert len(DeltaTable(str(tmp_path / "rollouts")).file_uris()) == 1
    assert len(list((tmp_path / "rollouts").glob("*/*/*.parquet"))) == 1          # VACUUM took the rest
    assert len(list(log_dir.glob("*.json"))) <= 3 and list(log_dir.glob("*.checkpoint.parquet"))
    assert write(store_at(tmp_path), make_rollouts(200, dim=DIM), first=0).rows_written == 0   # reopened: same ids


def test_compaction_merges_tombstone_files_and_keeps_their_first_reason(tmp_path):
    store = store_at(tmp_path, max_tombstone_files=2)
    write(store, make_rollouts(20, dim=DIM), first=0)
    for i in range(6):
        store.delete([f"r-{i:09d}"], reason=f"reason {i}")
    assert len(DeltaTable(str(tmp_path / "tombstones")).file_uris()) == 6
    assert store.compact().tombstone_files_merged == 6
    assert len(DeltaTable(str(tmp_path / "tombstones")).file_uris()) == 1
    tomb = store.sql("SELECT rollout_id, reason FROM tombstones ORDER BY 1").to_pydict()
    assert tomb == {"rollout_id": [f"r-{i:09d}" for i in range(6)], "reason": [f"reason {i}" for i in range(6)]}
    assert write(store, make_rollouts(20, dim=DIM), first=0).rows_written == 0


def test_lowering_a_mark_after_vacuum_brings_nothing_back(tmp_path):
    store = store_at(tmp_path)
    write(store, make_rollouts(40, dim=DIM, policy_versions=(0, 1, 2, 3)), first=0)
    assert store.retire_below(2, run="run-a") == 20
    store.compact()   # VACUUM (retention 0) deletes the retired files
    assert store.lower_retirement(0, run="run-a") == 0
    assert store.retirement_marks() == {} and store.count() == 20
    late = make_rollouts(5, dim=DIM, policy_versions=(1,), id_prefix="late")
    assert write(store, late, first=100).rows_written == 5   # version 1 is accepted again


@pytest.mark.parametrize("value, message", [("9223372036854775808", "out of range"), ("x", "retention mark"),
                                            ("-1", "out of range")])
def test_a_corrupt_mark_on_the_table_is_a_clear_error_at_open(tmp_path, value, message):
    store_at(tmp_path)
    DeltaTable(str(tmp_path / "rollouts")).alter.set_table_properties({"sponge.retired.run-a": value},
                                                                      raise_if_not_exists=False)
    with pytest.raises(StoreError, match=message):
        DeltaRolloutStore.open(tmp_path)


def test_a_parquet_segment_store_must_be_migrated_and_migrates_elsewhere_untouched(tmp_path):
    old_root, new_root = tmp_path / "old", tmp_path / "new"
    old = ParquetRolloutStore(old_root, embedding_dim=DIM)
    table = make_rollouts(60, dim=DIM, policy_versions=(0, 1, 2))
    old.write_segment(table, topic="rollouts", partition=1, offsets=np.arange(60), first_offset=0, last_offset=59)
    old.delete(["r-000000005"], reason="known bad")
    old.retire_below(1, run="run-a")
    old.write_dead_letters(pa.table({"topic": ["rollouts"], "partition": pa.array([1], pa.int32()),
                                     "offset": pa.array([60], pa.int64()), "reason": ["[]"],
                                     "value": pa.array([b"x"], pa.binary()),
                                     "received_at": pa.array([1], pa.timestamp("ms", tz="UTC"))}))
    with pytest.raises(StoreError, match="sponge store migrate"):
        DeltaRolloutStore.open(old_root)
    before = sorted(p.relative_to(old_root) for p in old_root.rglob("*") if p.is_file())
    summary = migrate_to_delta(old_root, new_root)
    assert sorted(p.relative_to(old_root) for p in old_root.rglob("*") if p.is_file()) == before
    new = DeltaRolloutStore.open(new_root)
    assert sorted(new.rollout_ids().to_pylist()) == sorted(old.rollout_ids().to_pylist())
    assert summary["migrated_rows"] == 39 and new.retirement_marks() == {"run-a": 1}
    assert new.table_offset("rollouts", 1) == 59
    assert new.sql("SELECT count(*) FROM dead_letters").column(0)[0].as_py() == 1
    assert write(new, table, first=0, partition=1).rows_written == 0   # removed and retired stay out
    assert json.loads((old_root / "_sponge_store.json").read_text())["format_version"] == 2
    assert not (new_root / "_sponge_store.json").exists()
    assert os.path.isdir(new_root / "rollouts" / "_delta_log")


@pytest.mark.soak
def test_the_transaction_log_stays_bounded_under_a_long_stream(tmp_path, caplog):
    """A steady stream of small segments for SPONGE_LOG_STREAM_S seconds (default 600), with
    retention, removals and a compaction every 20 s as `sponge serve` schedules them: the log
    holds only the entries of the last log_retention_s (plus those since the last checkpoint),
    however many commits the stream made, and the table's live files stay few."""
    import time

    seconds = float(os.environ.get("SPONGE_LOG_STREAM_S", "600"))
    retention_s, every_s, checkpoint = 60, 20, 20
    store = store_at(tmp_path, checkpoint_interval=checkpoint, log_retention_s=retention_s)
    log_dir = tmp_path / "rollouts" / "_delta_log"
    samples = []   # (elapsed s, table version, log json files, log bytes, live files, open ms)
    start = last_compaction = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        version = i // 50                        # a new policy version every 50 segments
        write(store, make_rollouts(100, dim=DIM, start=100 * i, policy_versions=(version,)), first=100 * i)
        if i % 50 == 49:
            store.retire_below(max(0, version - 2), run="run-a")        # keep the last few versions
            store.delete([f"r-{100 * i + 7:09d}"], reason="stream")    # and remove one now and then
        i += 1
        if time.monotonic() - last_compaction >= every_s:
            store.compact()
            last_compaction = time.monotonic()
            opened = time.perf_counter()
            DeltaRolloutStore.open(tmp_path).count()
            table = DeltaTable(str(tmp_path / "rollouts"))
            samples.append((time.monotonic() - start, table.version(), len(list(log_dir.glob("*.json"))),
                            sum(p.stat().st_size for p in log_dir.iterdir()), len(table.file_uris()),
                            (time.perf_counter() - opened) * 1000))
    report = "\n".join(f"{t:6.0f}s version={v} log_json={n} log_bytes={b} files={f} open_ms={o:.0f}"
                       for t, v, n, b, f, o in samples)
    print(f"\n{i} segments in {seconds:.0f} s; every {every_s} s after compaction:\n{report}")
    judged = [s for s in samples if s[0] >= retention_s + 2 * every_s]
    assert len(judged) >= 2, "the stream was too short to judge:\n" + report
    for t, version, n_json, *_ in judged:
        # Entries the log may still hold: the commits of the last retention window (and two
        # compaction intervals, cleanup runs at compaction) plus up to a checkpoint interval.
        window_start = max(v for s_t, v, *_ in samples if s_t <= t - retention_s - 2 * every_s) \
            if any(s_t <= t - retention_s - 2 * every_s for s_t, *_ in samples) else 0
        assert n_json <= version - window_start + checkpoint + 10, report
    assert samples[-1][1] > 2 * samples[-1][2], "the log keeps a fraction of the commits:\n" + report
    assert max(s[4] for s in judged) <= 8, report                # OPTIMIZE keeps the files few
    assert store.count() <= 100 * 50 * 4, report                 # versions v-2 .. v+1 at most
    assert all("rewrite failed" not in r.getMessage() for r in caplog.records), report


def _claimer(root: str, out, data: bytes) -> None:
    out.put((data, DeltaRolloutStore.open(root).put_shared_once("selector/run-a/objective", data)))


def test_shared_objects_and_a_put_once_only_one_process_wins(tmp_path):
    """What shard selectors on several hosts exchange through the store's location, not a local file."""
    store = store_at(tmp_path)
    assert store.get_shared("selector/run-a/shards/a.parquet") is None
    store.put_shared("selector/run-a/shards/a.parquet", b"one")
    store.put_shared("selector/run-a/shards/b.parquet", b"two")
    listed = store.list_shared("selector/run-a/shards")
    assert sorted(listed) == ["selector/run-a/shards/a.parquet", "selector/run-a/shards/b.parquet"]
    store.put_shared("selector/run-a/shards/a.parquet", b"three")
    assert store.get_shared("selector/run-a/shards/a.parquet") == b"three"
    for bad in ("../x", "a//b", "", "a/./b"):
        with pytest.raises(StoreError, match="not legal"):
            store.put_shared(bad, b"x")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(tmp_path), out, f"from-{i}".encode())) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    answers = [out.get(timeout=5) for _ in procs]
    winners = {got for _, got in answers}
    assert len(winners) == 1, answers                               # every caller got the same bytes
    assert sum(mine == got for mine, got in answers) == 1, answers  # exactly one caller's
    assert store.put_shared_once("selector/run-a/objective", b"late") == winners.pop()


def test_a_claim_is_its_first_commit_even_when_a_racing_loser_appended_a_second(tmp_path):
    # Before commit retries were turned off, the loser of the race for version 0 had its write retried and
    # appended as version 1; every caller must still read the first commit's bytes.
    store = store_at(tmp_path)
    uri = str(tmp_path / "_shared" / "claims" / "selector" / "run-c" / "objective")
    write_deltalake(uri, pa.table({"data": pa.array([b"first"], pa.binary())}), mode="error")
    write_deltalake(uri, pa.table({"data": pa.array([b"second"], pa.binary())}), mode="append")
    assert store.put_shared_once("selector/run-c/objective", b"mine") == b"first"
    assert DeltaTable(uri).version() == 1   # the losing caller's attempt committed nothing


def test_a_run_claimed_by_a_process_that_died_before_writing_its_record_still_registers(tmp_path):
    """The claim carries the first record: no 503 and no hand edit when its winner died."""
    from sponge.service.runs import PREFIX, RunRecord, RunRegistry

    store = store_at(tmp_path)
    record = RunRecord("run-x", "fp-1", 4, 0, 1.0)
    store.put_shared_once(f"{PREFIX}-claims/run-x", json.dumps(record.__dict__).encode())   # won, then died
    known, created = RunRegistry(store).register("run-x", "fp-1", 4, max_runs=10)
    assert (created, known.run_id, known.fingerprint, known.window) == (False, "run-x", "fp-1", 4)
    with pytest.raises(Exception, match="fingerprint"):
        RunRegistry(store).register("run-x", "fp-2", 4, max_runs=10)


def test_a_claim_from_before_claims_carried_data_reads_as_taken(tmp_path):
    store = store_at(tmp_path)
    DeltaTable.create(str(tmp_path / "_shared" / "claims" / "selector" / "run-b" / "objective"),
                      schema=pa.schema([("claimed_at", pa.int64())]))
    assert store.put_shared_once("selector/run-b/objective", b"mine") == b""
