"""Small helpers shared by the service tests: waiting for a condition, a real `sponge serve` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition", interval_s: float = 0.05) -> None:
    """Poll `predicate` until it is true; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def serve(broker: str, topic: str, store: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`sponge serve` with its defaults (only where to listen, read and write is given); its URL."""
    cmd = [sys.executable, "-m", "sponge.cli", "serve", "--bootstrap-servers", broker, "--topic", topic,
           "--group", f"g-{topic}", "--store", str(store), "--http-port", "0", "--no-create-topics", *extra]
    out = open(log, "ab")
    start = out.seek(0, os.SEEK_END)
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out.close()

    def url() -> str | None:
        with open(log, "rb") as f:
            f.seek(start)
            for line in f.read().decode(errors="replace").splitlines():
                if '"event": "http"' in line:
                    return json.loads(line)["url"]
        return None

    wait_for(lambda: url() is not None or proc.poll() is not None, 120, "the service's HTTP address")
    assert proc.poll() is None, f"sponge serve exited: {log.read_text()[-2000:]}"
    address = url()
    wait_for(lambda: _ready(address), 180, "the service to be ready (embedder loaded, selectors rebuilt)")
    return proc, address


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
