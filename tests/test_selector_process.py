"""The selector in a child process: same answers as in-process, errors and deaths reported, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from sponge.selectors import DynamicSelector, FacilityLocation
from sponge.selectors.process import SelectorHost, SelectorProcessError


def _data(n: int, seed: int = 0, d: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((6, d))
    return (centers[rng.integers(0, 6, n)] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)


@pytest.fixture
def host():
    h = SelectorHost().start()
    yield h
    h.close()


# The vectors' ways to the child: the shared ring (roomy), a ring of 10 batches' bytes minus a
# little (writes wrap, and a batch that would overwrite unread data goes over the socket), a ring
# smaller than one batch (always the socket), and no ring.
RINGS = {"roomy": 64 << 20, "wrapping": 10 * 100 * 16 * 4 - 200, "too-small": 1000, "none": 0}


@pytest.mark.parametrize("ring", RINGS)
def test_hosted_selector_answers_exactly_as_the_in_process_one(ring):
    host = SelectorHost(ring_bytes=RINGS[ring]).start()
    x = _data(600)
    objective = FacilityLocation(x[:64], m=8, quality_weight=0.1)
    local = DynamicSelector(objective, k=12, eps=0.2, seed=3)
    remote = host.new_selector("dynamic", objective, k=12, eps=0.2, seed=3)
    quality = (np.arange(600) % 3 == 0).astype(np.float32)
    for start in range(0, 600, 100):   # inserts, then deletes of the oldest, as the service does
        ids = np.arange(start, start + 100)
        for sel in (local, remote):
            sel.insert(ids, x[ids], quality[ids])
        if start >= 200:
            for sel in (local, remote):
                sel.delete(np.arange(start - 200, start - 150))
        np.testing.assert_array_equal(np.sort(remote.solution()), np.sort(local.solution()))
        assert remote.value() == pytest.approx(local.value(), rel=1e-6)
    assert remote.stats()["n_live"] == len(local) == 400
    assert remote.stats()["queries"] == local.stats()["queries"]
    host.close()


def test_the_ring_carries_batches_in_order_through_many_wraps():
    from sponge.selectors.process import _VectorRing

    writer = _VectorRing.create(1000)
    reader = _VectorRing(os.dup(writer.fd), writer.capacity)   # a second mapping, as the child's
    rng = np.random.default_rng(0)
    pending, through_socket = [], 0
    for step in range(500):
        batch = rng.standard_normal((int(rng.integers(1, 40)), 3)).astype(np.float32)
        where = writer.put(batch)
        if where is None:
            through_socket += 1
        else:
            pending.append((batch, where))
        if step % 3 == 2:   # the reader lags behind, then catches up
            for expected, (offset, end) in pending:
                np.testing.assert_array_equal(reader.take(offset, end, batch.dtype.str, expected.shape), expected)
            pending.clear()
    assert writer.head > 50 * writer.capacity   # it wrapped many times
    assert 0 < through_socket < 250             # full at times, but mostly used
    assert writer.put(np.zeros(300, np.float32)) is None   # bigger than the ring: never fits
    writer.close()
    reader.close()


def test_an_error_in_a_pipelined_insert_surfaces_at_the_next_answer_and_breaks_only_that_selector(host):
    x = _data(50)
    objective = FacilityLocation(x[:10], m=4)
    sel = host.new_selector("dynamic", objective, k=4)
    sel.insert(np.arange(20), x[:20])
    sel.insert(np.arange(10, 30), x[10:30])           # ids 10..19 again: the child refuses it
    with pytest.raises(SelectorProcessError, match="already inserted"):
        sel.solution()
    with pytest.raises(SelectorProcessError):          # broken until replaced: its state is unknown
        sel.value()
    fresh = host.new_selector("dynamic", objective, k=4)
    fresh.insert(np.arange(20), x[:20])
    assert len(fresh.solution()) == 4
    with pytest.raises(SelectorProcessError, match="replaced"):
        sel.stats()                                    # the old handle cannot reach the new selector


def test_a_killed_child_is_reported_and_the_next_selector_restarts_it(host):
    x = _data(40)
    objective = FacilityLocation(x[:10], m=4)
    sel = host.new_selector("dynamic", objective, k=4)
    sel.insert(np.arange(40), x)
    first = host.pid
    os.kill(first, signal.SIGKILL)
    with pytest.raises(SelectorProcessError, match="went away"):
        sel.solution()
    again = host.new_selector("dynamic", objective, k=4)
    assert host.pid != first
    again.insert(np.arange(40), x)
    assert len(again.solution()) == 4


def test_closing_the_host_ends_the_child():
    host = SelectorHost().start()
    pid = host.pid
    assert psutil.pid_exists(pid)
    host.close()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the selector process outlived its host"
        time.sleep(0.05)


def test_the_child_exits_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from sponge.selectors.process import SelectorHost\n"
        "h = SelectorHost().start()\n"
        "print(h.pid, flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert psutil.pid_exists(child)
        parent.kill()                       # kill -9: no finalizer runs; the child sees its socket close
        parent.wait(10)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the selector process outlived its killed parent"
            time.sleep(0.05)
    finally:
        parent.kill()


def test_one_child_hosts_a_selector_per_slot_independently(host):
    data = _data(400, seed=7)
    objective = FacilityLocation(data[:64], m=8)
    a = host.new_selector("dynamic", objective, k=8, eps=0.2, seed=1, slot="run-a")
    b = host.new_selector("dynamic", objective, k=8, eps=0.2, seed=1, slot="run-b")
    local = DynamicSelector(objective, k=8, eps=0.2, seed=1)
    a.insert(np.arange(200), data[:200])
    b.insert(np.arange(200, 400), data[200:])
    local.insert(np.arange(200), data[:200])
    assert np.array_equal(np.sort(a.solution()), np.sort(local.solution()))   # b's inserts did not leak in
    assert set(b.solution()) <= set(range(200, 400)) and len(a) == len(b) == 200
    assert host.slots == ["run-a", "run-b"]
    b.close()                                                       # frees run-b only
    assert host.slots == ["run-a"] and len(a) == 200
    with pytest.raises(SelectorProcessError, match="replaced"):
        b.solution()
    os.kill(host.pid, signal.SIGKILL)                               # the child dies: every slot goes
    with pytest.raises(SelectorProcessError):
        a.solution()
    c = host.new_selector("dynamic", objective, k=8, eps=0.2, seed=1, slot="run-c")   # a new child
    with pytest.raises(SelectorProcessError, match="replaced"):
        a.solution()
    c.insert(np.arange(10), data[:10])
    assert len(c) == 10
