"""The ingest service end to end: real broker, real Parquet store, real DuckDB SQL.

In-process tests run `IngestService.run(stop_event)` in a thread; the crash and
consumer-group tests run `sponge serve` as separate processes and kill them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sponge.streams.codec import JSON_CONTENT_TYPE
from sponge.streams.dlq import read_dead_letters
from sponge.streams.producer import RolloutProducer
from sponge.streams.synthetic import MALFORMED_KINDS, SyntheticConfig, produce, synthetic_rollouts

store_module = pytest.importorskip("sponge.store", reason="the store (sponge/store/) is not there yet")
RolloutStore = store_module.RolloutStore

from sponge.service.ingest import IngestConfig, IngestService  # noqa: E402

DIM = 384
SMALL = SyntheticConfig(embedding_dim=DIM, response_tokens=40, prompt_tokens=10, group_size=8)
SESSION_MS = 6000


def _config(broker: str, topic: str, store: Path, **kw) -> IngestConfig:
    base = dict(bootstrap_servers=broker, topic=topic, group_id=f"g-{topic}", store_path=str(store),
                embedding_dim=DIM, session_timeout_ms=SESSION_MS, flush_interval_s=0.3, poll_timeout_ms=100)
    base.update(kw)
    return IngestConfig(**base)


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _count(store_path: Path) -> int:
    """Rollouts the store's table holds, from its log's file statistics: no file is read and no id
    indexed (opening a store per poll took the CPU the service under test needed). These tests
    remove and retire nothing, so this is the number of live rollouts; `_assert_exactly` checks ids."""
    from deltalake import DeltaTable

    if not (store_path / "rollouts" / "_delta_log").exists():
        return 0
    adds = pa.table(DeltaTable(str(store_path / "rollouts")).get_add_actions(flatten=True))
    return int(pc.sum(adds.column("num_records")).as_py() or 0) if adds.num_rows else 0


class _Running:
    """An in-process service on a thread; `stop()` flushes, commits and joins."""

    def __init__(self, config: IngestConfig, **kw):
        self.service = IngestService(config, **kw)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.service.run(self.stop_event)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def healthy(self) -> bool:
        """Raise the service's error if its thread died; True otherwise (for use inside _wait)."""
        if self.error:
            raise self.error
        return True

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self):
        self.stop_event.set()
        self.thread.join(60)
        if self.error:
            raise self.error


def test_round_trip_every_field_byte_for_byte(broker, topic, tmp_path):
    sent = synthetic_rollouts(120, seed=7, config=SMALL)
    json_part = synthetic_rollouts(16, seed=8, config=SMALL)
    with RolloutProducer(broker, topic, rows_per_message=16) as producer:
        producer.send(sent)
    with RolloutProducer(broker, topic, rows_per_message=8, content_type=JSON_CONTENT_TYPE) as producer:
        producer.send(json_part)
    expected = pa.concat_tables([sent, json_part]).sort_by("rollout_id")

    segments = []
    running = _Running(_config(broker, topic, tmp_path / "store"),
                       on_segment=lambda write, rows: segments.append((write, rows)))
    try:
        _wait(lambda: running.healthy() and _count(tmp_path / "store") == expected.num_rows, 60, "all rollouts stored")
    finally:
        running.stop()

    store = RolloutStore(tmp_path / "store", embedding_dim=DIM)
    got = store.sql("SELECT * FROM rollouts ORDER BY rollout_id", max_rows=10_000)
    assert got.column("rollout_id").to_pylist() == expected.column("rollout_id").to_pylist()
    for name in expected.column_names:
        want, have = expected.column(name).combine_chunks(), got.column(name).combine_chunks()
        if name in ("embedding", "behavior_logprobs", "response_tokens", "prompt_tokens"):
            # Byte-for-byte: the flattened values' buffers must be identical.
            assert pc.list_flatten(have).cast(pc.list_flatten(want).type).to_numpy().tobytes() == \
                pc.list_flatten(want).to_numpy().tobytes(), name
            assert pc.list_value_length(have).to_pylist() == pc.list_value_length(want).to_pylist(), name
        elif name == "reward":
            assert have.cast(pa.float32()).to_numpy().tobytes() == want.to_numpy().tobytes()
        else:
            assert have.cast(want.type).to_pylist() == want.to_pylist(), name
    assert set(got.column("topic").to_pylist()) == {topic}
    assert got.column("offset").null_count == 0
    # The selection hook saw every new rollout once, with its embedding.
    hooked = pa.concat_tables([rows.select(["rollout_id", "embedding"]) for _, rows in segments])
    assert sorted(hooked.column("rollout_id").to_pylist()) == expected.column("rollout_id").to_pylist()
    assert sum(len(w.new_ids) for w, _ in segments) == expected.num_rows
    # One commit per flush, whatever the partitions it spans, each partition's offset recorded in it.
    from deltalake import DeltaTable

    history = DeltaTable(str(tmp_path / "store" / "rollouts")).history()
    assert sum(1 for h in history if h.get("sponge.operation") == "segment") == len(segments)
    per_partition = got.group_by("partition").aggregate([("offset", "max")]).to_pydict()
    for partition, last in zip(per_partition["partition"], per_partition["offset_max"]):
        assert store.table_offset(topic, partition) >= last


def test_bad_input_of_every_kind_goes_to_the_dlq_and_the_service_keeps_running(broker, topic, tmp_path):
    limit = 1 << 20
    sent = produce(broker, topic, 600, seed=3, synthetic=SMALL, rows_per_message=16,
                   bad_fraction=len(MALFORMED_KINDS) * 16 / 600, max_message_bytes=limit, chunk=600)
    kinds_sent = Counter(kind for kind, _ in sent["bad"])
    assert set(kinds_sent) == set(MALFORMED_KINDS)

    store_path = tmp_path / "store"
    running = _Running(_config(broker, topic, store_path, max_message_bytes=limit))
    try:
        _wait(lambda: running.healthy() and _count(store_path) == len(sent["good_ids"]), 60, "good rollouts stored")
        letters = read_dead_letters(broker, f"{topic}.dlq", expected=len(sent["bad"]))
        assert running.alive()
        # Still serving: more good input after the bad is stored too.
        more = synthetic_rollouts(24, seed=99, config=SMALL)
        with RolloutProducer(broker, topic) as producer:
            producer.send(more)
        _wait(lambda: running.healthy() and _count(store_path) == len(sent["good_ids"]) + 24, 30, "later rollouts stored")
        assert running.alive()
        metrics = running.service.metrics.render().decode()
    finally:
        running.stop()

    store = RolloutStore(store_path, embedding_dim=DIM)
    stored = set(store.sql("SELECT rollout_id FROM rollouts", max_rows=10_000).column("rollout_id").to_pylist())
    assert stored == sent["good_ids"] | set(more.column("rollout_id").to_pylist())

    # One dead letter per bad message; each names its rule, and its bad rows by rollout_id.
    assert len(letters) == len(sent["bad"])
    rules_seen = Counter()
    named_bad_ids = set()
    for letter in letters:
        assert letter["headers"]["source-topic"] == topic.encode()
        assert int(letter["headers"]["source-offset"]) >= 0
        assert letter["reason"], "a dead letter without a reason"
        for v in letter["reason"]:
            assert v["field"] and v["rule"] and v["detail"]
            rules_seen[v["rule"]] += 1
            if "rollout_id" in v:
                named_bad_ids.add(v["rollout_id"])
    assert set(MALFORMED_KINDS.values()) <= set(rules_seen)
    row_level_bad = {i for kind, ids in sent["bad"] for i in ids if len(ids) == 1}
    assert row_level_bad <= named_bad_ids
    assert not (named_bad_ids & stored)
    # The original bytes are kept: an undecodable letter is byte-identical to what was sent.
    assert all(letter["value"] for letter in letters)

    dead = store.sql("SELECT reason, value FROM dead_letters", max_rows=10_000)
    assert dead.num_rows >= len(sent["bad"])
    assert 'sponge_ingest_rejected_rollouts_total{reason="oversized"}' in metrics


def test_two_processes_in_one_group_split_partitions_and_store_each_rollout_once(broker, topic, tmp_path):
    store_path = tmp_path / "store"
    sent = produce(broker, topic, 2400, seed=5, synthetic=SMALL, rows_per_message=16)["good_ids"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_serve(broker, topic, store_path, log) for log in logs]
    try:
        _wait(lambda: _count(store_path) == len(sent), 90, "all rollouts stored by two processes")
        more = produce(broker, topic, 800, seed=6, synthetic=SMALL, rows_per_message=16)["good_ids"]
        _wait(lambda: _count(store_path) == len(sent) + len(more), 60, "second wave stored")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(60) for p in procs]
    assert codes == [0, 0]
    _assert_exactly(store_path, sent | more)
    final = [_last_assignment(log) for log in logs]
    assert final[0] and final[1], f"both members got partitions: {final}"
    assert not (final[0] & final[1]) and final[0] | final[1] == {0, 1, 2, 3}
    # Each process wrote segments only for partitions it owned at some point.
    for log in logs:
        events = _events(log)
        assert any(e["event"] == "flushed" and e["rows"] > 0 for e in events)


def test_kill_9_during_ingest_loses_nothing_and_stores_nothing_twice(broker, topic, tmp_path):
    store_path = tmp_path / "store"
    expected: set[str] = set()
    for round_ in range(3):
        expected |= produce(broker, topic, 2400, seed=100 + round_, synthetic=SMALL, rows_per_message=8)["good_ids"]
        before = _count(store_path)
        # Small polls and flushes: many segment writes and commits for the kill to fall between.
        proc = _serve(broker, topic, store_path, tmp_path / f"crash{round_}.log", flush_rows=64,
                      max_poll_records=4)
        try:
            # Kill as soon as this run has written something: mid-stream, flushes in flight.
            _wait(lambda: _count(store_path) > before or proc.poll() is not None, 60, "first segment", 0.05)
            time.sleep(random.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        assert _count(store_path) < len(expected), "the kill should land before ingest finished"
    proc = _serve(broker, topic, store_path, tmp_path / "final.log")
    try:
        _wait(lambda: _count(store_path) == len(expected), 90, "the rest stored after restarts")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    _assert_exactly(store_path, expected)


def test_crash_between_segment_write_and_commit_is_replayed_without_duplicates(broker, topic, tmp_path):
    """The kill -9 test above cannot choose where it lands; here the process 'dies' exactly
    after segments are durable and before their offsets are committed (the fault is injected
    by refusing the commit), and a fresh service must replay that range into no duplicates."""
    store_path = tmp_path / "store"
    sent = produce(broker, topic, 400, seed=21, synthetic=SMALL, rows_per_message=16)

    class Crash(Exception):
        pass

    class CrashBeforeCommit(IngestService):
        def _commit(self, commits):
            raise Crash("simulated crash after the segment write, before the commit")

    service = CrashBeforeCommit(_config(broker, topic, store_path, flush_rows=10**6, flush_interval_s=1.0))
    service.start()
    with pytest.raises(Crash):
        _wait(lambda: service.poll_once() is None, 60, "a flush")
    service._consumer.close()  # leave the group without committing anything
    service._dlq.close()
    assert _count(store_path) > 0

    running = _Running(_config(broker, topic, store_path))
    try:
        # Every message is read again (nothing was committed) and flushed.
        _wait(lambda: running.healthy() and running.service.totals.messages == sent["messages"]
              and running.service.totals.flushes > 0, 60, "replayed rollouts")
    finally:
        running.stop()
    assert running.service.totals.duplicates > 0, "the uncommitted range was replayed"
    _assert_exactly(store_path, sent["good_ids"])


def test_dead_letters_replayed_after_a_crash_show_once_in_the_view(broker, topic, tmp_path):
    """Dead letters are at-least-once: a crash after they were acknowledged by the DLQ and stored,
    before the offsets were committed, sends and stores them again on replay. Every copy carries
    the same letter id (header and column), and the store's dead_letters view shows each once."""
    import duckdb

    store_path = tmp_path / "store"
    limit = 1 << 20
    sent = produce(broker, topic, 400, seed=31, synthetic=SMALL, rows_per_message=16,
                   bad_fraction=len(MALFORMED_KINDS) * 16 / 400, max_message_bytes=limit, chunk=400)
    n_bad = len(sent["bad"])
    assert n_bad == len(MALFORMED_KINDS)

    class Crash(Exception):
        pass

    class CrashBeforeCommit(IngestService):
        def _commit(self, offsets):
            raise Crash("simulated crash after the dead letters and segments were written, before the commit")

    service = CrashBeforeCommit(_config(broker, topic, store_path, flush_rows=10**6, flush_interval_s=1.0,
                                        max_message_bytes=limit))
    service.start()
    with pytest.raises(Crash):
        _wait(lambda: service.poll_once() is None, 60, "a flush")
    service._consumer.close()  # leave the group without committing anything
    service._dlq.close()

    running = _Running(_config(broker, topic, store_path, max_message_bytes=limit))
    try:
        _wait(lambda: running.healthy() and running.service.totals.messages == sent["messages"]
              and running.service.totals.flushes > 0, 60, "the replay")
    finally:
        running.stop()
    files = str(store_path / "dead_letters" / "*.parquet")
    raw = duckdb.sql(f"SELECT letter_id FROM read_parquet('{files}')").fetchall()
    assert len(raw) > n_bad, "nothing was dead-lettered twice: the crash did not land after the letters"
    view = RolloutStore(store_path, embedding_dim=DIM).sql("SELECT letter_id, \"offset\" FROM dead_letters")
    ids = view.column("letter_id").to_pylist()
    assert len(ids) == len(set(ids)) == n_bad
    assert {r[0] for r in raw} == set(ids)
    on_topic = read_dead_letters(broker, f"{topic}.dlq", expected=len(raw))
    assert len(on_topic) == len(raw)          # the topic has every copy too...
    assert {x["headers"]["letter-id"].decode() for x in on_topic} == set(ids)   # ...under the same ids
    _assert_exactly(store_path, sent["good_ids"])


def test_sigterm_flushes_and_commits(broker, topic, tmp_path):
    """A long flush interval: only the SIGTERM path can make these rows durable."""
    store_path = tmp_path / "store"
    sent = produce(broker, topic, 200, seed=11, synthetic=SMALL)["good_ids"]
    log = tmp_path / "serve.log"
    proc = _serve(broker, topic, store_path, log, flush_interval_s=600, flush_rows=10**6)
    try:
        _wait(lambda: any(e["event"] == "partitions assigned" for e in _events_of(proc)), 60, "assignment")
        time.sleep(1.0)
        assert _count(store_path) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    _assert_exactly(store_path, sent)
    totals = [e for e in _events_of(proc) if e["event"] == "stopped"]
    assert totals and totals[-1]["ingested"] == len(sent)
    # Committed: a restart finds nothing left to read. The log is appended to: only the second
    # process's own lines count (matching the first's made SIGTERM land before its handler was in).
    proc = _serve(broker, topic, store_path, log, flush_interval_s=0.2)
    try:
        _wait(lambda: any(e["event"] == "partitions assigned" and e["partitions"] for e in _events_of(proc)),
              60, "reassignment")
        time.sleep(1.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    stops = [e for e in _events_of(proc) if e["event"] == "stopped"]
    assert len(stops) == 1 and stops[0]["messages"] == 0


def test_config_precedence_file_env_flags(tmp_path):
    """sponge serve's settings: flags > SPONGE_* environment > config file > defaults (sponge.config)."""
    import argparse

    from sponge.config import ConfigError, load
    from sponge.service.server import ServerConfig, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("ingest:\n  topic: from-file\n  flush_rows: 10\n  group_id: file-group\ncuration:\n  k: 7\n")
    args = parser.parse_args(["--config", str(cfg_file), "--group", "flag-group"])
    cfg = load(ServerConfig, args, env={"SPONGE_FLUSH_ROWS": "20", "SPONGE_CREATE_TOPICS": "false"})
    assert (cfg.ingest.topic, cfg.ingest.flush_rows, cfg.ingest.group_id, cfg.ingest.create_topics) == (
        "from-file", 20, "flag-group", False)
    assert cfg.curation.k == 7
    toml = tmp_path / "serve.toml"
    toml.write_text('topic = "t"\nflush_interval_s = 0.5\n[kafka]\nsecurity_protocol = "PLAINTEXT"\n')
    cfg = load(ServerConfig, parser.parse_args(["--config", str(toml)]), env={}).ingest
    assert cfg.flush_interval_s == 0.5 and cfg.kafka == {"security_protocol": "PLAINTEXT"}
    assert cfg.dead_letter_topic == "t.dlq"
    bad = tmp_path / "bad.yaml"
    bad.write_text("flush_row: 3\n")
    with pytest.raises(ConfigError, match="flush_row"):
        load(ServerConfig, parser.parse_args(["--config", str(bad)]), env={})


def test_metrics_are_served_over_http(broker, topic, tmp_path):
    produce(broker, topic, 64, seed=12, synthetic=SMALL)
    running = _Running(_config(broker, topic, tmp_path / "store"))
    try:
        port = running.service.metrics.serve(0)
        _wait(lambda: running.healthy() and _count(tmp_path / "store") == 64, 60, "rollouts stored")

        def scrape() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

        # The counter moves just after the segment is renamed into place: wait for it, not the file.
        _wait(lambda: "sponge_ingest_rollouts_total 64.0" in scrape(), 30, "the rollouts counter")
        body = scrape()
    finally:
        running.service.metrics.stop()
        running.stop()
    assert "sponge_ingest_rollouts_total 64.0" in body
    assert "sponge_ingest_flush_seconds_count" in body and "sponge_ingest_segments_total" in body
    assert "sponge_ingest_consumer_lag" in body


# ---- helpers for subprocess tests -------------------------------------------------------------

def _serve(broker: str, topic: str, store_path: Path, log: Path, **flags) -> subprocess.Popen:
    """`sponge serve` as a process writing to `log` (appended to); `_events_of(proc)` reads its lines only."""
    args = {"bootstrap-servers": broker, "topic": topic, "group": f"g-{topic}", "store": str(store_path),
            "session-timeout-ms": SESSION_MS, "flush-interval-s": 0.3, "flush-rows": 2000,
            "http-port": 0}  # the full service (selector + HTTP) on a free port
    args.update({k.replace("_", "-"): v for k, v in flags.items()})
    # The rollouts carry embeddings: no embedding model to load (its warm-up is slow on a loaded machine).
    cmd = [sys.executable, "-m", "sponge.cli", "serve", "--no-embed"]
    for k, v in args.items():
        cmd += [f"--{k}", str(v)]
    out = open(log, "ab")
    start = out.seek(0, os.SEEK_END)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env)
    proc.log, proc.log_start = log, start   # where this process's own lines begin
    out.close()                             # the child holds its own descriptor
    return proc


def _events_of(proc: subprocess.Popen) -> list[dict]:
    """The JSON log events written by `proc` alone (not by an earlier process on the same log)."""
    return _events(proc.log, proc.log_start)


def _events(log: Path, start: int = 0) -> list[dict]:
    out = []
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _last_assignment(log: Path) -> set[int]:
    assigned = [e for e in _events(log) if e.get("event") == "partitions assigned"]
    return {int(p.split("/")[-1]) for p in assigned[-1]["partitions"]} if assigned else set()


def _assert_exactly(store_path: Path, expected: set[str]) -> None:
    store = RolloutStore(store_path, embedding_dim=DIM)
    got = store.sql("SELECT rollout_id, count(*) AS n FROM rollouts GROUP BY rollout_id", max_rows=10**6)
    counts = dict(zip(got.column("rollout_id").to_pylist(), got.column("n").to_pylist()))
    assert set(counts) == expected, (len(set(counts) - expected), len(expected - set(counts)))
    assert max(counts.values()) == 1, "a rollout stored twice"
    assert store.count() == len(expected)
