"""The rollout validator: every rule named with its field, valid rows kept exactly (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sponge import record
from sponge.record import RecordError, Violation, check_size, conform, rollout_schema, validate
from sponge.streams.synthetic import synthetic_rollouts

DIM = 8


def good_table(n: int, seed: int = 0) -> pa.Table:
    from sponge.streams.synthetic import SyntheticConfig

    return synthetic_rollouts(n, seed=seed, config=SyntheticConfig(embedding_dim=DIM, response_tokens=6,
                                                                   prompt_tokens=4, group_size=2))


def set_value(table: pa.Table, name: str, row: int, value, typ=None) -> pa.Table:
    column = table.column(name).to_pylist()
    column[row] = value
    typ = typ or table.schema.field(name).type
    i = table.schema.get_field_index(name)
    return table.set_column(i, pa.field(name, typ), pa.array(column, typ))


# Each row-level corruption: (field, rule, function(table, row, draw) -> table)
def _nan_reward(t, r, v):
    return set_value(t, "reward", r, v)


def _null(name):
    def f(t, r, _):
        return set_value(t, name, r, None)
    return f


def _neg_version(t, r, v):
    return set_value(t, "policy_version", r, v)


def _bad_logprob_len(t, r, k):
    lp = t.column("behavior_logprobs")[r].as_py()
    return set_value(t, "behavior_logprobs", r, lp[: max(0, len(lp) - k)])


def _nonfinite_logprob(t, r, v):
    lp = t.column("behavior_logprobs")[r].as_py()
    lp[0] = v
    return set_value(t, "behavior_logprobs", r, lp)


def _nonfinite_embedding(t, r, v):
    emb = t.column("embedding")[r].as_py()
    emb[len(emb) // 2] = v
    return set_value(t, "embedding", r, emb)


def _wrong_dim(t, r, k):
    emb = t.column("embedding").to_pylist()
    emb[r] = emb[r][:-k] if k < DIM else emb[r] + [0.5] * k
    i = t.schema.get_field_index("embedding")
    return t.set_column(i, "embedding", pa.array(emb, pa.list_(pa.float32())))


def _empty_id(t, r, _):
    return set_value(t, "rollout_id", r, "")


CORRUPTIONS = {
    "reward non-finite": ("reward", "non-finite", _nan_reward, st.sampled_from([math.nan, math.inf, -math.inf])),
    "reward missing": ("reward", "missing", _null("reward"), st.none()),
    "prompt_id missing": ("prompt_id", "missing", _null("prompt_id"), st.none()),
    "response missing": ("response", "missing", _null("response"), st.none()),
    "rollout_id empty": ("rollout_id", "empty", _empty_id, st.none()),
    "policy_version negative": ("policy_version", "negative", _neg_version, st.integers(-(2**40), -1)),
    "logprob length": ("behavior_logprobs", "length mismatch", _bad_logprob_len, st.integers(1, 3)),
    "logprob non-finite": ("behavior_logprobs", "non-finite", _nonfinite_logprob,
                           st.sampled_from([math.nan, math.inf, -math.inf])),
    "embedding non-finite": ("embedding", "non-finite", _nonfinite_embedding,
                             st.sampled_from([math.nan, math.inf, -math.inf])),
    "embedding dimension": ("embedding", "wrong dimension", _wrong_dim, st.integers(1, 3)),
}


def _nullable(table: pa.Table) -> pa.Table:
    return table.cast(pa.schema([f.with_nullable(True) for f in table.schema]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(1, 12))
def test_every_violation_is_named_and_valid_rows_kept(data, n):
    pristine = _nullable(good_table(n, seed=n))
    table = pristine
    expected: dict[int, tuple[str, str]] = {}
    bad_rows = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n), label="bad rows")
    for row in bad_rows:
        name = data.draw(st.sampled_from(sorted(CORRUPTIONS)), label=f"corruption of row {row}")
        field, rule, corrupt, values = CORRUPTIONS[name]
        table = corrupt(table, row, data.draw(values))
        expected[row] = (field, rule)
    good, violations = validate(conform(table, DIM), DIM)
    found = {(v.row, v.field, v.rule) for v in violations}
    for row, (field, rule) in expected.items():
        assert (row, field, rule) in found, (row, field, rule, violations)
    assert {v.row for v in violations} == set(expected)
    keep = [i for i in range(n) if i not in expected]
    assert good.schema.equals(rollout_schema(DIM))
    assert good.column("rollout_id").to_pylist() == [table.column("rollout_id")[i].as_py() for i in keep]
    # Valid rows come out unchanged, value for value.
    original = pristine.take(pa.array(keep, pa.int64())).cast(rollout_schema(DIM))
    assert good.equals(original)


def test_missing_required_column_names_field():
    table = good_table(3).drop_columns(["reward", "prompt_id"])
    with pytest.raises(RecordError) as err:
        conform(table, DIM)
    assert {(v.field, v.rule) for v in err.value.violations} == {("reward", "missing"), ("prompt_id", "missing")}
    assert "reward" in str(err.value) and "missing" in str(err.value)


def test_wrong_type_names_field():
    table = good_table(3)
    table = table.set_column(table.schema.get_field_index("policy_version"), "policy_version",
                             pa.array(["v1", "v2", "v3"]))
    with pytest.raises(RecordError) as err:
        conform(table, DIM)
    [v] = err.value.violations
    assert (v.field, v.rule) == ("policy_version", "wrong type")


def test_fixed_size_embedding_of_wrong_width_is_rejected():
    table = good_table(2)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * (DIM + 1), np.float32)), DIM + 1)
    table = table.set_column(table.schema.get_field_index("embedding"), "embedding", emb)
    with pytest.raises(RecordError) as err:
        conform(table, DIM)
    assert err.value.violations[0].rule == "wrong dimension"


def test_safe_casts_and_absent_optionals():
    """JSON-like input (doubles, int64, variable lists, no optional columns) conforms and validates."""
    src = good_table(4)
    table = pa.table({
        "rollout_id": src.column("rollout_id"), "prompt_id": src.column("prompt_id"),
        "prompt": src.column("prompt"), "response": src.column("response"),
        "reward": src.column("reward").cast(pa.float64()),
        "policy_version": src.column("policy_version").cast(pa.int32()),
        "embedding": pa.array(src.column("embedding").to_pylist(), pa.list_(pa.float64())),
        "extra_column": pa.array([1, 2, 3, 4]),
    })
    good, violations = validate(conform(table, DIM), DIM)
    assert violations == []
    assert good.num_rows == 4 and good.schema.equals(rollout_schema(DIM))
    assert good.column("embedding").equals(src.column("embedding"))
    assert good.column("behavior_logprobs").null_count == 4


def test_fixed_size_embedding_of_doubles_is_cast():
    src = good_table(3)
    emb = src.column("embedding").cast(pa.list_(pa.float64(), DIM))
    table = src.set_column(src.schema.get_field_index("embedding"), "embedding", emb)
    good, violations = validate(conform(table, DIM), DIM)
    assert not violations and good.column("embedding").equals(src.column("embedding"))


def test_check_size():
    check_size(10, 10)
    with pytest.raises(RecordError) as err:
        check_size(11, 10)
    assert err.value.violations == [Violation("<message>", "oversized", "11 bytes > limit 10")]


def test_violation_json_round_trip():
    import json

    vs = [Violation("reward", "non-finite", "reward must be finite", 3)]
    assert json.loads(record.violations_to_json(vs)) == [
        {"field": "reward", "rule": "non-finite", "detail": "reward must be finite", "row": 3}]
