"""Shared fixtures: one real embedded Kafka broker per test session, a fresh topic per test,
the Kafka client, and the opt-in flags: --soak enables tests marked `soak`, --chaos those marked `chaos`, --long those marked `long`.

The Kafka client every test uses unless it names one is confluent-kafka; run the suite with
SPONGE_TEST_KAFKA_CLIENT=kafka-python (or SPONGE_KAFKA_CLIENT) for kafka-python. Tests of the
client interface itself run against both (the `kafka_client` fixture)."""

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
    parser.addoption("--long", action="store_true", default=False,
                     help="run long end-to-end tests (marked long): a minute or more each on 2 cores, what the "
                          "default suite covers in shorter form")


def pytest_configure(config):
    config.addinivalue_line("markers", "chaos: kills and restarts under load; runs only with --chaos")
    config.addinivalue_line("markers", "long: end-to-end runs of a minute or more; runs only with --long")
    chosen = os.environ.get("SPONGE_TEST_KAFKA_CLIENT")
    if chosen:
        # The default of every client made without naming one, here and in `sponge serve` children.
        os.environ["SPONGE_KAFKA_CLIENT"] = chosen


def pytest_report_header(config):
    from sponge.streams.kafka import default_client

    return f"kafka client: {default_client()} (SPONGE_TEST_KAFKA_CLIENT to change)"


def pytest_collection_modifyitems(config, items):
    for flag in ("soak", "chaos", "long"):
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


@pytest.fixture(params=["confluent", "kafka-python"])
def kafka_client(request) -> str:
    """Each Kafka client in turn, for tests of the client interface itself."""
    return request.param


@pytest.fixture
def topic(broker, request):
    """A new topic (4 partitions) and its DLQ for this test alone."""
    from sponge.streams.broker import create_topic

    safe = re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name)[:30]
    name = f"t{next(_counter)}-{safe}-{uuid.uuid4().hex[:6]}"
    create_topic(broker, name, partitions=4)
    create_topic(broker, f"{name}.dlq", partitions=1)
    return name
