"""Scale-out selection: shard selectors merged by greedy over the union of their solutions.

Each ingest process of a consumer group keeps a selector over its own partitions (a shard).
The global replay subset is lazy greedy over the union of the shard solutions, which is a
composable core-set (GreeDi, Mirzasoleiman et al. 2013): with k elements per shard the merge
keeps a constant fraction of what one selector over all data would find, at the cost of one
greedy pass over (shards × k) candidates instead of over every rollout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sponge.selectors import LazyGreedyRerun, Objective


def greedy_subset(objective: Objective, ids: np.ndarray, vectors: np.ndarray, k: int,
                  quality: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Lazy greedy for the best k of the given candidates; returns (chosen ids, f(chosen))."""
    selector = LazyGreedyRerun(objective, k=k)
    selector.insert(np.asarray(ids, dtype=np.int64), vectors, quality)
    return selector.solution(), float(selector.value())


def merge_shard_solutions(objective: Objective,
                          shards: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, float]:
    """Greedy over the union of shard solutions, each given as (int64 ids, vectors).

    An id that appears in several shards (it should not, partitions are disjoint) is kept once.
    """
    shards = [(np.asarray(ids, dtype=np.int64), np.asarray(vec, dtype=np.float32)) for ids, vec in shards if len(ids)]
    if not shards:
        return np.empty(0, np.int64), 0.0
    ids = np.concatenate([s[0] for s in shards])
    vectors = np.concatenate([s[1] for s in shards])
    ids, first = np.unique(ids, return_index=True)
    return greedy_subset(objective, ids, vectors[first], k)
