"""Replay: in-process replay sources (the `sponge.contract.ReplaySource` protocol) and how a batch is
drawn from their candidates (`ReplaySampler`, `draw_groups`). Storage and sampling are separate, with
Arrow tables between them.

Every pool here keeps the rollouts of the last `window` policy versions of its registered run,
grouped (one prompt × one policy version = one GRPO group, `sponge.groups`), with each rollout's
advantage computed within its whole group when it arrives; groups whose rewards are all equal are
never kept (no learning signal). They differ only in which of those groups they offer:

- `FIFOReplayPool`:     every group of the window (ReMix's replay buffer).
- `RandomReplayPool`:   a uniformly random subset of `capacity` groups of the window, kept under
                        inserts and deletes by one random key per group (the control for curation).
- `CuratedReplayPool`:  `capacity` groups chosen by sponge.selectors' fully dynamic selector over
                        facility location of group embeddings plus a learning-signal term (the
                        group's reward std, largest at success ½), with a staleness-decayed draw
                        weight travelling with the rows.
- `DiverseReplayPool`:  dedupe + drop + greedy farthest point, no selector.

A candidate table has `sponge.contract.CANDIDATE_COLUMNS` and, from the curated pool, `draw_weight`
(a multiplier of the row's draw probability).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from sponge.contract import CANDIDATE_COLUMNS, DRAW_WEIGHT, REPLAY_COLUMNS, ReplaySource, Unit
from sponge.groups import group_codes, group_reward_stats, with_group_columns

from .density_ratio import (
    log_density_ratios,
    ratio_diagnostics,
    self_normalise,
    truncate,
    truncation_cap,
    weights_from_log,
)

__all__ = [
    "CANDIDATE_COLUMNS",
    "REPLAY_COLUMNS",
    "CuratedReplayPool",
    "DiverseReplayPool",
    "FIFOReplayPool",
    "RandomReplayPool",
    "ReplayDraw",
    "ReplaySampler",
    "ReplaySource",
    "char_position_embedding",
    "draw_groups",
    "farthest_point_subset",
    "make_pool",
    "padded_list_column",
    "rollouts_table",
    "table_from_bytes",
    "table_to_bytes",
]


def rollouts_table(
    *, rollout_ids: list[str], prompt_ids: list[str], prompts: list[str], responses: list[str],
    prompt_tokens: list[list[int]], response_tokens: list[list[int]],
    behavior_logprobs: list[np.ndarray], rewards: np.ndarray, policy_version: int,
    advantages: np.ndarray | None = None, run_id: str | None = None,
) -> pa.Table:
    """Build the rollout Arrow table (record columns, plus `advantage` when given).

    List columns are built from flat values and offsets, not row by row.
    """
    def list_array(rows, value_type, np_dtype):
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        flat = np.concatenate([np.asarray(r, dtype=np_dtype) for r in rows]) if rows else np.zeros(0, np_dtype)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))

    n = len(rollout_ids)
    columns = {
        "rollout_id": pa.array(rollout_ids, pa.string()),
        "prompt_id": pa.array(prompt_ids, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "prompt": pa.array(prompts, pa.string()),
        "response": pa.array(responses, pa.string()),
        "prompt_tokens": list_array(prompt_tokens, pa.int32(), np.int32),
        "response_tokens": list_array(response_tokens, pa.int32(), np.int32),
        "behavior_logprobs": list_array(behavior_logprobs, pa.float32(), np.float32),
        "reward": pa.array(np.asarray(rewards, dtype=np.float32)),
        "policy_version": pa.array(np.full(n, policy_version, dtype=np.int64)),
        "created_at": pa.array(np.full(n, int(time.time() * 1000), dtype="datetime64[ms]"),
                               pa.timestamp("ms", tz="UTC")),
    }
    if advantages is not None:
        columns["advantage"] = pa.array(np.asarray(advantages, dtype=np.float32))
    return pa.table(columns)


def padded_list_column(column, pad_value: float, width: int | None = None,
                       dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A list column as a right-padded 2-D array [n, width] and the row lengths (vectorised)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)
    width = int(lengths.max(initial=0)) if width is None else width
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(dtype)
    out = np.full((len(column), max(width, 1)), pad_value, dtype=dtype)
    rows = np.repeat(np.arange(len(column)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = cols < out.shape[1]
    out[rows[keep], cols[keep]] = flat[keep]
    return out, lengths


def table_to_bytes(table: pa.Table | None) -> bytes | None:
    """An Arrow table as IPC stream bytes (checkpoints), None as None."""
    if table is None:
        return None
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def table_from_bytes(data: bytes | None) -> pa.Table | None:
    return None if data is None else pa.ipc.open_stream(data).read_all()


def _check_columns(table: pa.Table, required=REPLAY_COLUMNS) -> None:
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"replay table lacks required column(s) {missing}")


def _empty_candidates() -> pa.Table:
    return pa.table({c: pa.array([], pa.string()) for c in CANDIDATE_COLUMNS})


# ---------------------------------------------------------------------------------------------------
# In-process replay sources


class FIFOReplayPool:
    """Every signal group of the last `window` policy versions (ReMix's N), nothing curated.

    Implements `sponge.contract.ReplaySource`. `clear()` forgets what is held (reincarnation); rows
    sent afterwards are kept again. Subclasses choose among the window's groups (`_choose`) and
    may keep per-group state (`_added`, `_evicted`).
    """

    def __init__(self, window: int = 2):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.table: pa.Table | None = None      # signal groups of the window, with group_id/advantage
        self.run_id: str | None = None
        self.fingerprint: str | None = None
        self.version = 0

    # -- the contract -------------------------------------------------------------------------
    def register(self, run_id: str, fingerprint: str) -> int:
        if (self.run_id, self.fingerprint) != (run_id, fingerprint):
            if self.run_id is not None:      # another run or tokenizer: nothing held is usable
                self.clear()
                self.version = 0
            self.run_id, self.fingerprint = run_id, fingerprint
        return self.version

    def send(self, rollouts: pa.Table) -> None:
        _check_columns(rollouts)
        if rollouts.num_rows == 0:
            return
        if self.run_id is not None:
            rollouts = rollouts.filter(pc.equal(pc.fill_null(rollouts.column("run_id"), ""), self.run_id))
        rollouts = rollouts.filter(pc.greater_equal(rollouts.column("policy_version"), self.version - self.window))
        keep = [c for c in rollouts.column_names if c not in ("group_id", "advantage")]
        rows = with_group_columns(rollouts.select(keep), drop_no_signal=True)
        if rows.num_rows == 0:
            return
        if self.table is not None:
            common = [c for c in self.table.column_names if c in rows.column_names]
            rows = rows.select(common)
            self.table = pa.concat_tables([self.table.select(common), rows], promote_options="permissive")
        else:
            self.table = rows
        self._added(rows)

    def report_version(self, version: int) -> None:
        if version < self.version:
            raise ValueError(f"policy versions only go up: got {version} after {self.version}")
        self.version = version
        if self.table is None:
            return
        stale = pc.less(self.table.column("policy_version"), version - self.window)
        if pc.any(stale).as_py():
            self._evicted(self.table.filter(stale))
            self.table = self.table.filter(pc.invert(stale))

    def candidates(self, version: int, unit: Unit = "group") -> pa.Table:
        if unit not in ("group", "rollout"):
            raise ValueError(f"unit must be 'group' or 'rollout', got {unit!r}")
        if self.table is None or self.table.num_rows == 0:
            return _empty_candidates()
        v = self.table.column("policy_version")
        window = self.table.filter(pc.and_(pc.less(v, version), pc.greater_equal(v, version - self.window)))
        return self._choose(window, version) if window.num_rows else window

    def clear(self) -> None:
        if self.table is not None and self.table.num_rows:
            self._evicted(self.table)
        self.table = None

    def state_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, "window": self.window, "run_id": self.run_id,
                "fingerprint": self.fingerprint, "version": self.version, "table": table_to_bytes(self.table)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != type(self).__name__:
            raise ValueError(f"state is of a {state.get('kind')}, not a {type(self).__name__}")
        self.clear()
        self.window, self.run_id, self.fingerprint = state["window"], state["run_id"], state["fingerprint"]
        self.version = state["version"]
        table = table_from_bytes(state["table"])
        if table is not None and table.num_rows:
            self.table = table
            self._added(table)

    def __len__(self) -> int:
        return 0 if self.table is None else self.table.num_rows

    # -- what subclasses change -----------------------------------------------------------------
    def _choose(self, window: pa.Table, version: int) -> pa.Table:
        return window

    def _added(self, rows: pa.Table) -> None:
        pass

    def _evicted(self, rows: pa.Table) -> None:
        pass


class RandomReplayPool(FIFOReplayPool):
    """A uniformly random subset of `capacity` groups of the window: each group gets a random key
    when it arrives and the `capacity` groups of smallest key are offered (a uniform subset, kept
    under inserts and deletes without redrawing)."""

    def __init__(self, window: int = 2, capacity: int = 16, seed: int = 0):
        super().__init__(window)
        self.capacity, self.rng = capacity, np.random.default_rng(seed)
        self.keys: dict[str, float] = {}

    def _added(self, rows: pa.Table) -> None:
        for g in pc.unique(rows.column("group_id")).to_pylist():
            self.keys.setdefault(g, float(self.rng.random()))

    def _evicted(self, rows: pa.Table) -> None:
        for g in pc.unique(rows.column("group_id")).to_pylist():
            self.keys.pop(g, None)

    def _choose(self, window: pa.Table, version: int) -> pa.Table:
        groups = pc.unique(window.column("group_id")).to_pylist()
        if len(groups) <= self.capacity:
            return window
        chosen = sorted(groups, key=lambda g: self.keys.get(g, 1.0))[: self.capacity]
        return window.filter(pc.is_in(window.column("group_id"), value_set=pa.array(chosen)))


def char_position_embedding(prompts: list[str], responses: list[str], width: int = 16) -> np.ndarray:
    """One-hot (position, byte) features of prompt and response, L2-normalised: a cheap embedding
    under which two rollouts are close when they share characters at the same places.
    Vectorised through a fixed-width bytes array."""
    def onehot(strings):
        raw = np.array(strings, dtype=f"S{width}").view(np.uint8).reshape(len(strings), width)
        out = np.zeros((len(strings), width, 256), dtype=np.float32)
        rows, cols = np.nonzero(raw)
        out[rows, cols, raw[rows, cols]] = 1.0
        return out.reshape(len(strings), -1)
    emb = np.concatenate([onehot(prompts), onehot(responses)], axis=1)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def _embed(table: pa.Table) -> np.ndarray:
    if "embedding" in table.column_names and table.column("embedding").null_count == 0:
        emb = padded_list_column(table.column("embedding"), 0.0)[0]
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return char_position_embedding(table.column("prompt").to_pylist(), table.column("response").to_pylist())


class CuratedReplayPool(FIFOReplayPool):
    """`capacity` groups of the window chosen for learning signal and diversity, fully dynamic.

    Each signal group is one element of a `DynamicSelector` (f(S) ≥ (1/2 − ε)·OPT after every
    insert and delete, polylog amortised queries per update) maximising

        f(S) = Σ_c max_{g∈S} sim(c, g)  +  λ · Σ_{g∈S} std(rewards of g)

    facility location over the group embeddings (mean of its rollouts' embeddings; exact, every
    reference, unless `neighbours` is set) plus the group's reward std, its GRPO learning signal
    (for 0/1 rewards sqrt(p(1 − p)), largest at success ½). Groups enter when sent and leave as the
    window moves. Offered rows carry `draw_weight` = decay^(staleness − 1): a stale group is still
    offered, but drawn less. References: the first `n_references` group embeddings seen.
    """

    def __init__(self, window: int = 2, capacity: int = 16, quality_weight: float = 4.0,
                 staleness_decay: float = 0.7, n_references: int = 128, neighbours: int | None = None,
                 eps: float = 0.2, seed: int = 0):
        super().__init__(window)
        self.capacity, self.quality_weight, self.staleness_decay = capacity, quality_weight, staleness_decay
        self.n_references, self.neighbours, self.eps, self.seed = n_references, neighbours, eps, seed
        self.selector = None
        self.ids: dict[str, int] = {}
        self._next_id = 0

    def _group_features(self, rows: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray]:
        codes = group_codes(rows)
        emb = _embed(rows)
        n_groups = int(codes.max()) + 1
        members = (codes[None, :] == np.arange(n_groups)[:, None]).astype(np.float32)   # [G, R] one-hot
        group_emb = (members @ emb) / members.sum(1, keepdims=True)
        _, std, _ = group_reward_stats(rows.column("reward").to_numpy(), codes)
        quality = np.zeros(n_groups, np.float32)
        quality[codes] = std
        first = np.unique(codes, return_index=True)[1]
        names = rows.column("group_id").take(pa.array(first)).to_pylist()
        return names, group_emb, quality

    def _added(self, rows: pa.Table) -> None:
        from sponge.selectors import DynamicSelector, FacilityLocation

        names, emb, quality = self._group_features(rows)
        new = [i for i, g in enumerate(names) if g not in self.ids]
        if not new:
            return
        if self.selector is None:
            refs = emb[: self.n_references]
            m = len(refs) if self.neighbours is None else self.neighbours
            objective = FacilityLocation(refs, m=m, quality_weight=self.quality_weight)
            self.selector = DynamicSelector(objective, k=self.capacity, eps=self.eps, seed=self.seed)
        ids = np.arange(self._next_id, self._next_id + len(new), dtype=np.int64)
        self._next_id += len(new)
        for i, g in zip(ids, new):
            self.ids[names[g]] = int(i)
        self.selector.insert(ids, emb[new], quality=quality[new])

    def _evicted(self, rows: pa.Table) -> None:
        gone = [self.ids.pop(g) for g in pc.unique(rows.column("group_id")).to_pylist() if g in self.ids]
        if gone and self.selector is not None:
            self.selector.delete(np.array(gone, dtype=np.int64))

    def clear(self) -> None:
        super().clear()
        self.selector, self.ids = None, {}

    def _choose(self, window: pa.Table, version: int) -> pa.Table:
        if self.selector is None:
            return window.slice(0, 0)
        chosen_ids = {int(i) for i in self.selector.solution()}
        chosen = [g for g, i in self.ids.items() if i in chosen_ids]
        out = window.filter(pc.is_in(window.column("group_id"), value_set=pa.array(chosen, pa.string())))
        staleness = version - out.column("policy_version").to_numpy()
        weight = self.staleness_decay ** np.maximum(staleness - 1, 0)
        return out.append_column(DRAW_WEIGHT, pa.array(weight.astype(np.float32)))


def farthest_point_subset(embeddings: np.ndarray, k: int, start: int = 0) -> np.ndarray:
    """Greedy farthest-point (k-center) selection: indices of k rows, each the farthest (cosine
    distance) from those chosen so far. O(n·k) vectorised distance updates."""
    n = len(embeddings)
    if k >= n:
        return np.arange(n)
    chosen = [start]
    dist = 1.0 - embeddings @ embeddings[start]
    for _ in range(k - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, 1.0 - embeddings @ embeddings[nxt])
    return np.array(chosen)


def _whole_groups(window: pa.Table, chosen: pa.Table, unit: str) -> pa.Table:
    if unit == "rollout":
        return chosen
    return window.filter(pc.is_in(window.column("group_id"), value_set=pc.unique(chosen.column("group_id"))))


class DiverseReplayPool(FIFOReplayPool):
    """The window curated to at most `capacity` rollouts, no selector: drop exact duplicate
    (prompt, response) pairs (newest kept), then keep `capacity` chosen by `select(table, k)` — by
    default greedy farthest point over the embeddings. With unit "group" the chosen rollouts'
    whole groups are offered."""

    def __init__(self, window: int = 2, capacity: int = 128,
                 select: Callable[[pa.Table, int], np.ndarray] | None = None):
        super().__init__(window)
        self.capacity = capacity
        self.select = select or (lambda table, k: farthest_point_subset(_embed(table), k))
        self.unit = "group"

    def candidates(self, version: int, unit: Unit = "group") -> pa.Table:
        self.unit = unit
        return super().candidates(version, unit)

    def _choose(self, window: pa.Table, version: int) -> pa.Table:
        table = window.take(pc.sort_indices(window, [("policy_version", "descending")]))
        key = pc.binary_join_element_wise(table.column("prompt"), table.column("response"), "\x1f")
        _, first = np.unique(key.to_numpy(zero_copy_only=False), return_index=True)
        table = table.take(np.sort(first))
        if table.num_rows > self.capacity:
            table = table.take(np.sort(self.select(table, self.capacity)))
        return _whole_groups(window, table, self.unit)


def make_pool(config) -> ReplaySource:
    """The in-process pool a `ReMixConfig` names (replay_pool, replay_window, pool_capacity, ...)."""
    kind = config.replay_pool
    if kind == "random":
        return RandomReplayPool(config.replay_window, config.pool_capacity, seed=config.seed)
    if kind == "curated":
        return CuratedReplayPool(config.replay_window, config.pool_capacity, config.curation_quality_weight,
                                 config.curation_staleness_decay, seed=config.seed)
    if kind == "diverse":
        return DiverseReplayPool(config.replay_window, config.pool_capacity * config.group_size)
    return FIFOReplayPool(config.replay_window)


# ---------------------------------------------------------------------------------------------------
# Drawing a batch


def draw_groups(codes: np.ndarray, group_weights: np.ndarray, n_rows: int,
                rng: np.random.Generator) -> np.ndarray:
    """Row indices of whole groups drawn ∝ `group_weights` until at least `n_rows` rows are drawn.

    `codes` [R] are dense group codes 0..G−1 (`sponge.groups.group_codes`), `group_weights` [G]
    non-negative. Groups are drawn without replacement while any is left, then again from all
    (a small pool is repeated rather than under-filling the batch). Returns the rows of the drawn
    groups, each group's rows together, in draw order.
    """
    codes = np.asarray(codes)
    n_groups = len(group_weights)
    if n_rows <= 0 or n_groups == 0:
        return np.zeros(0, dtype=np.int64)
    weights = np.asarray(group_weights, dtype=np.float64)
    weights = np.where(weights > 0, weights, 0.0)
    if weights.sum() <= 0:
        weights = np.ones(n_groups)
    sizes = np.bincount(codes, minlength=n_groups)
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    chosen: list[int] = []
    total = 0
    while total < n_rows:
        live = np.flatnonzero(weights > 0)
        # Gumbel top-k: a weighted draw without replacement in one pass.
        keys = np.log(weights[live]) - np.log(-np.log(rng.random(len(live))))
        for g in live[np.argsort(-keys)]:
            chosen.append(int(g))
            total += int(sizes[g])
            if total >= n_rows:
                break
    return np.concatenate([order[starts[g]:starts[g + 1]] for g in chosen]).astype(np.int64)


@dataclass
class ReplayDraw:
    """A replay batch: the chosen rows plus what the loss needs about them."""

    table: pa.Table
    #: log π_k of each response token (the current policy at the start of the iteration) [n, T];
    #: None for a uniform draw made without a score function.
    logp_current: torch.Tensor | None
    #: Per-response loss weights (self-normalised truncated ratios in "weight" mode, else ones).
    weights: np.ndarray
    #: GRPO advantage of each drawn row, computed within its whole group.
    advantages: np.ndarray
    stats: dict = field(default_factory=dict)


class ReplaySampler:
    """Draws replay batches from candidate tables with truncated density-ratio corrections.

    `mode`:
      - "resample": sampling-importance-resampling, rows (or groups) drawn ∝ w̃; loss weights 1.
        Scores every candidate (one forward over the window).
      - "weight":   drawn uniformly; loss weights w̃ self-normalised to mean 1 over the draw.
      - "uniform":  drawn uniformly, no weights (ReMix's plain replay; the trainer's per-token
        correction still acts in the loss). "weight" and "uniform" score only the drawn rows.
    `ratio_mode`: "sequence" or "geometric" (see density_ratio). `cap`: fixed truncation C, or None
    for the schedule clip(cap_gamma·K, cap_min, cap_max). `recency_decay` < 1 multiplies a row's
    draw probability by decay^(staleness − 1) (uniform over the window when 1). A `draw_weight`
    column on the candidates (a curated source's preference) multiplies the draw probability too;
    a `weight` column (the service's importance weight of its own sample) is not used here.
    """

    def __init__(self, mode: str = "uniform", ratio_mode: str = "geometric", cap: float | None = None,
                 cap_gamma: float = 1.0, cap_min: float = 2.0, cap_max: float = 10.0,
                 recency_decay: float = 1.0):
        if mode not in ("resample", "weight", "uniform"):
            raise ValueError(f"unknown replay mode {mode!r}; use 'resample', 'weight' or 'uniform'")
        if ratio_mode not in ("sequence", "geometric"):
            raise ValueError(f"unknown ratio mode {ratio_mode!r}; use 'sequence' or 'geometric'")
        if not 0 < recency_decay <= 1:
            raise ValueError(f"recency_decay must be in (0, 1], got {recency_decay}")
        self.mode, self.ratio_mode, self.cap = mode, ratio_mode, cap
        self.cap_gamma, self.cap_min, self.cap_max = cap_gamma, cap_min, cap_max
        self.recency_decay = recency_decay

    def draw(self, candidates: pa.Table, n: int,
             score: Callable[[list[list[int]], list[list[int]]], tuple[torch.Tensor, torch.Tensor]],
             current_version: int, rng: np.random.Generator, unit: Unit = "rollout") -> ReplayDraw | None:
        """Draw `n` rows (with unit "group": whole groups until at least `n` rows).
        `score(prompt_tokens, response_tokens)` returns (log π_k [B, T], mask [B, T]) under the
        current policy, no gradient; in "uniform" mode it may be None (the draw then carries no
        log π_k and no ratio statistics: the caller scores the rows). Returns None when there are
        no candidates."""
        if candidates.num_rows == 0 or n <= 0:
            return None
        _check_columns(candidates, REPLAY_COLUMNS)
        resp_lengths = pc.list_value_length(candidates.column("response_tokens")).to_numpy()
        lp_lengths = pc.fill_null(pc.list_value_length(candidates.column("behavior_logprobs")), -1).to_numpy()
        if not np.array_equal(lp_lengths, resp_lengths):
            raise ValueError("behavior_logprobs and response_tokens differ in length for some rows")
        versions = candidates.column("policy_version").to_numpy()
        staleness = current_version - versions
        cap = self.cap if self.cap is not None else truncation_cap(
            len(np.unique(versions)), self.cap_gamma, self.cap_min, self.cap_max)
        prior = self.recency_decay ** np.maximum(staleness - 1, 0).astype(np.float64)
        if DRAW_WEIGHT in candidates.column_names:
            prior = prior * pc.fill_null(candidates.column(DRAW_WEIGHT), 1.0).to_numpy().astype(np.float64)

        if self.mode == "resample":       # every candidate's ratio decides the draw
            logp_all, mask_all = self._score(candidates, score)
            raw_all = self._ratios(candidates, logp_all, mask_all)
            p_row = truncate(raw_all, cap) * prior
            idx = self._pick(candidates, p_row, n, rng, unit)
            logp, raw = logp_all[torch.from_numpy(idx)], raw_all[idx]
            weights = np.ones(len(idx))
        else:
            idx = self._pick(candidates, prior, n, rng, unit)
            if score is None:                 # uniform draw, scored later by the caller
                if self.mode != "uniform":
                    raise ValueError(f"mode {self.mode!r} needs a score function")
                logp, raw, weights = None, np.full(len(idx), np.nan), np.ones(len(idx))
            else:
                chosen = candidates.take(pa.array(idx))
                logp, mask = self._score(chosen, score)
                raw = self._ratios(chosen, logp, mask)
                weights = self_normalise(truncate(raw, cap)) if self.mode == "weight" else np.ones(len(idx))
        table = candidates.take(pa.array(idx))
        stats = ratio_diagnostics(raw, truncate(raw, cap), staleness[idx])
        stats.update({"cap": cap, "candidates": candidates.num_rows, "drawn": len(idx),
                      "candidate_groups": len(pc.unique(candidates.column("group_id")))
                      if "group_id" in candidates.column_names else -1,
                      "ess_drawn_weights": float(weights.sum() ** 2 / (len(weights) * np.square(weights).sum())),
                      "mean_staleness": float(staleness[idx].mean())})
        return ReplayDraw(table, logp, weights.astype(np.float32), _advantages(candidates)[idx], stats)

    @staticmethod
    def _score(table: pa.Table, score) -> tuple[torch.Tensor, torch.Tensor]:
        return score(table.column("prompt_tokens").to_pylist(), table.column("response_tokens").to_pylist())

    def _ratios(self, table: pa.Table, logp: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        behavior = padded_list_column(table.column("behavior_logprobs"), 0.0, width=logp.shape[1])[0]
        behavior_t = torch.from_numpy(behavior).to(logp.device) * mask
        return weights_from_log(log_density_ratios(logp, behavior_t, mask, self.ratio_mode))

    @staticmethod
    def _pick(candidates: pa.Table, p_row: np.ndarray, n: int, rng: np.random.Generator, unit: str) -> np.ndarray:
        B = candidates.num_rows
        if unit == "group":
            codes = group_codes(candidates)
            sums = np.bincount(codes, weights=p_row)
            counts = np.bincount(codes)
            return draw_groups(codes, sums / np.maximum(counts, 1), n, rng)
        p = np.asarray(p_row, dtype=np.float64)
        p = p / p.sum() if p.sum() > 0 else np.full(B, 1.0 / B)
        return rng.choice(B, size=n, replace=n > B, p=p)


def _advantages(candidates: pa.Table) -> np.ndarray:
    if "advantage" in candidates.column_names and candidates.column("advantage").null_count == 0:
        return candidates.column("advantage").to_numpy().astype(np.float32)
    # No advantage column (a legacy source): compute it within each group of the candidates.
    return with_group_columns(candidates, drop_no_signal=False).column("advantage").to_numpy().astype(np.float32)

