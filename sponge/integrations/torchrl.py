"""A TorchRL replay buffer whose contents are a sponge replay source's curated groups.

    from sponge.integrations.torchrl import make_replay_buffer
    rb = make_replay_buffer(source, run_id="run-1", fingerprint=fp, batch_size=32, score=score_fn)
    rb.extend(rollouts_td)            # → source.send (the source keeps, curates, retires)
    rb.storage.set_version(v)         # the policy now generates with v (→ source.report_version)
    batch = rb.sample()               # whole GRPO groups of older versions, as a TensorDict

Three TorchRL parts, usable alone or through `make_replay_buffer`:

- `ReplaySourceStorage`: reading is the source's candidates at the storage's version
  (`source.candidates(version, unit)`), one row per rollout, as padded tensors (`rollouts_to_tensordict`);
  the Arrow table behind it is `storage.table`. It is refreshed when the version changes or after a
  write, never per sample. Writing through it is refused: what may be replayed is the source's call.
- `SourceWriter`: what the buffer is extended with becomes rollout records (`tensordict_to_rollouts`)
  sent to the source.
- `GroupSampler`: whole groups (one prompt × one policy version), drawn ∝ the source's draw weight;
  given a `score` function (log π_current of response tokens) it draws through sponge's
  `ReplaySampler` with truncated density ratios and the sample carries each row's `weight` and
  `logp_current`.

Every part has state_dict/load_state_dict (the storage's holds the source's own state).
"""

from __future__ import annotations

import hashlib
import sys
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

try:
    from tensordict import TensorDict
    from torchrl.data import TensorDictReplayBuffer
    from torchrl.data.replay_buffers.samplers import Sampler
    from torchrl.data.replay_buffers.storages import Storage
    from torchrl.data.replay_buffers.writers import Writer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("sponge.integrations.torchrl needs TorchRL: pip install 'sponge[torchrl]'") from exc

from sponge.contract import DRAW_WEIGHT, ReplaySource, Unit
from sponge.groups import group_codes
from sponge.trainer.replay import (
    ReplaySampler,
    draw_groups,
    padded_list_column,
    rollouts_table,
)

__all__ = ["GroupSampler", "ReplaySourceStorage", "SourceWriter", "make_replay_buffer",
           "rollouts_to_tensordict", "tensordict_to_rollouts"]

#: Signature of a scoring function: (prompt token ids, response token ids) → (log π [B, T], mask [B, T]).
Score = Callable[[list[list[int]], list[list[int]]], tuple[torch.Tensor, torch.Tensor]]


def rollouts_to_tensordict(table: pa.Table, pad_token_id: int = 0) -> TensorDict:
    """Rollout rows (record or candidate columns) as a TensorDict of right-padded tensors [n, ...]:
    prompt_tokens/prompt_mask [n, P], response_tokens/response_mask/behavior_logprobs [n, R], reward,
    policy_version, group (dense code per GRPO group), and advantage / draw_weight when the table has
    `advantage` / `weight`. Columnar (no per-row Python)."""
    n = table.num_rows
    if n == 0:   # sources may type an empty table loosely (all strings): no columns to read
        ints, floats, flags = torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.bool)
        return TensorDict({"prompt_tokens": ints, "prompt_mask": flags, "response_tokens": ints.clone(),
                           "response_mask": flags.clone(), "behavior_logprobs": floats, "reward": torch.zeros(0),
                           "policy_version": torch.zeros(0, dtype=torch.long),
                           "group": torch.zeros(0, dtype=torch.long)}, batch_size=[0])

    def tokens(name):
        ids, lengths = padded_list_column(table.column(name), pad_token_id, dtype=np.int64)
        mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        return torch.from_numpy(ids), torch.from_numpy(mask)

    prompt, prompt_mask = tokens("prompt_tokens")
    response, response_mask = tokens("response_tokens")
    behavior = padded_list_column(table.column("behavior_logprobs"), 0.0, width=response.shape[1])[0]
    out = {
        "prompt_tokens": prompt, "prompt_mask": prompt_mask,
        "response_tokens": response, "response_mask": response_mask,
        "behavior_logprobs": torch.from_numpy(behavior),
        "reward": torch.from_numpy(table.column("reward").to_numpy().astype(np.float32)),
        "policy_version": torch.from_numpy(table.column("policy_version").to_numpy().astype(np.int64)),
        "group": torch.from_numpy(group_codes(table) if n else np.zeros(0, np.int64)),
    }
    for column, missing in (("advantage", 0.0), (DRAW_WEIGHT, 1.0)):
        if column in table.column_names:
            out[column] = torch.from_numpy(pc.fill_null(table.column(column), missing)
                                           .to_numpy().astype(np.float32))
    return TensorDict(out, batch_size=[n])


def tensordict_to_rollouts(data: TensorDict, *, run_id: str, policy_version: int | None = None,
                           decode: Callable[[list[int]], str] | None = None, id_prefix: str = "") -> pa.Table:
    """Rollout records from a TensorDict with the keys `rollouts_to_tensordict` makes (prompt_tokens,
    prompt_mask, response_tokens, response_mask, behavior_logprobs, reward; policy_version per row or
    given; group, rows with equal group answering one prompt, else the prompt tokens decide).

    Text comes from `decode` when given, else is empty (the record needs it non-null, not non-empty).
    Rollout ids are `<id_prefix><run_id>/v<version>/<random>/<row>`: unique across writers."""
    data = data.reshape(-1)
    n = data.shape[0]
    prompt_lengths = data["prompt_mask"].sum(-1).cpu().numpy()
    response_lengths = data["response_mask"].sum(-1).cpu().numpy()
    prompts = _ragged(data["prompt_tokens"], prompt_lengths)
    responses = _ragged(data["response_tokens"], response_lengths)
    logprobs = [row[:k] for row, k in zip(data["behavior_logprobs"].float().cpu().numpy(), response_lengths)]
    if policy_version is None:
        versions = data["policy_version"].cpu().numpy().astype(np.int64)
    else:
        versions = np.full(n, policy_version, dtype=np.int64)
    if "group" in data:
        group = data["group"].cpu().numpy().astype(np.int64)
    else:
        group = np.unique([hashlib.sha1(np.asarray(p, np.int64).tobytes()).hexdigest() for p in prompts],
                          return_inverse=True)[1]
    # One write's groups stay apart from another's, even for the same prompt at the same version.
    nonce = uuid.uuid4().hex[:8]
    prompt_ids = [f"{_prompt_hash(prompts[i])}.{nonce}.{g}" for i, g in enumerate(group)]
    tables = []
    rewards = data["reward"].reshape(n).float().cpu().numpy()
    for v in np.unique(versions):       # rollouts_table takes one version per call
        rows = np.flatnonzero(versions == v)
        p_rows, r_rows = [prompts[i] for i in rows], [responses[i] for i in rows]
        tables.append(rollouts_table(
            rollout_ids=[f"{id_prefix}{run_id}/v{v}/{nonce}/{i}" for i in rows],
            prompt_ids=[prompt_ids[i] for i in rows],
            prompts=[decode(p) if decode else "" for p in p_rows],
            responses=[decode(r) if decode else "" for r in r_rows],
            prompt_tokens=p_rows, response_tokens=r_rows, behavior_logprobs=[logprobs[i] for i in rows],
            rewards=rewards[rows], policy_version=int(v), run_id=run_id))
    if not tables:
        return rollouts_table(rollout_ids=[], prompt_ids=[], prompts=[], responses=[], prompt_tokens=[],
                              response_tokens=[], behavior_logprobs=[], rewards=np.zeros(0), policy_version=0,
                              run_id=run_id)
    return pa.concat_tables(tables)


def _ragged(padded: torch.Tensor, lengths: np.ndarray) -> list[list[int]]:
    rows = padded.cpu().numpy()
    return [row[:k].tolist() for row, k in zip(rows, lengths)]


def _prompt_hash(tokens: list[int]) -> str:
    return hashlib.sha1(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()[:16]


class ReplaySourceStorage(Storage):
    """Read-only TorchRL storage: the source's candidates at `version` as padded tensors.

    `set_version(v)` reports the policy version to the source and makes the next read fetch the
    candidates for `v`; `refresh()` fetches them now. `table` is the Arrow candidate table the rows
    come from (row i of a sample's `index` is row i of it). A buffer built by hand needs
    `collate_fn=ReplaySourceStorage.collate` (reads are TensorDicts already)."""

    def __init__(self, source: ReplaySource, *, version: int = 0, unit: Unit = "group", pad_token_id: int = 0):
        if not isinstance(source, ReplaySource):
            raise TypeError(f"source must implement sponge.contract.ReplaySource, got a {type(source).__name__}")
        super().__init__(max_size=sys.maxsize)
        self.source, self.unit, self.pad_token_id = source, unit, pad_token_id
        self.version = int(version)
        self._table: pa.Table | None = None
        self._data: TensorDict | None = None

    @staticmethod
    def collate(data: TensorDict) -> TensorDict:
        """The buffer's collate function: a read is a TensorDict already."""
        return data

    def set_version(self, version: int) -> None:
        """The policy now generates with `version`: tell the source, read its candidates afresh."""
        if version < self.version:
            raise ValueError(f"policy versions only go up: got {version} after {self.version}")
        self.source.report_version(int(version))
        self.version = int(version)
        self.invalidate()

    def invalidate(self) -> None:
        """Read the candidates again at the next access (after a write, or when the source changed)."""
        self._table, self._data = None, None

    def refresh(self) -> None:
        self._table = self.source.candidates(self.version, unit=self.unit)
        self._data = rollouts_to_tensordict(self._table, self.pad_token_id)

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            self.refresh()
        return self._table

    @property
    def data(self) -> TensorDict:
        if self._data is None:
            self.refresh()
        return self._data

    def get(self, index) -> TensorDict:
        return self.data[index]

    def set(self, cursor, data, *, set_cursor: bool = True):
        raise TypeError("a ReplaySourceStorage is read-only: the source decides what is replayed; write rollouts "
                        "with SourceWriter (make_replay_buffer does) or source.send")

    def __len__(self) -> int:
        return self.data.shape[0]

    def _empty(self) -> None:
        self.source.clear()
        self.invalidate()

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "version": self.version, "unit": self.unit}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.source.load_state_dict(state_dict["source"])
        self.version, self.unit = int(state_dict["version"]), state_dict["unit"]
        self.invalidate()

    def dumps(self, path) -> None:
        torch.save(self.state_dict(), _file(path, "storage.pt"))

    def loads(self, path) -> None:
        self.load_state_dict(torch.load(_file(path, "storage.pt"), weights_only=False))


class SourceWriter(Writer):
    """Sends what the buffer is extended with to the source, as rollouts of `run_id` (at the
    storage's version unless the data carries `policy_version`). Nothing is written locally."""

    def __init__(self, source: ReplaySource, run_id: str, *, decode: Callable[[list[int]], str] | None = None):
        super().__init__()
        self.source, self.run_id, self.decode = source, run_id, decode
        self.sent = 0

    def add(self, data: TensorDict) -> torch.Tensor:
        return self.extend(data.unsqueeze(0))

    def extend(self, data: TensorDict) -> torch.Tensor:
        version = None if "policy_version" in data else getattr(self._storage, "version", 0)
        table = tensordict_to_rollouts(data, run_id=self.run_id, policy_version=version, decode=self.decode)
        self.source.send(table)
        self.sent += table.num_rows
        if isinstance(self._storage, ReplaySourceStorage):
            self._storage.invalidate()
        # Nothing is stored here (the source keeps it): -1 marks each written row as having no index.
        return torch.full((table.num_rows,), -1, dtype=torch.long)

    def _empty(self, empty_write_count: bool = True) -> None:
        if empty_write_count:
            self.sent = 0

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "sent": self.sent}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run_id, self.sent = state_dict["run_id"], int(state_dict["sent"])

    def dumps(self, path) -> None:
        torch.save(self.state_dict(), _file(path, "writer.pt"))

    def loads(self, path) -> None:
        self.load_state_dict(torch.load(_file(path, "writer.pt"), weights_only=False))


class GroupSampler(Sampler):
    """Whole GRPO groups from a `ReplaySourceStorage`, at least `batch_size` rows per sample.

    Without `score`: groups drawn without replacement ∝ their draw weight (the source's `weight`
    column, 1 when absent), then again from all when the storage has too few rows. With `score`
    (log π_current of response tokens, no gradient): drawn by `sponge.trainer.replay.ReplaySampler`
    in `mode` ("weight", "resample" or "uniform") with truncated density ratios π_current/π_behaviour,
    and each sampled row carries `weight` (its loss weight) and `logp_current` [n, R]. The last
    draw's diagnostics (ESS, clipped mass, staleness) are in `last_stats`."""

    def __init__(self, *, score: Score | None = None, mode: str = "weight", ratio_mode: str = "geometric",
                 cap: float | None = None, cap_gamma: float = 1.0, cap_min: float = 2.0, cap_max: float = 10.0,
                 recency_decay: float = 1.0, seed: int = 0):
        super().__init__()
        self.score = score
        self.sampler = ReplaySampler(mode, ratio_mode, cap, cap_gamma, cap_min, cap_max, recency_decay)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.last_stats: dict = {}

    def sample(self, storage: Storage, batch_size: int) -> tuple[torch.Tensor, dict]:
        if not isinstance(storage, ReplaySourceStorage):
            raise TypeError("GroupSampler samples a ReplaySourceStorage")
        table = storage.table
        if table.num_rows == 0:
            raise RuntimeError(f"the replay source offers no candidates at version {storage.version} "
                               "(nothing older in its window, or replay cleared)")
        if self.score is None:
            codes = group_codes(table)
            prior = storage.data[DRAW_WEIGHT].double().numpy() if DRAW_WEIGHT in storage.data \
                else np.ones(table.num_rows)
            weights = np.bincount(codes, weights=prior) / np.bincount(codes)
            index = draw_groups(codes, weights, batch_size, self.rng)
            self.last_stats = {"drawn": len(index), "candidates": table.num_rows}
            return torch.from_numpy(index), {}
        rows = table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
        draw = self.sampler.draw(rows, batch_size, self.score, storage.version, self.rng, unit="group")
        index = torch.from_numpy(draw.table.column("_row").to_numpy().copy())
        width = storage.data["response_tokens"].shape[1]
        logp = torch.nn.functional.pad(draw.logp_current.detach().float().cpu(),
                                       (0, max(width - draw.logp_current.shape[1], 0)))[:, :width]
        self.last_stats = draw.stats
        return index, {"weight": torch.from_numpy(draw.weights), "logp_current": logp}

    def _empty(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self.rng.bit_generator.state = state_dict["rng"]

    def dumps(self, path) -> None:
        torch.save(self.state_dict(), _file(path, "sampler.pt"))

    def loads(self, path) -> None:
        self.load_state_dict(torch.load(_file(path, "sampler.pt"), weights_only=False))


def make_replay_buffer(source: ReplaySource, *, run_id: str, fingerprint: str, batch_size: int,
                       score: Score | None = None, unit: Unit = "group", pad_token_id: int = 0,
                       decode: Callable[[list[int]], str] | None = None, **sampler_kwargs) -> TensorDictReplayBuffer:
    """A TensorDictReplayBuffer over `source`: registers the run (its version becomes the storage's),
    writes go to the source, samples are whole curated groups (see GroupSampler for `score` and the
    sampler's keyword arguments)."""
    version = source.register(run_id, fingerprint)
    storage = ReplaySourceStorage(source, version=version, unit=unit, pad_token_id=pad_token_id)
    return TensorDictReplayBuffer(storage=storage, sampler=GroupSampler(score=score, **sampler_kwargs),
                                  writer=SourceWriter(source, run_id, decode=decode), batch_size=batch_size,
                                  collate_fn=ReplaySourceStorage.collate)


def _file(path, name: str) -> str:
    from pathlib import Path

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / name)
