"""Small helpers shared by the service tests."""

from __future__ import annotations

import time


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition", interval_s: float = 0.05) -> None:
    """Poll `predicate` until it is true; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)
