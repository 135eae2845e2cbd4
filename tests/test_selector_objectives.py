"""Objectives and baselines: faiss facility-location gains against a dense numpy reference, coverage
values against set arithmetic, the baselines behind the shared interface, parameter persistence."""

from __future__ import annotations

import numpy as np
import pytest

from sponge.selectors import (METHODS, DynamicSelector, FacilityLocation, LazyGreedyRerun, RandomSubset,
                              SetCoverage, SieveStreamingRerun, lazy_greedy, load_params, save_params)
from sponge.selectors.objectives import CountingOracle, ElementTable


def dense_facility_location(refs, x, m, quality, lam):
    """f(S) from the full similarity matrix, sparsified to each element's top-m references."""
    r = refs / np.linalg.norm(refs, axis=1, keepdims=True)
    v = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = v.astype(np.float64) @ r.T.astype(np.float64)  # (n, |C|)
    keep = np.zeros_like(sim, bool)
    np.put_along_axis(keep, np.argsort(-sim, axis=1)[:, :m], True, axis=1)
    w = np.where(keep, np.maximum(sim, 0), 0.0)

    def f(subset):
        subset = list(subset)
        if not subset:
            return 0.0
        return w[subset].max(axis=0).sum() + lam * quality[subset].sum()
    return f


@pytest.mark.parametrize("m", [5, 64])
def test_facility_location_gains_equal_dense_reference(m):
    rng = np.random.default_rng(0)
    refs, x = rng.normal(size=(64, 24)), rng.normal(size=(200, 24))
    quality = rng.random(200)
    obj = FacilityLocation(refs, m=m, quality_weight=0.3)
    table = ElementTable(obj.width, obj.n_clients)
    rows = table.add(np.arange(200), obj.profile(x, quality))
    oracle = CountingOracle(table, obj.n_clients + 1)
    f = dense_facility_location(refs, x, m, quality, 0.3)
    for trial in range(20):
        s = rng.choice(200, size=int(rng.integers(0, 12)), replace=False)
        cov = np.zeros(obj.n_clients + 1, np.float32)
        for e in s:
            cov[table.clients[rows[e]]] = np.maximum(cov[table.clients[rows[e]]], table.weights[rows[e]])
        cand = rng.choice(np.setdiff1d(np.arange(200), s), size=30, replace=False)  # gains of non-members
        got = oracle.gains(rows[cand], cov)
        want = np.array([f(set(s) | {c}) - f(s) for c in cand])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(oracle.value(rows[s], count=False), f(s), rtol=1e-4, atol=1e-4)
    assert oracle.queries == 20 * 30  # counted; the uncounted value() calls are not


def test_coverage_values_match_set_union():
    rng = np.random.default_rng(1)
    weights = rng.random(50)
    items = np.full((80, 6), -1)
    sets = []
    for i in range(80):
        c = rng.choice(50, size=int(rng.integers(0, 7)), replace=False)
        items[i, : len(c)] = c
        sets.append(set(c.tolist()))
    obj = SetCoverage(50, 6, item_weights=weights)
    table = ElementTable(obj.width, obj.n_clients)
    rows = table.add(np.arange(80), obj.profile(items))
    oracle = CountingOracle(table, obj.n_clients + 1)
    for _ in range(30):
        s = rng.choice(80, size=int(rng.integers(1, 10)), replace=False)
        union = set().union(*(sets[i] for i in s))
        assert oracle.value(rows[s]) == pytest.approx(weights[list(union)].sum() if union else 0.0, rel=1e-5)
    with pytest.raises(ValueError, match="twice"):
        obj.profile(np.array([[1, 1, -1]]))
    with pytest.raises(ValueError, match="item indices"):
        obj.profile(np.array([[50]]))


def test_lazy_greedy_equals_plain_greedy():
    rng = np.random.default_rng(2)
    obj = FacilityLocation(rng.normal(size=(100, 16)), m=8)
    table = ElementTable(obj.width, obj.n_clients)
    rows = table.add(np.arange(300), obj.profile(rng.normal(size=(300, 16))))
    oracle = CountingOracle(table, obj.n_clients + 1)
    chosen, value = lazy_greedy(oracle, rows, 10)
    lazy_queries = oracle.queries
    plain, cov = [], np.zeros(obj.n_clients + 1, np.float32)
    for _ in range(10):
        g = oracle.gains(rows, cov)
        g[plain] = -1
        best = int(np.argmax(g))
        plain.append(best)
        cov[table.clients[best]] = np.maximum(cov[table.clients[best]], table.weights[best])
    assert chosen.tolist() == plain
    assert value == pytest.approx(oracle.value(rows[plain], count=False), rel=1e-5)
    assert lazy_queries < 10 * 300  # laziness saves evaluations


def make_instance(seed=3, n=400, d=16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, d))
    x = (centres[rng.integers(0, 10, n)] + 0.4 * rng.normal(size=(n, d))).astype(np.float32)
    refs = (centres[rng.integers(0, 10, 80)] + 0.4 * rng.normal(size=(80, d))).astype(np.float32)
    return FacilityLocation(refs, m=8), x, rng


@pytest.mark.parametrize("cls", [LazyGreedyRerun, SieveStreamingRerun, RandomSubset, DynamicSelector])
def test_every_method_behind_the_same_interface(cls):
    obj, x, rng = make_instance()
    sel = cls(obj, k=8, seed=0)
    live = set()
    for step in range(40):
        new = np.arange(step * 10, step * 10 + 10)
        sel.insert(new, x[new])
        live |= set(new.tolist())
        if step % 2:
            gone = rng.choice(sorted(live), 6, replace=False)
            sel.delete(gone)
            live -= set(gone.tolist())
        sol = sel.solution()
        assert sol.dtype == np.int64 and len(sol) == min(8, len(live)) or cls is not RandomSubset
        assert len(sol) <= 8 and set(sol.tolist()) <= live
        assert sel.value() == pytest.approx(sel.oracle.value(sel.table.rows_of(sol), count=False), rel=1e-4)
    stats = sel.stats()
    assert stats["n_live"] == len(live) and stats["method"] == cls.method
    ref = CountingOracle(sel.table, sel.oracle.n_columns)
    _, greedy = lazy_greedy(ref, sel.table.live_rows(), 8)
    if cls is not RandomSubset:
        assert sel.value() >= (0.5 - 0.2) * greedy
    if cls is RandomSubset:
        assert stats["queries"] == 0


def test_sieve_reruns_only_when_a_selected_element_goes():
    obj, x, _ = make_instance(seed=4)
    sel = SieveStreamingRerun(obj, k=5, eps=0.2)
    sel.insert(np.arange(200), x[:200])
    unselected = [i for i in range(200) if sel.in_sieve[sel.table.rows_of(np.array([i]))[0]] == 0][:5]
    sel.delete(np.array(unselected))
    assert sel.stats()["reruns"] == 0
    sel.delete(sel.solution()[:1])
    assert sel.stats()["reruns"] == 1
    assert len(sel.solution()) == 5


def test_save_and_load_parameters(tmp_path):
    obj, x, _ = make_instance(seed=5)
    for cls in METHODS.values():
        sel = cls(obj, k=6, seed=11)
        save_params(sel, tmp_path / cls.method)
        again = load_params(tmp_path / cls.method)
        assert type(again) is cls and again.params() == sel.params() and len(again) == 0
        for s in (sel, again):  # state is rebuilt by re-inserting: same seed, same sequence, same answer
            s.insert(np.arange(150), x[:150])
            s.delete(np.arange(0, 150, 3))
        assert sel.solution().tolist() == again.solution().tolist()
