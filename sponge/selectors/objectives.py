"""Objectives in weighted-coverage form, and the oracle that evaluates (and counts) them.

Every objective a sponge selector maximises is written as

    f(S) = sum_c max(0, max_{s in S} w[s, c])  +  sum_{s in S} b[s]         w >= 0, b >= 0

Each element s carries a short sparse row of (client c, weight w[s, c]) pairs -- its "profile" -- and a
non-negative modular bonus b[s]. This one form covers

* facility location over a fixed reference set C: the clients are s's top-m nearest references (cosine
  similarity through a faiss inner-product index, searched once when s is inserted) and w is that
  similarity, clipped at 0. With m = |C| it is exact facility location; with m < |C| it is facility
  location on the sparsified (top-m per element) similarity, still monotone submodular.
* weighted set coverage: the clients are the items s covers and w their weights.
* a quality term lambda*q(s): the bonus.

The point of the form is speed: a marginal gain f(s | S) touches only s's m numbers and the coverage
vector cov_S[c] = max_{s in S} w[s, c], so gains of many elements against many partial solutions are one
numpy gather. Profiles are padded to a fixed width m with a "sink" client (index n_clients, weight 0)
that never contributes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import faiss
import numpy as np


@dataclass
class Profiles:
    """The sparse rows of a batch of elements (see the module docstring)."""

    clients: np.ndarray  # (n, m) int32; padding points at the sink column n_clients
    weights: np.ndarray  # (n, m) float32 >= 0; padding is 0
    bonus: np.ndarray  # (n,) float32 >= 0


class Objective(ABC):
    """Turns raw element data into profiles; holds the (fixed) parameters of f."""

    #: number of clients; coverage vectors have n_clients + 1 columns (the last is the sink)
    n_clients: int
    #: profile width m
    width: int

    @abstractmethod
    def profile(self, data: np.ndarray, quality: np.ndarray | None = None) -> Profiles:
        """Validate a batch of raw element data and return its profiles (one batched call)."""

    @abstractmethod
    def params(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able scalars, arrays) from which `from_params` rebuilds an equal objective."""

    @classmethod
    @abstractmethod
    def from_params(cls, scalars: dict, arrays: dict[str, np.ndarray]) -> Objective:
        """Inverse of `params`."""


def _check_quality(quality: np.ndarray | None, n: int, weight: float) -> np.ndarray:
    if quality is None:
        return np.zeros(n, np.float32)
    q = np.asarray(quality, dtype=np.float32).reshape(-1)
    if q.shape[0] != n:
        raise ValueError(f"quality has {q.shape[0]} entries for {n} elements")
    if not np.all(np.isfinite(q)) or np.any(q < 0):
        raise ValueError("quality must be finite and non-negative (the objective must stay monotone)")
    return (weight * q).astype(np.float32)


class FacilityLocation(Objective):
    """Facility location against a fixed reference set, cosine similarity through faiss.

    Args:
        references: (|C|, d) reference vectors (the "clients"); L2-normalised here.
        m: neighbours per element: each element covers only its m most similar references.
        quality_weight: lambda in f(S) = FL(S) + lambda * sum_{s in S} q(s).
        use_gpu: None = the index on GPU 0 when faiss reports a GPU (the faiss-gpu-cu12 extra),
            else on the CPU; False = always the CPU; True = the GPU or an error. The GPU index
            (`StandardGpuResources` + `index_cpu_to_gpu`, float32 storage) finds the same neighbours
            as the CPU one, with similarities equal within float rounding (~1e-6); faiss's GPU
            search takes at most 2048 neighbours, so a wider profile stays on the CPU.
    """

    def __init__(self, references: np.ndarray, m: int = 16, quality_weight: float = 1.0,
                 use_gpu: bool | None = None):
        refs = np.ascontiguousarray(references, dtype=np.float32)
        if refs.ndim != 2 or refs.shape[0] == 0:
            raise ValueError(f"references must be a non-empty (n, d) array, got shape {refs.shape}")
        if not np.all(np.isfinite(refs)):   # (checked here: _normalise would call it "vectors")
            raise ValueError("references contain non-finite values")
        if quality_weight < 0:
            raise ValueError("quality_weight must be >= 0")
        self.references = _normalise(refs)
        self.n_clients, self.dim = self.references.shape
        self.width = int(min(m, self.n_clients))
        self.quality_weight = float(quality_weight)
        self.use_gpu = use_gpu
        index = faiss.IndexFlatIP(self.dim)
        index.add(self.references)
        self.on_gpu = _wants_gpu(use_gpu, self.width)
        if self.on_gpu:
            # The resources (streams, scratch memory) must live as long as the index that uses them.
            self._gpu_resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        else:
            self.index = index

    def profile(self, data: np.ndarray, quality: np.ndarray | None = None) -> Profiles:
        x = np.asarray(data, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {x.shape}")
        bonus = _check_quality(quality, x.shape[0], self.quality_weight)
        sims, nbrs = self.index.search(_normalise(x), self.width)  # the one batched search per insert
        clients = np.where(nbrs < 0, self.n_clients, nbrs).astype(np.int32)
        weights = np.maximum(sims, 0.0, dtype=np.float32)
        weights[nbrs < 0] = 0.0
        return Profiles(clients, weights, bonus)

    def params(self):
        return ({"m": self.width, "quality_weight": self.quality_weight, "use_gpu": self.use_gpu},
                {"references": self.references})

    @classmethod
    def from_params(cls, scalars, arrays):
        return cls(arrays["references"], m=scalars["m"], quality_weight=scalars["quality_weight"],
                   use_gpu=scalars.get("use_gpu"))


_GPU_MAX_K = 2048   # faiss's GPU k-selection handles at most this many neighbours


def _wants_gpu(use_gpu: bool | None, k: int) -> bool:
    """Whether FacilityLocation's index goes on the GPU (see its `use_gpu`)."""
    available = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu is None:
        return available and k <= _GPU_MAX_K
    if use_gpu and not available:
        raise ValueError("use_gpu=True but faiss reports no GPU (install the faiss-gpu-cu12 extra on a GPU machine)")
    if use_gpu and k > _GPU_MAX_K:
        raise ValueError(f"faiss's GPU search takes at most {_GPU_MAX_K} neighbours, m is {k}")
    return bool(use_gpu)


class SetCoverage(Objective):
    """Weighted set coverage: element s covers a set of items, f(S) = total weight of covered items.

    Element data is an (n, width) integer array of item indices padded with -1.

    Args:
        n_items: items are 0..n_items-1.
        width: most items one element may cover.
        item_weights: non-negative weight per item (default 1).
        quality_weight: lambda of the optional modular quality term.
    """

    def __init__(self, n_items: int, width: int, item_weights: np.ndarray | None = None,
                 quality_weight: float = 1.0):
        if n_items <= 0 or width <= 0:
            raise ValueError("n_items and width must be positive")
        self.n_clients, self.width = int(n_items), int(width)
        w = np.ones(n_items, np.float32) if item_weights is None else np.asarray(item_weights, np.float32)
        if w.shape != (n_items,) or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("item_weights must be n_items finite non-negative numbers")
        self.item_weights = np.append(w, np.float32(0.0))  # sink item has weight 0
        self.quality_weight = float(quality_weight)

    def profile(self, data: np.ndarray, quality: np.ndarray | None = None) -> Profiles:
        items = np.asarray(data)
        if items.ndim != 2 or items.shape[1] > self.width or not np.issubdtype(items.dtype, np.integer):
            raise ValueError(f"items must be an integer array of shape (n, <= {self.width}), got "
                             f"{items.dtype} {items.shape}")
        if np.any(items >= self.n_clients) or np.any(items < -1):
            raise ValueError(f"item indices must lie in [0, {self.n_clients}) or be -1 (padding)")
        srt = np.sort(items, axis=1)
        if np.any((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)):
            raise ValueError("an element lists the same item twice")
        clients = np.full((items.shape[0], self.width), self.n_clients, np.int32)
        clients[:, : items.shape[1]] = np.where(items < 0, self.n_clients, items)
        return Profiles(clients, self.item_weights[clients],
                        _check_quality(quality, items.shape[0], self.quality_weight))

    def params(self):
        return ({"n_items": self.n_clients, "width": self.width, "quality_weight": self.quality_weight},
                {"item_weights": self.item_weights[:-1]})

    @classmethod
    def from_params(cls, scalars, arrays):
        return cls(scalars["n_items"], scalars["width"], arrays["item_weights"], scalars["quality_weight"])


OBJECTIVES: dict[str, type[Objective]] = {"FacilityLocation": FacilityLocation, "SetCoverage": SetCoverage}


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32, contiguous); ValueError if any value is not finite.

    The squared norms come from one einsum pass (no n x d temporary, 3x faster than np.linalg.norm)
    and double as the finiteness check: a non-finite value makes its row's sum non-finite. A
    finite row can overflow float32 when squared; only then is it redone in float64."""
    x = np.asarray(x, dtype=np.float32)
    squares = np.einsum("ij,ij->i", x, x)
    if not np.isfinite(squares).all():
        if not np.isfinite(x).all():
            raise ValueError("vectors contain non-finite values")
        squares = np.einsum("ij,ij->i", x.astype(np.float64), x.astype(np.float64))
    norms = np.maximum(np.sqrt(squares), 1e-12).astype(np.float32)
    return np.divide(x, norms[:, None], dtype=np.float32)


# ----------------------------------------------------------------------------------------------------
# The math, as plain functions


def marginal_gains(weights: np.ndarray, bonus: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """f(s | S) for each row s, given covered[i, j] = cov_S[clients[i, j]] (same shape as weights).

    The excesses are float32, their row sums float64 (as in the compiled scan of kernels.py, so
    both sides of a threshold test agree up to float64 rounding, not float32's). The row sums go
    through einsum, several times faster than a reduction over the short last axis (and, unlike a
    BLAS matrix-vector product, never spawns threads that fight faiss's OpenMP threads)."""
    excess = np.subtract(weights, covered, dtype=np.float32)
    np.maximum(excess, np.float32(0.0), out=excess)
    return np.einsum("...j->...", excess, dtype=np.float64) + bonus


def add_to_coverage(cov: np.ndarray, clients: np.ndarray, weights: np.ndarray) -> None:
    """cov <- coverage of S + {s}, in place (one element's profile; its clients are distinct but
    the padding may repeat the sink column, whose weight is 0, so plain assignment is safe)."""
    cov[clients] = np.maximum(cov[clients], weights)


# ----------------------------------------------------------------------------------------------------
# Element storage and the counting oracle


class ElementTable:
    """Columnar storage of the live elements' profiles, addressed by row; ids map to rows.

    Rows of deleted elements are reused. All per-element state of a selector is kept in numpy arrays
    indexed by row, so 10^5..10^6 live elements cost a few arrays, not millions of Python objects:
    the id -> row map too is a pair of arrays sorted by id, searched and merged a batch at a time.
    """

    def __init__(self, width: int, sink: int, capacity: int = 1024):
        self.width, self.sink = width, sink
        self.capacity = 0
        self.ids = np.empty(0, np.int64)
        self.clients = np.empty((0, width), np.intp)  # intp: the fast index type for np.take
        self.weights = np.empty((0, width), np.float32)
        self.bonus = np.empty(0, np.float32)
        self.live = np.empty(0, bool)
        self._sorted_ids = np.empty(0, np.int64)  # live ids, increasing ...
        self._sorted_rows = np.empty(0, np.int64)  # ... and their rows
        self._free = np.empty(0, np.int64)  # a stack of free rows; the top is the end
        self._grow(capacity)

    def __len__(self) -> int:
        return len(self._sorted_ids)

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self.ids = np.concatenate([self.ids, np.full(extra, -1, np.int64)])
        self.clients = np.concatenate([self.clients, np.full((extra, self.width), self.sink, np.intp)])
        self.weights = np.concatenate([self.weights, np.zeros((extra, self.width), np.float32)])
        self.bonus = np.concatenate([self.bonus, np.zeros(extra, np.float32)])
        self.live = np.concatenate([self.live, np.zeros(extra, bool)])
        # new rows go on top of the stack, lowest last: handed out in increasing order
        self._free = np.concatenate([self._free, np.arange(capacity - 1, self.capacity - 1, -1, dtype=np.int64)])
        self.capacity = capacity

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in the sorted map, whether the id is live) for each id."""
        pos = np.searchsorted(self._sorted_ids, ids)
        found = np.zeros(len(ids), bool)
        inside = pos < len(self._sorted_ids)
        found[inside] = self._sorted_ids[pos[inside]] == ids[inside]
        return pos, found

    def check_new(self, ids: np.ndarray) -> None:
        """Raise ValueError (changing nothing) if an id repeats in the batch or is already live."""
        uniq, counts = np.unique(ids, return_counts=True)
        if np.any(counts > 1):
            raise ValueError(f"ids repeated within the batch: {uniq[counts > 1][:10].tolist()}")
        _, found = self._find(ids)
        if found.any():
            raise ValueError(f"ids already inserted (delete them first): {ids[found][:10].tolist()}")

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows of live ids; KeyError (changing nothing) naming any unknown id."""
        pos, found = self._find(ids)
        if not found.all():
            raise KeyError(f"ids not present (never inserted or already deleted): {ids[~found][:10].tolist()}")
        rows = self._sorted_rows[pos]
        if len(np.unique(rows)) != len(rows):
            raise ValueError("ids repeated within the delete batch")
        return rows

    def add(self, ids: np.ndarray, prof: Profiles) -> np.ndarray:
        n = len(ids)
        if n > len(self._free):
            self._grow(max(2 * self.capacity, self.capacity + n))
        rows = self._free[len(self._free) - n:][::-1].copy()
        self._free = self._free[: len(self._free) - n]
        self.ids[rows] = ids
        self.clients[rows], self.weights[rows], self.bonus[rows] = prof.clients, prof.weights, prof.bonus
        self.live[rows] = True
        order = np.argsort(ids, kind="stable")
        at = np.searchsorted(self._sorted_ids, ids[order])
        self._sorted_ids = np.insert(self._sorted_ids, at, ids[order])
        self._sorted_rows = np.insert(self._sorted_rows, at, rows[order])
        return rows

    def remove(self, rows: np.ndarray) -> None:
        pos, _ = self._find(self.ids[rows])
        keep = np.ones(len(self._sorted_ids), bool)
        keep[pos] = False
        self._sorted_ids, self._sorted_rows = self._sorted_ids[keep], self._sorted_rows[keep]
        self.live[rows] = False
        self.ids[rows] = -1
        self._free = np.concatenate([self._free, rows])

    def profiles_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(clients, weights, bonus) of rows, gathered (np.take: several times faster than fancy indexing)."""
        return (np.take(self.clients, rows, axis=0), np.take(self.weights, rows, axis=0),
                np.take(self.bonus, rows))

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self.live)


class CountingOracle:
    """Marginal gains and set values over an ElementTable; every evaluation counts as one query.

    Adding an element to a partial solution (updating a coverage vector) is bookkeeping, not a query.
    """

    def __init__(self, table: ElementTable, n_columns: int):
        self.table = table
        self.n_columns = n_columns  # n_clients + 1 (sink)
        self.queries = 0

    def gains(self, rows: np.ndarray, cov: np.ndarray, prefix: np.ndarray | int | None = None) -> np.ndarray:
        """f(s | S) for each row s. `cov` is one coverage vector, or a (contiguous) matrix of coverage
        vectors of nested partial solutions with `prefix[i]` choosing the row of cov used for rows[i]."""
        return self.gains_of(*self.table.profiles_of(rows), cov, prefix)

    def gains_of(self, clients: np.ndarray, weights: np.ndarray, bonus: np.ndarray, cov: np.ndarray,
                 prefix: np.ndarray | int | None = None) -> np.ndarray:
        """`gains` for profiles already gathered (callers that ask about the same rows repeatedly)."""
        if cov.ndim == 1:
            covered = np.take(cov, clients)
        elif np.ndim(prefix):  # flat index into the matrix: much faster than 2-d fancy indexing
            offset = np.asarray(prefix, np.intp) * cov.shape[1]
            covered = np.take(cov.ravel(), np.add(clients, offset[:, None]))
        else:
            covered = np.take(cov[int(prefix)], clients)
        self.queries += len(clients)
        return marginal_gains(weights, bonus, covered)

    def singletons(self, rows: np.ndarray) -> np.ndarray:
        return self.gains(rows, np.zeros(self.n_columns, np.float32))

    def value(self, rows: np.ndarray, count: bool = True) -> float:
        """f(S) for S = rows (one query if counted; reporting uses count=False)."""
        t = self.table
        cov = np.zeros(self.n_columns, np.float32)
        np.maximum.at(cov, t.clients[rows].ravel(), t.weights[rows].ravel())
        cov[-1] = 0.0
        if count:
            self.queries += 1
        return float(cov.sum(dtype=np.float64) + t.bonus[rows].sum(dtype=np.float64))
