"""Chaos (opt-in, `pytest --chaos tests/test_chaos.py`): a real `sponge serve` process SIGKILLed
20 times and the broker killed and restarted 3 times while good and bad messages flow.

The test supervises the service the way systemd's Restart=always would: whenever the process
is gone it starts it again, with the same command line; nothing is ever edited by hand. The
embedded broker keeps everything in memory and comes back empty, so "nothing lost" is defined
against that: the broker is killed only once every message acknowledged so far is stored (good
rollouts) or dead-lettered (bad messages), and nothing is ever re-sent. Under that rule every
acknowledged rollout must be stored exactly once, every bad message must show exactly once in
the store's dead_letters view, the service must never exit on its own (only the test's kills
end it), and at the end it must be up and ready without help.

Knobs (environment): SPONGE_CHAOS_KILLS (20), SPONGE_CHAOS_BROKER_RESTARTS (3), SPONGE_CHAOS_SEED (0).
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
import urllib.error
import urllib.request
from pathlib import Path

import duckdb
import pytest
from helpers import wait_for

from sponge.store import RolloutStore
from sponge.streams.broker import EmbeddedBroker, create_topic, free_port
from sponge.streams.codec import ARROW_CONTENT_TYPE
from sponge.streams.producer import RolloutProducer
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts

pytestmark = pytest.mark.chaos

TOPIC = "rollouts"
SMALL = SyntheticConfig(response_tokens=40, prompt_tokens=10)
DIM = SMALL.embedding_dim


class Supervisor:
    """Keeps one `sponge serve` process running (Restart=always): a process that is gone is started
    again with the same command. Exits other than the test's own kills are counted."""

    def __init__(self, command: list[str], logs: Path):
        self.command, self.logs = command, logs
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.unexpected_exits: list[int] = []
        self.killing = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "Supervisor":
        self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> None:
        log = open(self.logs / f"serve-{self.starts:03d}.log", "wb")
        # PYTHONFAULTHANDLER: a hung process told to abort (dump()) leaves its threads' stacks in its log.
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=log,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1"))
        log.close()
        self.starts += 1

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                code = self.proc.poll()
                if code is None:
                    continue
                if not self.killing:
                    self.unexpected_exits.append(code)
                self.killing = False
                time.sleep(0.5)   # RestartSec
                self._spawn()

    def ingesting(self) -> bool:
        """The current process is alive and has made a batch durable (it owns partitions and consumes)."""
        with self._lock:
            log = self.logs / f"serve-{self.starts - 1:03d}.log"
            return self.proc.poll() is None and b'"event": "flushed"' in log.read_bytes()

    def kill(self) -> bool:
        """SIGKILL the current process; False if it was not running."""
        with self._lock:
            if self.proc.poll() is not None:
                return False
            self.killing = True
            self.proc.kill()
            self.proc.wait()
            return True

    def dump(self) -> None:
        """SIGABRT the current process: its threads' stacks go to its log (for a hang)."""
        with self._lock:
            self.killing = True
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGABRT)
                self.proc.wait()

    def stop(self) -> int:
        """Stop supervising, SIGTERM the service and return its exit status."""
        self._stop.set()
        self._thread.join(10)
        self.proc.terminate()
        return self.proc.wait(120)

    def shutdown(self) -> None:
        """Stop supervising and kill what runs (after a failure): nothing is started again."""
        self._stop.set()
        self._thread.join(10)
        with self._lock:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def _readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except (OSError, ValueError):
        return 0, {}


def _stored(store_path: Path) -> tuple[int, int]:
    """(rows, distinct rollout_ids) in the store's rollouts view."""
    if not store_path.exists():
        return 0, 0
    t = RolloutStore(store_path, embedding_dim=DIM).sql(
        "SELECT count(*) AS n, count(DISTINCT rollout_id) AS d FROM rollouts")
    return t.column("n")[0].as_py(), t.column("d")[0].as_py()


def _dead_letter_values(store_path: Path) -> list[bytes]:
    if not store_path.exists():
        return []
    return RolloutStore(store_path, embedding_dim=DIM).sql(
        "SELECT value FROM dead_letters", max_rows=10**6).column("value").to_pylist()


def _events(logs: Path) -> list[dict]:
    out = []
    for log in sorted(logs.glob("serve-*.log")):
        for line in log.read_bytes().decode(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    return out


class Producer:
    """Sends batches of good rollouts (and every third batch a bad message) on its own thread while
    `running`; `pause()` returns once no send is in flight. Only acknowledged sends are counted."""

    def __init__(self, bootstrap: str, seed: int):
        self.bootstrap = bootstrap
        self.rng = random.Random(seed)
        self.good: set[str] = set()    # rollout_ids the broker acknowledged
        self.bad: list[bytes] = []     # values of acknowledged bad messages
        self.batches = 0
        self.running = threading.Event()
        self._idle = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.is_set():
            if not self.running.wait(0.05):
                continue
            with self._idle:
                if self.running.is_set():
                    self._send(self.batches)
                    self.batches += 1
            time.sleep(self.rng.uniform(0.05, 0.4))

    def _send(self, batch: int) -> None:
        rows = synthetic_rollouts(self.rng.randint(32, 128), seed=batch, config=SMALL, id_prefix=f"c{batch}")
        value = None
        with RolloutProducer(self.bootstrap, TOPIC, rows_per_message=32, acks="all",
                             allow_auto_create_topics=False) as producer:
            producer.send(rows)
            if batch % 3 == 0:
                value = b"not arrow: chaos bad message %d " % batch + self.rng.randbytes(16)
                producer.send_raw(value, key=b"bad-%d" % batch,
                                  headers=[("content-type", ARROW_CONTENT_TYPE.encode())])
            producer.flush(timeout_s=60)
        self.good.update(rows.column("rollout_id").to_pylist())
        if value is not None:
            self.bad.append(value)

    def pause(self) -> None:
        self.running.clear()
        with self._idle:
            pass

    def close(self) -> None:
        self.pause()
        self._done.set()
        self._thread.join(30)


def test_kills_and_broker_restarts_lose_nothing_and_store_nothing_twice(tmp_path):
    kills = int(os.environ.get("SPONGE_CHAOS_KILLS", "20"))
    restarts = int(os.environ.get("SPONGE_CHAOS_BROKER_RESTARTS", "3"))
    seed = int(os.environ.get("SPONGE_CHAOS_SEED", "0"))
    rng = random.Random(seed)
    epochs = restarts + 1
    kills_per_epoch = [kills // epochs + (1 if e < kills % epochs else 0) for e in range(epochs)]

    t0 = time.monotonic()
    store_path, logs = tmp_path / "store", tmp_path / "logs"
    logs.mkdir()
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    bootstrap, http_port = broker.bootstrap, free_port()

    def topics() -> None:   # what `sponge broker --topic rollouts` does at its start
        create_topic(bootstrap, TOPIC, partitions=4)
        create_topic(bootstrap, f"{TOPIC}.dlq", partitions=1)

    topics()
    command = [sys.executable, "-m", "sponge.cli", "serve", "--bootstrap-servers", bootstrap, "--topic", TOPIC,
               "--group", "chaos", "--store", str(store_path), "--http-port", str(http_port), "--no-embed",
               "--k", "16", "--flush-interval-s", "0.3", "--flush-rows", "2000", "--session-timeout-ms", "6000",
               "--broker-wait-s", "0"]   # under a supervisor: wait for the broker as long as it takes
    supervisor = Supervisor(command, logs).start()
    producer = Producer(bootstrap, seed)
    kills_done = broker_restarts = 0

    def all_in() -> bool:
        _, distinct = _stored(store_path)
        return (distinct == len(producer.good)
                and len(set(_dead_letter_values(store_path)) & set(producer.bad)) == len(producer.bad))

    try:
        for epoch in range(epochs):
            producer.running.set()
            for _ in range(kills_per_epoch[epoch]):
                # Mid-stream: the process owns partitions and has made a batch durable; batches keep
                # arriving while it dies, so the kill lands between polls, writes and commits.
                try:
                    wait_for(supervisor.ingesting, 180, "the service to ingest before a kill")
                except AssertionError:
                    supervisor.dump()
                    raise
                time.sleep(rng.uniform(0.2, 3.0))
                kills_done += supervisor.kill()
            wait_for(supervisor.ingesting, 180, "the service to ingest after the epoch's last kill")
            time.sleep(rng.uniform(1.0, 3.0))
            # The in-memory broker forgets everything: restart it only once all acknowledged input is in.
            producer.pause()
            wait_for(all_in, 300, f"everything sent in epoch {epoch} to be stored / dead-lettered")
            if epoch < restarts:
                broker.kill()
                time.sleep(rng.uniform(1.0, 4.0))   # the service runs without a broker meanwhile
                broker = EmbeddedBroker(port=int(bootstrap.split(":")[1]),
                                        log_path=tmp_path / f"broker{epoch + 1}.log").start()
                topics()
                broker_restarts += 1
        producer.close()
        wait_for(lambda: _readyz(http_port)[0] == 200, 120, "the service to be ready at the end")
        status, body = _readyz(http_port)
        code = supervisor.stop()
    finally:
        producer.close()
        supervisor.shutdown()
        broker.stop()
    good, bad = producer.good, producer.bad
    elapsed = time.monotonic() - t0

    store = RolloutStore(store_path, embedding_dim=DIM)
    counts = store.sql("SELECT rollout_id, count(*) AS n FROM rollouts GROUP BY rollout_id", max_rows=10**7)
    stored = dict(zip(counts.column("rollout_id").to_pylist(), counts.column("n").to_pylist()))
    view = store.sql("SELECT value, letter_id FROM dead_letters", max_rows=10**6)
    raw_letters = duckdb.sql(f"SELECT count(*) FROM read_parquet('{store_path}/dead_letters/*.parquet')"
                             ).fetchall()[0][0]
    events = _events(logs)
    replayed = sum(e.get("duplicates", 0) for e in events if e["event"] == "flushed")
    figures = {
        "kills": kills_done, "service_starts": supervisor.starts, "unexpected_exits": supervisor.unexpected_exits,
        "broker_restarts": broker_restarts, "rollouts_sent": len(good), "rollouts_stored": len(stored),
        "stored_twice": sum(1 for n in stored.values() if n > 1), "missing": len(good - set(stored)),
        "replayed_rows_dropped_by_the_store": replayed, "bad_sent": len(bad), "dead_letters_in_view": view.num_rows,
        "dead_letter_copies_in_files": raw_letters, "final_readyz": status, "final_exit": code,
        "seconds": round(elapsed, 1),
    }
    print("\nchaos figures: " + json.dumps(figures))
    assert supervisor.unexpected_exits == [], "the service exited on its own"
    assert kills_done == kills and broker_restarts == restarts
    assert set(stored) == good, figures
    assert max(stored.values()) == 1, figures
    values = view.column("value").to_pylist()
    assert sorted(values) == sorted(bad), figures          # every bad message, each once
    assert len(set(view.column("letter_id").to_pylist())) == view.num_rows
    assert status == 200 and body["ready"] is True
    assert code == 0
