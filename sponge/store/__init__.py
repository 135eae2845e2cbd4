"""The rollout store: Delta Lake tables of rollouts, tombstones and dead letters, read by SQL.

Where things live:

    common.py      what every store shares: errors, segments and results (Segment, SegmentWrite, Removal), knobs, name checks
    delta.py       the store (`RolloutStore` = `DeltaRolloutStore`): writes, removal, retention, views
    parquet.py     the older format-2 layout, read only by `sponge store migrate`
    reads.py       the reads both stores answer alike through their DuckDB views (scan, rows, groups, counts)
    idmap.py       the one rollout-id set (exactly-once) and the id → row map
    datasets.py    the Arrow datasets DuckDB reads the tables through
    sql.py         read-only SQL: the checks and limits; sql_worker.py runs each query in its own child
    sql_json.py    the one JSON encoder of query results
    cli.py         `sponge store stats|migrate|retention`; sql_cli.py: `sponge sql`

A new SQL view is one entry in `DeltaRolloutStore._views` (delta.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Names are imported on first use, not here: the SQL fork server (`python -m sponge.store.sql_worker`)
# imports this package and must stay one small thread, without delta-rs, faiss or the Parquet store.
_EXPORTS = {
    "DEFAULT_RUN": "common", "DEFAULT_STORE_PATH": "common", "MAX_VERSION": "common", "RUN_ID_RE": "common",
    "CompactionResult": "common", "Removal": "common", "Segment": "common", "SegmentWrite": "common", "StoreConfig": "common",
    "StoreError": "common", "DeltaRolloutStore": "delta", "DeltaStoreConfig": "delta",
    "ParquetRolloutStore": "parquet",
}
__all__ = [
    "DEFAULT_RUN", "DEFAULT_STORE_PATH", "MAX_VERSION", "RUN_ID_RE", "CompactionResult", "DeltaRolloutStore",
    "DeltaStoreConfig", "ParquetRolloutStore", "Removal", "RolloutStore", "Segment", "SegmentWrite", "StoreConfig",
    "StoreError",
]

if TYPE_CHECKING:
    from sponge.store.common import (
        DEFAULT_RUN,
        DEFAULT_STORE_PATH,
        MAX_VERSION,
        RUN_ID_RE,
        CompactionResult,
        Removal,
        Segment,
        SegmentWrite,
        StoreConfig,
        StoreError,
    )
    from sponge.store.delta import DeltaRolloutStore, DeltaStoreConfig
    from sponge.store.delta import DeltaRolloutStore as RolloutStore
    from sponge.store.parquet import ParquetRolloutStore


def __getattr__(name: str):
    if name == "RolloutStore":   # the store every part of sponge opens
        name = "DeltaRolloutStore"
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"sponge.store.{_EXPORTS[name]}"), name)
