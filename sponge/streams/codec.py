"""Encode rollout tables into Kafka message values and decode them back.

A message value is an Arrow IPC stream (one or more record batches of rollouts), or,
for interoperability and debugging, JSON: one object or an array of objects. The
`content-type` header says which; a message without the header is sniffed (an Arrow
IPC stream starts with the continuation marker 0xFFFFFFFF, JSON with `{` or `[`).

Decoding never raises anything but `RecordError`, whose violations name the field and
the rule, so the caller can dead-letter the message with a precise reason.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Sequence

import pyarrow as pa

from sponge.record import RecordError, Violation, check_size, DEFAULT_MAX_MESSAGE_BYTES

ARROW_CONTENT_TYPE = "application/vnd.apache.arrow.stream"
JSON_CONTENT_TYPE = "application/json"
CONTENT_TYPE_HEADER = "content-type"

#: Kafka headers are (str, bytes) pairs.
Headers = Sequence[tuple[str, bytes]]

_ARROW_MAGIC = b"\xff\xff\xff\xff"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def encode_arrow(table: pa.Table | pa.RecordBatch, compression: str | None = None) -> bytes:
    """Serialise a table as one Arrow IPC stream. `compression` may be 'lz4' or 'zstd'."""
    options = pa.ipc.IpcWriteOptions(compression=compression)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write(table)
    return sink.getvalue().to_pybytes()


def encode_json(rows: pa.Table | Iterable[dict]) -> bytes:
    """Serialise rollouts as a JSON array of objects (timestamps as epoch milliseconds).

    Non-finite floats are written as NaN/Infinity (Python's JSON dialect) so that a
    malformed rollout stays malformed on the wire instead of silently becoming null.
    """
    if isinstance(rows, pa.Table):
        rows = rows.to_pylist()
    return json.dumps(list(rows), default=_json_default, separators=(",", ":")).encode()


def headers_for(content_type: str) -> list[tuple[str, bytes]]:
    return [(CONTENT_TYPE_HEADER, content_type.encode())]


def header_value(headers: Headers | None, name: str) -> bytes | None:
    """The value of the first header called `name` (case-insensitive), or None."""
    for key, value in headers or ():
        if key.lower() == name:
            return value
    return None


def content_type_of(value: bytes, headers: Headers | None) -> str:
    """The declared content type, or the sniffed one when the header is absent."""
    declared = header_value(headers, CONTENT_TYPE_HEADER)
    if declared is not None:
        return declared.decode("utf-8", "replace").split(";")[0].strip().lower()
    if value[:4] == _ARROW_MAGIC:
        return ARROW_CONTENT_TYPE
    if value.lstrip()[:1] in (b"{", b"["):
        return JSON_CONTENT_TYPE
    return "unknown"


def decode(
    value: bytes | None,
    headers: Headers | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> pa.Table:
    """Decode one message value into a table of rollouts (not yet conformed or validated).

    Raises RecordError for an oversized, empty, undecodable or unknown-type message.
    """
    if value is None or len(value) == 0:
        raise RecordError([Violation("<message>", "empty", "message value is empty or null")])
    check_size(len(value), max_message_bytes)
    content_type = content_type_of(value, headers)
    if content_type == ARROW_CONTENT_TYPE:
        return decode_arrow(value)
    if content_type == JSON_CONTENT_TYPE:
        return decode_json(value)
    raise RecordError([Violation("<message>", "unknown content type",
                                 f"content-type {content_type!r} is neither {ARROW_CONTENT_TYPE} "
                                 f"nor {JSON_CONTENT_TYPE}")])


def decode_arrow(value: bytes) -> pa.Table:
    try:
        return pa.ipc.open_stream(value).read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise RecordError([Violation("<message>", "undecodable",
                                     f"not an Arrow IPC stream: {_first_line(exc)}")]) from None


def decode_json(value: bytes) -> pa.Table:
    """A JSON object or array of objects → table, one column per key seen.

    Each column is typed on its own, so a column whose values cannot share one type is
    reported as that field's 'wrong type' instead of failing the message anonymously.
    """
    try:
        doc = json.loads(value)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordError([Violation("<message>", "undecodable", f"invalid JSON: {exc}")]) from None
    rows = [doc] if isinstance(doc, dict) else doc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RecordError([Violation("<message>", "undecodable",
                                     "JSON value must be an object or an array of objects")])
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns, problems = [], []
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns.append(pa.array(values, from_pandas=False))
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            problems.append(Violation(name, "wrong type", f"values cannot share one type ({_first_line(exc)})"))
            columns.append(pa.nulls(len(rows)))
    if problems:
        raise RecordError(problems)
    table = pa.Table.from_arrays(columns, names=list(names))
    # JSON has no timestamp type: epoch milliseconds (the encoding above) become one here.
    if "created_at" in table.column_names and pa.types.is_integer(table.column("created_at").type):
        i = table.column_names.index("created_at")
        table = table.set_column(i, "created_at", table.column(i).cast(pa.timestamp("ms", tz="UTC")))
    return table


def _json_default(obj):
    if isinstance(obj, dt.datetime):
        if obj.tzinfo is None:
            obj = obj.replace(tzinfo=dt.timezone.utc)
        return (obj - _EPOCH) // dt.timedelta(milliseconds=1)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if isinstance(obj, float) and not math.isfinite(obj):
        return obj
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
