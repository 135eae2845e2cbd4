"""Runs: the namespaces of a service. Which runs exist, and what the service remembers of each.

A run is one training run: its rollouts carry its `run_id`, it reports its own policy versions,
keeps its own retention window and replay subset, and registers the fingerprint of the tokenizer
(and model) its token ids belong to, so rows of another run or tokenizer are never served to it.

The registry is one small JSON object per run among the store's shared objects (`runs/<run_id>`,
beside the tables, on a local disk or an object store), so every process of the store — shards on
one host or on many, a restarted service — sees the same runs and versions. A run is created by
exactly one process (a claim only one wins); its version is written by the process its trainer
talks to. Per-run counters that only matter while the service runs (rows curated per version,
refusals) live in the curator, not here.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from sponge.store import MAX_VERSION, RUN_ID_RE, StoreError

__all__ = ["RunError", "RunRecord", "RunRegistry"]

#: The shared objects of the registry: <PREFIX>/<run_id>, one JSON record each.
PREFIX = "runs"


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

    def __init__(self, store: Any) -> None:
        self.store = store                      # put_shared / get_shared / list_shared / put_shared_once
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[int | None, RunRecord]] = {}   # run -> (object's mtime, record)
        self._listed_at = float("-inf")

    #: Another process's change is seen within this many seconds (a listing of the store's shared
    #: objects, on an object store a LIST request, at most this often).
    refresh_s: float = 1.0

    def runs(self) -> dict[str, RunRecord]:
        """Every run the store knows, deleted ones included (another process's change within refresh_s)."""
        with self._lock:
            if time.monotonic() - self._listed_at >= self.refresh_s:
                listed = {key.rsplit("/", 1)[-1]: t for key, t in self.store.list_shared(PREFIX).items()}
                for run, mtime in listed.items():
                    if self._cache.get(run, (None,))[0] != mtime:
                        record = self._read(run)
                        if record is not None:
                            self._cache[run] = (mtime, record)
                self._listed_at = time.monotonic()
            return {run: rec for run, (_, rec) in sorted(self._cache.items())}

    def get(self, run_id: str) -> RunRecord | None:
        record = self.runs().get(run_id)
        if record is None:   # not listed yet: created by another process within refresh_s
            record = self._read(run_id)
            if record is not None:
                with self._lock:
                    self._cache[run_id] = (None, record)
        return record

    def live(self) -> dict[str, RunRecord]:
        return {r: rec for r, rec in self.runs().items() if not rec.deleted}

    def register(self, run_id: str, fingerprint: str, window: int | None, max_runs: int) -> tuple[RunRecord, bool]:
        """Create the run, or return it when it exists with this fingerprint: (record, created).

        A run registered before without a fingerprint (its rollouts arrived first) takes this one."""
        check_run_id(run_id)
        if not isinstance(fingerprint, str) or len(fingerprint) > 256:
            raise RunError("fingerprint must be a string of at most 256 characters")
        known = self.get(run_id)
        if known is None:
            live = len(self.live())
            if live >= max_runs:
                raise RunError(f"too many live runs ({live}, the cap is {max_runs}): delete one you are done "
                               "with (DELETE /runs/{id}) or raise --max-runs", status=409)
            # The claim carries the first record: if another process won a moment ago, its record
            # comes back with the claim even if that process died before writing it.
            mine = json.dumps(dataclasses.asdict(RunRecord(run_id, fingerprint, window, 0, time.time()))).encode()
            first = self.store.put_shared_once(f"{PREFIX}-claims/{run_id}", mine)
            if first == mine:
                record = self._parse(run_id, mine)
                self._write(record)
                return record, True
            known = self._read(run_id) or (self._parse(run_id, first) if first else self._wait_for(run_id))
        if known.deleted:
            raise RunError(f"run {run_id!r} was deleted; its id cannot be used again: start a new run id",
                           status=410)
        if known.fingerprint and fingerprint and known.fingerprint != fingerprint:
            raise RunError(
                f"run {run_id!r} was registered with tokenizer/model fingerprint {known.fingerprint}, "
                f"this trainer has {fingerprint}: its token ids would not match; use a new run id", status=409)
        if fingerprint and not known.fingerprint:
            known = dataclasses.replace(known, fingerprint=fingerprint)
            self._write(known)
        return known, False

    def set_version(self, run_id: str, version: int) -> RunRecord:
        """The run's trainer now generates with `version`; returns the record (versions only go up)."""
        record = self._existing(run_id)
        if version < record.policy_version:
            raise RunError(f"policy version went backwards for run {run_id!r}: {version} < "
                           f"{record.policy_version} (a new training run needs a new run id)", status=409)
        if version != record.policy_version:
            record = dataclasses.replace(record, policy_version=version)
            self._write(record)
        return record

    def delete(self, run_id: str) -> RunRecord:
        record = dataclasses.replace(self._existing(run_id), deleted=True)
        self._write(record)
        return record

    def _existing(self, run_id: str) -> RunRecord:
        record = self.get(run_id)
        if record is None:
            raise RunError(f"no run {run_id!r}: register it first (POST /runs)", status=404)
        if record.deleted:
            raise RunError(f"run {run_id!r} was deleted", status=410)
        return record

    def _write(self, record: RunRecord) -> None:
        self.store.put_shared(f"{PREFIX}/{record.run_id}", json.dumps(dataclasses.asdict(record)).encode())
        with self._lock:
            self._cache[record.run_id] = (None, record)   # ours at once; its mtime at the next listing

    def _read(self, run_id: str) -> RunRecord | None:
        blob = self.store.get_shared(f"{PREFIX}/{run_id}")
        return None if blob is None else self._parse(run_id, blob)

    @staticmethod
    def _parse(run_id: str, blob: bytes) -> RunRecord:
        try:
            fields = {f.name for f in dataclasses.fields(RunRecord)}
            return RunRecord(**{k: v for k, v in json.loads(blob).items() if k in fields})
        except (ValueError, TypeError) as exc:
            raise StoreError(f"unreadable run record {PREFIX}/{run_id} in the store: {exc}") from None

    def _wait_for(self, run_id: str, timeout_s: float = 30.0) -> RunRecord:
        # Only for a claim made before claims carried the record (a store from an older version).
        deadline = time.monotonic() + timeout_s
        while (record := self._read(run_id)) is None:
            if time.monotonic() > deadline:
                raise RunError(f"run {run_id!r} was claimed by another process that never wrote it", status=503)
            time.sleep(0.05)
        return record


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
