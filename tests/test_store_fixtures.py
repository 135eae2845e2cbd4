"""Synthetic rollout tables for the store and SQL tests (the real generator lives in sponge.streams)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sponge.record import rollout_schema, validate


def make_rollouts(
    n: int,
    *,
    dim: int = 16,
    tokens: int = 8,
    start: int = 0,
    policy_versions: tuple[int, ...] = (0,),
    seed: int = 0,
    id_prefix: str = "r",
) -> pa.Table:
    """`n` valid rollouts with ids `{id_prefix}-{start + i}`, random embeddings and log-probs.

    Built column by column (no per-row objects except the id strings), so 100k+ rows are quick.
    """
    rng = np.random.default_rng(seed + start)
    idx = np.arange(start, start + n)
    ids = pa.array([f"{id_prefix}-{i:09d}" for i in idx], pa.string())
    prompt_ids = pa.array([f"p-{i // 4:08d}" for i in idx], pa.string())
    token_offsets = pa.array(np.arange(n + 1, dtype=np.int32) * tokens)
    resp_tokens = pa.ListArray.from_arrays(token_offsets, pa.array(rng.integers(0, 50_000, n * tokens, dtype=np.int32)))
    prompt_tokens = pa.ListArray.from_arrays(token_offsets, pa.array(rng.integers(0, 50_000, n * tokens, dtype=np.int32)))
    logprobs = pa.ListArray.from_arrays(
        token_offsets, pa.array(-rng.exponential(1.0, n * tokens).astype(np.float32))
    )
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * dim).astype(np.float32)), dim)
    versions = np.asarray(policy_versions, dtype=np.int64)[idx % len(policy_versions)]
    columns = {
        "rollout_id": ids,
        "prompt_id": prompt_ids,
        "run_id": pa.repeat(pa.scalar("run-a", pa.string()), n),
        "prompt": pa.array([f"What is {i} + 1?" for i in idx], pa.string()),
        "response": pa.array([f"It is {i + 1}." for i in idx], pa.string()),
        "prompt_tokens": prompt_tokens,
        "response_tokens": resp_tokens,
        "behavior_logprobs": logprobs,
        "reward": pa.array(rng.standard_normal(n).astype(np.float32)),
        "policy_version": pa.array(versions),
        "created_at": pa.array((1_700_000_000_000 + idx).astype(np.int64)).cast(pa.timestamp("ms", tz="UTC")),
        "embedding": embedding,
        "meta": pa.repeat(pa.scalar('{"source": "test"}', pa.string()), n),
    }
    return pa.Table.from_pydict(columns, schema=rollout_schema(dim))


def test_make_rollouts_passes_the_validator():
    table = make_rollouts(50, dim=16, policy_versions=(1, 2))
    good, violations = validate(table, 16)
    assert violations == []
    assert good.num_rows == 50
    assert good.schema.equals(rollout_schema(16), check_metadata=False)
