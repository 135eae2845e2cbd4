"""The rollout record: its Arrow schema and a columnar validator.

One schema version covers every field. Validation runs on whole Arrow tables
(pyarrow.compute kernels, no per-row Python), and every failure names the row,
the field and the rule it broke, so a dead letter says exactly what was wrong.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 1
DEFAULT_EMBEDDING_DIM = 384
#: A Kafka message larger than this is rejected before it is decoded.
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024

REQUIRED_FIELDS = ("rollout_id", "prompt_id", "prompt", "response", "reward", "policy_version")

#: Columns the store adds to every row it keeps.
STORE_FIELDS = (
    pa.field("topic", pa.string()),
    pa.field("partition", pa.int32()),
    pa.field("offset", pa.int64()),
    pa.field("ingested_at", pa.timestamp("ms", tz="UTC")),
)


#: A dead letter as the store keeps it (the DLQ topic carries the same facts as headers).
DEAD_LETTER_SCHEMA = pa.schema([
    pa.field("topic", pa.string()),
    pa.field("partition", pa.int32()),
    pa.field("offset", pa.int64()),
    pa.field("reason", pa.string()),        # JSON list of violations: field, rule, row, rollout_id
    pa.field("value", pa.binary()),         # the original message bytes
    pa.field("received_at", pa.timestamp("ms", tz="UTC")),
    # topic/partition/offset/sha256(value)[:32]: equal for every copy of one letter (files written
    # before it existed lack it; the store's view computes it for them)
    pa.field("letter_id", pa.string()),
])


@functools.lru_cache(maxsize=8)
def rollout_schema(embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> pa.Schema:
    """The Arrow schema of a rollout with `embedding_dim`-wide embeddings."""
    fields = [
        pa.field("rollout_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string()),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("prompt_tokens", pa.list_(pa.int32())),
        pa.field("response_tokens", pa.list_(pa.int32())),
        pa.field("behavior_logprobs", pa.list_(pa.float32())),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("policy_version", pa.int64(), nullable=False),
        pa.field("created_at", pa.timestamp("ms", tz="UTC")),
        pa.field("embedding", pa.list_(pa.float32(), embedding_dim)),
        pa.field("meta", pa.string()),
    ]
    return pa.schema(fields, metadata={b"sponge.schema_version": str(SCHEMA_VERSION).encode()})


def stored_schema(embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> pa.Schema:
    """The rollout schema plus the columns the store adds."""
    base = rollout_schema(embedding_dim)
    return pa.schema(list(base) + list(STORE_FIELDS), metadata=base.metadata)


@dataclass(frozen=True)
class Violation:
    """One broken rule. `row` is None when the whole message is at fault."""

    field: str
    rule: str
    detail: str
    row: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        where = "message" if self.row is None else f"row {self.row}"
        return f"{where}: field '{self.field}' {self.rule}: {self.detail}"


class RecordError(ValueError):
    """Raised when a whole message cannot be read as rollouts."""

    def __init__(self, violations: list[Violation]):
        self.violations = violations
        super().__init__("; ".join(str(v) for v in violations))


def violations_to_json(violations: list[Violation]) -> str:
    return json.dumps([v.to_dict() for v in violations], separators=(",", ":"))


def check_size(num_bytes: int, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
    """Reject an oversized message before any decoding work is spent on it."""
    if num_bytes > max_message_bytes:
        raise RecordError(
            [Violation("<message>", "oversized", f"{num_bytes} bytes > limit {max_message_bytes}")]
        )


def conform(table: pa.Table, embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> pa.Table:
    """Return `table` with exactly the rollout schema's columns and types.

    Missing optional columns become nulls; safe casts (int32→int64, double→float,
    a variable list of the right width → fixed-size list) are applied. A missing
    required column or a type that cannot be cast safely raises RecordError
    naming the field. Per-row width problems of a variable-length embedding
    list are left to `validate`, which names the rows.
    """
    schema = rollout_schema(embedding_dim)
    if table.schema.names == schema.names and table.schema.types == schema.types:
        # Already the right types (the producer's own encoding): relabel without copying, so the
        # result has the same (all-nullable) schema as a converted table and they concatenate.
        return pa.Table.from_arrays(table.columns, names=schema.names)
    problems: list[Violation] = []
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            if field.name in REQUIRED_FIELDS:
                problems.append(Violation(field.name, "missing", "required field is absent"))
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if column.type == field.type:
            columns.append(column)
            continue
        if field.name == "embedding" and _is_list_of_numbers(column.type):
            # Width is checked row by row in validate(); keep it variable here.
            columns.append(column.cast(pa.list_(pa.float32())))
            continue
        if (field.name == "embedding" and pa.types.is_fixed_size_list(column.type)
                and column.type.list_size == embedding_dim and _is_number(column.type.value_type)):
            columns.append(column.cast(field.type))
            continue
        if field.name == "embedding" and pa.types.is_fixed_size_list(column.type):
            problems.append(
                Violation("embedding", "wrong dimension",
                          f"expected {embedding_dim}, got {column.type.list_size}")
            )
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        try:
            columns.append(column.cast(field.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            problems.append(
                Violation(field.name, "wrong type",
                          f"expected {field.type}, got {column.type} ({_first_line(exc)})")
            )
            columns.append(pa.nulls(table.num_rows, field.type))
    if problems:
        raise RecordError(problems)
    names = [f.name for f in schema]
    return pa.Table.from_arrays(columns, names=names)


def validate(
    table: pa.Table, embedding_dim: int = DEFAULT_EMBEDDING_DIM
) -> tuple[pa.Table, list[Violation]]:
    """Split a conformed table into (valid rows with the exact schema, violations).

    Every rule is one vectorised check over the column; rows that break any
    rule are dropped from the returned table and listed with their index.
    """
    bad, violations = check(table, embedding_dim)
    return keep_valid(table, bad, embedding_dim), violations


def keep_valid(table: pa.Table, bad: np.ndarray, embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> pa.Table:
    """The rows of a conformed table not marked `bad`, with exactly the rollout schema."""
    schema = rollout_schema(embedding_dim)
    good = table.filter(pa.array(~bad)) if bad.any() else table
    if not pa.types.is_fixed_size_list(good.column("embedding").type):
        good = good.set_column(
            good.schema.get_field_index("embedding"), "embedding",
            _to_fixed_size(good.column("embedding"), embedding_dim),
        )
    return good.cast(schema)


def check(table: pa.Table, embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> tuple[np.ndarray, list[Violation]]:
    """Every rule over a conformed table: (bad-row mask, one Violation per broken rule per row)."""
    n = table.num_rows
    bad = np.zeros(n, dtype=bool)
    violations: list[Violation] = []

    def flag(mask: np.ndarray, field: str, rule: str, detail: str) -> None:
        nonlocal bad
        if mask.any():
            for row in np.flatnonzero(mask):
                violations.append(Violation(field, rule, detail, int(row)))
            bad |= mask

    for name in REQUIRED_FIELDS:
        flag(_np_bool(table.column(name).is_null()), name, "missing", "required value is null")

    flag(_np_bool(pc.equal(table.column("rollout_id"), "")), "rollout_id", "empty", "must be non-empty")
    flag(_np_bool(pc.equal(table.column("prompt_id"), "")), "prompt_id", "empty", "must be non-empty")

    reward = table.column("reward")
    flag(_np_bool(pc.invert(pc.is_finite(reward))), "reward", "non-finite", "reward must be finite")

    flag(_np_bool(pc.less(table.column("policy_version"), 0)), "policy_version", "negative",
         "policy_version must be >= 0")

    response_len = pc.list_value_length(table.column("response_tokens"))
    logprob_len = pc.list_value_length(table.column("behavior_logprobs"))
    has_logprobs = pc.is_valid(table.column("behavior_logprobs"))
    length_mismatch = pc.and_(has_logprobs, pc.not_equal(pc.fill_null(response_len, -1), logprob_len))
    flag(_np_bool(length_mismatch), "behavior_logprobs", "length mismatch",
         "len(behavior_logprobs) must equal len(response_tokens)")
    flat_logprobs = pc.list_flatten(table.column("behavior_logprobs"))
    if len(flat_logprobs) and not pc.all(pc.is_finite(flat_logprobs)).as_py():
        rows = _rows_with_nonfinite(table.column("behavior_logprobs"))
        flag(rows, "behavior_logprobs", "non-finite", "log-probs must be finite")

    embedding = table.column("embedding")
    has_embedding = pc.is_valid(embedding)
    if pa.types.is_fixed_size_list(embedding.type):
        wrong_dim = np.zeros(n, dtype=bool)
    else:
        wrong_dim = _np_bool(pc.and_(has_embedding,
                                     pc.not_equal(pc.list_value_length(embedding), embedding_dim)))
    flag(wrong_dim, "embedding", "wrong dimension", f"embedding must have {embedding_dim} values")
    flat_embedding = pc.list_flatten(embedding)
    if len(flat_embedding) and not pc.all(pc.is_finite(flat_embedding)).as_py():
        flag(_rows_with_nonfinite(embedding) & ~wrong_dim, "embedding", "non-finite",
             "embedding values must be finite")

    return bad, violations


def _to_fixed_size(column: pa.ChunkedArray, dim: int) -> pa.Array:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = pc.list_flatten(column).cast(pa.float32())
    # Null rows contribute no values; rebuild offsets so each valid row has `dim` values.
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
    full = np.zeros((len(column), dim), dtype=np.float32)
    full[valid] = values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    return pa.FixedSizeListArray.from_arrays(
        pa.array(full.reshape(-1)), dim, mask=pa.array(~valid)
    )


def _rows_with_nonfinite(column: pa.ChunkedArray) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_fixed_size_list(column.type):
        flat = column.values
        parents = np.repeat(np.arange(len(column)), column.type.list_size)
        offset = column.offset * column.type.list_size
        flat = flat.slice(offset, len(column) * column.type.list_size)
    else:
        flat = pc.list_flatten(column)
        parents = pc.list_parent_indices(column).to_numpy()
    nonfinite = ~pc.is_finite(flat).to_numpy(zero_copy_only=False)
    mask = np.zeros(len(column), dtype=bool)
    mask[parents[nonfinite]] = True
    return mask


def _np_bool(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.fill_null(arr, False).to_numpy(zero_copy_only=False).astype(bool)


def _is_list_of_numbers(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
        pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)
    )


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
