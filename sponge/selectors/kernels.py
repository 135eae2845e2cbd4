"""Compiled inner loops of the dynamic selector (numba), kept to the few that dominate its cost.

`scan_levels` is the rebuild scan of `_Instance._extend` (see dynamic.py): walk an instance's
members in key order and make each one pickable at top + 1 the next u. In numpy it had to be
done in chunks (a chunk's gains at once, then back to Python), which evaluates members after a
pick at the old top for nothing and pays numpy's per-call overhead and temporaries per chunk;
at 10^5 elements it was about half of the selector's time. Here it is one pass: per member one
gather of its m covered values, stopping as soon as S is full.

`merge_by_key` merges a batch of new members (already in key order) into an instance's key order
in one pass; `np.insert` at `searchsorted` positions took two passes and a sort per instance per batch.

Compiled on first use and cached on disk (`cache=True`); `nogil=True` so a selector running on
a thread of a service does not hold the interpreter while it scans.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def scan_levels(order_rows: np.ndarray, pos: int, fail_at: np.ndarray, clients: np.ndarray,
                weights: np.ndarray, bonus: np.ndarray, cov: np.ndarray, prefix_value: np.ndarray,
                chosen: np.ndarray, top: int, k: int, thr: float) -> tuple[int, int, int]:
    """Scan members order_rows[pos:] at the current top; returns (top, pos, queries) at the stop.

    For each member: skip it if a remembered failure says it is not pickable at top + 1
    (0 < fail_at <= top + 1: failing at a level means failing at every level above); else ask
    f(s | S_top) (one query). If >= thr it becomes u_{top+1}: cov[top+1] = max(cov[top], its
    profile), prefix_value and chosen are set. Else its failure at top + 1 is remembered.
    Stops when S is full (top = k), the members run out, or cov has no row for the next level
    (the caller grows cov and calls again from the returned pos).
    """
    queries = 0
    n = order_rows.shape[0]
    width = clients.shape[1]
    while pos < n and top < k:
        if top + 1 >= cov.shape[0]:
            break
        row = order_rows[pos]
        fa = fail_at[row]
        if fa > 0 and fa <= top + 1:
            pos += 1
            continue
        gain = 0.0   # float64 sum of float32 excesses, as marginal_gains
        for j in range(width):
            excess = weights[row, j] - cov[top, clients[row, j]]
            if excess > 0:
                gain += excess
        gain += bonus[row]
        queries += 1
        pos += 1
        if gain >= thr:
            nxt = top + 1
            cov[nxt, :] = cov[top, :]
            for j in range(width):
                c = clients[row, j]
                if weights[row, j] > cov[nxt, c]:
                    cov[nxt, c] = weights[row, j]
            prefix_value[nxt] = prefix_value[top] + gain
            chosen[nxt] = row
            top = nxt
        else:
            fail_at[row] = top + 1
    return top, pos, queries


@njit(cache=True, nogil=True)
def merge_by_key(keys: np.ndarray, rows: np.ndarray, new_keys: np.ndarray,
                 new_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge two key-sorted (keys, rows) sequences into one; a new key equal to an old one goes first."""
    n, m = keys.shape[0], new_keys.shape[0]
    out_keys = np.empty(n + m, keys.dtype)
    out_rows = np.empty(n + m, rows.dtype)
    i = j = 0
    for o in range(n + m):
        if j < m and (i == n or new_keys[j] <= keys[i]):
            out_keys[o], out_rows[o] = new_keys[j], new_rows[j]
            j += 1
        else:
            out_keys[o], out_rows[o] = keys[i], rows[i]
            i += 1
    return out_keys, out_rows


def warm_up() -> None:
    """Load (or compile) the kernels now with the argument types the selector passes, so the
    first real batch does not pay for it (about 0.5 s from the on-disk cache, seconds without)."""
    scan_levels(np.zeros(1, np.int64), 0, np.zeros(1, np.int16), np.zeros((1, 1), np.intp),
                np.zeros((1, 1), np.float32), np.zeros(1, np.float32), np.zeros((2, 2), np.float32),
                np.zeros(2), np.zeros(2, np.int64), 0, 1, 1.0)
    merge_by_key(np.zeros(1), np.zeros(1, np.int64), np.zeros(1), np.zeros(1, np.int64))
