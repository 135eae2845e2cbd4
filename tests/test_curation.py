"""The curator over a real Parquet store and the real dynamic selector, one run or several."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sponge.contract import CANDIDATE_COLUMNS
from sponge.groups import with_group_columns
from sponge.service.curation import CurationConfig, Curator, embedding_matrix, group_has_signal
from sponge.service.runs import RunError
from sponge.service.shards import greedy_subset
from sponge.store import RolloutStore, SegmentWrite
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts


def write(store: RolloutStore, curator: Curator, rows: pa.Table, first: int) -> SegmentWrite:
    offsets = np.arange(first, first + rows.num_rows, dtype=np.int64)
    w = store.write_segment(rows, topic="rollouts", partition=0, offsets=offsets,
                            first_offset=first, last_offset=first + rows.num_rows - 1)
    curator.on_segment(w, rows.filter(pc.is_in(rows.column("rollout_id"), w.new_ids)))
    return w


def versions(n_per: int, n_versions: int, seed: int = 0, run: str = "synthetic") -> list[pa.Table]:
    cfg = SyntheticConfig(response_tokens=30, run_id=run)
    return [synthetic_rollouts(n_per, seed=seed + v, config=dataclasses.replace(cfg, policy_version=v),
                               id_prefix=f"{run}-v{v}") for v in range(n_versions)]

RUN = "synthetic"   # synthetic_rollouts' run; it registers itself when its rollouts arrive


@pytest.fixture
def store(tmp_path) -> RolloutStore:
    return RolloutStore(tmp_path / "store")


def test_subset_is_kept_and_snapshotted(store):
    cfg = CurationConfig(k=12, n_references=64, retention_window=None)
    cur = Curator(store, cfg)
    first = 0
    for table in versions(200, 3):
        write(store, cur, table, first)
        first += table.num_rows
    ids = cur.subset_ids()
    assert len(ids) == 12 and len(set(ids)) == 12
    cur.snapshot()
    snap = store.sql("SELECT rollout_id, run_id, selection_version, objective_value FROM replay_subset")
    assert sorted(snap.column("rollout_id").to_pylist()) == sorted(ids)
    assert set(snap.column("run_id").to_pylist()) == {RUN}
    assert set(snap.column("selection_version").to_pylist()) == {cur.selection_version(RUN)}
    assert snap.column("objective_value")[0].as_py() == pytest.approx(cur.describe_run(RUN)["objective_value"])
    # The dynamic solution is competitive with lazy greedy on the same live set.
    greedy_value = lazy_greedy_value(cur)
    assert cur.describe_run(RUN)["objective_value"] >= 0.5 * greedy_value


def lazy_greedy_value(cur: Curator) -> float:
    """Lazy greedy over every live rollout in the store, on the curator's objective."""
    live = cur.store.connect().sql("SELECT prompt_id, reward, embedding FROM rollouts").to_arrow_table()
    _, value = greedy_subset(cur._run(RUN).selection.selector.objective, np.arange(live.num_rows),
                             embedding_matrix(live), cur.config.k, quality=group_has_signal(live))
    return value


def test_retention_evicts_from_store_and_selector(store):
    cur = Curator(store, CurationConfig(k=8, n_references=64, retention_window=1))
    first = 0
    for table in versions(120, 4):
        write(store, cur, table, first)
        first += table.num_rows
    assert cur.describe()["n_live"] == 480
    evicted = cur.report_version(RUN, 3)["evicted"]   # keep versions >= 2
    assert evicted == 240
    left = store.sql("SELECT DISTINCT policy_version FROM rollouts ORDER BY 1").column(0).to_pylist()
    assert left == [2, 3]
    assert cur.describe()["n_live"] == 240 and cur.describe_run(RUN)["retired_below"] == 2
    subset_versions = store.sql(
        "SELECT DISTINCT r.policy_version FROM rollouts r WHERE rollout_id IN ("
        + ",".join(f"'{i}'" for i in cur.subset_ids()) + ")").column(0).to_pylist()
    assert set(subset_versions) <= {2, 3}
    with pytest.raises(RunError, match="backwards"):
        cur.report_version(RUN, 1)
    with pytest.raises(RunError, match="largest jump"):
        cur.report_version(RUN, 10**9)


def test_explicit_removal_and_sampling(store):
    cur = Curator(store, CurationConfig(k=10, n_references=64))
    write(store, cur, versions(200, 1)[0], 0)
    victim = cur.subset_ids()[0]
    removal = cur.remove([victim, "no-such-id"])
    assert removal.removed == 1 and removal.unknown == ["no-such-id"]
    assert victim not in cur.subset_ids()
    assert store.sql(f"SELECT count(*) FROM rollouts WHERE rollout_id = '{victim}'").column(0)[0].as_py() == 0
    sample = cur.sample(64, weighting="quality", seed=3)
    assert sample.num_rows == 64
    assert set(sample.column("rollout_id").to_pylist()) <= set(cur.subset_ids())
    prob = sample.column("sample_prob").to_numpy()
    weight = sample.column("weight").to_numpy()
    np.testing.assert_allclose(weight, 1.0 / (len(cur.subset_ids()) * prob))
    # Advantages come from the whole stored group: recompute one by hand.
    row = sample.slice(0, 1).to_pylist()[0]
    group = store.sql(f"SELECT reward FROM rollouts WHERE prompt_id = '{row['prompt_id']}'").column(0).to_numpy()
    expected = (row["reward"] - group.mean()) / (group.std() + 1e-6)
    assert row["advantage"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="unknown weighting"):
        cur.sample(4, weighting="nope")


def test_a_rollout_removed_while_queued_for_selection_stays_out(store):
    cur = Curator(store, CurationConfig(k=10, n_references=64, retention_window=None))
    write(store, cur, versions(100, 1)[0], 0)
    queued = versions(100, 1, seed=9)[0]
    queued = queued.set_column(0, "rollout_id", pc.binary_join_element_wise("late-", queued.column(0), ""))
    w = store.write_segment(queued, topic="rollouts", partition=0, offsets=np.arange(100, 200, dtype=np.int64),
                            first_offset=100, last_offset=199)   # stored; its curation batch still queued
    gone = queued.column("rollout_id").to_pylist()[:30]
    assert cur.remove(gone).removed == 30
    cur.on_segment(w, queued)                                    # the queued batch arrives after the removal
    assert cur.describe()["n_live"] == 170
    assert not set(gone) & set(cur.subset_ids())


def test_rebuild_from_store_reaches_the_same_value(store):
    cfg = CurationConfig(k=16, n_references=64, seed=1)
    cur = Curator(store, cfg)
    first = 0
    for table in versions(150, 3, seed=5):
        write(store, cur, table, first)
        first += table.num_rows
    value = cur.describe_run(RUN)["objective_value"]
    restarted = Curator(store, cfg)          # a new process: same references from disk
    seconds = restarted.rebuild()
    assert seconds > 0
    assert restarted.describe()["n_live"] == 450
    assert restarted.describe_run(RUN)["objective_value"] == pytest.approx(value, rel=0.05)
    np.testing.assert_allclose(restarted._run(RUN).selection.selector.objective.references,
                               cur._run(RUN).selection.selector.objective.references, atol=1e-6)


def live_in_selector(cur: Curator, run: str = RUN) -> set[str]:
    ids = cur._run(run).selection.ids
    return set(ids.strings(ids.live_below(np.iinfo(np.int64).max)).to_pylist())


def test_a_run_first_seen_after_the_rebuild_starts_from_the_rows_handed_to_it(tmp_path, monkeypatch):
    # A run new since the curator's rebuild (all its stored rows come through `add`) starts its
    # selector from the rows it was handed, never scanning the store; a run the store held at the
    # rebuild reads it. Both end with the same live set, through a removal and a retention before
    # the reference set is full (f changes then, and the selector starts again over everything live).
    cfg = CurationConfig(k=8, n_references=100, min_references=16, retention_window=1, selector_process=False)
    cfg30 = SyntheticConfig(response_tokens=30)
    batches = [synthetic_rollouts(30, seed=s, config=dataclasses.replace(cfg30, policy_version=v),
                                  id_prefix=f"b{s}-v{v}") for s, v in enumerate((0, 0, 0, 1, 2, 3))]
    curators = {}
    for path in ("fresh", "from_store"):
        store = RolloutStore(tmp_path / path)
        cur = Curator(store, cfg)
        if path == "fresh":
            cur.rebuild()   # an empty store: the run is new to it
        scans = []   # the store's own scan, counted

        def counted_scan(*args, _scan=store.scan, _log=scans, **kwargs):
            _log.append(args)
            return _scan(*args, **kwargs)
        monkeypatch.setattr(store, "scan", counted_scan)
        first = 0
        for i, table in enumerate(batches):
            write(store, cur, table, first)
            first += table.num_rows
            if i == 0 and path == "fresh":   # the run's first batch is counted once, not also from the store
                assert dict(cur._run(RUN).arrived) == {0: 30}
            if i == 1:   # the selector has started (30 + 30 rows), the references are not full yet
                gone = table.column("rollout_id").to_pylist()[:5]
                assert cur.remove(gone).removed == 5
            if i == 3:
                cur.report_version(RUN, 2)   # keep versions >= 1: the three batches of version 0 leave
        curators[path] = (cur, store, len(scans))
    for path, (cur, store, scans) in curators.items():
        stored = set(store.sql(f"SELECT rollout_id FROM rollouts WHERE run_id = '{RUN}'", max_rows=10_000)
                     .column(0).to_pylist())
        assert live_in_selector(cur) == stored, path
        assert cur.describe_run(RUN)["references"] == 100
    assert curators["fresh"][2] == 0 and curators["from_store"][2] > 0
    # Arrivals (read-your-writes, retention) count each stored row once: what `add` was handed.
    assert dict(curators["fresh"][0]._run(RUN).arrived) == {1: 30, 2: 30, 3: 30}
    assert curators["fresh"][0].describe()["n_live"] == curators["from_store"][0].describe()["n_live"] == 90


def test_rows_still_queued_when_a_run_is_read_from_the_store_arrive_once(store):
    # Ingest stores a segment before the curation worker hands it to `add`. A run read from the store
    # in between (a rebuild after a curator failure while ingest goes on, as here, or a run that first
    # gets room under the run cap) counts the queued rows from the store: `add` must not count them again,
    # or a trainer's read-your-writes wait ends early and retention retires a version too soon.
    cur = Curator(store, CurationConfig(k=8, n_references=32, min_references=16, selector_process=False))
    cur.rebuild()
    cur.register_run(RUN)
    first, queued, later = (synthetic_rollouts(40, seed=s, id_prefix=f"q{s}",
                                               config=SyntheticConfig(policy_version=v))
                            for s, v in ((1, 0), (2, 1), (3, 1)))
    write(store, cur, first, 0)
    offsets = np.arange(40, 80, dtype=np.int64)
    w = store.write_segment(queued, topic="rollouts", partition=0, offsets=offsets, first_offset=40, last_offset=79)
    cur.count_refused(w)
    cur.remember(queued)        # stored and remembered; its `add` waits in the worker's queue ...
    cur.rebuild()               # ... while the curator rebuilds from the store, which holds it
    assert dict(cur._run(RUN).arrived) == {0: 40, 1: 40}
    cur.add(queued)             # the worker hands it over: already counted
    write(store, cur, later, 80)   # a new row is counted as it comes
    assert dict(cur._run(RUN).arrived) == {0: 40, 1: 80}
    assert cur.describe()["n_live"] == store.count() == 120
    cur.report_version(RUN, 6)  # retention (a window of 4 versions): the ids kept for skipping go too
    assert cur._run(RUN).counted_from_store is None


def test_empty_subset_sampling_is_a_clear_error(store):
    cur = Curator(store, CurationConfig(k=4, n_references=64))
    cur.register_run("fresh")
    with pytest.raises(ValueError, match="empty"):
        cur.sample(3, run_id="fresh")


def test_reference_refresh_never_inserts_a_rollout_twice(store):
    # One flush writes several partitions before their hooks run; the refresh triggered by the
    # first hook already sees the second partition's rows in the store.
    cur = Curator(store, CurationConfig(k=8, n_references=100, min_references=16))
    a, b = (synthetic_rollouts(60, seed=s, id_prefix=f"p{s}") for s in (1, 2))
    writes = []
    for partition, rows in enumerate((a, b)):
        offsets = np.arange(rows.num_rows, dtype=np.int64)
        writes.append((store.write_segment(rows, topic="rollouts", partition=partition, offsets=offsets,
                                           first_offset=0, last_offset=rows.num_rows - 1), rows))
    for w, rows in writes:
        cur.on_segment(w, rows)
    assert cur.describe_run(RUN)["references"] == 100
    assert cur.describe()["n_live"] == store.count() == 120


def test_rows_arriving_outside_the_window_are_evicted_at_once(store):
    cur = Curator(store, CurationConfig(k=8, n_references=32, retention_window=1))
    cur.register_run(RUN)
    cur.report_version(RUN, 5)
    old = synthetic_rollouts(40, seed=1, id_prefix="late", config=SyntheticConfig(policy_version=2))
    assert write(store, cur, old, 0).rows_skipped_retired == 40   # the store refuses retired versions
    assert store.count() == 0 and cur.describe()["n_live"] == 0
    current = synthetic_rollouts(40, seed=2, id_prefix="now", config=SyntheticConfig(policy_version=5))
    write(store, cur, current, 40)
    assert cur.describe()["n_live"] == 40
    # Rows already durable when their version retires, handed to the curator after: evicted there.
    older = synthetic_rollouts(40, seed=3, id_prefix="older", config=SyntheticConfig(policy_version=5))
    offsets = np.arange(100, 140, dtype=np.int64)
    w = store.write_segment(older, topic="rollouts", partition=0, offsets=offsets, first_offset=100, last_offset=139)
    assert cur.report_version(RUN, 7)["evicted"] == 80 and cur.describe()["n_live"] == 0
    cur.on_segment(w, older)
    assert store.count() == 0 and cur.describe()["n_live"] == 0
    assert cur.describe_run(RUN)["evicted_total"] == 80


def test_runs_are_namespaces_each_with_its_own_version_retention_and_subset(store):
    cur = Curator(store, CurationConfig(k=8, n_references=32, retention_window=1, max_runs=2))
    assert cur.register_run("a", "fp-a")[1] is True
    assert cur.register_run("a", "fp-a")[1] is False                  # resumed, not new
    with pytest.raises(RunError, match="fingerprint") as err:
        cur.register_run("a", "fp-other")
    assert err.value.status == 409
    first = 0
    for run in ("a", "b"):
        for table in versions(40, 3, run=run):
            write(store, cur, table, first)
            first += table.num_rows
    assert cur.registry.get("b").fingerprint == ""                    # b registered itself on arrival
    assert cur.register_run("b", "fp-b")[0].fingerprint == "fp-b"     # and takes its trainer's fingerprint
    with pytest.raises(RunError, match="too many live runs"):
        cur.register_run("c")
    cur.report_version("a", 2)                                        # a's window: versions >= 1
    assert store.version_counts("a") == {1: 40, 2: 40} and store.version_counts("b") == {0: 40, 1: 40, 2: 40}
    assert cur.describe_run("b")["policy_version"] == 0               # b's version untouched
    candidates = cur.candidates("a", 2).table
    assert set(candidates.column("run_id").to_pylist()) == {"a"}      # never another run's rows
    assert set(candidates.column("policy_version").to_pylist()) <= {1}   # [2 - 1, 2): no future versions
    assert set(cur.subset_ids("b")) <= set(store.rows_by_id(cur.subset_ids("b"), ["rollout_id"])
                                          .column(0).to_pylist())
    with pytest.raises(RunError, match="say which"):
        cur.subset_ids()                                              # two runs: the legacy routes must be told
    assert cur.delete_run("b") == 120
    assert store.version_counts("b") == {} and cur.runs()[0]["run_id"] == "a"
    with pytest.raises(RunError, match="deleted") as err:
        cur.register_run("b")
    assert err.value.status == 410
    late = versions(10, 1, seed=99, run="b")[0]
    assert write(store, cur, late, first).retired == {"b": 10}          # a deleted run's late rows are refused


def test_group_candidates_are_whole_groups_with_signal_and_exact_advantages(store):
    cur = Curator(store, CurationConfig(k=16, n_references=32, retention_window=3))
    first = 0
    for table in versions(96, 3):
        write(store, cur, table, first)
        first += table.num_rows
    table = cur.candidates(RUN, 3, unit="group").table
    assert table.num_rows > 0
    stored = store.sql("SELECT prompt_id, policy_version, reward FROM rollouts").to_pandas()
    for group_id, rows in table.to_pandas().groupby("group_id"):
        prompt, version = group_id.rsplit("@", 1)
        whole = stored[(stored.prompt_id == prompt) & (stored.policy_version == int(version))]
        assert len(rows) == len(whole)                                # the whole group, every stored rollout
        assert rows.reward.max() > rows.reward.min()                  # never a group without signal
        expected = (rows.reward - whole.reward.mean()) / (whole.reward.std(ddof=0) + 1e-6)
        np.testing.assert_allclose(rows.advantage, expected, rtol=1e-4, atol=1e-5)
    singles = cur.candidates(RUN, 3, unit="rollout").table
    assert set(singles.column("rollout_id").to_pylist()) <= set(cur.subset_ids(RUN))


def test_retention_waits_for_the_rollouts_the_trainer_sent(store):
    cur = Curator(store, CurationConfig(k=8, n_references=32, retention_window=1, retention_grace_s=60))
    cur.register_run(RUN)
    tables = versions(40, 3)
    write(store, cur, tables[0], 0)
    # The trainer has sent 40 rollouts of versions 0, 1 and 2 but only version 0 has arrived; at
    # version 3 its window keeps >= 2, yet nothing of 1 may be retired before it is in.
    reply = cur.report_version(RUN, 3, sent={0: 40, 1: 40, 2: 40})
    assert reply["retired_below"] == 1 and reply["retention_deferred_to"] == 2
    w = write(store, cur, tables[1], 40)
    assert w.rows_written == 40 and w.retired == {}                   # not refused: it was in flight
    assert store.retired_below(RUN) == 2                               # and now retired, as asked
    gap = cur.wait_for(RUN, {2: 40}, timeout_s=0.3)
    assert gap == {2: 40}                                              # bounded wait, says what is missing
    write(store, cur, tables[2], 80)
    assert cur.wait_for(RUN, {2: 40}, timeout_s=5) == {}


def test_candidates_from_recent_rows_equal_a_store_read_through_retention_removal_and_restart(store):
    """The rows held in memory for candidates (sponge.service.recent) answer exactly what the store
    would: the same whole groups, after retention, after a removal, and after a restart (when the
    versions stored before it are read from the store until the window has moved past them)."""
    cfg = CurationConfig(k=16, n_references=32, retention_window=2)
    cur = Curator(store, cfg)
    cur.register_run(RUN, "a-tokenizer")   # as a trainer does before it sends
    reads = []
    real_group_rows = store.group_rows

    def counted(*args, **kwargs):
        reads.append(args)
        return real_group_rows(*args, **kwargs)

    store.group_rows = counted   # count the store reads (the real read still answers)

    def from_store(version: int, unit: str) -> pa.Table:
        """What the candidates were before recent rows: the groups read from the store."""
        ids = pa.array(cur.subset_ids(RUN), pa.string())
        table = with_group_columns(real_group_rows(RUN, ids, version - 2, version), drop_no_signal=True)
        if unit == "rollout":
            table = table.filter(pc.is_in(table.column("rollout_id"), value_set=ids))
        return table.select(list(CANDIDATE_COLUMNS)).to_pylist()   # values (schemas differ in nullability)

    first = 0
    tables = versions(64, 6)
    for v, table in enumerate(tables[:4]):
        write(store, cur, table, first)
        first += table.num_rows
        cur.report_version(RUN, v + 1)
    assert cur.describe_run(RUN)["recent_from"] == 0 and cur.describe_run(RUN)["recent_rows"] == 2 * 64
    for unit in ("group", "rollout"):
        got = cur.candidates(RUN, 4, unit=unit).table
        assert got.num_rows > 0 and got.to_pylist() == from_store(4, unit)
    assert reads == []   # answered from memory
    # A removal leaves memory as it leaves the store.
    victim = cur.candidates(RUN, 4).table.column("rollout_id")[0].as_py()
    cur.remove([victim])
    got = cur.candidates(RUN, 4).table
    assert victim not in got.column("rollout_id").to_pylist() and got.to_pylist() == from_store(4, "group")
    assert reads == []

    # Restart: a new curator over the same store holds nothing of versions 2 and 3 yet.
    cur.close()
    cur = Curator(store, cfg)
    cur.rebuild()
    assert cur.describe_run(RUN)["recent_from"] == 4
    got = cur.candidates(RUN, 4).table
    assert got.num_rows > 0 and got.to_pylist() == from_store(4, "group") and len(reads) == 1   # from the store
    for v, table in enumerate(tables[4:], start=4):
        write(store, cur, table, first)
        first += table.num_rows
        cur.report_version(RUN, v + 1)
    got = cur.candidates(RUN, 6).table
    assert got.num_rows > 0 and got.to_pylist() == from_store(6, "group") and len(reads) == 1   # from memory again
    cur.close()


def test_recent_rows_shed_the_oldest_versions_past_their_bound():
    from sponge.service.recent import RecentRows

    recent = RecentRows(max_rows=100)
    recent.start(None)
    for table in versions(40, 4):
        recent.add(table)
    # 160 rows offered, at most 100 held (past it, shed to at most 75): versions 0 and 1 went when
    # version 2 arrived, so a window from 2 is answered, one from 1 is not (the store answers it).
    assert len(recent) == 80 and recent.complete_from == 2
    ids = pa.concat_arrays([t.column("rollout_id").combine_chunks() for t in versions(40, 4)])
    assert recent.groups_of(ids, 2, 4).num_rows == 80
    assert recent.groups_of(ids, 1, 4) is None
    # Retention and removal drop whole batches or filter the one that straddles them.
    recent.drop_below(3)
    assert len(recent) == 40 and recent.groups_of(ids, 3, 4).num_rows == 40
    gone = versions(40, 4)[3].column("rollout_id").combine_chunks().slice(0, 5)
    recent.drop_ids(gone)
    assert len(recent) == 35 and not set(gone.to_pylist()) & set(recent.groups_of(ids, 3, 4)
                                                                  .column("rollout_id").to_pylist())
    recent.drop_below(9)
    assert len(recent) == 0 and recent.groups_of(ids, 9, 10).num_rows == 0   # empty, answered from memory


def test_two_shards_merge_to_one_subset_when_their_rows_tie(store):
    """Each shard lists its own solution first; with exact duplicate embeddings across the shards
    (ties for greedy) both must still serve the same merged subset, and optimise one objective."""
    rows = versions(120, 1)[0]
    twin = rows.set_column(rows.schema.get_field_index("rollout_id"), "rollout_id",
                           pc.binary_join_element_wise(rows.column("rollout_id"), "twin", "-"))
    twin = twin.set_column(twin.schema.get_field_index("prompt_id"), "prompt_id",
                           pc.binary_join_element_wise(twin.column("prompt_id"), "twin", "-"))
    curators = []
    for shard, partition, table in (("a", 0, rows), ("b", 1, twin)):
        cur = Curator(store, CurationConfig(k=10, n_references=32, shard=shard, retention_window=None))
        cur.set_partitions({partition})
        offsets = np.arange(table.num_rows, dtype=np.int64)
        w = store.write_segment(table, topic="rollouts", partition=partition, offsets=offsets,
                                first_offset=0, last_offset=table.num_rows - 1)
        curators.append((cur, w, table))
    for cur, w, table in curators:
        cur.on_segment(w, table)
    for cur, _, _ in curators:   # the second shard's solution is published after the first merged
        cur.subset_ids()
    a, b = (sorted(cur.subset_ids()) for cur, _, _ in curators)
    assert len(a) == 10 and a == b
    objectives = [cur._runs[RUN].selection.selector.objective for cur, _, _ in curators]
    assert np.array_equal(objectives[0].references, objectives[1].references)
