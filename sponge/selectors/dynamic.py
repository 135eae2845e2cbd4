"""The fully dynamic (1/2 - eps) submodular selector (Banihashem et al., ICML 2023; ALGORITHMS.md 3).

Read top to bottom: the guesses of OPT, then one guess's level structure, then insert, delete and
rebuild. Everything per element is a numpy array indexed by the element's row in the ElementTable.

**Guessing OPT.** One independent instance per threshold tau_j = (1 + eps)^j. Element s goes to
instance j iff tau_j / (2k) <= f({s}) <= tau_j: an element whose singleton value is below tau/(2k) can
never be picked there, and the instance with tau in [OPT, (1 + eps) OPT) receives every element. That
instance ends with |S| = k (so f(S) >= k * tau/(2k) >= OPT/2) or with no element left pickable (so
OPT <= f(S) + k * tau/(2k), f(S) >= (1 - eps)/2 * OPT). The answer is the best instance's S. Each
element reaches log_{1+eps}(2k) instances.

**Levels, per instance.** thr = tau/(2k). Level i >= 1 holds R_i and a chosen u_i in R_i; S_i =
{u_1..u_i}. An element is *pickable at level i* if i <= k and f(s | S_{i-1}) >= thr; since S only
grows, pickability is monotone in i, so R_i = {s : level(s) >= i} where level(s) is the highest level
at which s is pickable -- the sets nest by construction. The invariant: u_i is uniformly random in R_i.
The top t = |S|; R_{t+1} is empty (an element pickable above the top would have become u_{t+1}).

**Insert s.** Binary-search level(s) against S (O(log k) queries), then walk up: joining R_i, s
becomes u_i with probability 1/|R_i| (keeps u_i uniform), and then the levels above i are rebuilt.

**Delete s.** Leave every R_i. If s = u_i, rebuild from level i; u_i being uniform in R_i, an oblivious
deletion hits it with probability 1/|R_i|, which is why expected work per update stays small.

**Rebuild above level t.** Candidates (known to be in R_t / R_{t+1}) in uniform random order: the
first one pickable at the top becomes the next u; each candidate that is not pickable at the current
top settles at its level, found by binary search over the (now fixed) prefixes. Candidates are
evaluated in vectorised chunks; a chunk costs a query per element, and elements past the first pick in
a chunk keep what their evaluation proved (a failure settles them, a pass is a known lower bound).

Expected queries per update: O(log k) per instance for the level search, plus O(level(s) log k) for
the rebuilds a random choice triggers -- independent of n. (The paper's multi-pick levels bring the
rebuild term to polylog(k) as well; the single-pick levels above are the ones ALGORITHMS.md specifies.)
"""

from __future__ import annotations

import math

import numpy as np

from sponge.selectors.base import Selector
from sponge.selectors.baselines import lazy_greedy
from sponge.selectors.objectives import CountingOracle, ElementTable, Objective, add_to_coverage


Profile = tuple[np.ndarray, np.ndarray, np.ndarray]  # (clients, weights, bonus) of some elements


def _take(prof: Profile, idx: np.ndarray) -> Profile:
    return tuple(np.take(x, idx, axis=0) for x in prof)


class _Instance:
    """The level structure for one guess tau of OPT."""

    def __init__(self, tau: float, k: int, table: ElementTable, oracle: CountingOracle,
                 rng: np.random.Generator, rebuilds: np.ndarray):
        self.tau, self.k, self.thr = tau, k, tau / (2 * k)
        self.table, self.oracle, self.rng, self.rebuilds = table, oracle, rng, rebuilds
        self.level = np.full(table.capacity, -1, np.int16)  # -1: not in this instance
        self.count_at = np.zeros(k + 2, np.int64)  # members whose level is exactly l
        self.size = 0
        self.top = 0
        self.chosen = np.full(k + 1, -1, np.int64)  # chosen[i] = row of u_i, i = 1..top
        self.prefix_value = np.zeros(k + 1)  # f(S_i)
        self.cov = np.zeros((min(k, 8) + 1, oracle.n_columns), np.float32)  # cov[i] = coverage of S_i

    # -- small helpers ----------------------------------------------------------------------------

    def ensure_capacity(self, capacity: int) -> None:
        if len(self.level) < capacity:
            self.level = np.concatenate([self.level, np.full(capacity - len(self.level), -1, np.int16)])

    def value(self) -> float:
        return float(self.prefix_value[self.top])

    def solution_rows(self) -> np.ndarray:
        return self.chosen[1: self.top + 1]

    def r_sizes(self) -> np.ndarray:
        """|R_l| for l = 0..k+1 (suffix sums of count_at)."""
        return np.cumsum(self.count_at[::-1])[::-1]

    def _place(self, rows: np.ndarray, levels: np.ndarray) -> None:
        self.level[rows] = levels
        self.count_at += np.bincount(levels, minlength=self.k + 2)
        self.size += len(rows)

    def _unplace(self, rows: np.ndarray) -> np.ndarray:
        levels = self.level[rows]
        self.count_at -= np.bincount(levels, minlength=self.k + 2)
        self.level[rows] = -1
        self.size -= len(rows)
        return levels

    def _choose(self, row: int) -> None:
        """u_{top+1} <- row (row is pickable at top + 1)."""
        t = self.top + 1
        if t >= len(self.cov):
            grown = np.zeros((min(2 * len(self.cov), self.k + 1), self.cov.shape[1]), np.float32)
            grown[: len(self.cov)] = self.cov
            self.cov = grown
        gain = self.oracle.gains(np.array([row]), self.cov[t - 1])[0]
        self.cov[t] = self.cov[t - 1]
        add_to_coverage(self.cov[t], self.table.clients[row], self.table.weights[row])
        self.prefix_value[t] = self.prefix_value[t - 1] + gain
        self.chosen[t] = row
        self.top = t
        self.level[row] = t
        self.count_at[t] += 1
        self.size += 1

    def _levels(self, prof: Profile, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Highest level in [lo, hi) at which each element (profiles `prof`) is pickable, given that it
        is pickable at lo and not at hi. Lockstep binary search: ~log2(hi - lo) queries per element.
        The elements still open are compacted after each step, so a step is one gain call over
        contiguous arrays (no re-gathering from the table)."""
        out = lo.astype(np.int64)
        hi = hi.astype(np.int64)
        idx = np.flatnonzero(hi - out > 1)
        if len(idx) == 0:
            return out
        lo_, hi_ = out[idx], hi[idx]
        cl, w, b = _take(prof, idx) if len(idx) < len(out) else prof
        while True:
            mid = (lo_ + hi_) >> 1
            # pickable at level mid: f(s | S_{mid-1}) >= thr
            ok = self.oracle.gains_of(cl, w, b, self.cov, mid - 1) >= self.thr
            lo_ = np.where(ok, mid, lo_)
            hi_ = np.where(ok, hi_, mid)
            still = hi_ - lo_ > 1
            if still.all():
                continue
            done = ~still
            out[idx[done]] = lo_[done]
            if not still.any():
                return out
            idx, lo_, hi_ = idx[still], lo_[still], hi_[still]
            cl, w, b = (np.compress(still, x, axis=0) for x in (cl, w, b))

    # -- insert -----------------------------------------------------------------------------------

    def insert(self, rows: np.ndarray, prof: Profile) -> None:
        """Insert a batch of rows, each with f({s}) >= thr (pickable at level 1).

        The batch is one step of the walk of every row at once. Each new row's level is found against
        the current S. Then, bottom up: R_l grows from |R_l| old to |R_l| + b_l members (b_l new rows
        reach level l), and u_l is kept with probability |R_l| / (|R_l| + b_l), else replaced by a new
        row drawn uniformly from those b_l -- so u_l stays uniform in the grown R_l. The first level
        whose u is replaced is rebuilt (with everything above it); below it nothing changed. This is
        the distribution the one-at-a-time walk ends in (both leave every u_i uniform in R_i given
        S_{i-1}), at the cost of at most one rebuild per batch instead of one per promotion."""
        if len(rows) == 0:
            return
        cap = min(self.top + 1, self.k)  # highest level a new element can reach
        lv = self._levels(prof, np.ones(len(rows), np.int64), np.full(len(rows), cap + 1))
        top_level = int(lv.max())
        new_at = np.cumsum(np.bincount(lv, minlength=top_level + 1)[::-1])[::-1][1:]  # b_l, l = 1..
        old_at = self.r_sizes()[1: top_level + 1]
        fires = self.rng.random(top_level) * (old_at + new_at) < new_at
        if not fires.any():
            self._place(rows, lv)
            return
        j = int(np.argmax(fires)) + 1
        reach = np.flatnonzero(lv >= j)
        pick = int(reach[self.rng.integers(len(reach))])
        others = np.ones(len(rows), bool)
        others[pick] = False
        self._place(rows[others], lv[others])
        self._promote(int(rows[pick]), j)

    def _promote(self, row: int, j: int) -> None:
        """row joins R_1..R_j and becomes u_j; rebuild the levels above j from the old R_j."""
        cands = np.flatnonzero(self.level >= j)
        self._unplace(cands)
        self._truncate(j - 1)
        self._choose(row)
        self.rebuilds[j + 1] += 1
        self._rebuild(cands, known=j)

    def build(self, rows: np.ndarray) -> None:
        """Build the structure from scratch over rows (all pickable at level 1)."""
        self._rebuild(rows, known=1)

    # -- delete -----------------------------------------------------------------------------------

    def delete(self, rows: np.ndarray) -> None:
        """Remove rows (all members); rebuild from the lowest level whose u was deleted."""
        levels = self.level[rows].astype(np.int64)
        was_chosen = (levels >= 1) & (self.chosen[levels] == rows)
        self._unplace(rows)
        if not was_chosen.any():
            return
        j = int(levels[was_chosen].min())
        cands = np.flatnonzero(self.level >= j)  # R_j without the deleted: still pickable at j
        self._unplace(cands)
        self._truncate(j - 1)
        self.rebuilds[j] += 1
        self._rebuild(cands, known=j)

    def _truncate(self, t: int) -> None:
        self.chosen[t + 1:] = -1
        self.top = t

    # -- rebuild ----------------------------------------------------------------------------------

    def _rebuild(self, cands: np.ndarray, known: int) -> None:
        """Re-place `cands` (unplaced; each known pickable at level `known` <= top + 1) above the top,
        choosing new u's as in a sequential pass over the candidates in uniform random order.

        The pass reads the order in chunks: a chunk costs a query per element not already known to be
        pickable at the top; the first pickable one becomes the next u, the scan resumes right after
        it. Elements that fail settle (at a level <= the current top: monotonicity); elements after the
        pick that passed keep that as a known lower bound and are asked again at the new top. The
        settled elements' exact levels come from one binary search at the end."""
        order = self.rng.permutation(cands)
        prof = self.table.profiles_of(order)  # gathered once; the pass indexes into these
        n = len(order)
        lo = np.full(n, known, np.int64)  # highest level each is known pickable at
        hi = np.full(n, self.k + 1, np.int64)  # lowest level each is known to fail at
        settled = np.zeros(n, bool)
        picked = np.zeros(n, bool)
        pos, chunk = 0, 16
        while pos < n and self.top < self.k:
            t = self.top
            part = np.arange(pos, min(pos + chunk, n))
            part = part[~settled[part]]
            ok = lo[part] > t  # known pickable at t + 1 without asking
            ask = np.flatnonzero(~ok)
            if len(ask):
                ok[ask] = self.oracle.gains_of(*_take(prof, part[ask]), self.cov, t) >= self.thr
            if not ok.any():  # none pickable at t + 1: all settle at levels <= t
                settled[part], hi[part] = True, t + 1
                pos += chunk
                chunk = min(2 * chunk, 4096)
                continue
            p = int(np.argmax(ok))
            u = int(part[p])
            self._choose(int(order[u]))
            picked[u] = settled[u] = True
            fail = part[~ok]  # before the pick all failed; after it, those that failed
            settled[fail], hi[fail] = True, t + 1
            lo[part[p + 1:][ok[p + 1:]]] = t + 1
            pos = u + 1
            chunk = max(8, 2 * (p + 1))
        # the rest (S full, or scanned past the end) keep hi = k + 1: their level is at most k
        lo[picked], hi[picked] = 0, 1  # placed by _choose; no search
        levels = self._levels(prof, lo, hi)
        self._place(order[~picked], levels[~picked])

    # -- audit (tests) ----------------------------------------------------------------------------

    def check(self, live_rows: np.ndarray) -> None:
        """Recompute everything by brute force and assert the structure matches it."""
        k, thr, t = self.k, self.thr, self.top
        members = np.flatnonzero(self.level >= 0)
        assert set(members.tolist()) <= set(live_rows.tolist()), "a deleted element is still a member"
        assert self.size == len(members)
        assert np.array_equal(self.count_at, np.bincount(self.level[members], minlength=k + 2))
        assert np.all(self.level[members] >= 1), "a member below level 1 (routing guarantees f({s}) >= thr)"
        assert 0 <= t <= k, "|S| > k"
        cov = np.zeros(self.oracle.n_columns, np.float32)
        value = 0.0
        for i in range(1, t + 1):
            u = self.chosen[i]
            assert u >= 0 and self.level[u] == i, f"u_{i} is not in R_{i} \\ R_{i+1}"
            assert np.array_equal(self.cov[i - 1], cov), f"coverage of S_{i - 1} is stale"
            r_i = members[self.level[members] >= i]
            g = self.oracle.gains(r_i, cov)
            assert np.all(g >= thr), f"an element of R_{i} is not pickable at level {i}"
            value += self.oracle.gains(np.array([u]), cov)[0]
            add_to_coverage(cov, self.table.clients[u], self.table.weights[u])
            # elements not in R_i but in R_{i-1} must fail at level i
            below = members[self.level[members] == i - 1] if i > 1 else np.empty(0, np.int64)
            below = below[below != self.chosen[i - 1]]  # u_{i-1} itself is in S_{i-1}, not a candidate
            if len(below):
                assert np.all(self.oracle.gains(below, self.cov[i - 1]) < thr), f"R_{i} misses elements"
        if t < k:
            at_top = members[self.level[members] == t]
            at_top = at_top[at_top != self.chosen[t]]
            if len(at_top):
                assert np.all(self.oracle.gains(at_top, cov) < thr), "R_{top+1} should be empty"
        assert np.all(self.chosen[t + 1:] == -1)
        assert math.isclose(value, self.prefix_value[t], rel_tol=1e-5, abs_tol=1e-6)


class DynamicSelector(Selector):
    """Fully dynamic (1/2 - eps)-approximate selection under insertions and deletions.

    Args:
        objective: the monotone submodular objective (e.g. FacilityLocation(references, m=16)).
        k: most elements in the solution.
        eps: accuracy: OPT guesses are (1 + eps)^j; the guarantee is f(S) >= (1/2 - eps) OPT at every step.
        seed: seed of this selector's RNG (the uniform choices and rebuild orders).
    """

    method = "dynamic"

    def __init__(self, objective: Objective, k: int = 64, eps: float = 0.2, seed: int = 0,
                 refine: bool = True, dormant_low_guesses: bool = True):
        super().__init__(objective, k, seed)
        self.refine = bool(refine)
        self.dormant_low_guesses = bool(dormant_low_guesses)
        self.routed: dict[int, int] = {}  # guess j -> live elements routed to it
        self._answer: tuple[np.ndarray, float] | None = None  # cached read-out, dropped on update
        self.readout_queries = 0
        self._last_rows = np.empty(0, np.int64)
        if not 0 < eps < 0.5:
            raise ValueError("eps must lie in (0, 0.5)")
        self.eps = float(eps)
        self._log_base = math.log1p(eps)
        self.instances: dict[int, _Instance] = {}
        self.rebuilds = np.zeros(k + 2, np.int64)  # rebuilds by the level they start from
        self.guess_lo = np.zeros(self.table.capacity, np.int32)  # instance range [lo, hi] per row
        self.guess_hi = np.full(self.table.capacity, -1, np.int32)

    def params(self) -> dict:
        return {"k": self.k, "eps": self.eps, "seed": self.seed, "refine": self.refine,
                "dormant_low_guesses": self.dormant_low_guesses}

    def _tau(self, j: np.ndarray | int):
        return np.power(1.0 + self.eps, j)

    def _guess_range(self, single: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Instances j with tau_j / (2k) <= f({s}) <= tau_j (empty range when f({s}) = 0)."""
        pos = single > 0
        s = np.where(pos, single, 1.0)
        lo = np.ceil(np.log(s) / self._log_base).astype(np.int64)
        hi = np.floor(np.log(2 * self.k * s) / self._log_base).astype(np.int64)
        # settle floating-point ties with the same tau the instances use
        lo = np.where(self._tau(lo - 1) >= s, lo - 1, lo)
        lo = np.where(self._tau(lo) < s, lo + 1, lo)
        hi = np.where(self._tau(hi + 1) / (2 * self.k) <= s, hi + 1, hi)
        hi = np.where(self._tau(hi) / (2 * self.k) > s, hi - 1, hi)
        return np.where(pos, lo, 1), np.where(pos, hi, 0)

    def _inserted(self, rows: np.ndarray) -> None:
        self._answer = None
        cap = self.table.capacity
        if len(self.guess_lo) < cap:
            extra = cap - len(self.guess_lo)
            self.guess_lo = np.concatenate([self.guess_lo, np.zeros(extra, np.int32)])
            self.guess_hi = np.concatenate([self.guess_hi, np.full(extra, -1, np.int32)])
            for inst in self.instances.values():
                inst.ensure_capacity(cap)
        prof = self.table.profiles_of(rows)  # gathered once for every instance
        lo, hi = self._guess_range(self.oracle.gains_of(*prof, np.zeros(self.oracle.n_columns, np.float32)))
        self.guess_lo[rows], self.guess_hi[rows] = lo, hi
        for j in self._guesses_of(lo, hi):
            mask = (lo <= j) & (j <= hi)
            mine = rows[mask]
            self.routed[j] = self.routed.get(j, 0) + len(mine)
            if j in self.instances and len(mine):
                self.instances[j].insert(mine, tuple(np.compress(mask, x, axis=0) for x in prof))
            # a guess with no instance yet is built (or left dormant) by _refresh_guesses
        self._refresh_guesses()

    def _deleting(self, rows: np.ndarray) -> None:
        self._answer = None
        lo, hi = self.guess_lo[rows], self.guess_hi[rows]
        for j in self._guesses_of(lo, hi):
            mine = rows[(lo <= j) & (j <= hi)]
            self.routed[j] -= len(mine)
            if self.routed[j] == 0:
                del self.routed[j]
            inst = self.instances.get(j)
            if inst is not None:
                inst.delete(mine)
                if inst.size == 0:
                    del self.instances[j]
        self.guess_hi[rows] = -1
        self.guess_lo[rows] = 0

    def _deleted(self) -> None:
        self._refresh_guesses()

    @staticmethod
    def _guesses_of(lo: np.ndarray, hi: np.ndarray) -> range:
        routed = hi >= lo
        if not routed.any():
            return range(0)
        return range(int(lo[routed].min()), int(hi.max()) + 1)

    def _refresh_guesses(self) -> None:
        """Keep an instance for every guess tau_j >= b / (1+eps)^2, b the best value found; with
        `dormant_low_guesses`, drop instances below b / (1+eps)^3 (hysteresis against flapping).

        Why this is safe: b is the value of a feasible set, so OPT >= b and the guess that carries the
        guarantee, tau* in [OPT, (1+eps) OPT), is always kept. Why it pays: guesses far below OPT fill
        S with k barely-filtered elements and almost every element climbs all k levels there, so they
        cost the most rebuild work while never holding the answer. The price: a guess woken up after b
        falls is built from scratch (O(|V_j| log k) queries), so an adversary alternately inserting and
        deleting one dominant element could force that every few updates."""
        if not self.dormant_low_guesses:
            wake = [j for j in self.routed if j not in self.instances]
        else:
            b = max((i.value() for i in self.instances.values()), default=0.0)
            wake = [j for j in self.routed if j not in self.instances and self._tau(j) * (1 + self.eps) ** 2 >= b]
        if wake:
            live = self.table.live
            for j in sorted(wake):
                inst = self.instances[j] = _Instance(float(self._tau(j)), self.k, self.table, self.oracle,
                                                     self.rng, self.rebuilds)
                members = np.flatnonzero(live & (self.guess_lo[: len(live)] <= j) & (j <= self.guess_hi[: len(live)]))
                self.rebuilds[1] += 1
                inst.build(members)
        if self.dormant_low_guesses and self.instances:
            b = max(i.value() for i in self.instances.values())
            # the instance holding b stays whatever its tau: dropping it would lower b and could put
            # guesses below the wake line (tau (1+eps)^2 >= b) without an instance
            for j in [j for j, inst in self.instances.items()
                      if self._tau(j) * (1 + self.eps) ** 3 < b and inst.value() < b]:
                del self.instances[j]

    def _best(self) -> _Instance | None:
        if not self.instances:
            return None
        return max(self.instances.values(), key=_Instance.value)

    def _read_out(self) -> tuple[np.ndarray, float]:
        if self._answer is None:
            best = self._best()
            if best is None:
                self._answer = (np.empty(0, np.int64), 0.0)
            else:
                self._answer = (best.solution_rows().copy(), best.value())
                if self.refine and len(self.instances) > 1:
                    before = self.oracle.queries
                    # the pool: every instance's solution, plus what survives of the last answer
                    kept = self._last_rows[self.table.live[self._last_rows]]
                    pool = np.unique(np.concatenate([kept] + [i.solution_rows() for i in self.instances.values()]))
                    rows, value = lazy_greedy(self.oracle, pool, self.k)
                    self.readout_queries += self.oracle.queries - before
                    if value > self._answer[1]:
                        self._answer = (rows, value)
            self._last_rows = self._answer[0]
        return self._answer

    def _solution_rows(self) -> np.ndarray:
        return self._read_out()[0]

    def value(self) -> float:
        return self._read_out()[1]

    def stats(self) -> dict:
        out = super().stats()
        best = self._best()
        out.update({
            "instances_alive": len(self.instances),
            "guesses_dormant": len(set(self.routed) - set(self.instances)),
            "rebuilds_per_level": {int(i): int(c) for i, c in enumerate(self.rebuilds) if c},
            "rebuilds": int(self.rebuilds.sum()),
            "readout_queries": self.readout_queries,
            "update_queries": self.oracle.queries - self.readout_queries,
            "best_tau": None if best is None else best.tau,
            "best_instance_size": 0 if best is None else best.top,
        })
        return out

    def check_invariants(self) -> None:
        """Assert every instance's structure (R_i nesting, u_i in R_i, |S| <= k, levels, values, routing)
        against a brute-force recomputation. Slow; for tests."""
        live = self.table.live_rows()
        before = self.oracle.queries
        single = self.oracle.singletons(live)
        lo, hi = self._guess_range(single)
        assert np.array_equal(lo[hi >= lo], self.guess_lo[live][hi >= lo])
        assert np.array_equal(hi, self.guess_hi[live])
        for j, inst in self.instances.items():
            expect = live[(lo <= j) & (j <= hi)]
            assert np.array_equal(np.flatnonzero(inst.level >= 0), np.sort(expect)), f"routing of instance {j}"
            inst.check(live)
        routed = hi >= lo
        count: dict[int, int] = {}
        for a, b in zip(lo[routed].tolist(), hi[routed].tolist()):
            for j in range(a, b + 1):
                count[j] = count.get(j, 0) + 1
        assert count == self.routed, "routed counts are stale"
        assert set(self.instances) <= set(count), "an instance without elements"
        best = max((i.value() for i in self.instances.values()), default=0.0)
        must = {j for j in count if not self.dormant_low_guesses or self._tau(j) * (1 + self.eps) ** 2 >= best}
        assert must <= set(self.instances), f"guesses {sorted(must - set(self.instances))} lack an instance"
        self.oracle.queries = before  # auditing is not the algorithm's work
