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
{u_1..u_i}. An element is *pickable at level i* if i <= k and f(s | S_{i-1}) >= thr; pickability is
monotone in i (S only grows, gains only shrink), so R_i = {s : s pickable at level i} nest. The
invariant: u_i is uniformly random in R_i (given S_{i-1}). The top t = |S|; R_{t+1} is empty unless
t = k (an element pickable above the top would have become u_{t+1}).

**Uniform choices through random keys.** Every element draws a uniform key once per instance, when it
joins the instance (independent across instances: shared keys would make every instance prefer the same
elements, and the read-out pool of their solutions less diverse). Each instance keeps u_i = the element
of R_i with the smallest key. Keys are i.i.d. and hidden from the (oblivious) update sequence, so u_i
is uniform in R_i, and the structure is exactly what a rebuild over a fresh uniformly random order
produces -- the same distribution as the walk with coins of probability 1/|R_i| described in
ALGORITHMS.md, which it implements. Since u_{i+1} is in R_i and u_i is R_i's smallest key, the u's keys
increase with i. What the keys buy: an element whose key is above u_i's can never be u_i, so

* **insert s** needs one query at most: with l = the first level whose u has a larger key than s, s
  changes the structure iff it is pickable at level l (then it is the new u_l and the levels above are
  rebuilt); if l = k + 1 (S full, key above every u) nothing is asked at all;
* **delete s** changes nothing unless s = u_i; then level i is rebuilt;
* **rebuild from level j** scans the members in key order from u_{j-1}'s key, asking each whether it
  is pickable at the current top + 1: the first that is becomes the next u. The scan stops when S is
  full, so it reads only the members whose key is below u_k's (a small fraction when R_i are large),
  not all of R_j: an element's exact level is never needed, only where it stands against the u's.

A failed test is remembered (`fail_at[s] = l`: s is not pickable at level l, i.e. against S_{l-1})
while S_{l-1} stands, so a rescan skips what it already knows (and, by monotonicity, s fails at every
level above l too). A batch of inserts is applied at once: every new element is tested against the
unchanged structure, and the lowest level any of them takes over (the smallest key among those that
pass there) is rebuilt, once. Expected queries per update: the insert's single test, plus rebuilds
triggered with probability 1/|R_i| per level that cost about the members scanned between u_i's and
u_k's keys.

**Re-drawing keys.** Persistent keys make an instance's solution move only when an update forces a
rebuild, which starves the read-out's refinement (lazy greedy over all instances' solutions) of new
candidates. So, on a budget (`rekey_share`), one instance at a time draws all-new keys and is rebuilt:
a fresh sample, independent of the old one, so the uniform-choice invariant is untouched.
"""

from __future__ import annotations

import math

import numpy as np

from sponge.selectors.base import Selector
from sponge.selectors.baselines import lazy_greedy
from sponge.selectors.kernels import merge_by_key, scan_levels
from sponge.selectors.objectives import (
    CountingOracle,
    ElementTable,
    Objective,
    add_to_coverage,
)

Profile = tuple[np.ndarray, np.ndarray, np.ndarray]  # (clients, weights, bonus) of some elements


def sorted_uniforms(rng: np.random.Generator, n: int) -> np.ndarray:
    """n i.i.d. uniform(0, 1) draws in increasing order, in O(n): the partial sums of n + 1
    exponential spacings over their total (the order statistics of uniforms, exactly)."""
    spacings = rng.exponential(size=n + 1)
    return np.cumsum(spacings)[:-1] / spacings.sum()


def _take(prof: Profile, idx: np.ndarray) -> Profile:
    return tuple(np.take(x, idx, axis=0) for x in prof)


class _KeyOrder:
    """One instance's random key per member, and its members sorted by key."""

    def __init__(self, capacity: int):
        self.key = np.zeros(capacity)  # per row
        self.rows = np.empty(0, np.int64)  # live rows, by increasing key
        self.keys = np.empty(0)  # their keys

    def add(self, rows: np.ndarray, rng: np.random.Generator, capacity: int) -> None:
        """Draw each new row an i.i.d. uniform key and merge the rows into the key order."""
        if len(self.key) < capacity:
            self.key = np.concatenate([self.key, np.zeros(capacity - len(self.key))])
        # The keys are drawn already sorted (normalised exponential spacings) and dealt to the rows
        # in a random order: the same joint law as a key per row, without sorting the batch.
        dealt = rng.permutation(rows)
        keys = sorted_uniforms(rng, len(rows))
        self.key[dealt] = keys
        self.keys, self.rows = merge_by_key(self.keys, self.rows, keys, dealt)

    def remove(self, rows: np.ndarray) -> None:
        gone = np.zeros(len(self.key), bool)
        gone[rows] = True
        keep = ~gone[self.rows]
        self.rows, self.keys = self.rows[keep], self.keys[keep]


class _Instance:
    """The level structure for one guess tau of OPT."""

    def __init__(self, tau: float, k: int, table: ElementTable, oracle: CountingOracle,
                 rng: np.random.Generator, rebuilds: np.ndarray):
        self.tau, self.k, self.thr = tau, k, tau / (2 * k)
        self.table, self.oracle, self.rng, self.rebuilds = table, oracle, rng, rebuilds
        self.order = _KeyOrder(table.capacity)
        self.member = np.zeros(table.capacity, bool)  # routed to this instance
        self.fail_at = np.zeros(table.capacity, np.int16)  # l > 0: known not pickable at level l; 0: unknown
        self.size = 0
        self.top = 0
        self.chosen = np.full(k + 1, -1, np.int64)  # chosen[i] = row of u_i, i = 1..top
        self.chosen_key = np.full(k + 1, -np.inf)  # their keys (chosen_key[0] = -inf)
        self.prefix_value = np.zeros(k + 1)  # f(S_i)
        self.cov = np.zeros((min(k, 8) + 1, oracle.n_columns), np.float32)  # cov[i] = coverage of S_i

    # -- small helpers ----------------------------------------------------------------------------

    def ensure_capacity(self, capacity: int) -> None:
        if len(self.member) < capacity:
            extra = capacity - len(self.member)
            self.member = np.concatenate([self.member, np.zeros(extra, bool)])
            self.fail_at = np.concatenate([self.fail_at, np.zeros(extra, np.int16)])

    def value(self) -> float:
        return float(self.prefix_value[self.top])

    def solution_rows(self) -> np.ndarray:
        return self.chosen[1: self.top + 1]

    def _choose(self, row: int) -> None:
        """u_{top+1} <- row (row is pickable at top + 1)."""
        t = self.top + 1
        if t >= len(self.cov):
            self._grow_cov()
        gain = self.oracle.gains(np.array([row]), self.cov[t - 1])[0]
        self.cov[t] = self.cov[t - 1]
        add_to_coverage(self.cov[t], self.table.clients[row], self.table.weights[row])
        self.prefix_value[t] = self.prefix_value[t - 1] + gain
        self.chosen[t] = row
        self.chosen_key[t] = self.order.key[row]
        self.top = t

    def _grow_cov(self) -> None:
        """Coverage rows are added as levels fill (k + 1 rows of |C| floats each can be large)."""
        grown = np.zeros((min(2 * len(self.cov), self.k + 1), self.cov.shape[1]), np.float32)
        grown[: len(self.cov)] = self.cov
        self.cov = grown

    def _truncate(self, t: int) -> None:
        """Keep S_t; forget the failed tests made against the prefixes that go (S_t and below stay,
        so a test at level <= t + 1 stays valid)."""
        self.chosen[t + 1:] = -1
        self.chosen_key[t + 1:] = -np.inf
        self.top = t
        stale = self.fail_at > t + 1
        self.fail_at[stale] = 0

    # -- insert -----------------------------------------------------------------------------------

    def insert(self, rows: np.ndarray, prof: Profile) -> None:
        """Insert a batch of rows, each with f({s}) >= thr (pickable at level 1). One test per row at
        most: at l = the first level whose u has a larger key (none is asked when l = k + 1)."""
        if len(rows) == 0:
            return
        self._join(rows)
        t = self.top
        keys = self.order.key[rows]
        lv = np.searchsorted(self.chosen_key[1: t + 1], keys) + 1  # keys increase with the level
        ok = lv == 1  # pickable at level 1: known from the routing
        ask = np.flatnonzero((lv > 1) & (lv <= min(t + 1, self.k)))
        if len(ask):
            ok[ask] = self.oracle.gains_of(*_take(prof, ask), self.cov, lv[ask] - 1) >= self.thr
            failed = ask[~ok[ask]]
            self.fail_at[rows[failed]] = lv[failed]
        if not ok.any():
            return
        j = int(lv[ok].min())
        cand = np.flatnonzero(ok & (lv == j))
        new_u = int(rows[cand[np.argmin(keys[cand])]])  # the smallest key pickable at j: u_j
        self.rebuilds[j] += 1
        self._truncate(j - 1)
        self._choose(new_u)
        self._extend()

    def build(self, rows: np.ndarray) -> None:
        """Build the structure from scratch over rows (all pickable at level 1)."""
        self._join(rows)
        self._extend()

    def rekey(self) -> None:
        """Draw every member a fresh key and rebuild from level 1: a new sample of the structure,
        independent of the old one (so anything may trigger it without biasing the uniform choices)."""
        members = self.rng.permutation(self.order.rows)
        keys = sorted_uniforms(self.rng, len(members))
        self.order.rows, self.order.keys = members, keys
        self.order.key[members] = keys
        self.rebuilds[1] += 1
        self._truncate(0)
        self._extend()

    def _join(self, rows: np.ndarray) -> None:
        self.member[rows] = True
        self.size += len(rows)
        self.order.add(rows, self.rng, self.table.capacity)

    # -- delete -----------------------------------------------------------------------------------

    def delete(self, rows: np.ndarray) -> None:
        """Remove rows (all members); rebuild from the lowest level whose u was deleted."""
        self.member[rows] = False
        self.fail_at[rows] = 0
        self.size -= len(rows)
        self.order.remove(rows)
        hit = np.flatnonzero(np.isin(self.chosen[1: self.top + 1], rows))
        if len(hit) == 0:
            return
        j = int(hit[0]) + 1
        self.rebuilds[j] += 1
        self._truncate(j - 1)
        self._extend()

    # -- rebuild ----------------------------------------------------------------------------------

    def _extend(self) -> None:
        """Scan the members with keys above u_top's in key order; each one pickable at top + 1 becomes
        the next u, until S is full or the members run out (kernels.scan_levels, one compiled pass;
        a member known to fail at top + 1 is skipped without a query)."""
        order = self.order
        pos = int(np.searchsorted(order.keys, self.chosen_key[self.top], side="right"))
        table = self.table
        while True:
            top, pos, queries = scan_levels(order.rows, pos, self.fail_at, table.clients, table.weights,
                                            table.bonus, self.cov, self.prefix_value, self.chosen,
                                            self.top, self.k, self.thr)
            self.oracle.queries += queries
            if top > self.top:
                self.chosen_key[self.top + 1: top + 1] = order.key[self.chosen[self.top + 1: top + 1]]
                self.top = top
            if top < self.k and pos < len(order.rows) and top + 1 >= len(self.cov):
                self._grow_cov()   # the kernel stopped for want of a row for the next level
                continue
            return

    # -- audit (tests) ----------------------------------------------------------------------------

    def check(self, live_rows: np.ndarray) -> None:
        """Recompute everything by brute force and assert the structure matches it: u_i is the
        smallest-key element of R_i (so u_i in R_i), R_{top+1} is empty when |S| < k, remembered
        failures are true, the prefix coverages and values are right."""
        k, thr, t = self.k, self.thr, self.top
        members = np.flatnonzero(self.member)
        assert set(members.tolist()) <= set(live_rows.tolist()), "a deleted element is still a member"
        assert np.array_equal(np.sort(self.order.rows), members), "key order out of step with the members"
        assert np.all(np.diff(self.order.keys) >= 0)
        assert np.array_equal(self.order.keys, self.order.key[self.order.rows])
        assert self.size == len(members)
        assert 0 <= t <= k, "|S| > k"
        key = self.order.key
        cov = np.zeros(self.oracle.n_columns, np.float32)
        value = 0.0
        rest = members.copy()  # members not in S_{i-1}
        for i in range(1, t + 1):
            u = self.chosen[i]
            assert u >= 0 and self.member[u], f"u_{i} is not a member"
            assert np.array_equal(self.cov[i - 1], cov), f"coverage of S_{i - 1} is stale"
            assert self.chosen_key[i] == key[u]
            g = self.oracle.gains(rest, cov)
            r_i = rest[g >= thr]
            assert len(r_i) and u == r_i[np.argmin(key[r_i])], f"u_{i} is not the smallest key of R_{i}"
            value += self.oracle.gains(np.array([u]), cov)[0]
            add_to_coverage(cov, self.table.clients[u], self.table.weights[u])
            rest = rest[rest != u]
        if t < k and len(rest):
            assert np.all(self.oracle.gains(rest, cov) < thr), "R_{top+1} should be empty"
        assert np.all(self.chosen[t + 1:] == -1)
        fa = self.fail_at[members]
        assert np.all(fa <= t + 1), "a remembered failure above top + 1"
        for lvl in np.unique(fa[fa > 0]).tolist():
            rows = members[fa == lvl]
            assert np.all(self.oracle.gains(rows, self.cov[lvl - 1]) < thr), f"a wrong failure at level {lvl}"
        assert math.isclose(value, self.prefix_value[t], rel_tol=1e-5, abs_tol=1e-6)


class DynamicSelector(Selector):
    """Fully dynamic (1/2 - eps)-approximate selection under insertions and deletions.

    Args:
        objective: the monotone submodular objective (e.g. FacilityLocation(references, m=16)).
        k: most elements in the solution.
        eps: accuracy: OPT guesses are (1 + eps)^j; the guarantee is f(S) >= (1/2 - eps) OPT at every step.
        seed: seed of this selector's RNG (the random keys that make the uniform choices).
        refine: read out lazy greedy over the pool of every instance's solution (and what survives of
            the last answer) when it beats the best instance; its queries are counted apart.
        refine_singletons: the read-out pool also gets this many times k live elements of highest
            f({s}): the candidates the instances of high guesses would have offered when those sleep
            (`dormant_high_guesses`), for one O(n) selection per read-out.
        dormant_low_guesses: keep no instance for guesses far below the best value found (see
            `_refresh_guesses`); they never hold the answer and cost the most.
        dormant_high_guesses: keep no instance for guesses far above an upper bound on OPT that a
            non-full instance certifies (see `_opt_upper_bound`); they cannot be the guess that
            carries the guarantee, and with S never full each of their rebuilds scans every member.
        rekey_share: re-draw one instance's keys (a scan of about its size in queries) each time the
            updates have spent size / rekey_share queries since the last re-draw (see `_maybe_rekey`).
            For read-out quality, not the guarantee; 0 turns it off: 15-35% more updates/s in the
            service pattern, f/f(lazy greedy) 1-2 points lower at n = 10^5.
    """

    method = "dynamic"

    def __init__(self, objective: Objective, k: int = 64, eps: float = 0.2, seed: int = 0,
                 refine: bool = True, refine_singletons: int = 2, dormant_low_guesses: bool = True,
                 dormant_high_guesses: bool = True, rekey_share: float = 0.5):
        super().__init__(objective, k, seed)
        self.rekey_share = float(rekey_share)
        self._rekey_at = -10**9  # the guess re-drawn last
        self._rekey_mark = 0  # update queries when it was
        self.refine = bool(refine)
        self.refine_singletons = int(refine_singletons)
        self.dormant_low_guesses = bool(dormant_low_guesses)
        self.dormant_high_guesses = bool(dormant_high_guesses)
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
        self.single = np.zeros(self.table.capacity)  # f({s}) per row

    def params(self) -> dict:
        return {"k": self.k, "eps": self.eps, "seed": self.seed, "refine": self.refine,
                "refine_singletons": self.refine_singletons, "dormant_low_guesses": self.dormant_low_guesses,
                "dormant_high_guesses": self.dormant_high_guesses, "rekey_share": self.rekey_share}

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
            self.single = np.concatenate([self.single, np.zeros(extra)])
            for inst in self.instances.values():
                inst.ensure_capacity(cap)
        prof = self.table.profiles_of(rows)  # gathered once for every instance
        single = self.oracle.gains_of(*prof, np.zeros(self.oracle.n_columns, np.float32))
        self.single[rows] = single
        lo, hi = self._guess_range(single)
        self.guess_lo[rows], self.guess_hi[rows] = lo, hi
        for j in self._guesses_of(lo, hi):
            mask = (lo <= j) & (j <= hi)
            mine = rows[mask]
            self.routed[j] = self.routed.get(j, 0) + len(mine)
            if j in self.instances and len(mine):
                self.instances[j].insert(mine, tuple(np.compress(mask, x, axis=0) for x in prof))
            # a guess with no instance yet is built (or left dormant) by _refresh_guesses
        self._refresh_guesses()
        self._maybe_rekey()

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
        self._maybe_rekey()

    def _maybe_rekey(self) -> None:
        """Spend about `rekey_share` of the update work on re-drawing whole instances (round robin).

        Why: an instance's keys are drawn once, so between the rebuilds its updates force, its solution
        barely moves, and the read-out (lazy greedy over the instances' solutions plus the last answer)
        keeps seeing the same few hundred elements. A re-draw is a fresh sample, as valid as the old
        one, and feeds the read-out new candidates; it costs one scan of the instance's members."""
        spent = self.oracle.queries - self.readout_queries - self._rekey_mark
        if self.rekey_share <= 0 or not self.instances:
            return
        js = sorted(self.instances)
        nxt = next((j for j in js if j > self._rekey_at), js[0])
        if spent * self.rekey_share < self.instances[nxt].size:
            return
        self._rekey_at = nxt
        self.instances[nxt].rekey()
        self._rekey_mark = self.oracle.queries - self.readout_queries
        self._refresh_guesses()   # the new sample's value may lower the best value b: wake guesses

    @staticmethod
    def _guesses_of(lo: np.ndarray, hi: np.ndarray) -> range:
        routed = hi >= lo
        if not routed.any():
            return range(0)
        return range(int(lo[routed].min()), int(hi.max()) + 1)

    def _refresh_guesses(self) -> None:
        """Keep an instance for every guess that may carry the guarantee; with the dormant options,
        none for guesses far from it on either side (hysteresis against flapping):

        * low: keep tau_j >= b / (1+eps)^2, b the best value found; drop below b / (1+eps)^3.
          b is the value of a feasible set, so OPT >= b and the guess that carries the guarantee,
          tau* in [OPT, (1+eps) OPT), is always kept. Guesses far below OPT fill S with k
          barely-filtered elements and almost every element climbs all k levels there.
        * high: keep tau_j <= (1+eps) U, U an upper bound on OPT (`_opt_upper_bound`); drop above
          (1+eps)^3 U (U moves with every batch: a narrower band woke and rebuilt guesses often).
          tau* < (1+eps) OPT <= (1+eps) U, so it is kept. Guesses far above OPT never fill S, so
          every rebuild there scans all of their members. Their solutions did feed the read-out
          pool with high-gain elements; the pool's top singletons (`refine_singletons`) stand in.

        The price: a guess woken up after b falls or U rises is built from scratch (a key-order
        scan: up to |V_j| queries), so an adversary alternately inserting and deleting one dominant
        element could force that every few updates."""
        grow = 1 + self.eps
        b = max((i.value() for i in self.instances.values()), default=0.0)
        upper, _ = self._opt_upper_bound()

        def wanted(j: int) -> bool:
            tau = self._tau(j)
            return (not self.dormant_low_guesses or tau * grow ** 2 >= b) and tau <= grow * upper

        wake = [j for j in self.routed if j not in self.instances and wanted(j)]
        if wake:
            live = self.table.live
            for j in sorted(wake):
                inst = self.instances[j] = _Instance(float(self._tau(j)), self.k, self.table, self.oracle,
                                                     self.rng, self.rebuilds)
                members = np.flatnonzero(live & (self.guess_lo[: len(live)] <= j) & (j <= self.guess_hi[: len(live)]))
                self.rebuilds[1] += 1
                inst.build(members)
        if self.instances and (self.dormant_low_guesses or self.dormant_high_guesses):
            # New instances can only raise b and lower U, so what was woken covers the new lines too.
            # The instances holding b and U stay whatever their tau: dropping one would move its line
            # and could leave a guess inside it without an instance.
            holder_b = max(self.instances, key=lambda j: self.instances[j].value())
            b = self.instances[holder_b].value()
            upper, holder_u = self._opt_upper_bound()
            for j in [j for j in self.instances if j not in (holder_b, holder_u) and (
                    (self.dormant_low_guesses and self._tau(j) * grow ** 3 < b)
                    or self._tau(j) > grow ** 3 * upper)]:
                del self.instances[j]

    def _opt_upper_bound(self) -> tuple[float, int | None]:
        """(U, the guess whose instance gives it): U = min over certifying instances j of
        f(S_j) + tau_j / 2, an upper bound on OPT; (inf, None) without one, or with
        `dormant_high_guesses` off.

        A non-full instance (top < k) has no member pickable at top + 1: every member's gain on S_j
        is below thr_j = tau_j / (2k). So are the gains of elements routed below it (f({s}) <
        thr_j). If no live element is routed only above j (guess_lo > j, i.e. f({s}) > tau_j), that
        covers every element, and by submodularity OPT <= f(S_j) + sum_{o in OPT} f(o | S_j)
        < f(S_j) + k thr_j. Such j certify the bound; the rest do not."""
        live = self.table.live
        routed = live & (self.guess_hi[: len(live)] >= self.guess_lo[: len(live)])
        if not self.dormant_high_guesses or not routed.any():
            return math.inf, None
        highest_lo = int(self.guess_lo[: len(live)][routed].max())
        bounds = [(inst.value() + inst.tau / 2, j) for j, inst in self.instances.items()
                  if inst.top < self.k and j >= highest_lo]
        return min(bounds, default=(math.inf, None))

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
                    pool = np.unique(np.concatenate([kept, self._top_singletons()]
                                                    + [i.solution_rows() for i in self.instances.values()]))
                    rows, value = lazy_greedy(self.oracle, pool, self.k)
                    self.readout_queries += self.oracle.queries - before
                    if value > self._answer[1]:
                        self._answer = (rows, value)
            self._last_rows = self._answer[0]
        return self._answer

    def _top_singletons(self) -> np.ndarray:
        """The `refine_singletons` * k live rows of highest f({s}) (for the read-out pool)."""
        live = self.table.live_rows()
        m = min(self.refine_singletons * self.k, len(live))
        if m == 0:
            return np.empty(0, np.int64)
        return live[np.argpartition(-self.single[live], m - 1)[:m]]

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
        """Assert every instance's structure (u_i the smallest key of R_i, |S| <= k, values, routing)
        against a brute-force recomputation. Slow; for tests."""
        live = self.table.live_rows()
        before = self.oracle.queries
        single = self.oracle.singletons(live)
        lo, hi = self._guess_range(single)
        assert np.array_equal(lo[hi >= lo], self.guess_lo[live][hi >= lo])
        assert np.array_equal(hi, self.guess_hi[live])
        for j, inst in self.instances.items():
            expect = live[(lo <= j) & (j <= hi)]
            assert np.array_equal(np.flatnonzero(inst.member), np.sort(expect)), f"routing of instance {j}"
            inst.check(live)
        routed = hi >= lo
        count: dict[int, int] = {}
        for a, b in zip(lo[routed].tolist(), hi[routed].tolist()):
            for j in range(a, b + 1):
                count[j] = count.get(j, 0) + 1
        assert count == self.routed, "routed counts are stale"
        assert set(self.instances) <= set(count), "an instance without elements"
        best = max((i.value() for i in self.instances.values()), default=0.0)
        upper, _ = self._opt_upper_bound()
        must = {j for j in count if (not self.dormant_low_guesses or self._tau(j) * (1 + self.eps) ** 2 >= best)
                and self._tau(j) <= (1 + self.eps) * upper}
        assert must <= set(self.instances), f"guesses {sorted(must - set(self.instances))} lack an instance"
        # the bound is a bound: no feasible set the instances know beats it
        assert best <= upper * (1 + 1e-9), f"best value {best} above the certified upper bound {upper}"
        self.oracle.queries = before  # auditing is not the algorithm's work
