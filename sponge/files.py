"""Atomic file writes: the one way sponge replaces a file so that a reader or a crash never sees
half of it (temporary name in the same directory, fsync, rename, fsync of the directory)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["TEMP_SUFFIX", "atomic_write", "fsync_dir", "temp_path"]

#: Temporary files end with this; stores sweep the ones whose writer died.
TEMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """A temporary name beside `path` that says which host and process write it."""
    return path.parent / f".{path.name}~{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[Path], None]) -> None:
    """Replace `path` with `data` (bytes, or a function that writes the file it is given) atomically
    and durably: written to a temporary file beside it, fsynced, renamed over it, directory fsynced."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            with open(tmp, "wb") as fh:
                fh.write(data)
        else:
            data(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` on this host still runs (so its temporary files are not stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
