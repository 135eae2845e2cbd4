"""rollout_id <-> int64 for the selector, columnar."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sponge.store.idmap import RolloutIdMap


def test_ids_round_trip_in_batches_and_unknown_ones_are_minus_one():
    ids = RolloutIdMap()
    first = pa.array([f"r-{i}" for i in range(5000)])
    second = pa.chunked_array([pa.array([f"s-{i}" for i in range(3000)]), pa.array(["t-0", "t-1"])])
    new_a, a = ids.assign(first, np.zeros(5000))
    new_b, b = ids.assign(second, np.full(3002, 7))
    assert new_a.all() and new_b.all()
    np.testing.assert_array_equal(a, np.arange(5000))
    np.testing.assert_array_equal(b, np.arange(5000, 8002))
    probe = pa.array(["s-17", "nope", "r-4999", "t-1", "r-0", ""])
    np.testing.assert_array_equal(ids.lookup(probe), [5017, -1, 4999, 8001, 0, -1])
    assert ids.strings(np.array([8001, 0, 5017])).to_pylist() == ["t-1", "r-0", "s-17"]
    assert ids.versions(np.array([5017, 17])).tolist() == [7, 0]
    assert len(ids) == 8002
    ids.forget(np.array([0, 5017]))
    assert len(ids) == 8000 and ids.is_alive(np.array([0, 1, 5017, 8002, -1])).tolist() == [False, True, False, False, False]
    ids.forget(np.array([0, 0]))                        # twice: no effect
    assert len(ids) == 8000
    assert ids.lookup(["r-0"])[0] == 0                 # forgotten ids keep their number (no reuse)
    again, more = ids.assign(pa.array(["r-3", "u-0", "s-5", "u-1"]), np.array([1, 2, 3, 4]))
    np.testing.assert_array_equal(again, [False, True, False, True])   # known ids get no second number
    np.testing.assert_array_equal(more, [8002, 8003])
    assert ids.strings(more).to_pylist() == ["u-0", "u-1"] and ids.versions(more).tolist() == [2, 4]


def test_empty_inputs():
    ids = RolloutIdMap()
    assert len(ids.lookup(pa.array([], pa.string()))) == 0
    assert ids.lookup(["x"])[0] == -1
    assert len(ids.assign(pa.array([], pa.string()), np.empty(0))[1]) == 0
    assert len(ids.strings(np.empty(0, np.int64))) == 0


def test_id_set_membership_in_batches_and_a_first_hash_collision_hides_nothing():
    from sponge.store.idmap import RolloutIdSet

    removed = RolloutIdSet()
    removed.add(pa.array([f"r{i}" for i in range(0, 5000, 2)]))
    removed.add([f"r{i}" for i in range(0, 100, 2)])        # again: no double entries
    removed.add(["r0", "r0"])                                # nor within one batch
    assert len(removed) == 2500
    probe = pa.array([f"r{i}" for i in range(5000)])
    np.testing.assert_array_equal(removed.contains(probe), np.arange(5000) % 2 == 0)
    assert removed.contains(pa.array([], pa.string())).shape == (0,)
    # Force two ids onto one first hash: both stay findable, a third with that h1 does not appear.
    h1, h2 = removed.hash(pa.array(["x", "y", "z"]))
    removed._h1 = np.insert(removed._h1, np.searchsorted(removed._h1, [h1[0], h1[0]]), [h1[0], h1[0]])
    removed._h2 = np.insert(removed._h2, np.searchsorted(removed._h1, h1[0]), [h2[1], h2[0]])
    assert removed.contains_hashed(np.array([h1[0], h1[0], h1[0]], np.uint64), h2).tolist() == [True, True, False]


def test_id_set_tags_let_retention_drop_a_runs_old_versions_only():
    from sponge.store.idmap import RolloutIdSet

    index = RolloutIdSet()
    index.add([f"a{v}" for v in range(5)][:2], run=1, version=0)
    index.add(["a-late"], run=1, version=4)
    index.add(["b-old"], run=2, version=0)
    index.add(["dead"], run=1)                               # tombstoned: FOREVER, never dropped
    assert index.drop_below(run=1, version=3) == 2
    assert index.contains(["a0", "a1", "a-late", "b-old", "dead"]).tolist() == [False, False, True, True, True]
    # A stored id that is then tombstoned takes the FOREVER tag: retention counts and drops it no more.
    index.add(["c0", "c1"], run=3, version=0)
    index.add(["c1"], retag=True)
    assert index.count_below(run=3, version=1) == 1
    assert index.drop_below(run=3, version=1) == 1 and index.contains(["c0", "c1"]).tolist() == [False, True]


def test_forgotten_ids_are_compacted_away_and_live_ones_keep_their_ints():
    ids = RolloutIdMap(compact_min=10)
    _, ints = ids.assign(pa.array([f"r{i}" for i in range(100)]), np.zeros(100, np.int64))
    ids.forget(ints[:80])                                   # 80 dead > 20 live: compacted
    assert len(ids._h1) == 20
    assert ids.lookup(pa.array(["r85", "r5"])).tolist() == [85, -1]
    assert ids.strings(np.array([85, 99])).to_pylist() == ["r85", "r99"]
    assert ids.strings(np.array([5])).to_pylist() == [None]
    new, more = ids.assign(pa.array(["r90", "x"]), np.ones(2, np.int64))
    assert new.tolist() == [False, True] and more.tolist() == [100]
    assert ids.strings(np.array([100])).to_pylist() == ["x"] and len(ids) == 21


def test_compaction_cuts_off_the_forgotten_prefix_so_the_map_follows_the_live_span():
    ids = RolloutIdMap(compact_min=100)
    for step in range(50):                                  # a retention window of 3 batches of 100
        ids.assign(pa.array([f"b{step}-{i}" for i in range(100)]), np.full(100, step))
        ids.forget(ids.live_below(step - 2))
        assert len(ids) == min(step + 1, 3) * 100
    assert ids.next_int == 5000 and ids.live_below(10**9).min() == 4700
    assert len(ids._alive) <= 700 and len(ids._h1) <= 700   # not 5000: bounded by the window
    assert ids.strings(np.array([4999, 4700, 12])).to_pylist() == ["b49-99", "b47-0", None]
    assert ids.is_alive(np.array([12, 4700])).tolist() == [False, True]
    assert ids.lookup(pa.array(["b49-5", "b0-5"])).tolist() == [4905, -1]
    ids.forget(ids.live_below(10**9))                       # everything: compacts to nothing
    _, more = ids.assign(pa.array(["late"]), np.array([60]))
    assert more.tolist() == [5000] and ids.strings(more).to_pylist() == ["late"] and len(ids) == 1
