"""Codec round trips (hypothesis) and clear errors for undecodable input."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sponge.record import RecordError, conform, rollout_schema, validate
from sponge.streams.codec import (ARROW_CONTENT_TYPE, JSON_CONTENT_TYPE, content_type_of, decode, encode_arrow,
                                  encode_json, headers_for)
from sponge.streams.producer import plan_messages

DIM = 4
f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
text = st.text(max_size=20)


@st.composite
def rollouts(draw) -> pa.Table:
    n = draw(st.integers(0, 6))
    rows = []
    for i in range(n):
        k = draw(st.integers(0, 5))
        rows.append({
            "rollout_id": f"r{i}-" + draw(text), "prompt_id": draw(text.filter(bool)),
            "run_id": draw(st.none() | text), "prompt": draw(text), "response": draw(text),
            "prompt_tokens": draw(st.none() | st.lists(st.integers(-2**31, 2**31 - 1), max_size=5)),
            "response_tokens": draw(st.lists(st.integers(-2**31, 2**31 - 1), min_size=k, max_size=k)),
            "behavior_logprobs": draw(st.none() | st.lists(f32, min_size=k, max_size=k)),
            "reward": draw(f32), "policy_version": draw(st.integers(0, 2**62)),
            "created_at": draw(st.none() | st.datetimes(min_value=dt.datetime(1971, 1, 1),
                                                        max_value=dt.datetime(2200, 1, 1),
                                                        timezones=st.just(dt.timezone.utc))
                               .map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))),
            "embedding": draw(st.none() | st.lists(f32, min_size=DIM, max_size=DIM)),
            "meta": draw(st.none() | text),
        })
    return pa.Table.from_pylist(rows, schema=rollout_schema(DIM))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=rollouts(), compression=st.sampled_from([None, "lz4", "zstd"]))
def test_arrow_round_trip(table, compression):
    value = encode_arrow(table, compression)
    out = decode(value, headers_for(ARROW_CONTENT_TYPE))
    assert out.equals(table)
    # Sniffed without a header too.
    assert decode(value).equals(table)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=rollouts())
def test_json_round_trip_through_validator(table):
    if table.num_rows == 0:
        return
    out = decode(encode_json(table), headers_for(JSON_CONTENT_TYPE))
    good, violations = validate(conform(out, DIM), DIM)
    assert violations == []
    assert good.equals(table)


def test_json_single_object_and_bytes_exact_floats():
    row = {"rollout_id": "a", "prompt_id": "p", "prompt": "", "response": "", "reward": 0.1,
           "policy_version": 3, "embedding": [0.1, 0.2, 0.3, 1e-30], "created_at": 1_700_000_000_123}
    table = decode(encode_json([row]))
    good, violations = validate(conform(table, DIM), DIM)
    assert not violations
    assert good.column("reward")[0].as_py() == np.float32(0.1)
    assert good.column("created_at")[0].value == 1_700_000_000_123


@pytest.mark.parametrize("value,headers,rule", [
    (b"\x00\x01garbage", headers_for(ARROW_CONTENT_TYPE), "undecodable"),
    (b"\xff\xff\xff\xff\x10\x00\x00\x00trunc", None, "undecodable"),
    (b'[{"rollout_id": "a",', headers_for(JSON_CONTENT_TYPE), "undecodable"),
    (b'"just a string"', headers_for(JSON_CONTENT_TYPE), "undecodable"),
    (b"\xc3\x28", headers_for(JSON_CONTENT_TYPE), "undecodable"),
    (b"hello", None, "unknown content type"),
    (b"hello", [("content-type", b"text/plain")], "unknown content type"),
    (b"", None, "empty"),
    (None, None, "empty"),
])
def test_undecodable_messages_name_the_rule(value, headers, rule):
    with pytest.raises(RecordError) as err:
        decode(value, headers)
    assert err.value.violations[0].rule == rule
    assert err.value.violations[0].field == "<message>"


def test_oversized_is_rejected_before_decoding():
    with pytest.raises(RecordError) as err:
        decode(b"\xff\xff\xff\xff" + b"\x00" * 100, max_message_bytes=50)
    assert err.value.violations[0].rule == "oversized"


def test_json_column_with_mixed_types_names_the_field():
    with pytest.raises(RecordError) as err:
        decode(b'[{"reward": 1.0}, {"reward": "high"}]', headers_for(JSON_CONTENT_TYPE))
    assert (err.value.violations[0].field, err.value.violations[0].rule) == ("reward", "wrong type")


def test_content_type_parameters_are_ignored():
    assert content_type_of(b"x", [("Content-Type", b"application/json; charset=utf-8")]) == JSON_CONTENT_TYPE


@settings(max_examples=50, deadline=None)
@given(groups=st.lists(st.integers(1, 9), min_size=1, max_size=40), parts=st.integers(1, 6),
       per_message=st.integers(1, 20))
def test_message_plan_keeps_groups_whole(groups, parts, per_message):
    prompt_ids = pa.array([f"p{g}" for g, size in enumerate(groups) for _ in range(size)])
    order, starts, partitions = plan_messages(prompt_ids, parts, per_message)
    assert sorted(order.tolist()) == list(range(len(prompt_ids)))
    ends = np.r_[starts[1:], len(order)]
    ids = np.array(prompt_ids.to_pylist())[order]
    seen = {}
    for s, e, p in zip(starts, ends, partitions):
        for pid in set(ids[s:e]):
            assert pid not in seen, "a GRPO group was split across messages"
            seen[pid] = p
        # a message exceeds the target only by finishing its last group
        assert e - s <= per_message + max(groups) - 1
    assert len(seen) == len(groups)
