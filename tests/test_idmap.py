"""rollout_id <-> int64 for the selector, columnar."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sponge.engine.idmap import RolloutIdMap


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
    assert ids.version[5017] == 7 and ids.version[17] == 0
    assert len(ids) == 8002
    ids.forget(np.array([0, 5017]))
    assert len(ids) == 8000 and not ids.alive[0] and ids.alive[1]
    assert ids.lookup(["r-0"])[0] == 0                 # forgotten ids keep their number (no reuse)
    again, more = ids.assign(pa.array(["r-3", "u-0", "s-5", "u-1"]), np.array([1, 2, 3, 4]))
    np.testing.assert_array_equal(again, [False, True, False, True])   # known ids get no second number
    np.testing.assert_array_equal(more, [8002, 8003])
    assert ids.strings(more).to_pylist() == ["u-0", "u-1"] and list(ids.version[more]) == [2, 4]


def test_empty_inputs():
    ids = RolloutIdMap()
    assert len(ids.lookup(pa.array([], pa.string()))) == 0
    assert ids.lookup(["x"])[0] == -1
    assert len(ids.assign(pa.array([], pa.string()), np.empty(0))[1]) == 0
    assert len(ids.strings(np.empty(0, np.int64))) == 0
