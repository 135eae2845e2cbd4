"""The store implementations the store tests run against: `Store` is a fixture that builds one.

`parquet` is the format-2 store (Parquet segments, JSON marks); `delta` the Delta Lake tables.
Tests that hold for both take the `Store` fixture; a test of one layout names its class itself.
"""

from __future__ import annotations

import functools

import pytest

from sponge.store.delta import DeltaRolloutStore, DeltaStoreConfig
from sponge.store import ParquetRolloutStore, StoreConfig

IMPLEMENTATIONS = {"parquet": ParquetRolloutStore, "delta": DeltaRolloutStore}


def _delta(root, embedding_dim=384, *, config: StoreConfig | None = None):
    # Tests remove files at once: nothing needs a vacuum grace period here.
    fields = vars(config) if config is not None else {}
    return DeltaRolloutStore(root, embedding_dim=embedding_dim,
                             config=DeltaStoreConfig(**{**fields, "vacuum_retention_hours": 0,
                                                        "removal_rewrite": "now"}))


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def Store(request):
    """A store class (same signature as RolloutStore, with `.open`) of each implementation."""
    if request.param == "delta":
        factory = functools.partial(_delta)
        factory.open = lambda root, config=None: DeltaRolloutStore.open(
            root, config=DeltaStoreConfig(**{**(vars(config) if config else {}), "vacuum_retention_hours": 0}))
        factory.kind = "delta"
        return factory
    factory = functools.partial(ParquetRolloutStore)
    factory.open = ParquetRolloutStore.open
    factory.kind = "parquet"
    return factory
