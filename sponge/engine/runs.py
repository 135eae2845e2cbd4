"""Runs: the namespaces of a service. Which runs exist, and what the service remembers of each.

A run is one training run: its rollouts carry its `run_id`, it reports its own policy versions,
keeps its own retention window and replay subset, and registers the fingerprint of the tokenizer
(and model) its token ids belong to, so rows of another run or tokenizer are never served to it.

The registry is a small JSON file in the store root (`_runs.json`), replaced atomically under a
file lock, so every process on the store (shards, a restarted service) sees the same runs and
versions. Per-run counters that only matter while the service runs (rows curated per version,
refusals) live in the curator, not here.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sponge.engine.store import MAX_VERSION, RUN_ID_RE, StoreError
from sponge.files import atomic_write

__all__ = ["RunError", "RunRecord", "RunRegistry"]

REGISTRY_NAME = "_runs.json"


class RunError(ValueError):
    """A run operation was refused; `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RunRecord:
    """What the service remembers of a run across restarts."""

    run_id: str
    #: names the tokenizer/model its token ids belong to ("" = not registered by a trainer)
    fingerprint: str
    #: replay and retention window in policy versions (keeps versions >= current - window)
    window: int | None
    #: the policy version the run's trainer last reported (only goes up)
    policy_version: int = 0
    created_at: float = 0.0
    #: deleted runs keep their record so that late rollouts of theirs are refused, not resurrected
    deleted: bool = False


class RunRegistry:
    """The runs of one store: register, look up, advance versions, delete (thread- and process-safe)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.path = self.root / REGISTRY_NAME
        self._signature: tuple = ()
        self._runs: dict[str, RunRecord] = {}

    def runs(self) -> dict[str, RunRecord]:
        """Every run the store knows, deleted ones included (re-read when another process changed it)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return dict(self._runs)
        signature = (st.st_ino, st.st_mtime_ns)
        if signature != self._signature:
            self._runs = _read(self.path)
            self._signature = signature
        return dict(self._runs)

    def get(self, run_id: str) -> RunRecord | None:
        return self.runs().get(run_id)

    def live(self) -> dict[str, RunRecord]:
        return {r: rec for r, rec in self.runs().items() if not rec.deleted}

    def register(self, run_id: str, fingerprint: str, window: int | None, max_runs: int) -> tuple[RunRecord, bool]:
        """Create the run, or return it when it exists with this fingerprint: (record, created).

        A run registered before without a fingerprint (its rollouts arrived first) takes this one."""
        check_run_id(run_id)
        if not isinstance(fingerprint, str) or len(fingerprint) > 256:
            raise RunError("fingerprint must be a string of at most 256 characters")
        with self._locked() as runs:
            known = runs.get(run_id)
            if known is not None:
                if known.deleted:
                    raise RunError(f"run {run_id!r} was deleted; its id cannot be used again: start a new run id",
                                   status=410)
                if known.fingerprint and fingerprint and known.fingerprint != fingerprint:
                    raise RunError(
                        f"run {run_id!r} was registered with tokenizer/model fingerprint {known.fingerprint}, "
                        f"this trainer has {fingerprint}: its token ids would not match; use a new run id",
                        status=409)
                if fingerprint and not known.fingerprint:
                    known = dataclasses.replace(known, fingerprint=fingerprint)
                    runs[run_id] = known
                return known, False
            live = sum(not r.deleted for r in runs.values())
            if live >= max_runs:
                raise RunError(f"too many live runs ({live}, the cap is {max_runs}): delete one you are done with "
                               "(DELETE /runs/{id}) or raise --max-runs", status=409)
            record = RunRecord(run_id, fingerprint, window, 0, time.time())
            runs[run_id] = record
            return record, True

    def set_version(self, run_id: str, version: int) -> RunRecord:
        """The run's trainer now generates with `version`; returns the record (versions only go up)."""
        with self._locked() as runs:
            record = self._existing(runs, run_id)
            if version < record.policy_version:
                raise RunError(f"policy version went backwards for run {run_id!r}: {version} < "
                               f"{record.policy_version} (a new training run needs a new run id)", status=409)
            if version != record.policy_version:
                record = dataclasses.replace(record, policy_version=version)
                runs[run_id] = record
            return record

    def delete(self, run_id: str) -> RunRecord:
        with self._locked() as runs:
            record = dataclasses.replace(self._existing(runs, run_id), deleted=True)
            runs[run_id] = record
            return record

    @staticmethod
    def _existing(runs: dict[str, RunRecord], run_id: str) -> RunRecord:
        record = runs.get(run_id)
        if record is None:
            raise RunError(f"no run {run_id!r}: register it first (POST /runs)", status=404)
        if record.deleted:
            raise RunError(f"run {run_id!r} was deleted", status=410)
        return record

    @contextmanager
    def _locked(self) -> Iterator[dict[str, RunRecord]]:
        """The registry for a read-modify-write, under a file lock shared by every process."""
        lock_dir = self.root / "_locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_dir / "runs.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            runs = self.runs()
            before = dict(runs)
            yield runs
            if runs != before:
                body = {r: dataclasses.asdict(rec) for r, rec in sorted(runs.items())}
                atomic_write(self.path, json.dumps({"runs": body}, indent=1).encode())
                self._runs, self._signature = dict(runs), ()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def check_run_id(run_id: str) -> str:
    """`run_id` if it is a legal run id, else a RunError saying what is legal."""
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise RunError(f"run id {run_id!r} is not legal: 1-128 letters, digits and . _ : - , starting with a "
                       "letter or digit")
    return run_id


def check_version(version: int) -> int:
    """`version` if it is a legal policy version (an int64 >= 0), else a RunError."""
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
        raise RunError(f"policy version {version!r} is out of range: an integer in [0, 2^63 - 1]")
    return version


def _read(path: Path) -> dict[str, RunRecord]:
    try:
        body = json.loads(path.read_text())["runs"]
        fields = {f.name for f in dataclasses.fields(RunRecord)}
        return {run: RunRecord(**{k: v for k, v in rec.items() if k in fields}) for run, rec in body.items()}
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise StoreError(f"unreadable run registry {path}: {exc}; fix or delete the file "
                         "(deleting it forgets the runs' versions and fingerprints)") from None
