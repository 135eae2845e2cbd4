"""Rollout ids (strings) to the selector's dense int64 ids and back, without per-row Python objects.

The selector works on int64 ids; the store and the API on rollout_id strings. A dict per direction
costs a few hundred bytes and a Python loop step per rollout, and a scan of every key to find the
stale ones; at 10^6 live rollouts that is hundreds of MiB and a second per policy report. Here:

* int ids are handed out in arrival order, so int -> string is a `take` from the Arrow chunks of
  the strings as they arrived, and per-int facts (alive, policy version) are numpy arrays;
* string -> int goes through two 64-bit hashes of each string (DuckDB's `hash`, vectorised), kept
  sorted for `searchsorted`. A wrong answer needs both hashes of two different ids to collide
  (about 2^-128 per pair); a collision of the first alone makes a known id look unknown.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class RolloutIdMap:
    """rollout_id <-> int64 for one selector's lifetime (a new selector starts a new map).

    A long-running service forgets millions of ids (retention evicts them), so forgotten ones are
    compacted away once they outnumber the live ones (and `compact_min`): their hash pairs are
    dropped, their strings freed, and the per-int facts (alive, version) of the forgotten ints below
    the oldest live one are cut off. After that a forgotten id looks unknown to `lookup`/`assign`
    and `strings` gives None for its int. Ints are never reused, so the map's size follows the live
    ints' span: bounded when retention evicts in arrival order, as it does."""

    def __init__(self, compact_min: int = 65_536) -> None:
        self.compact_min = compact_min
        self._hasher = duckdb.connect(":memory:")   # this map's own: connections are not thread-safe
        self._chunks: list[pa.Array] = []           # the strings of ints _base, _base + 1, ...
        self._strings: pa.ChunkedArray | None = None
        self._h1 = np.empty(0, np.uint64)           # sorted by h1 ...
        self._h2 = np.empty(0, np.uint64)
        self._int = np.empty(0, np.int64)           # ... with each hash pair's int id
        self._base = 0                              # every int below this one is forgotten
        self._alive = np.empty(0, bool)             # per int from _base: still in the selector
        self._version = np.empty(0, np.int64)       # per int from _base: the rollout's policy_version
        self._live = 0

    def __len__(self) -> int:
        return self._live

    @property
    def next_int(self) -> int:
        """The int the next new id gets."""
        return self._base + len(self._alive)

    def _hash(self, ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        return _hash_pairs(self._hasher, ids)

    def lookup(self, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """The int id of each string, -1 where it was never assigned (or forgotten and compacted)."""
        ids = _as_array(ids)
        if len(ids) == 0:
            return np.full(0, -1, np.int64)
        return self._find(*self._hash(ids))

    def _find(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        out = np.full(len(h1), -1, np.int64)
        if len(self._h1) == 0:
            return out
        pos = np.minimum(np.searchsorted(self._h1, h1), len(self._h1) - 1)
        hit = (self._h1[pos] == h1) & (self._h2[pos] == h2)
        out[hit] = self._int[pos[hit]]
        return out

    def assign(self, ids: pa.Array | pa.ChunkedArray, versions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Int ids for the strings not assigned before: (mask of those, their new consecutive ints)."""
        ids = _as_array(ids)
        first = self.next_int
        if len(ids) == 0:
            return np.zeros(0, bool), np.arange(first, first, dtype=np.int64)
        h1, h2 = self._hash(ids)
        new = self._find(h1, h2) < 0
        if not new.all():
            ids, h1, h2, versions = ids.filter(pa.array(new)), h1[new], h2[new], np.asarray(versions)[new]
        ints = np.arange(first, first + len(ids), dtype=np.int64)
        if len(ids) == 0:
            return new, ints
        order = np.argsort(h1, kind="stable")
        at = np.searchsorted(self._h1, h1[order])
        self._h1 = np.insert(self._h1, at, h1[order])
        self._h2 = np.insert(self._h2, at, h2[order])
        self._int = np.insert(self._int, at, ints[order])
        self._chunks.append(ids)
        self._strings = None
        self._alive = np.concatenate([self._alive, np.ones(len(ids), bool)])
        self._version = np.concatenate([self._version, np.asarray(versions, np.int64)])
        self._live += len(ids)
        return new, ints

    def is_alive(self, ints: np.ndarray) -> np.ndarray:
        """A mask: which of `ints` are assigned and not forgotten."""
        at = np.asarray(ints, np.int64) - self._base
        inside = (at >= 0) & (at < len(self._alive))
        out = np.zeros(len(at), bool)
        out[inside] = self._alive[at[inside]]
        return out

    def versions(self, ints: np.ndarray) -> np.ndarray:
        """The policy_version of each int (which must not be compacted away)."""
        return self._version[np.asarray(ints, np.int64) - self._base]

    def live_below(self, version: int) -> np.ndarray:
        """The live ints whose policy_version is below `version` (retention's victims)."""
        return np.flatnonzero(self._alive & (self._version < version)) + self._base

    def strings(self, ints: np.ndarray) -> pa.Array:
        """The rollout_id of each int id (None for one compacted away)."""
        if len(ints) == 0:
            return pa.array([], pa.string())
        if self._strings is None:
            self._strings = pa.chunked_array(self._chunks, pa.string())
        at = np.asarray(ints, np.int64) - self._base
        return self._strings.take(pa.array(at, mask=at < 0)).combine_chunks()

    def forget(self, ints: np.ndarray) -> None:
        """Mark ints as gone from the selector (ones already forgotten are ignored)."""
        ints = np.unique(np.asarray(ints, np.int64))
        ints = ints[self.is_alive(ints)]
        self._alive[ints - self._base] = False
        self._live -= len(ints)
        if len(self._h1) - self._live > max(self.compact_min, self._live):
            self._compact()

    def _compact(self) -> None:
        keep = self.is_alive(self._int)
        self._h1, self._h2, self._int = self._h1[keep], self._h2[keep], self._int[keep]
        cut = int(np.argmax(self._alive)) if self._live else len(self._alive)   # the oldest live int
        alive = self._alive[cut:]
        strings = pa.chunked_array(self._chunks, pa.string()).slice(cut).combine_chunks()
        self._chunks = [pc.if_else(pa.array(alive), strings, pa.scalar(None, pa.string()))]
        self._strings = None
        self._alive, self._version, self._base = alive.copy(), self._version[cut:].copy(), self._base + cut

    def close(self) -> None:
        self._hasher.close()


class RolloutIdSet:
    """A set of rollout ids as sorted hash pairs (16 bytes an id; a Python set of str costs ~100).

    The one id set of the package: the curator's explicit removals, and the store's exactly-once
    index. Each id may carry two int64 tags (the store keeps its run and policy_version) so that
    retention can drop a run's versions below a mark in one vectorised pass (`drop_below`).
    A false "member" needs both hashes of two ids to collide (about 2^-128 per pair)."""

    #: the version tag of an id that retention never drops (a tombstoned id)
    FOREVER = np.iinfo(np.int64).max

    def __init__(self) -> None:
        self._hasher = duckdb.connect(":memory:")
        self._h1 = np.empty(0, np.uint64)   # sorted by h1 ...
        self._h2 = np.empty(0, np.uint64)   # ... with each id's second hash
        self._run = np.empty(0, np.int64)   # ... and its tags
        self._version = np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self._h1)

    def hash(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """The hash pair of each id (for callers that test and then add the same batch)."""
        return _hash_pairs(self._hasher, _as_array(ids))

    def add(self, ids, run: int = 0, version: int = FOREVER, retag: bool = False) -> None:
        ids = _as_array(ids)
        if len(ids):
            self.add_hashed(*self.hash(ids), run=run, version=version, retag=retag)

    def add_hashed(self, h1: np.ndarray, h2: np.ndarray, run: int = 0, version: int = FOREVER,
                   retag: bool = False) -> None:
        """Add ids given as hash pairs, all with the same tags; ids already present keep theirs
        unless `retag` (a tombstone: the id is then kept FOREVER, whatever it was stored as)."""
        found = self._positions(h1, h2)
        if retag and (found >= 0).any():
            at = found[found >= 0]
            self._run[at], self._version[at] = run, version
        new = found < 0
        pairs = np.unique(np.stack([h1[new], h2[new]], axis=1), axis=0)   # sorted by h1; repeats once
        if len(pairs) == 0:
            return
        at = np.searchsorted(self._h1, pairs[:, 0])
        self._h1 = np.insert(self._h1, at, pairs[:, 0])
        self._h2 = np.insert(self._h2, at, pairs[:, 1])
        self._run = np.insert(self._run, at, run)
        self._version = np.insert(self._version, at, version)

    def contains(self, ids) -> np.ndarray:
        """A mask: which of `ids` are in the set."""
        ids = _as_array(ids)
        if len(ids) == 0 or len(self._h1) == 0:
            return np.zeros(len(ids), bool)
        return self.contains_hashed(*self.hash(ids))

    def contains_hashed(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        return self._positions(h1, h2) >= 0

    def _positions(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        """Where each hash pair is held (-1: not held)."""
        found = np.full(len(h1), -1, np.int64)
        if len(self._h1) == 0:
            return found
        # every entry with an equal h1 (a collision of the first hash alone must not hide an id)
        lo, hi = np.searchsorted(self._h1, h1, "left"), np.searchsorted(self._h1, h1, "right")
        for shift in range(int((hi - lo).max(initial=0))):   # almost always 0 or 1 rounds
            at = np.minimum(lo + shift, len(self._h1) - 1)
            hit = (lo + shift < hi) & (self._h2[at] == h2)
            found[hit] = at[hit]
        return found

    def count_below(self, run: int, version: int) -> int:
        """How many ids are tagged with `run` and a version below `version`."""
        return int(((self._run == run) & (self._version < version)).sum())

    def drop_below(self, run: int, version: int) -> int:
        """Forget the ids tagged with `run` and a version below `version`; returns how many."""
        drop = (self._run == run) & (self._version < version)
        n = int(drop.sum())
        if n:
            keep = ~drop
            self._h1, self._h2 = self._h1[keep], self._h2[keep]
            self._run, self._version = self._run[keep], self._version[keep]
        return n

    def close(self) -> None:
        self._hasher.close()


def first_occurrence(h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
    """True at the first row of each distinct hash pair within one batch."""
    if len(h1) < 2:
        return np.ones(len(h1), dtype=bool)
    _, first = np.unique(np.stack([h1, h2], axis=1), axis=0, return_index=True)
    mask = np.zeros(len(h1), dtype=bool)
    mask[first] = True
    return mask


def _hash_pairs(conn: duckdb.DuckDBPyConnection, ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes of each string (DuckDB's `hash`, vectorised)."""
    out = conn.from_arrow(pa.table({"id": ids})).select(
        "hash(id) AS h1, hash(concat('sponge:', id)) AS h2").fetchnumpy()
    return np.asarray(out["h1"], np.uint64), np.asarray(out["h2"], np.uint64)


def _as_array(ids) -> pa.Array:
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    elif not isinstance(ids, pa.Array):
        ids = pa.array(list(ids), pa.string())
    if ids.type != pa.string():
        ids = ids.cast(pa.string())
    return ids
