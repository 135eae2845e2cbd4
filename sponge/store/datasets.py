"""Arrow datasets a SQL connection reads, described in JSON so a query child can open them too.

The rollout store is a set of Delta tables whose live files only the table's log knows; DuckDB's
own Delta reader is an extension that cannot be downloaded here, and its Parquet reader cannot
reach an object store without another one. So every reader gets the store's tables as pyarrow
datasets (the files of one table snapshot, each with its partition values), registered on its
DuckDB connection under a name the store's views select from. A `DatasetSpec` is that snapshot
as plain data: the caller builds one from the table's log and hands it, as JSON, to the child
process that runs user SQL (`sponge.store.sql_worker`), which opens the same files (local or
S3, with the same credentials) without reading the log again. pyarrow only: the SQL child never
imports delta-rs (its runtime does not survive a fork).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs


@dataclass(frozen=True)
class FileSystemSpec:
    """Where a dataset's files live: the local file system or an S3-compatible store."""

    #: "local" or "s3"
    kind: str = "local"
    #: S3 endpoint URL (http://host:port), empty for AWS itself
    endpoint: str = ""
    region: str = ""
    access_key: str = ""
    secret_key: str = ""
    session_token: str = ""

    def open(self) -> pafs.FileSystem:
        if self.kind == "local":
            return pafs.LocalFileSystem()
        if self.kind != "s3":
            raise ValueError(f"unknown file system kind {self.kind!r}")
        kwargs: dict[str, Any] = {"region": self.region or "us-east-1"}
        if self.endpoint:
            parsed = urlparse(self.endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        if self.access_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key,
                          session_token=self.session_token or None)
        return pafs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class DatasetSpec:
    """Parquet files of one table snapshot (paths on `filesystem`, each with its partition
    values) or a small in-memory table; `open()` gives what DuckDB registers."""

    schema: pa.Schema
    #: file paths as the file system names them (no scheme)
    paths: list[str] = field(default_factory=list)
    #: partition column -> one value per path (the values the table's log records)
    partitions: dict[str, list] = field(default_factory=dict)
    filesystem: FileSystemSpec = field(default_factory=FileSystemSpec)
    #: a small table carried whole instead of files (e.g. the segment list)
    table: pa.Table | None = None

    def open(self) -> ds.Dataset | pa.Table:
        if self.table is not None:
            return self.table
        expressions = None
        if self.partitions:
            expressions = []
            for i in range(len(self.paths)):
                expr = None
                for name, values in self.partitions.items():
                    term = pc.field(name) == pa.scalar(values[i], self.schema.field(name).type)
                    expr = term if expr is None else expr & term
                expressions.append(expr)
        return ds.FileSystemDataset.from_paths(list(self.paths), schema=self.schema, format=ds.ParquetFileFormat(),
                                               filesystem=self.filesystem.open(), partitions=expressions)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"schema": _b64(self.schema.serialize()), "paths": list(self.paths),
                               "partitions": self.partitions, "filesystem": vars(self.filesystem)}
        if self.table is not None:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, self.table.schema) as writer:
                writer.write_table(self.table)
            out["table"] = _b64(sink.getvalue())
        return out

    @classmethod
    def from_json(cls, body: dict) -> DatasetSpec:
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(body["schema"])))
        table = None
        if body.get("table"):
            table = pa.ipc.open_stream(pa.py_buffer(base64.b64decode(body["table"]))).read_all()
        return cls(schema=schema, paths=list(body.get("paths", [])), partitions=dict(body.get("partitions", {})),
                   filesystem=FileSystemSpec(**body.get("filesystem", {})), table=table)


def register_datasets(conn: Any, datasets: dict[str, DatasetSpec | dict]) -> None:
    """Register each dataset on a DuckDB connection under its name (specs or their JSON)."""
    for name, spec in datasets.items():
        if isinstance(spec, dict):
            spec = DatasetSpec.from_json(spec)
        conn.register(name, spec.open())


def _b64(buffer: pa.Buffer) -> str:
    return base64.b64encode(memoryview(buffer)).decode("ascii")
