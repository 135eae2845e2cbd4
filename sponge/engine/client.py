"""Talk to a running sponge service from a training script.

`ServiceClient` wraps the HTTP API (replay as Arrow, SQL, policy reports, removal).
`ServiceReplaySource` plugs the service into the ReMix trainer: replay candidates come back
as the curated subset (with each rollout's group advantage), and every policy-version bump
is reported so the service evicts what is too stale.
"""

from __future__ import annotations

import httpx
import pyarrow as pa
import pyarrow.compute as pc


class ServiceError(RuntimeError):
    """The service answered with an error; the message is the service's own."""


class ServiceClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise ServiceError(f"{response.request.method} {response.request.url.path}: "
                               f"{response.status_code} {detail}")
        return response

    def ready(self) -> dict:
        return self._check(self._http.get("/readyz")).json()

    def sample(self, n: int = 256, weighting: str = "uniform", seed: int | None = None) -> pa.Table:
        params = {"n": n, "weighting": weighting}
        if seed is not None:
            params["seed"] = seed
        return _read_arrow(self._check(self._http.get("/replay/sample", params=params)).content)

    def subset(self) -> pa.Table:
        return _read_arrow(self._check(self._http.get("/replay/subset", params={"format": "arrow"})).content)

    def sql(self, query: str, max_rows: int = 1000, timeout_s: float = 5.0) -> pa.Table:
        body = {"query": query, "max_rows": max_rows, "timeout_s": timeout_s, "format": "arrow"}
        return _read_arrow(self._check(self._http.post("/sql", json=body)).content)

    def report_policy_version(self, version: int) -> dict:
        return self._check(self._http.post("/policy", json={"policy_version": int(version)})).json()

    def remove(self, rollout_ids: list[str], reason: str = "explicit") -> int:
        body = {"rollout_ids": list(rollout_ids), "reason": reason}
        return self._check(self._http.post("/rollouts/remove", json=body)).json()["removed"]

    def close(self) -> None:
        self._http.close()


class ServiceReplaySource:
    """A trainer `ReplaySource` backed by a sponge service and a Kafka producer.

    Fresh rollouts reach the service through Kafka (pass a `RolloutProducer.send` as the
    trainer's `on_rollouts` hook), so `add` has nothing to do here. `window` keeps only
    candidates from the last `window` policy versions, as ReMix does.
    """

    def __init__(self, client: ServiceClient, window: int = 2) -> None:
        self.client = client
        self.window = window
        self.enabled = True

    def add(self, rollouts: pa.Table) -> None:
        """Nothing to do: the service ingests fresh rollouts from Kafka."""

    def candidates(self, current_version: int) -> pa.Table:
        if not self.enabled:
            return pa.table({})
        rows = self.client.subset()
        if rows.num_rows == 0:
            return rows
        keep = pc.greater_equal(rows.column("policy_version"), current_version - self.window)
        return rows.filter(keep)

    def clear(self) -> None:
        # Reincarnation switches replay off; the service keeps curating for other consumers.
        self.enabled = False

    def on_policy_version(self, version: int) -> None:
        self.client.report_policy_version(version)


def _read_arrow(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(payload).read_all()
