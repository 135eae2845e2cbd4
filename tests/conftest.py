"""Shared fixtures: one real embedded Kafka broker per test session, a fresh topic per test,
and the opt-in flags: --soak enables tests marked `soak`, --chaos those marked `chaos`."""

from __future__ import annotations

import itertools
import os
import re
import uuid

import pytest


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", default=False, help="run long soak tests (marked soak)")
    parser.addoption("--chaos", action="store_true", default=False,
                     help="run chaos tests (marked chaos): kill -9 the service and restart the broker under load")


def pytest_configure(config):
    config.addinivalue_line("markers", "chaos: kills and restarts under load; runs only with --chaos")


def pytest_collection_modifyitems(config, items):
    for flag in ("soak", "chaos"):
        if config.getoption(f"--{flag}"):
            continue
        skip = pytest.mark.skip(reason=f"{flag} test: run with --{flag}")
        for item in items:
            if flag in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """A real Tansu broker (in memory) on a free loopback port, shared by the whole session.

    Set SPONGE_TEST_BOOTSTRAP to use an already running Kafka instead.
    """
    external = os.environ.get("SPONGE_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    from sponge.streams.broker import EmbeddedBroker

    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b.bootstrap


_counter = itertools.count()


@pytest.fixture
def topic(broker, request):
    """A new topic (4 partitions) and its DLQ for this test alone."""
    from sponge.streams.broker import create_topic

    safe = re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name)[:30]
    name = f"t{next(_counter)}-{safe}-{uuid.uuid4().hex[:6]}"
    create_topic(broker, name, partitions=4)
    create_topic(broker, f"{name}.dlq", partitions=1)
    return name
