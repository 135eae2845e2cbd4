"""Segment writes: round trip, exactly-once under replays and concurrent writers, layout, bad input."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store_fixtures import make_rollouts

from sponge.store.delta import DeltaRolloutStore
from sponge.store.common import REPLAY_SCHEMA
from sponge.store import (
    ParquetRolloutStore,
    RolloutStore,
    StoreError,
)
from sponge.record import rollout_schema, stored_schema

pytest_plugins = ["store_impls"]   # the `Store` fixture: each test below runs on both stores

DIM = 16


def write(store: RolloutStore, table: pa.Table, first: int, *, partition: int = 0, topic: str = "rollouts"):
    """Write `table` as if its rows came from consecutive offsets starting at `first`."""
    offsets = np.arange(first, first + table.num_rows, dtype=np.int64)
    return store.write_segment(table, topic=topic, partition=partition, offsets=offsets,
                               first_offset=first, last_offset=first + max(table.num_rows, 1) - 1)


def stored_ids(store: RolloutStore) -> list[str]:
    return store.sql("SELECT rollout_id FROM rollouts", max_rows=10**6).column(0).to_pylist()


def test_round_trip_is_byte_for_byte(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    table = make_rollouts(200, dim=DIM, tokens=37, policy_versions=(3, 7))
    result = write(store, table, first=1000)
    assert result.rows_written == 200 and result.rows_skipped_duplicate == 0
    assert sorted(result.new_ids.to_pylist()) == sorted(table.column("rollout_id").to_pylist())

    got = store.sql("SELECT * FROM rollouts ORDER BY rollout_id", max_rows=1000)
    want = table.sort_by("rollout_id")
    assert got.num_rows == 200
    # Embeddings and log-probs bit for bit (compare the raw float32 bytes, not approximately).
    got_emb = np.asarray(pc.list_flatten(got.column("embedding")).to_numpy(), dtype=np.float32)
    want_emb = pc.list_flatten(want.column("embedding")).to_numpy()
    assert got_emb.tobytes() == want_emb.tobytes()
    got_lp = np.asarray(pc.list_flatten(got.column("behavior_logprobs")).to_numpy(), dtype=np.float32)
    assert got_lp.tobytes() == pc.list_flatten(want.column("behavior_logprobs")).to_numpy().tobytes()
    for name in ("rollout_id", "prompt_id", "run_id", "prompt", "response", "prompt_tokens",
                 "response_tokens", "reward", "policy_version", "meta"):
        assert got.column(name).to_pylist() == want.column(name).to_pylist(), name
    ms = pa.timestamp("ms", tz="UTC")  # DuckDB answers in microseconds; the values are the same
    assert got.column("created_at").cast(ms).equals(want.column("created_at"))
    # The store's own columns.
    assert set(got.column("topic").to_pylist()) == {"rollouts"}
    assert set(got.column("partition").to_pylist()) == {0}
    assert sorted(got.column("offset").to_pylist()) == list(range(1000, 1200))
    assert got.column("ingested_at").null_count == 0

    # scan() returns exactly the stored schema's types, and the same bytes.
    scanned = pa.Table.from_batches(list(store.scan(batch_size=64))).sort_by("rollout_id")
    assert scanned.schema.equals(stored_schema(DIM), check_metadata=False)
    assert scanned.select(rollout_schema(DIM).names).cast(rollout_schema(DIM)).equals(
        want.cast(rollout_schema(DIM)))


def test_hive_layout_and_file_names(tmp_path):
    store = ParquetRolloutStore(tmp_path, embedding_dim=DIM)
    result = write(store, make_rollouts(30, dim=DIM, policy_versions=(0, 5)), first=40, partition=2)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in result.paths)
    assert names == ["rollouts/run=run-a/policy_version=0/rollouts+2+40-69.parquet",
                     "rollouts/run=run-a/policy_version=5/rollouts+2+40-69.parquet"]
    # Plain hive-partitioned Parquet: readable without sponge.
    dataset = pq.read_table(tmp_path / "rollouts", partitioning="hive")
    assert dataset.num_rows == 30
    segments = store.sql("SELECT policy_version, rows FROM segments ORDER BY policy_version")
    assert segments.to_pydict() == {"policy_version": [0, 5], "rows": [15, 15]}


def test_empty_store_views_are_typed_and_empty(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    rollouts = store.sql("SELECT * FROM rollouts")
    assert rollouts.num_rows == 0
    assert rollouts.column_names == stored_schema(DIM).names
    assert rollouts.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    for view, columns in {
        "tombstones": ["rollout_id", "reason", "deleted_at"],
        "dead_letters": ["topic", "partition", "offset", "reason", "value", "received_at", "letter_id"],
        "replay_subset": REPLAY_SCHEMA.names,
        "segments": ["file", "run_id", "policy_version", "rows", "bytes"],
    }.items():
        table = store.sql(f"SELECT * FROM {view}")
        assert table.num_rows == 0 and table.column_names == columns, view
    assert store.count() == 0
    assert len(store.rollout_ids()) == 0
    assert list(store.scan()) == []
    assert store.stats()["segments"] == 0
    # Typed: aggregates over the empty views work.
    assert store.sql("SELECT avg(reward) AS r, max(policy_version) AS v FROM rollouts").to_pylist() == \
        [{"r": None, "v": None}]


def test_replay_of_same_and_overlapping_ranges_stores_each_id_once(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    table = make_rollouts(100, dim=DIM)
    first = write(store, table.slice(0, 60), first=0)
    assert first.rows_written == 60
    again = write(store, table.slice(0, 60), first=0)  # crash before commit: the same range again
    assert (again.rows_written, again.rows_skipped_duplicate, again.paths) == (0, 60, [])
    overlap = write(store, table.slice(30, 70), first=30)  # a larger batch over the replayed range
    assert (overlap.rows_written, overlap.rows_skipped_duplicate) == (40, 30)
    assert sorted(overlap.new_ids.to_pylist()) == table.column("rollout_id").to_pylist()[60:]
    ids = stored_ids(store)
    assert len(ids) == 100 and sorted(ids) == table.column("rollout_id").to_pylist()
    # The first file is untouched by the replays.
    assert pq.read_metadata(first.paths[0]).num_rows == 60


def test_duplicates_within_one_batch_keep_the_first(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    table = make_rollouts(10, dim=DIM)
    doubled = pa.concat_tables([table, table.slice(2, 3)])
    result = write(store, doubled, first=0)
    assert (result.rows_written, result.rows_skipped_duplicate) == (10, 3)
    offsets = store.sql("SELECT rollout_id, \"offset\" FROM rollouts ORDER BY rollout_id").column(1).to_pylist()
    assert offsets == list(range(10))  # the first occurrence (lower offset) is the one kept


def test_two_store_objects_on_one_root_never_store_twice(Store, tmp_path):
    a = Store(tmp_path, embedding_dim=DIM)
    b = Store(tmp_path, embedding_dim=DIM)  # opened before a writes: must notice a's files
    table = make_rollouts(50, dim=DIM)
    assert write(a, table, first=0).rows_written == 50
    # b replays the same partition range (a was revoked before committing) ...
    assert write(b, table, first=0).rows_written == 0
    # ... and the same rollouts arriving through another partition are still refused.
    assert write(b, table.slice(10, 20), first=500, partition=1).rows_written == 0
    more = make_rollouts(20, dim=DIM, start=50)
    assert write(b, more, first=50).rows_written == 20
    assert write(a, more, first=50).rows_written == 0
    ids = stored_ids(a)
    assert len(ids) == len(set(ids)) == 70


def test_new_rows_for_an_existing_file_name_are_added_not_overwritten(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    table = make_rollouts(20, dim=DIM)
    write(store, table.slice(0, 10), first=0)
    # Same range name, with ten rows the store lacks (cannot come from Kafka, but must not lose data).
    result = store.write_segment(table, topic="rollouts", partition=0, offsets=np.arange(20) % 10,
                                 first_offset=0, last_offset=9)
    assert result.rows_written == 10
    if Store.kind == "parquet":   # the same range's file grows; a Delta segment is a file of its own
        assert pq.read_metadata(result.paths[0]).num_rows == 20
    assert store.count() == 20


def test_embedding_dim_is_recorded_and_checked(Store, tmp_path):
    Store(tmp_path, embedding_dim=DIM)
    assert Store.open(tmp_path).embedding_dim == DIM
    with pytest.raises(StoreError, match="holds 16-d embeddings"):
        Store(tmp_path, embedding_dim=384)
    with pytest.raises(StoreError, match="no rollout store"):
        Store.open(tmp_path / "missing")


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.drop_columns(["reward"]), r"missing \['reward'\]"),
    (lambda t: t.set_column(8, "reward", t.column("reward").cast(pa.float64())), "'reward' has type double"),
    (lambda t: t.append_column("extra", pa.array([1] * t.num_rows)), r"unexpected \['extra'\]"),
])
def test_rows_without_the_rollout_schema_are_refused(Store, tmp_path, mutate, message):
    store = Store(tmp_path, embedding_dim=DIM)
    with pytest.raises(StoreError, match=message):
        write(store, mutate(make_rollouts(5, dim=DIM)), first=0)
    assert store.count() == 0


def test_bad_offsets_and_topics_are_refused(Store, tmp_path):
    store = Store(tmp_path, embedding_dim=DIM)
    table = make_rollouts(5, dim=DIM)
    with pytest.raises(StoreError, match="one per row"):
        store.write_segment(table, topic="t", partition=0, offsets=np.arange(4), first_offset=0, last_offset=4)
    with pytest.raises(StoreError, match="outside the consumed range"):
        store.write_segment(table, topic="t", partition=0, offsets=np.arange(5) + 3, first_offset=0, last_offset=4)
    with pytest.raises(StoreError, match="first_offset <= last_offset"):
        store.write_segment(table, topic="t", partition=0, offsets=np.arange(5), first_offset=5, last_offset=4)
    with pytest.raises(StoreError, match="not a legal Kafka topic"):
        store.write_segment(table, topic="../etc", partition=0, offsets=np.arange(5), first_offset=0, last_offset=4)
    with pytest.raises(StoreError, match="embedding_dim"):
        Store(tmp_path / "other", embedding_dim=0)
    assert store.count() == 0


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(
    st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 40), st.integers(1, 25)),
    min_size=1, max_size=8,
))
def test_any_interleaving_of_replays_stores_each_rollout_exactly_once(tmp_path_factory, steps):
    """Two writers (store objects) consume overlapping offset ranges of two partitions in any order."""
    check_interleaving(tmp_path_factory.mktemp("delta"), steps, DeltaRolloutStore)   # the store every writer uses


def check_interleaving(root, steps, cls):
    writers = [cls(root, embedding_dim=DIM), cls(root, embedding_dim=DIM)]
    # The Kafka log: partition p, offset o holds rollout "p{p}-{o}" (immutable, like a real log).
    logs = {p: make_rollouts(70, dim=DIM, id_prefix=f"p{p}", policy_versions=(0, 1)) for p in (0, 1)}
    expected: set[str] = set()
    for writer, partition, first, length in steps:
        rows = logs[partition].slice(first, length)
        write(writers[writer], rows, first=first, partition=partition)
        expected.update(rows.column("rollout_id").to_pylist())
    ids = stored_ids(writers[0])
    assert len(ids) == len(set(ids))
    assert set(ids) == expected
