"""One query returning every kind of DuckDB value, and the JSON both `sponge sql --format json`
and `POST /sql` must give for it (the forms are documented in sponge/store/sql_json.py)."""

from __future__ import annotations

TYPES_QUERY = """
SELECT 1.50::DECIMAL(10, 2) AS dec, 0.0000001::DECIMAL(18, 7) AS dec_small,
       -123456789012345678901234567890::DECIMAL(38, 0) AS dec_wide,
       '\\xAA\\x00\\xFF'::BLOB AS blob,
       TIMESTAMP '2024-01-02 03:04:05.123456' AS ts, TIMESTAMP_S '2024-01-02 03:04:05' AS ts_s,
       TIMESTAMP_NS '2024-01-02 03:04:05.123456789' AS ts_ns, 'infinity'::TIMESTAMP AS ts_inf,
       TIMESTAMPTZ '2024-01-02 03:04:05+02' AS tstz,
       DATE '2024-02-29' AS date, '-infinity'::DATE AS date_inf, TIME '12:34:56.789' AS time,
       INTERVAL '1 year 2 months 3 days 04:05:06.5' AS iv, INTERVAL '-14 months' AS iv_neg,
       'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::UUID AS uuid,
       'nan'::DOUBLE AS nan, 'inf'::DOUBLE AS inf, '-inf'::FLOAT AS ninf, 1.25::DOUBLE AS dbl,
       170141183460469231731687303715884105727::HUGEINT AS huge,
       340282366920938463463374607431768211455::UHUGEINT AS uhuge,
       18446744073709551615::UBIGINT AS ubig, (-9223372036854775807 - 1)::BIGINT AS big,
       {'a': 1, 'b': [1.5::DOUBLE, 'nan'::DOUBLE, NULL], 'c': {'d': DATE '2000-01-01'}} AS struct,
       [[1, 2], [], NULL] AS list, [1, 2, 3]::INTEGER[3] AS array,
       MAP {'k': 1, 'j': NULL} AS map, MAP {7: 'seven'} AS map_int_keys,
       [MAP {'x': ['\\x01'::BLOB]}] AS nested,
       NULL::INTEGER AS null_int, 'tëxt' AS str, true AS flag
"""

TYPES_JSON = {
    "dec": "1.50", "dec_small": "0.0000001", "dec_wide": "-123456789012345678901234567890",
    "blob": "qgD/",
    "ts": "2024-01-02T03:04:05.123456", "ts_s": "2024-01-02T03:04:05",
    "ts_ns": "2024-01-02T03:04:05.123456789", "ts_inf": "infinity",
    "tstz": "2024-01-02T01:04:05.000000+00:00",
    "date": "2024-02-29", "date_inf": "-infinity", "time": "12:34:56.789000",
    "iv": "P1Y2M3DT4H5M6.5S", "iv_neg": "P-1Y-2M",
    "uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "nan": None, "inf": None, "ninf": None, "dbl": 1.25,
    "huge": "170141183460469231731687303715884105727",
    "uhuge": "340282366920938463463374607431768211455",
    "ubig": 18446744073709551615, "big": -9223372036854775808,
    "struct": {"a": 1, "b": [1.5, None, None], "c": {"d": "2000-01-01"}},
    "list": [[1, 2], [], None], "array": [1, 2, 3],
    "map": {"k": 1, "j": None}, "map_int_keys": {"7": "seven"},
    "nested": [{"x": ["AQ=="]}],
    "null_int": None, "str": "tëxt", "flag": True,
}
