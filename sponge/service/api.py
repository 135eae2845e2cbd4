"""The service's HTTP API: health, metrics, runs, replay candidates as Arrow, read-only SQL, removal.

Served by the same process as the ingest loop (uvicorn in a thread). Every handler
turns bad input into a 4xx with a message that says what to fix; nothing a client
sends can stop the service. Replay travels as an Arrow IPC stream (candidates with their
`group_id` and `advantage`; legacy samples with a `weight` column beside the rows).

Runs (one per training run; `sponge.service.runs`):

    POST   /runs                      {"run_id", "fingerprint", "window"?} → 201 new / 200 resumed
    GET    /runs                      every live run, described
    GET    /runs/{run}                one run: version, window, retention, arrivals, refusals, subset
    DELETE /runs/{run}                retire all of the run's data
    POST   /runs/{run}/version        {"policy_version", "sent"?: {version: rollouts sent}}
    POST   /runs/{run}/candidates     {"version", "unit": group|rollout, "expect"?, "wait_s"?} → Arrow
    POST   /runs/{run}/flush          ingest and curate what has queued now (rollouts just sent)
    POST   /runs/{run}/retention      {"retired_below"}: lower a mark raised by mistake (admin)

With a token set, every route but /healthz (the docs and the OpenAPI schema included) needs
`Authorization: Bearer <token>`; a missing, wrong or malformed header is 401.
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from sponge.service.runs import RunError
from sponge.store import MAX_VERSION, StoreError
from sponge.streams.codec import ARROW_CONTENT_TYPE, encode_arrow

if TYPE_CHECKING:
    from sponge.service.curation import Curator
    from sponge.store import RolloutStore


@dataclass
class ApiConfig:
    """The HTTP API: where it listens, its token, the bounds a client cannot raise."""

    #: Interface to bind; loopback by default so nothing is exposed by accident.
    host: str = field(default="127.0.0.1", metadata={"name": "http_host"})
    #: Port to bind; 0 picks a free one (the chosen port is on `ApiServer.port`).
    port: int = field(default=8765, metadata={"name": "http_port"})
    #: When set, every endpoint but /healthz needs `Authorization: Bearer <token>`.
    token: str | None = None
    #: Most rows one /replay/sample request may ask for.
    max_sample: int = 4096
    #: Most rows one POST /sql returns, whatever the request says.
    max_sql_rows: int = 10_000
    #: Longest one POST /sql may run, whatever the request says.
    max_sql_seconds: float = 10.0


class SqlRequest(BaseModel):
    query: str = Field(..., min_length=1, description="one read-only SELECT over the store's views")
    max_rows: int = Field(1000, ge=1)
    timeout_s: float = Field(5.0, gt=0)
    format: str = Field("json", pattern="^(json|arrow)$")


class PolicyReport(BaseModel):
    policy_version: int = Field(..., ge=0, le=MAX_VERSION, strict=True,
                                description="the trainer step whose weights now generate")
    run_id: str | None = Field(None, description="the run (default: the only live run)")


class RunRequest(BaseModel):
    run_id: str = Field(..., min_length=1, max_length=128, description="the run's id: letters, digits, . _ : -")
    fingerprint: str = Field("", max_length=256, description="tokenizer/model fingerprint of its token ids")
    window: int | None = Field(None, ge=0, le=MAX_VERSION,
                               description="retention and replay window in policy versions (default: the service's)")


class VersionReport(BaseModel):
    policy_version: int = Field(..., ge=0, le=MAX_VERSION, strict=True,
                                description="the policy version that now generates")
    sent: dict[int, int] | None = Field(None, description="rollouts the trainer sent so far, per policy version: "
                                        "retention waits for them before retiring their version")


class CandidatesRequest(BaseModel):
    version: int = Field(..., ge=0, le=MAX_VERSION, strict=True,
                         description="the trainer's current policy version")
    unit: str = Field("group", pattern="^(group|rollout)$")
    expect: dict[int, int] | None = Field(None, description="wait until this many rollouts of each version "
                                          "have arrived (read-your-writes)")
    wait_s: float = Field(0.0, ge=0, le=600, description="the longest to wait for `expect`")


class RetentionRequest(BaseModel):
    retired_below: int = Field(..., ge=0, le=MAX_VERSION, strict=True,
                               description="the new, lower retention mark")


class RemoveRequest(BaseModel):
    rollout_ids: list[str] = Field(..., min_length=1, max_length=100_000)
    reason: str = Field("explicit", min_length=1, max_length=200)


def create_app(store: RolloutStore, curator: Curator | None, config: ApiConfig,
               metrics_text: Any = None, ready: threading.Event | None = None) -> FastAPI:
    """Build the FastAPI app over a store and (optionally) a curator.

    `metrics_text` is a zero-argument callable returning (bytes, content_type) for
    /metrics; `ready` is set by the service once it has rebuilt its state.
    """
    app = FastAPI(title="sponge", description="Replay curation service for RL fine-tuning",
                  version="0.1.0")

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        # Every route but /healthz, the docs and the schema included; compared as bytes, so a header
        # with odd (non-ASCII) bytes is a plain 401, never a 500.
        if config.token and request.url.path != "/healthz" and not _token_ok(request, config.token):
            return JSONResponse(status_code=401, content={"detail": "missing or wrong bearer token"},
                                headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    def need_curator() -> Curator:
        if curator is None:
            raise HTTPException(status_code=409, detail="selection is disabled in this service")
        return curator

    @app.exception_handler(RunError)
    async def run_error(_: Request, exc: RunError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    @app.exception_handler(ValueError)
    async def value_error(_: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.exception_handler(duckdb.IOException)
    async def store_io_error(_: Request, exc: duckdb.IOException) -> JSONResponse:
        # A segment file vanished under a reader (compaction rewrote the store meanwhile): transient.
        return JSONResponse(status_code=503, headers={"Retry-After": "1"},
                            content={"detail": f"the store changed during the request, retry: {exc}"})

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        is_ready = ready is None or ready.is_set()
        body = {"ready": is_ready, "rollouts": store.count()}
        why = ready.reason() if not is_ready and hasattr(ready, "reason") else None  # server.Readiness
        if why:
            body["reason"] = why   # e.g. "broker unreachable since ..."
        if curator is not None:
            body.update(curator.describe())
        return JSONResponse(status_code=200 if is_ready else 503, content=body)

    @app.get("/metrics")
    def metrics() -> Response:
        if metrics_text is None:
            raise HTTPException(status_code=404, detail="metrics are not enabled")
        payload, content_type = metrics_text()
        return Response(content=payload, media_type=content_type)

    # -- runs --------------------------------------------------------------------------------------
    @app.post("/runs")
    def register_run(req: RunRequest) -> JSONResponse:
        record, created = need_curator().register_run(req.run_id, req.fingerprint, req.window)
        return JSONResponse(status_code=201 if created else 200,
                            content={"created": created, **need_curator().describe_run(record.run_id)})

    @app.get("/runs")
    def list_runs() -> dict:
        return {"runs": need_curator().runs()}

    @app.get("/runs/{run_id}")
    def get_run(run_id: str) -> dict:
        return need_curator().describe_run(run_id)

    @app.delete("/runs/{run_id}")
    def delete_run(run_id: str) -> dict:
        return {"run_id": run_id, "deleted": True, "retired": need_curator().delete_run(run_id)}

    @app.post("/runs/{run_id}/version")
    def report_version(run_id: str, report: VersionReport) -> dict:
        return need_curator().report_version(run_id, report.policy_version, report.sent)

    @app.post("/runs/{run_id}/flush")
    def flush(run_id: str) -> dict:
        """A trainer has just sent rollouts it will soon want back: ingest and curate what has queued
        now instead of at the flush and batch deadlines."""
        need_curator().hurry(run_id)
        return {"run_id": run_id}

    @app.post("/runs/{run_id}/retention")
    def lower_retention(run_id: str, req: RetentionRequest) -> dict:
        restored = need_curator().lower_retention(run_id, req.retired_below)
        return {"run_id": run_id, "restored": restored, "retired_below": store.retired_below(run_id)}

    @app.post("/runs/{run_id}/candidates")
    def candidates(run_id: str, req: CandidatesRequest) -> Response:
        found = need_curator().candidates(run_id, req.version, req.unit, req.expect, req.wait_s)
        return Response(content=encode_arrow(found.table), media_type=ARROW_CONTENT_TYPE, headers={
            "x-sponge-complete": "true" if found.complete else "false",
            "x-sponge-missing": ",".join(f"{v}:{n}" for v, n in sorted(found.missing.items())),
            "x-sponge-waited-s": f"{found.waited_s:.3f}", "x-sponge-compute-s": f"{found.compute_s:.3f}"})

    # -- the subset (legacy routes: the only live run unless ?run= says which) ---------------------
    @app.get("/replay/sample")
    def replay_sample(
        n: int = Query(256, ge=1, description="rows to draw (with replacement)"),
        weighting: str = Query("uniform", pattern="^(uniform|recency|quality)$"),
        seed: int | None = Query(None, description="seed for a reproducible draw"),
        run: str | None = Query(None, description="the run (default: the only live run)"),
    ) -> Response:
        cur = need_curator()
        if n > config.max_sample:
            raise HTTPException(status_code=400, detail=f"n={n} exceeds the limit {config.max_sample}")
        run = cur.resolve_run(run)
        table = cur.sample(n, weighting=weighting, seed=seed, run_id=run)
        return Response(content=encode_arrow(table), media_type=ARROW_CONTENT_TYPE,
                        headers={"x-sponge-selection-version": str(cur.selection_version(run))})

    @app.get("/replay/subset")
    def replay_subset(format: str = Query("json", pattern="^(json|arrow)$"),
                      run: str | None = Query(None, description="the run (default: the only live run)")) -> Response:
        cur = need_curator()
        run = cur.resolve_run(run)
        if format == "arrow":
            return Response(content=encode_arrow(cur.subset_rows(run)), media_type=ARROW_CONTENT_TYPE,
                            headers={"x-sponge-selection-version": str(cur.selection_version(run))})
        return JSONResponse(content={"rollout_ids": cur.subset_ids(run), **cur.describe_run(run)})

    from sponge.store.sql_worker import SqlWorkers

    app.state.sql_workers = SqlWorkers(store.config.sql_limits)   # ApiServer.stop() kills what runs

    @app.post("/sql")
    def sql(req: SqlRequest) -> Response:
        """Run in a bounded child process. 400: refused or failed; 422: a time, memory or result-size
        limit stopped it; 429: max_concurrent queries already run; 503: shutting down or retry."""
        from sponge.store.sql import SqlBusy, SqlError, SqlLimitError, SqlUnavailable

        try:
            table = store.query(req.query, max_rows=min(req.max_rows, config.max_sql_rows),
                                timeout_s=min(req.timeout_s, config.max_sql_seconds),
                                workers=app.state.sql_workers).table
        except SqlError as exc:
            status = (429 if isinstance(exc, SqlBusy) else 503 if isinstance(exc, SqlUnavailable)
                      else 422 if isinstance(exc, SqlLimitError) else 400)
            raise HTTPException(status_code=status, detail=str(exc),
                                headers={"Retry-After": "1"} if status in (429, 503) else None) from exc
        if req.format == "arrow":
            return Response(content=encode_arrow(table), media_type=ARROW_CONTENT_TYPE)
        return JSONResponse(content={"columns": table.column_names,
                                     "rows": _jsonable(table), "num_rows": table.num_rows})

    @app.post("/policy")
    def policy(report: PolicyReport) -> dict:
        """Legacy: a run's version report (the only live run, or `default` when there is none)."""
        cur = need_curator()
        run = cur.resolve_run(report.run_id)
        if cur.registry.get(run) is None:
            cur.register_run(run)
        return cur.report_version(run, report.policy_version)

    @app.get("/policy")
    def policy_get(run: str | None = Query(None, description="the run (default: the only live run)")) -> dict:
        cur = need_curator()
        run = cur.resolve_run(run)
        record = cur.registry.get(run)
        return {"run_id": run, "policy_version": record.policy_version if record else 0}

    @app.post("/rollouts/remove")
    def remove(req: RemoveRequest) -> dict:
        """Tombstone rollouts; ids the store does not hold are listed as unknown (nothing written for them)."""
        try:
            removal = (curator.remove(req.rollout_ids, reason=req.reason) if curator is not None
                       else store.delete(req.rollout_ids, reason=req.reason))
        except StoreError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {"removed": removal.removed, "unknown": removal.unknown[:1000],
                "unknown_count": len(removal.unknown)}

    return app


def _token_ok(request: Request, token: str) -> bool:
    """Does the request carry `Authorization: Bearer <token>`? Compared as bytes in constant time."""
    raw = next((v for k, v in request.headers.raw if k.lower() == b"authorization"), b"")
    scheme, _, supplied = raw.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(supplied.strip(), token.encode("utf-8"))


def _jsonable(table: pa.Table) -> list[dict]:
    # The one encoder `sponge sql --format json` uses too: every DuckDB type (sponge.store.sql_json).
    from sponge.store.sql_json import json_rows

    return json_rows(table)


class ApiServer:
    """Runs the app with uvicorn in a daemon thread; `stop()` shuts it down."""

    def __init__(self, app: FastAPI, config: ApiConfig) -> None:
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                                     log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, name="sponge-http", daemon=True)
        self.host = config.host
        self.port = config.port

    def start(self, timeout_s: float = 10.0) -> ApiServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server failed to start on {self.host}:{self.port}")
            time.sleep(0.02)
        sockets = [s for server in self._server.servers for s in server.sockets]
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        if (sql_workers := getattr(self._server.config.app.state, "sql_workers", None)) is not None:
            sql_workers.close()   # kills in-flight SQL children: shutdown never waits for a query
        self._thread.join(timeout=10)
