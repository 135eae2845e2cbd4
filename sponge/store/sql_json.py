"""JSON for query results: one encoder, by Arrow type, for every type DuckDB returns.

Used by `sponge sql --format json` (JSON Lines) and `POST /sql` (``"rows"``), so both write
the same text for the same value:

=====================================  =================================================
DuckDB type (Arrow type)               JSON
=====================================  =================================================
BOOLEAN, integers up to (U)BIGINT      number / true / false
FLOAT, DOUBLE                          number; NaN, Infinity and -Infinity as null
DECIMAL (decimal128)                   string, exact, with the column's scale ("1.50")
HUGEINT (exported as DECIMAL(38,0))    string of digits, exact
UHUGEINT, BIT, BIGNUM, TIMETZ          string: DuckDB's own text (the worker casts these
                                       top-level columns to VARCHAR: Arrow would lose them)
VARCHAR, UUID, JSON, ENUM              string (UUID in its 8-4-4-4-12 form)
BLOB (binary)                          string, base64 (RFC 4648, with padding)
DATE                                   "2024-02-29"
TIME                                   "12:34:56.789000" (as many digits as the unit: µs)
TIMESTAMP (_S, _MS, _NS)               "2024-01-02T03:04:05.123456" (digits per unit: 0/3/6/9)
TIMESTAMPTZ                            the instant in UTC: "2024-01-02T01:04:05.000000+00:00"
infinite DATE / TIMESTAMP              "infinity" / "-infinity"
INTERVAL (month_day_nano)              ISO 8601 duration, each part signed as PostgreSQL's
                                       iso_8601 style: "P1Y2M3DT4H5M6.5S", "P-1Y-2M", "PT0S"
LIST, ARRAY                            array, elements encoded recursively
STRUCT                                 object, fields encoded recursively
MAP                                    object; keys that are not strings become their JSON text
UNION                                  the value of the member that is set
NULL at any depth                      null
=====================================  =================================================

Years outside 1..9999 are written with as many digits as they need (astronomical numbering:
year 0 is 1 BC). Columns are converted whole, by type (the Arrow buffers read as numbers with
numpy where that is the conversion), not value by value with type checks.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: DuckDB's infinite TIMESTAMP and DATE values as they reach Arrow (the storage integers).
_INFINITE_TS = 2**63 - 1
_INFINITE_DATE = 2**31 - 1
_PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
_DIGITS = {"s": 0, "ms": 3, "us": 6, "ns": 9}
_SECONDS_PER_DAY = 86_400


def json_rows(table: pa.Table) -> list[dict[str, Any]]:
    """The rows of `table` as JSON-ready dicts (column name -> value)."""
    names = table.column_names
    columns = [json_column(column) for column in table.columns]
    return [dict(zip(names, values)) for values in zip(*columns)] if columns else [{} for _ in range(table.num_rows)]


def json_column(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    """One column as a list of JSON-ready values (see the module docstring for the forms)."""
    if isinstance(column, pa.ChunkedArray):
        out: list[Any] = []
        for chunk in column.chunks:
            out.extend(_encode(chunk))
        return out
    return _encode(column)


def write_json_lines(table: pa.Table, out: Any) -> None:
    """One JSON object per row, one row per line."""
    for row in json_rows(table):
        out.write(json.dumps(row, separators=(",", ":"), allow_nan=False))
        out.write("\n")


# ---------------------------------------------------------------------- by Arrow type


def _encode(arr: pa.Array) -> list[Any]:
    t = arr.type
    if isinstance(t, pa.ExtensionType):
        if t.extension_name == "arrow.uuid":
            return _with_nulls(arr.storage, lambda a: [str(uuid.UUID(bytes=b)) for b in a.to_pylist()])
        return _encode(arr.storage)
    if pa.types.is_dictionary(t):
        return _encode(arr.dictionary_decode())
    if pa.types.is_null(t):
        return [None] * len(arr)
    if pa.types.is_floating(t):
        # NaN and ±inf have no JSON form: null, columnar (is_finite is null for nulls, false for NaN).
        finite = arr.cast(pa.float64()) if pa.types.is_float16(t) else arr
        return pc.if_else(pc.is_finite(finite), finite, pa.scalar(None, finite.type)).to_pylist()
    if pa.types.is_decimal(t):
        return [None if v is None else format(v, "f") for v in arr.to_pylist()]
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) \
            or _is_view(t, "binary_view"):
        return [None if v is None else base64.b64encode(v).decode("ascii") for v in arr.to_pylist()]
    if pa.types.is_timestamp(t):
        return _with_nulls(arr, lambda a: _timestamps(a, t.unit, t.tz is not None))
    if pa.types.is_date32(t):
        return _with_nulls(arr, lambda a: [_date_text(int(d)) for d in _ints(a, pa.int32())])
    if pa.types.is_date64(t):
        return _with_nulls(arr, lambda a: [_date_text(int(ms) // (_SECONDS_PER_DAY * 1000))
                                           for ms in _ints(a, pa.int64())])
    if pa.types.is_time(t):
        storage = pa.int32() if pa.types.is_time32(t) else pa.int64()
        return _with_nulls(arr, lambda a: [_time_text(int(v), t.unit) for v in _ints(a, storage)])
    if pa.types.is_duration(t):
        per = _PER_SECOND[t.unit]
        return _with_nulls(arr, lambda a: [_iso_duration(0, 0, int(v) * (10**9 // per)) for v in _ints(a, pa.int64())])
    if t == pa.month_day_nano_interval():
        return [None if v is None else _iso_duration(v.months, v.days, v.nanoseconds) for v in arr.to_pylist()]
    if pa.types.is_map(t):
        return _maps(arr)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) \
            or _is_view(t, "list_view") or _is_view(t, "large_list_view"):
        return _lists(arr)
    if pa.types.is_struct(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        fields = [_encode(child) for child in arr.flatten()]  # flatten(): slice- and null-aware
        valid = arr.is_valid().to_pylist()
        return [dict(zip(names, values)) if ok else None for ok, values in zip(valid, zip(*fields))] \
            if fields else [{} if ok else None for ok in valid]
    if pa.types.is_union(t):
        return [_dynamic(v) for v in arr.to_pylist()]
    # Booleans, integers, strings (and anything else to_pylist already makes JSON-ready).
    return [_dynamic(v) for v in arr.to_pylist()] if not _plain(t) else arr.to_pylist()


def _plain(t: pa.DataType) -> bool:
    return (pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t) or _is_view(t, "string_view"))


def _is_view(t: pa.DataType, name: str) -> bool:
    check = getattr(pa.types, f"is_{name}", None)
    return bool(check and check(t))


def _with_nulls(arr: pa.Array, convert: Callable[[pa.Array], list[Any]]) -> list[Any]:
    """Apply `convert` to the non-null values only, then put the nulls back in place."""
    if arr.null_count == 0:
        return convert(arr)
    valid = arr.is_valid()
    converted = iter(convert(arr.filter(valid)))
    return [next(converted) if ok else None for ok in valid.to_pylist()]


def _ints(arr: pa.Array, storage: pa.DataType) -> np.ndarray:
    """The storage integers of a temporal array with no nulls (days, seconds, micros, ...)."""
    return arr.view(storage).to_numpy(zero_copy_only=False)


def _lists(arr: pa.Array) -> list[Any]:
    values = _encode(arr.flatten())            # flatten(): only the elements of valid, in-slice lists
    lengths = pc.list_value_length(arr).to_pylist()   # null for a null list
    out: list[Any] = []
    pos = 0
    for n in lengths:
        if n is None:
            out.append(None)
        else:
            out.append(values[pos:pos + n])
            pos += n
    return out


def _maps(arr: pa.Array) -> list[Any]:
    # MapArray.keys/.items are the whole child arrays (not slice-aware); the offsets are
    # slice-aware and index into them, so take just the span this (maybe sliced) array covers.
    offsets = arr.offsets.to_numpy()
    start, end = int(offsets[0]), int(offsets[-1])
    keys = _encode(arr.keys.slice(start, end - start))
    items = _encode(arr.items.slice(start, end - start))
    out: list[Any] = []
    for i, ok in enumerate(arr.is_valid().to_pylist()):
        lo, hi = int(offsets[i]) - start, int(offsets[i + 1]) - start
        out.append({k if isinstance(k, str) else json.dumps(k): v for k, v in zip(keys[lo:hi], items[lo:hi])}
                   if ok else None)
    return out


def _dynamic(value: Any) -> Any:
    """JSON-ready form of a Python value of unknown Arrow type (union members)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return format(value, "f")
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _dynamic(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dynamic(v) for v in value]
    return str(value)


# ---------------------------------------------------------------------- calendar math


def civil_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) of the proleptic Gregorian date `days` after 1970-01-01, any year.

    Howard Hinnant's days-to-civil algorithm: shift to eras of 400 years starting on March 1st.
    """
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097                                   # day of era, 0..146096
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365   # year of era, 0..399
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)           # day of year from March 1st, 0..365
    mp = (5 * doy + 2) // 153                                 # month from March, 0..11
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return era * 400 + yoe + (month <= 2), month, day


def _year_text(year: int) -> str:
    return f"{year:04d}" if year >= 0 else f"-{-year:04d}"


def _date_text(days: int) -> str:
    if abs(days) == _INFINITE_DATE:
        return "infinity" if days > 0 else "-infinity"
    year, month, day = civil_from_days(days)
    return f"{_year_text(year)}-{month:02d}-{day:02d}"


def _clock_text(seconds_of_day: int, fraction: int, digits: int) -> str:
    hours, rest = divmod(seconds_of_day, 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"{hours:02d}:{minutes:02d}:{seconds:02d}"
    return f"{text}.{fraction:0{digits}d}" if digits else text


def _time_text(value: int, unit: str) -> str:
    seconds, fraction = divmod(value, _PER_SECOND[unit])
    return _clock_text(seconds, fraction, _DIGITS[unit] if fraction or unit != "s" else 0)


def _timestamps(arr: pa.Array, unit: str, utc: bool) -> list[str]:
    per = _PER_SECOND[unit]
    suffix = "+00:00" if utc else ""
    out = []
    for value in _ints(arr, pa.int64()):
        value = int(value)
        if abs(value) == _INFINITE_TS:
            out.append("infinity" if value > 0 else "-infinity")
            continue
        seconds, fraction = divmod(value, per)
        days, seconds_of_day = divmod(seconds, _SECONDS_PER_DAY)
        year, month, day = civil_from_days(days)
        out.append(f"{_year_text(year)}-{month:02d}-{day:02d}T"
                   f"{_clock_text(seconds_of_day, fraction, _DIGITS[unit])}{suffix}")
    return out


def _iso_duration(months: int, days: int, nanoseconds: int) -> str:
    """ISO 8601 duration with each part signed (PostgreSQL's iso_8601 interval style)."""
    years, months = int(months / 12), months - int(months / 12) * 12     # truncate toward zero
    sign = -1 if nanoseconds < 0 else 1
    hours, rest = divmod(abs(nanoseconds), 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    seconds, nanos = divmod(rest, 10**9)
    date = "".join(f"{n}{u}" for n, u in ((years, "Y"), (months, "M"), (days, "D")) if n)
    clock = "".join(f"{sign * n}{u}" for n, u in ((hours, "H"), (minutes, "M")) if n)
    if seconds or nanos:
        text = f"{seconds}.{nanos:09d}".rstrip("0").rstrip(".")
        clock += f"{'-' if sign < 0 else ''}{text}S"
    if not date and not clock:
        return "PT0S"
    return f"P{date}" + (f"T{clock}" if clock else "")
