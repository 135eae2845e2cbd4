"""Tombstones, compaction, crash leftovers, dead letters, replay snapshots, scans and stats."""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from test_store_fixtures import make_rollouts

import sponge.store.parquet as store_module
from sponge.store import (
    ParquetRolloutStore,
    RolloutStore,
    StoreConfig,
    StoreError,
)

pytest_plugins = ["store_impls"]   # the `Store` fixture: each test below runs on both stores

DIM = 8


def write(store: RolloutStore, table: pa.Table, first: int, partition: int = 0):
    offsets = np.arange(first, first + table.num_rows, dtype=np.int64)
    return store.write_segment(table, topic="rollouts", partition=partition, offsets=offsets,
                               first_offset=first, last_offset=first + table.num_rows - 1)


def ids_in_files(root) -> list[str]:
    """The ids in the rollouts' files: a Parquet store's segment files, or a Delta table's live files
    as any Delta reader sees them."""
    if (root / "rollouts" / "_delta_log").is_dir():
        return DeltaTable(str(root / "rollouts")).to_pyarrow_table(columns=["rollout_id"]).column(0).to_pylist()
    files = sorted((root / "rollouts").glob("*/*/*.parquet"))
    return [i for f in files for i in pq.read_table(f, columns=["rollout_id"]).column(0).to_pylist()]


def test_tombstones_hide_rows_and_survive_compaction(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    table = make_rollouts(100, dim=DIM, policy_versions=(0, 1))
    write(store, table.slice(0, 50), first=0)
    write(store, table.slice(50, 50), first=50)
    doomed = [f"r-{i:09d}" for i in (3, 4, 60)]
    assert store.delete(doomed + [doomed[0]], reason="bad reward").removed == 3
    assert store.count() == 97
    assert not set(doomed) & set(store.rollout_ids().to_pylist())
    assert store.sql("SELECT count(*) AS n FROM rollouts WHERE rollout_id = 'r-000000003'").column(0)[0].as_py() == 0
    tomb = store.sql("SELECT rollout_id, reason FROM tombstones ORDER BY rollout_id").to_pydict()
    assert tomb == {"rollout_id": sorted(doomed), "reason": ["bad reward"] * 3}
    if Store.kind == "parquet":
        assert set(doomed) <= set(ids_in_files(tmp_path))  # hidden, not yet removed from the files
        result = store.compact()
        assert result.rows_removed == 3 and result.segments_rewritten == 3 and result.segments_removed == 0
    else:   # a Delta removal deletes the rows from the table at once (its files rewritten)
        assert not set(doomed) & set(ids_in_files(tmp_path))
        assert store.compact().rows_removed == 0
    assert not set(doomed) & set(ids_in_files(tmp_path))
    assert len(ids_in_files(tmp_path)) == 97
    assert store.count() == 97
    assert store.sql("SELECT count(*) FROM tombstones").column(0)[0].as_py() == 3  # kept after compaction
    assert store.compact().rows_removed == 0  # nothing left to do


def test_compaction_removes_dead_segments_whole_and_changes_files_only_inside_the_guard(tmp_path):
    store = ParquetRolloutStore(tmp_path, embedding_dim=DIM)
    table = make_rollouts(90, dim=DIM, policy_versions=(0, 1, 2))   # one segment file per version
    write(store, table, first=0)
    versions = table.column("policy_version").to_pylist()
    ids = table.column("rollout_id").to_pylist()
    stale = [i for i, v in zip(ids, versions) if v == 0]               # retention: version 0 whole
    some = [i for i, v in zip(ids, versions) if v == 1][:5]           # explicit removal: a few of version 1
    store.delete(stale + some, reason="retention")

    class CountingGuard:
        """Stands in for the curator's lock: records that files changed only while it was held."""
        def __init__(self):
            self.held, self.entries, self.changes_outside = False, 0, 0

        def __enter__(self):
            self.held, self.entries = True, self.entries + 1

        def __exit__(self, *exc):
            self.held = False

    guard = CountingGuard()
    real_unlink = store_module.Path.unlink

    def watched_unlink(path, *args, **kwargs):
        if "policy_version=" in str(path) and not guard.held:
            guard.changes_outside += 1
        return real_unlink(path, *args, **kwargs)

    store_module.Path.unlink = watched_unlink
    try:
        result = store.compact(guard=guard)
    finally:
        store_module.Path.unlink = real_unlink
    assert result.segments_removed == 1 and result.segments_rewritten == 1
    assert result.rows_removed == len(stale) + len(some)
    assert guard.entries == 2 and guard.changes_outside == 0   # one entry for the removals, one per rewrite
    assert not (tmp_path / "rollouts" / "run=run-a" / "policy_version=0").exists() or not any(
        (tmp_path / "rollouts" / "run=run-a" / "policy_version=0").glob("*.parquet"))
    assert sorted(ids_in_files(tmp_path)) == sorted(set(ids) - set(stale) - set(some))
    assert store.count() == 90 - len(stale) - len(some)


def test_deleted_rollouts_never_come_back_through_a_replay(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    table = make_rollouts(20, dim=DIM)
    write(store, table, first=0)
    store.delete(table.column("rollout_id").slice(0, 5), reason="stale")
    store.compact()
    # Replays: through this store object, a fresh one, and one opened before the delete.
    assert write(store, table, first=0).rows_written == 0
    assert write(Store(tmp_path, embedding_dim=DIM), table, first=0).rows_written == 0
    assert store.count() == 15


def test_a_delete_by_another_process_is_honoured_by_a_writer(Store, tmp_path):
    writer = Store(tmp_path, embedding_dim=DIM)
    curator = Store(tmp_path, embedding_dim=DIM)
    table = make_rollouts(10, dim=DIM)
    write(writer, table.slice(0, 4), first=0)
    curator.delete(table.column("rollout_id").slice(0, 4), reason="known bad")
    curator.compact()                                       # gone from the files too
    result = write(writer, table, first=0)                  # a replay of the whole range
    assert (result.rows_written, result.rows_skipped_duplicate) == (6, 4)
    assert writer.count() == 6


def test_removing_ids_the_store_does_not_hold_reports_them_and_writes_nothing(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    table = make_rollouts(10, dim=DIM)
    write(store, table, first=0)
    ids = table.column("rollout_id").to_pylist()
    removal = store.delete(["never-stored", ids[0]], reason="x")
    assert removal.removed == 1 and removal.unknown == ["never-stored"]
    assert store.delete(["never-stored", ids[0]], reason="x").unknown == ["never-stored", ids[0]]  # already gone
    assert store.sql("SELECT count(*) FROM tombstones").column(0)[0].as_py() == 1   # nothing written for them
    assert write(store, make_rollouts(1, dim=DIM, start=10**6), first=10).rows_written == 1


def test_compaction_removes_emptied_segments_and_merges_tombstone_files(tmp_path):
    store = ParquetRolloutStore(tmp_path, embedding_dim=DIM, config=StoreConfig(max_tombstone_files=2))
    table = make_rollouts(30, dim=DIM)
    write(store, table.slice(0, 10), first=0)
    write(store, table.slice(10, 20), first=10)
    for i in range(10):  # ten delete calls = ten tombstone files
        store.delete([f"r-{i:09d}"], reason=f"reason {i}")
    assert store.delete(["r-000000000"], reason="again").removed == 0  # already gone: nothing written
    assert len(list((tmp_path / "tombstones").glob("*.parquet"))) == 10
    result = store.compact()
    assert result.segments_removed == 1 and result.rows_removed == 10
    assert result.tombstone_files_merged == 10
    assert len(list((tmp_path / "tombstones").glob("*.parquet"))) == 1
    assert [p.name for p in (tmp_path / "rollouts" / "run=run-a" / "policy_version=0").iterdir()] == [
        "rollouts+0+10-29.parquet"]
    tomb = store.sql("SELECT rollout_id, reason FROM tombstones ORDER BY rollout_id").to_pydict()
    assert tomb["rollout_id"] == [f"r-{i:09d}" for i in range(10)]
    assert tomb["reason"][0] == "reason 0"
    assert store.count() == 20
    assert write(store, table.slice(0, 10), first=0).rows_written == 0


def test_delete_refuses_bad_input(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    with pytest.raises(StoreError, match="reason"):
        store.delete(["a"], reason="")
    with pytest.raises(StoreError, match="strings"):
        store.delete(pa.array([1, 2]), reason="x")
    with pytest.raises(StoreError, match="not a single string"):
        store.delete("abc", reason="x")
    assert store.delete([], reason="x").removed == 0


def test_crash_leftover_temp_files_are_ignored_and_cleaned(tmp_path):
    store = ParquetRolloutStore(tmp_path, embedding_dim=DIM)
    write(store, make_rollouts(10, dim=DIM), first=0)
    segment_dir = tmp_path / "rollouts" / "run=run-a" / "policy_version=0"
    # A writer that died mid-write (pid that is not running) left half a Parquet file behind.
    dead_pid = 2**22 + 12345
    while True:
        try:
            os.kill(dead_pid, 0)
            dead_pid += 1
        except ProcessLookupError:
            break
    host = socket.gethostname()
    dead = segment_dir / f".rollouts+0+10-19.parquet~{host}~{dead_pid}~abcd1234.tmp"
    dead.write_bytes(b"PAR1 half a file")
    # A writer on another host: kept until it is old.
    remote = segment_dir / ".rollouts+1+0-9.parquet~otherhost~1~abcd1234.tmp"
    remote.write_bytes(b"PAR1")
    # A live writer (this process) mid-write: must be left alone.
    live = segment_dir / f".rollouts+2+0-9.parquet~{host}~{os.getpid()}~abcd1234.tmp"
    live.write_bytes(b"PAR1")
    assert store.count() == 10  # the views never read temp files
    assert store.stats()["segments"] == 1

    ParquetRolloutStore(tmp_path, embedding_dim=DIM)  # opening cleans up
    assert not dead.exists()
    assert remote.exists() and live.exists()
    old = time.time() - 2 * 3600
    os.utime(remote, (old, old))
    assert store.remove_stale_temp_files() == 1
    assert not remote.exists() and live.exists()


def test_a_failed_write_leaves_nothing_and_can_be_retried(tmp_path, monkeypatch):
    """Fault injection (a rename that fails, e.g. disk error): nothing half-written, ids not recorded."""
    store = ParquetRolloutStore(tmp_path, embedding_dim=DIM)
    table = make_rollouts(10, dim=DIM)

    def failing_replace(src, dst):
        raise OSError("injected: rename failed")

    monkeypatch.setattr(store_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        write(store, table, first=0)
    monkeypatch.undo()
    assert list(tmp_path.rglob("*.tmp")) == []
    assert store.count() == 0
    assert write(store, table, first=0).rows_written == 10  # the retry stores everything


def test_dead_letters_are_appended_and_queryable(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    letters = pa.table({
        "topic": ["rollouts", "rollouts"],
        "partition": pa.array([0, 1], pa.int32()),
        "offset": pa.array([5, 9], pa.int64()),
        "reason": ['[{"field":"reward","rule":"non-finite"}]', '[{"field":"<message>","rule":"undecodable"}]'],
        "value": pa.array([b"\x00\x01", b"not arrow"], pa.binary()),
        "received_at": pa.array([1, 2], pa.timestamp("ms", tz="UTC")),
    })
    store.write_dead_letters(letters)
    store.write_dead_letters(letters.slice(0, 1))   # a replay's copy of the first: shown once
    got = store.sql("SELECT \"offset\", value, reason->>'$[0].rule' AS rule FROM dead_letters ORDER BY 1")
    assert got.to_pydict() == {"offset": [5, 9], "value": [b"\x00\x01", b"not arrow"],
                               "rule": ["non-finite", "undecodable"]}
    with pytest.raises(StoreError, match="lack column"):
        store.write_dead_letters(letters.drop_columns(["reason"]))


def test_replay_snapshots_show_the_latest_and_keep_a_few(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM, config=StoreConfig(replay_keep=3))
    for version in range(1, 6):
        subsets = pa.table({"rollout_id": [f"r-{version}-{i}" for i in range(version)],
                            "run_id": ["run-a"] * version, "selection_version": [version] * version,
                            "objective_value": [version * 1.5] * version})
        store.write_replay_snapshot(subsets, seq=version, extra={"k": version, "algo": "dynamic"})
    subset = store.sql("SELECT * FROM replay_subset ORDER BY rollout_id").to_pydict()
    assert subset["rollout_id"] == [f"r-5-{i}" for i in range(5)]
    assert set(subset["selection_version"]) == {5} and set(subset["objective_value"]) == {7.5}
    assert sorted(p.name for p in (tmp_path / "replay").iterdir()) == [
        f"selection-{v:012d}.parquet" for v in (3, 4, 5)]
    table, extra = store.latest_replay_snapshot()
    assert table.num_rows == 5 and extra == {"algo": "dynamic", "k": 5}
    with pytest.raises(StoreError, match="JSON"):
        store.write_replay_snapshot(None, seq=6, extra={"x": object()})


def test_scan_streams_live_rows_in_bounded_batches(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    table = make_rollouts(300, dim=DIM, policy_versions=(0, 1, 2))
    write(store, table, first=0)
    store.delete(["r-000000007"], reason="x")
    batches = list(store.scan(columns=["rollout_id", "embedding", "policy_version"], batch_size=100))
    assert all(b.num_rows <= 100 for b in batches)
    got = pa.Table.from_batches(batches)
    assert got.num_rows == 299 and "r-000000007" not in got.column("rollout_id").to_pylist()
    assert got.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    with pytest.raises(StoreError, match="unknown column"):
        next(store.scan(columns=["nope"]))
    stats = store.stats()
    stored = 300 if Store.kind == "parquet" else 299   # Delta deletes the row from its file at once
    assert (stats["segments"], stats["rows"], stats["stored_rows"], stats["tombstones"]) == (3, 299, stored, 1)
    assert stats["bytes"] > 0


def test_a_write_failing_after_its_first_policy_version_file_is_retried_exactly_once(tmp_path, monkeypatch):
    """Fault injection: the second of two per-version files fails to land; the retry adds only it."""
    store = ParquetRolloutStore(tmp_path, embedding_dim=DIM)
    table = make_rollouts(20, dim=DIM, policy_versions=(0, 1))
    real_replace = os.replace
    calls = []

    def replace_once_then_fail(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("injected: second rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", replace_once_then_fail)
    with pytest.raises(OSError, match="injected"):
        write(store, table, first=0)
    monkeypatch.undo()
    assert store.count() == 10
    retry = write(store, table, first=0)
    assert (retry.rows_written, retry.rows_skipped_duplicate) == (10, 10)
    ids = store.rollout_ids().to_pylist()
    assert len(ids) == len(set(ids)) == 20


def test_retention_retires_whole_versions_with_one_mark_and_forgets_their_ids(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    table = make_rollouts(120, dim=DIM, policy_versions=(0, 1, 2, 3))
    write(store, table, first=0)
    versions = np.array(table.column("policy_version").to_pylist())
    ids = table.column("rollout_id").to_pylist()
    assert store.retired_below("run-a") is None
    assert store.retire_below(2, run="run-a") == int((versions < 2).sum())
    assert store.retire_below(1, run="run-a") == 0 and store.retired_below("run-a") == 2   # the mark only rises
    assert store.count() == int((versions >= 2).sum())
    assert store.sql("SELECT min(policy_version) FROM rollouts").column(0)[0].as_py() == 2
    assert store.sql("SELECT count(*) FROM tombstones").column(0)[0].as_py() == 0   # no per-id tombstones
    assert store.stats()["retirement_marks"] == {"run-a": 2}
    # Another store object on the root (another process) sees the mark and refuses retired rows,
    # also on a replay of the very range that brought them.
    other = Store(tmp_path, embedding_dim=DIM)
    assert other.count() == store.count()
    again = write(other, table, first=0)
    assert (again.rows_written, again.rows_skipped_retired) == (0, int((versions < 2).sum()))
    late = make_rollouts(10, dim=DIM, policy_versions=(1, 4), id_prefix="late")
    result = write(store, late, first=500)
    late_versions = np.array(late.column("policy_version").to_pylist())
    assert result.rows_skipped_retired == int((late_versions < 2).sum())
    assert result.rows_written == int((late_versions >= 2).sum())
    # The retired versions' files leave (Parquet: compaction deletes their directories whole;
    # Delta: the partition delete already took them out of the table); the index forgets their ids.
    held_before = len(store._index)
    compacted = store.compact()
    if Store.kind == "parquet":
        assert compacted.segments_removed == 2 and compacted.rows_removed == int((versions < 2).sum())
        assert sorted(p.name for p in (tmp_path / "rollouts" / "run=run-a").iterdir()) == [
            "policy_version=2", "policy_version=3", "policy_version=4"]
    else:
        assert sorted(set(DeltaTable(str(tmp_path / "rollouts")).to_pyarrow_table(
            columns=["policy_version"]).column(0).to_pylist())) == [2, 3, 4]
    assert len(store._index) == held_before == store.count()
    assert set(ids_in_files(tmp_path)) == set(store.rollout_ids().to_pylist())
    # Reopening keeps the mark.
    reopened = Store.open(tmp_path)
    assert reopened.retired_below("run-a") == 2 and reopened.count() == store.count()
    assert write(reopened, table.filter(pa.array(versions < 2)), first=0).rows_written == 0
    assert not {i for i, v in zip(ids, versions) if v < 2} & set(reopened.rollout_ids().to_pylist())


def test_retention_is_per_run_and_an_admin_can_lower_a_mark_raised_by_mistake(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    a = make_rollouts(40, dim=DIM, policy_versions=(0, 1, 2, 3))
    b = make_rollouts(40, dim=DIM, policy_versions=(0, 1, 2, 3), id_prefix="b").set_column(
        2, "run_id", pa.repeat(pa.scalar("run-b", pa.string()), 40))
    write(store, pa.concat_tables([a, b]), first=0)
    assert store.retire_below(3, run="run-a") == 30
    assert store.sql("SELECT run_id, count(*) AS n FROM rollouts GROUP BY 1 ORDER BY 1").to_pydict() == {
        "run_id": ["run-a", "run-b"], "n": [10, 40]}                          # run-b untouched
    assert store.lower_retirement(1, run="run-a") == 20                       # raised by mistake: back
    assert store.count() == 70 and store.retirement_marks() == {"run-a": 1}
    late = make_rollouts(5, dim=DIM, policy_versions=(2,), id_prefix="late")
    assert write(store, late, first=500).rows_written == 5                    # v2 is live again


@pytest.mark.parametrize("body, message", [
    ('{"runs": {"run-a": 9223372036854775808}}', "out of range"),
    ('{"runs": {"run-a": -1}}', "out of range"),
    ('{"runs": {"../x": 1}}', "not legal"),
    ('{"below": 3}', "unreadable retention marks"),
    ("not json", "unreadable retention marks"),
])
def test_a_corrupt_or_out_of_range_mark_on_disk_is_a_clear_error_at_open(tmp_path, body, message):
    ParquetRolloutStore(tmp_path, embedding_dim=DIM)
    (tmp_path / "_retired.json").write_text(body)
    with pytest.raises(StoreError, match=message):
        ParquetRolloutStore.open(tmp_path)


def test_out_of_range_versions_are_refused(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    for bad in (2**63, -1, 1.5, "3", True):
        with pytest.raises(StoreError):
            store.retire_below(bad, run="run-a")
    assert store.retirement_marks() == {}


def test_a_store_of_another_format_or_none_at_all_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no rollout store"):
        RolloutStore.open(tmp_path / "missing")
    RolloutStore(tmp_path, embedding_dim=DIM)
    (tmp_path / "_sponge_store.json").write_text('{"format_version": 1, "embedding_dim": 16}')
    with pytest.raises(StoreError, match="sponge store migrate"):
        RolloutStore.open(tmp_path)


def test_a_format_1_store_migrates_in_place_to_delta_tables_with_its_rows_and_retention(tmp_path, capsys):
    from sponge.cli import main
    from sponge.record import stored_schema

    store = ParquetRolloutStore(tmp_path, embedding_dim=DIM)
    a = make_rollouts(30, dim=DIM, policy_versions=(0, 1, 2))
    b = make_rollouts(30, dim=DIM, policy_versions=(0, 1, 2), id_prefix="b").set_column(
        2, "run_id", pa.nulls(30, pa.string()))
    write(store, pa.concat_tables([a, b]), first=0)
    expected = sorted(store.rollout_ids().to_pylist())
    # Rewrite it as an older sponge laid it out: no run level, one mark for everything.
    for path in list((tmp_path / "rollouts").glob("*/*/*.parquet")):
        old = tmp_path / "rollouts" / path.parent.name / path.name
        old.parent.mkdir(exist_ok=True)
        tables = [pq.read_table(old)] if old.exists() else []
        pq.write_table(pa.concat_tables(tables + [pq.read_table(path).select(
            [f.name for f in stored_schema(DIM) if f.name != "policy_version"])]), old)
        path.unlink()
    for run_dir in (tmp_path / "rollouts").glob("run=*"):
        for d in run_dir.iterdir():
            d.rmdir()
        run_dir.rmdir()
    (tmp_path / "_sponge_store.json").write_text(json.dumps({"format_version": 1, "embedding_dim": DIM}))
    (tmp_path / "_retired.json").write_text('{"below": 1}')
    with pytest.raises(StoreError, match="migrate"):
        RolloutStore.open(tmp_path)

    assert main(["store", "migrate", "--store", str(tmp_path)]) == 0
    migrated = RolloutStore.open(tmp_path)
    assert migrated.retirement_marks() == {"run-a": 1, "default": 1}
    versions = dict(zip(a.column("rollout_id").to_pylist() + b.column("rollout_id").to_pylist(),
                        a.column("policy_version").to_pylist() + b.column("policy_version").to_pylist()))
    assert sorted(migrated.rollout_ids().to_pylist()) == sorted(i for i in expected if versions[i] >= 1)
    runs = migrated.sql("SELECT DISTINCT run_id FROM rollouts ORDER BY 1").column(0).to_pylist()
    assert runs == ["default", "run-a"]
    out = json.loads(capsys.readouterr().out)
    assert (out["migrated_segments"], out["migrated_rows"]) == (6, 40)   # 3 format-1 files, 2 runs each
    assert not (tmp_path / "_format2").exists() and not (tmp_path / "_sponge_store.json").exists()
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir() if p.name.startswith("run_id=")) == [
        "run_id=default", "run_id=run-a"]
