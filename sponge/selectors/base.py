"""The Selector interface every selection method implements, and the bookkeeping they share.

A selector keeps a subset S (|S| <= k) of the live elements, maximising a monotone submodular
objective, while elements are inserted and deleted in batches:

    sel.insert(ids, vectors, quality=None)   # ids: int64 (n,), vectors: the objective's raw data (n, ...)
    sel.delete(ids)
    sel.solution() -> int64 ids;  sel.value() -> f(S);  sel.stats() -> dict

Errors never corrupt the structure: inserting an id that is live (or repeated in the batch) raises
ValueError, deleting an id that is not live raises KeyError, bad vectors or quality raise ValueError --
all before anything changes.
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from sponge.selectors.objectives import (
    OBJECTIVES,
    CountingOracle,
    ElementTable,
    Objective,
)


def as_ids(ids) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"ids must be a 1-d integer array, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64, copy=False)


class Selector(ABC):
    """Shared storage (element table, counting oracle) and the public batch interface."""

    #: name used in saved parameters and benchmark tables
    method: str = "selector"

    def __init__(self, objective: Objective, k: int, seed: int = 0):
        if k < 1:
            raise ValueError("k must be >= 1")
        self.objective, self.k, self.seed = objective, int(k), int(seed)
        self.rng = np.random.default_rng(seed)  # the selector's own RNG; no global state
        self.table = ElementTable(objective.width, sink=objective.n_clients)
        self.oracle = CountingOracle(self.table, objective.n_clients + 1)
        self.updates = 0

    # -- public interface ------------------------------------------------------------------------

    def insert(self, ids, vectors, quality: np.ndarray | None = None) -> None:
        ids = as_ids(ids)
        if len(ids) == 0:
            return
        if len(vectors) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(vectors)} vectors")
        self.table.check_new(ids)
        prof = self.objective.profile(vectors, quality)  # validates data; one faiss search
        rows = self.table.add(ids, prof)
        self.updates += len(ids)
        self._inserted(rows)

    def delete(self, ids) -> None:
        ids = as_ids(ids)
        if len(ids) == 0:
            return
        rows = self.table.rows_of(ids)  # KeyError on unknown ids, before any change
        self.updates += len(ids)
        self._deleting(rows)
        self.table.remove(rows)
        self._deleted()

    def solution(self) -> np.ndarray:
        return self.table.ids[self._solution_rows()].copy()

    def value(self) -> float:
        """f(solution()); evaluating it for reporting is not charged as a query."""
        return self.oracle.value(self._solution_rows(), count=False)

    def stats(self) -> dict:
        return {"method": self.method, "n_live": len(self.table), "queries": self.oracle.queries,
                "updates": self.updates}

    def __len__(self) -> int:
        return len(self.table)

    # -- what a method implements ----------------------------------------------------------------

    @abstractmethod
    def _inserted(self, rows: np.ndarray) -> None:
        """React to new rows (already in the table)."""

    @abstractmethod
    def _deleting(self, rows: np.ndarray) -> None:
        """React to rows about to leave the table (their profiles are still readable)."""

    def _deleted(self) -> None:
        """Called after deleted rows have left the table."""

    @abstractmethod
    def _solution_rows(self) -> np.ndarray:
        """Rows of the current solution."""

    def params(self) -> dict:
        """Method parameters (JSON-able) that `load_params` passes back to the constructor."""
        return {"k": self.k, "seed": self.seed}


# ----------------------------------------------------------------------------------------------------
# Persistence of parameters. The state itself is derived: rebuild it by re-inserting the live rollouts.


def params_bytes(selector: Selector) -> bytes:
    """The selector's method, parameters and objective (scalars + arrays) as one .npz blob."""
    scalars, arrays = selector.objective.params()
    meta = {"method": selector.method, "params": selector.params(),
            "objective": type(selector.objective).__name__, "objective_params": scalars}
    buffer = io.BytesIO()
    np.savez(buffer, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    return buffer.getvalue()


def selector_from_bytes(blob: bytes) -> Selector:
    """A new, empty selector equal in parameters to the one `params_bytes` described."""
    from sponge.selectors import METHODS  # late import: the methods import this module

    with np.load(io.BytesIO(blob)) as z:
        meta = json.loads(z["__meta__"].tobytes().decode())
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
    if meta["objective"] not in OBJECTIVES or meta["method"] not in METHODS:
        raise ValueError(f"unknown objective {meta['objective']!r} or method {meta['method']!r}")
    objective = OBJECTIVES[meta["objective"]].from_params(meta["objective_params"], arrays)
    return METHODS[meta["method"]](objective, **meta["params"])


def save_params(selector: Selector, directory: str | Path) -> Path:
    """Write the selector's parameters to `directory`/selector.npz (atomically)."""
    from sponge.files import atomic_write

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / "selector.npz", params_bytes(selector))
    return d


def load_params(directory: str | Path) -> Selector:
    """A new, empty selector equal in parameters to the one saved in `directory`."""
    return selector_from_bytes((Path(directory) / "selector.npz").read_bytes())
