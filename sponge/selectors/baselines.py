"""Baselines behind the Selector interface: lazy greedy rerun, sieve-streaming rerun, random subset.

* LazyGreedyRerun: lazy greedy (Minoux 1978) from scratch over the live set whenever the solution is
  asked for after a change -- a batch of updates costs one rerun. (1 - 1/e) approximation; the quality
  reference; about n + (re-evaluations) queries per rerun.
* SieveStreamingRerun: sieve-streaming (Badanidiyuru et al., KDD 2014) over insertions; when a deleted
  element sits in any sieve, the whole sieve is rerun over the live elements in arrival order.
  (1/2 - eps) approximation for insertion-only streams.
* RandomSubset: a uniformly random k-subset of the live elements (no queries).
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from sponge.selectors.base import Selector
from sponge.selectors.objectives import CountingOracle, Objective, add_to_coverage


def lazy_greedy(oracle: CountingOracle, rows: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Greedy for max f(S), |S| <= k, over `rows` with lazy (stale upper bound) re-evaluation.
    Returns (chosen rows in pick order, f(S)); every gain evaluated is charged to `oracle`."""
    if len(rows) == 0 or k == 0:
        return np.empty(0, np.int64), 0.0
    cov = np.zeros(oracle.n_columns, np.float32)
    bounds = oracle.gains(rows, cov)
    heap = [(-b, i, 0) for i, b in enumerate(bounds.tolist())]  # (-bound, index, picks when evaluated)
    heapq.heapify(heap)
    chosen, value = [], 0.0
    table = oracle.table
    while heap and len(chosen) < k:
        neg, i, epoch = heapq.heappop(heap)
        if -neg <= 0:
            break
        if epoch == len(chosen):  # bound is the exact current gain: it is the best
            row = int(rows[i])
            chosen.append(row)
            value += -neg
            add_to_coverage(cov, table.clients[row], table.weights[row])
            continue
        gain = oracle.gains(rows[i: i + 1], cov)[0]
        heapq.heappush(heap, (-gain, i, len(chosen)))
    return np.asarray(chosen, np.int64), float(value)


class LazyGreedyRerun(Selector):
    """Lazy greedy from scratch over V_t, rerun when the solution is read after an update."""

    method = "lazy_greedy"

    def __init__(self, objective: Objective, k: int = 64, seed: int = 0):
        super().__init__(objective, k, seed)
        self._rows = np.empty(0, np.int64)
        self._value = 0.0
        self._dirty = False
        self.reruns = 0

    def _inserted(self, rows):
        self._dirty = True

    def _deleting(self, rows):
        self._dirty = True

    def _refresh(self) -> None:
        if self._dirty:
            self._rows, self._value = lazy_greedy(self.oracle, self.table.live_rows(), self.k)
            self._dirty = False
            self.reruns += 1

    def _solution_rows(self):
        self._refresh()
        return self._rows

    def value(self) -> float:
        self._refresh()
        return self._value

    def stats(self):
        return {**super().stats(), "reruns": self.reruns}


class SieveStreamingRerun(Selector):
    """Sieve-streaming over arrivals; a deletion that hits a sieve's set reruns it over the live set.

    Args:
        eps: thresholds v = (1 + eps)^j cover [m, 2 k m], m the largest singleton value seen.
    """

    method = "sieve"

    def __init__(self, objective: Objective, k: int = 64, eps: float = 0.2, seed: int = 0):
        super().__init__(objective, k, seed)
        self.eps = float(eps)
        self._log_base = math.log1p(eps)
        self._arrival = np.zeros(self.table.capacity, np.int64)  # arrival order, for reruns
        self._clock = 0
        self.reruns = 0
        self._reset()

    def params(self):
        return {"k": self.k, "eps": self.eps, "seed": self.seed}

    def _reset(self) -> None:
        self.max_single = 0.0
        self.js = np.empty(0, np.int64)  # sieve j has threshold v = (1 + eps)^j
        self.covs = np.zeros((0, self.oracle.n_columns), np.float32)
        self.vals = np.zeros(0)
        self.members: list[list[int]] = []
        self.in_sieve = np.zeros(self.table.capacity, np.int32)  # sieves holding each row

    def _resize_sieves(self, lo: int, hi: int) -> None:
        """Keep sieves lo..hi, dropping the ones below and opening empty ones above."""
        keep = self.js >= lo
        for j_idx in np.flatnonzero(~keep):
            self.in_sieve[self.members[j_idx]] -= 1
        start = int(self.js[-1]) + 1 if keep.any() else lo
        new = np.arange(start, hi + 1)
        self.js = np.concatenate([self.js[keep], new])
        self.covs = np.concatenate([self.covs[keep], np.zeros((len(new), self.covs.shape[1]), np.float32)])
        self.vals = np.concatenate([self.vals[keep], np.zeros(len(new))])
        self.members = [m for m, kept in zip(self.members, keep) if kept] + [[] for _ in new]

    def _stream(self, rows: np.ndarray) -> None:
        singles = self.oracle.singletons(rows)
        table, k = self.table, self.k
        for row, single in zip(rows.tolist(), singles.tolist()):
            if single > self.max_single:
                self.max_single = single
                lo = math.ceil(math.log(single) / self._log_base)
                hi = math.floor(math.log(2 * k * single) / self._log_base)
                self._resize_sieves(lo, hi)
            sizes = np.fromiter((len(m) for m in self.members), np.int64, len(self.members))
            open_ = np.flatnonzero(sizes < k)
            if len(open_) == 0:
                continue
            clients = table.clients[row]
            covered = self.covs[open_][:, clients]
            self.oracle.queries += len(open_)
            gains = np.maximum(table.weights[row][None, :] - covered, 0).sum(1, dtype=np.float64) \
                + table.bonus[row]
            v = np.power(1.0 + self.eps, self.js[open_])
            take = open_[gains >= (v / 2 - self.vals[open_]) / (k - sizes[open_])]
            for s in take.tolist():
                add_to_coverage(self.covs[s], clients, table.weights[row])
                self.members[s].append(row)
            self.vals[take] += gains[np.isin(open_, take)]
            self.in_sieve[row] += len(take)

    def _grow(self) -> None:
        cap = self.table.capacity
        if len(self._arrival) < cap:
            self._arrival = np.concatenate([self._arrival, np.zeros(cap - len(self._arrival), np.int64)])
            self.in_sieve = np.concatenate([self.in_sieve, np.zeros(cap - len(self.in_sieve), np.int32)])

    def _inserted(self, rows):
        self._grow()
        self._arrival[rows] = np.arange(self._clock, self._clock + len(rows))
        self._clock += len(rows)
        self._stream(rows)

    def _deleting(self, rows):
        if not np.any(self.in_sieve[rows] > 0):
            return  # unselected elements do not affect any sieve
        keep = np.setdiff1d(self.table.live_rows(), rows)
        self._reset()
        self._grow()
        self.reruns += 1
        self._stream(keep[np.argsort(self._arrival[keep], kind="stable")])

    def _solution_rows(self):
        if len(self.vals) == 0:
            return np.empty(0, np.int64)
        return np.asarray(self.members[int(np.argmax(self.vals))], np.int64)

    def value(self) -> float:
        return float(self.vals.max()) if len(self.vals) else 0.0

    def stats(self):
        return {**super().stats(), "reruns": self.reruns, "sieves": len(self.js)}


class RandomSubset(Selector):
    """k live elements chosen uniformly at random (each element draws a random key; the k smallest)."""

    method = "random"

    def __init__(self, objective: Objective, k: int = 64, seed: int = 0):
        super().__init__(objective, k, seed)
        self._key = np.full(self.table.capacity, np.inf)

    def _inserted(self, rows):
        if len(self._key) < self.table.capacity:
            self._key = np.concatenate([self._key, np.full(self.table.capacity - len(self._key), np.inf)])
        self._key[rows] = self.rng.random(len(rows))

    def _deleting(self, rows):
        self._key[rows] = np.inf

    def _solution_rows(self):
        n = min(self.k, len(self.table))
        if n == 0:
            return np.empty(0, np.int64)
        rows = np.argpartition(self._key, n - 1)[:n]
        return rows[np.argsort(self._key[rows])]
