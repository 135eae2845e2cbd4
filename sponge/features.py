"""Cheap rollout embeddings, computed where rollouts are made.

The service embeds a rollout that arrives without an embedding with all-MiniLM-L6-v2: good
vectors, but ~20 ms a rollout on a busy 2-core CPU, which a trainer waiting for its own rollouts
would feel on every step. A trainer that sends its rollouts through `sponge.client` embeds them
itself instead, here: a feature-hashed bag of token uni- and bigrams of prompt and response
(signed hashing, L2-normalised), vectorised over whole Arrow columns, ~1 µs a token. Two rollouts
are close when they share tokens and short token sequences — what the selector needs to tell
similar rollouts of one run apart (each run is selected on its own, so runs never compare
vectors from different embedders).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["token_ngram_embedding", "with_embeddings"]

_MIX = np.uint64(0x9E3779B97F4A7C15)


def token_ngram_embedding(prompt_tokens: pa.Array | pa.ChunkedArray, response_tokens: pa.Array | pa.ChunkedArray,
                          dim: int) -> np.ndarray:
    """(n, dim) float32 unit vectors: hashed token unigrams and bigrams of prompt and response."""
    n = len(prompt_tokens)
    out = np.zeros((n, dim), dtype=np.float32)
    for salt, column, weight in ((1, prompt_tokens, 0.5), (2, response_tokens, 1.0)):
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        tokens = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.uint64)
        rows = np.repeat(np.arange(n), lengths)
        keys = [(tokens, rows)]
        same_row = rows[1:] == rows[:-1]                     # bigrams never cross two rollouts
        keys.append((tokens[:-1][same_row] * _MIX + tokens[1:][same_row] + np.uint64(7), rows[1:][same_row]))
        for gram, (key, at) in enumerate(keys):
            h = _hash(key ^ np.uint64(salt * 1_000_003 + gram))
            bucket = (h % np.uint64(dim)).astype(np.int64)
            sign = np.where((h >> np.uint64(63)) == 1, -weight, weight).astype(np.float32)
            np.add.at(out, (at, bucket), sign)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norm, 1e-12)


def with_embeddings(rollouts: pa.Table, dim: int) -> pa.Table:
    """`rollouts` with an `embedding` column (FixedSizeList<float32, dim>) where it had none."""
    if "embedding" in rollouts.column_names and rollouts.column("embedding").null_count == 0:
        return rollouts
    vectors = token_ngram_embedding(rollouts.column("prompt_tokens"), rollouts.column("response_tokens"), dim)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    if "embedding" in rollouts.column_names:
        return rollouts.set_column(rollouts.column_names.index("embedding"), "embedding", column)
    return rollouts.append_column("embedding", column)


def _hash(x: np.ndarray) -> np.ndarray:
    """splitmix64: a well-mixed 64-bit hash of each uint64, vectorised."""
    with np.errstate(over="ignore"):
        x = (x + _MIX).astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
