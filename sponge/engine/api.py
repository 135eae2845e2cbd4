"""The service's HTTP API: health, metrics, replay samples as Arrow, read-only SQL, policy reports, removal.

Served by the same process as the ingest loop (uvicorn in a thread). Every handler
turns bad input into a 4xx with a message that says what to fix; nothing a client
sends can stop the service. Replay samples travel as an Arrow IPC stream with the
sampling weight in a `weight` column beside the rows.
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from sponge.streams.codec import ARROW_CONTENT_TYPE, encode_arrow

if TYPE_CHECKING:
    from sponge.engine.curation import Curator
    from sponge.engine.store import RolloutStore


@dataclass
class ApiConfig:
    #: Interface to bind; loopback by default so nothing is exposed by accident.
    host: str = "127.0.0.1"
    #: Port to bind; 0 picks a free one (the chosen port is on `ApiServer.port`).
    port: int = 8765
    #: When set, every endpoint but /healthz needs `Authorization: Bearer <token>`.
    token: str | None = None
    #: Upper bounds a client cannot raise.
    max_sample: int = 4096
    max_sql_rows: int = 10_000
    max_sql_seconds: float = 10.0


class SqlRequest(BaseModel):
    query: str = Field(..., min_length=1, description="one read-only SELECT over the store's views")
    max_rows: int = Field(1000, ge=1)
    timeout_s: float = Field(5.0, gt=0)
    format: str = Field("json", pattern="^(json|arrow)$")


class PolicyReport(BaseModel):
    policy_version: int = Field(..., ge=0, description="the trainer step whose weights now generate")


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

    def authorise(request: Request) -> None:
        if not config.token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.strip(), config.token):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    def need_curator() -> Curator:
        if curator is None:
            raise HTTPException(status_code=409, detail="selection is disabled in this service")
        return curator

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

    @app.get("/readyz", dependencies=[Depends(authorise)])
    def readyz() -> JSONResponse:
        is_ready = ready is None or ready.is_set()
        body = {"ready": is_ready, "rollouts": store.count()}
        if curator is not None:
            body.update(curator.describe())
        return JSONResponse(status_code=200 if is_ready else 503, content=body)

    @app.get("/metrics", dependencies=[Depends(authorise)])
    def metrics() -> Response:
        if metrics_text is None:
            raise HTTPException(status_code=404, detail="metrics are not enabled")
        payload, content_type = metrics_text()
        return Response(content=payload, media_type=content_type)

    @app.get("/replay/sample", dependencies=[Depends(authorise)])
    def replay_sample(
        n: int = Query(256, ge=1, description="rows to draw (with replacement)"),
        weighting: str = Query("uniform", pattern="^(uniform|recency|quality)$"),
        seed: int | None = Query(None, description="seed for a reproducible draw"),
    ) -> Response:
        cur = need_curator()
        if n > config.max_sample:
            raise HTTPException(status_code=400, detail=f"n={n} exceeds the limit {config.max_sample}")
        table = cur.sample(n, weighting=weighting, seed=seed)
        return Response(content=encode_arrow(table), media_type=ARROW_CONTENT_TYPE,
                        headers={"x-sponge-selection-version": str(cur.selection_version)})

    @app.get("/replay/subset", dependencies=[Depends(authorise)])
    def replay_subset(format: str = Query("json", pattern="^(json|arrow)$")) -> Response:
        cur = need_curator()
        if format == "arrow":
            return Response(content=encode_arrow(cur.subset_rows()), media_type=ARROW_CONTENT_TYPE,
                            headers={"x-sponge-selection-version": str(cur.selection_version)})
        return JSONResponse(content={"rollout_ids": cur.subset_ids(), **cur.describe()})

    @app.post("/sql", dependencies=[Depends(authorise)])
    def sql(req: SqlRequest) -> Response:
        from sponge.engine.sql import SqlError

        try:
            table = store.sql(req.query, max_rows=min(req.max_rows, config.max_sql_rows),
                              timeout_s=min(req.timeout_s, config.max_sql_seconds))
        except SqlError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        if req.format == "arrow":
            return Response(content=encode_arrow(table), media_type=ARROW_CONTENT_TYPE)
        return JSONResponse(content={"columns": table.column_names,
                                     "rows": _jsonable(table), "num_rows": table.num_rows})

    @app.post("/policy", dependencies=[Depends(authorise)])
    def policy(report: PolicyReport) -> dict:
        cur = need_curator()
        evicted = cur.report_policy_version(report.policy_version)
        return {"policy_version": cur.policy_version, "evicted": evicted}

    @app.get("/policy", dependencies=[Depends(authorise)])
    def policy_get() -> dict:
        cur = need_curator()
        return {"policy_version": cur.policy_version}

    @app.post("/rollouts/remove", dependencies=[Depends(authorise)])
    def remove(req: RemoveRequest) -> dict:
        if curator is not None:
            removed = curator.remove(req.rollout_ids, reason=req.reason)
        else:
            removed = store.delete(req.rollout_ids, reason=req.reason)
        return {"removed": removed}

    return app


def _jsonable(table: pa.Table) -> list[dict]:
    # Binary and fixed-size list columns are fine for to_pylist; bytes need a text form.
    rows = table.to_pylist()
    for row in rows:
        for key, value in row.items():
            if isinstance(value, bytes):
                row[key] = value.hex()
            elif hasattr(value, "isoformat"):
                row[key] = value.isoformat()
    return rows


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
        self._thread.join(timeout=10)
