"""User SQL in child processes the OS bounds: an address-space limit and SIGKILL at the deadline.

    caller (service / CLI)  --control socket-->  fork server: `python -m sponge.store.sql_worker FD`
          |                                        (duckdb + pyarrow imported once, one thread)
          |                                              | fork, one per query
          +------ query socket (job in, result out) --> query child: guard, locked connection,
                                                         views, plan, run, Arrow IPC back, exit

Why this shape. DuckDB's memory_limit covers its buffer manager only; a list built from
``range(10^9)``, ``repeat('x', 10^9)`` or the Arrow export of a huge value allocate outside it,
and ``interrupt()`` is not checked while a query is planned or while such a value is built. So
the query runs in a child process: the child lowers its own RLIMIT_AS (address space) to what
it has mapped at that point plus the memory limit plus a fixed headroom, so an allocation past
it fails inside DuckDB (which reports "failed to allocate", a clean error) instead of growing
the caller; and the caller SIGKILLs the child at the deadline, whatever it is doing. RLIMIT_AS
rather than a cgroup memory limit: it needs no privileges or cgroup delegation (a plain
`pip install` under any container works the same), it is per process, and a failed allocation
becomes an error DuckDB reports instead of an OOM kill. Its cost is that it counts reserved
address space, not resident memory, hence the headroom (thread stacks, malloc arenas).

Why a fork server. Importing duckdb and pyarrow costs ~0.4 s of CPU, too much per query; forking
a process that already has them costs milliseconds. The caller is multi-threaded (uvicorn,
ingest), so it never forks itself: it starts the server with subprocess (fork+exec), and the
server, which keeps a single thread (no OpenBLAS or jemalloc background threads), forks one
child per query. Each child runs exactly one query and exits, so its memory goes back to the OS
at once. The caller passes the child one end of a fresh socketpair over the control socket
(SCM_RIGHTS) and gets its pid back; it kills it through a pidfd, which cannot hit a reused pid.

`SqlWorkers` is the caller's side: at most `max_concurrent` queries at once (more are refused
with SqlBusy, never queued), results bounded by `max_rows` and `max_result_bytes`, and `close()`
kills the queries in flight so shutdown never waits for one. The server exits when the caller
closes its end (or dies), and a query child exits as soon as its caller's end of the query
socket closes (the caller exited or was killed), so nothing outlives the caller for long.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import weakref
from pathlib import Path
from typing import Any, Self

from sponge.store.sql import (
    ERROR_KINDS,
    QueryResult,
    SqlBusy,
    SqlError,
    SqlLimitError,
    SqlLimits,
    SqlUnavailable,
    memory_limit_message,
    time_limit_message,
)

#: Seconds the caller waits for the fork server to import duckdb and fork a child (first query).
STARTUP_TIMEOUT_S = 60.0
#: Address space a child may map beyond what it has at the start of its query, on top of the
#: memory limit: DuckDB's threads (8 MiB stack each), malloc arenas, the Arrow export's copies.
ADDRESS_SPACE_HEADROOM = 512 * 2**20
#: A child whose caller vanished without closing its socket exits this long after its deadline
#: (a caller that closes it, by exiting or killing, ends the child at once).
ORPHAN_GRACE_S = 30.0
#: Largest job header or result header accepted on a socket (a job holds the query and the views).
MAX_HEADER_BYTES = 64 * 2**20
#: Environment of the fork server: no helper threads (forking a threaded process can deadlock a
#: child on a lock another thread held), and few malloc arenas (each reserves 64 MiB of address
#: space, which RLIMIT_AS counts).
WORKER_ENV = {
    "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    "JE_ARROW_MALLOC_CONF": "background_thread:false", "MALLOC_ARENA_MAX": "2",
}
_FRAME = struct.Struct(">Q")
_PID = struct.Struct(">q")


# ============================================================================ caller side


class SqlWorkers:
    """Runs user queries in bounded child processes; thread-safe; `close()` kills what runs.

    The fork server starts on the first query (or `start()`), so a process that never runs
    SQL pays nothing.
    """

    def __init__(self, limits: SqlLimits | None = None, *, python: str = sys.executable) -> None:
        self.max_concurrent = (limits or SqlLimits()).max_concurrent
        self._python = python
        self._slots = threading.BoundedSemaphore(self.max_concurrent)
        self._lock = threading.Lock()          # guards _servers, _children and _closed
        self._servers: list[_ForkServer] = []  # the current fork server, if started
        self._children: dict[int, _Child] = {}
        self._closed = False
        # A pool dropped without close() (a store garbage-collected in a test) still stops its server.
        self._finalizer = weakref.finalize(self, _shutdown, self._children, self._servers)

    def start(self) -> SqlWorkers:
        """Start the fork server now (it imports duckdb in the background meanwhile)."""
        with self._lock:
            self._ensure_server()
        return self

    def run(self, query: str, *, setup_sql: list[str], allowed_dir: str | Path, limits: SqlLimits,
            datasets: dict | None = None) -> QueryResult:
        """Run one query in a fresh child within `limits`; raise SqlError (or a kind of it) if not.

        `datasets`: Arrow datasets the views select from, as `sponge.store.datasets.DatasetSpec`
        JSON by name; the child opens and registers them before the views are created."""
        started = time.perf_counter()
        if not self._slots.acquire(blocking=False):
            raise SqlBusy(f"{self.max_concurrent} SQL queries are already running (the limit): retry shortly")
        try:
            job = json.dumps({"query": query, "setup_sql": list(setup_sql), "allowed_dir": str(allowed_dir),
                              "limits": dataclasses.asdict(limits), "datasets": datasets or {}}).encode()
            child = self._fork()
            try:
                header, payload = child.run(job, limits)
            finally:
                with self._lock:
                    self._children.pop(child.pid, None)
                child.close()
        finally:
            self._slots.release()
        if not header.get("ok"):
            raise ERROR_KINDS.get(header.get("error"), SqlError)(header.get("message", "query failed"))
        import pyarrow as pa

        table = pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
        return QueryResult(table=table, truncated=bool(header["truncated"]),
                           elapsed_s=time.perf_counter() - started)

    def close(self) -> None:
        """Kill the queries in flight (their callers get SqlUnavailable) and stop the fork server."""
        with self._lock:
            self._closed = True
        self._finalizer()   # = _shutdown(children, servers), once

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _ensure_server(self) -> _ForkServer:
        if self._closed:
            raise SqlUnavailable("query not run: SQL is shutting down")
        if not self._servers:
            self._servers.append(_ForkServer(self._python))
        return self._servers[0]

    def _fork(self) -> _Child:
        for attempt in range(2):   # a server that died since the last query is restarted once
            with self._lock:
                server = self._ensure_server()
            try:
                child = server.fork()
            except _ServerGone as exc:
                with self._lock:
                    if server in self._servers:
                        self._servers.remove(server)
                    closed = self._closed
                server.close()
                if closed:
                    raise SqlUnavailable("query not run: SQL is shutting down") from None
                if attempt == 1:
                    raise SqlUnavailable(f"the SQL worker could not start: {exc}") from None
                continue
            with self._lock:
                if not self._closed:
                    self._children[child.pid] = child
                    return child
            child.kill(reason="closed")
            child.close()
            raise SqlUnavailable("query not run: SQL is shutting down")
        raise AssertionError("unreachable")


class _ServerGone(Exception):
    pass


class _ForkServer:
    """The caller's handle on one fork server process."""

    def __init__(self, python: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {**os.environ, **WORKER_ENV}
        # The server imports this same sponge (an installed copy or a source tree on sys.path).
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            # -P: the current directory is not put on sys.path (nothing there can shadow a module).
            self.process = subprocess.Popen(
                [python, "-P", "-m", "sponge.store.sql_worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.control = ours
        self._lock = threading.Lock()   # one fork request at a time on the control socket

    def fork(self) -> _Child:
        """A new child holding one end of a fresh socketpair; the other end comes back with it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                try:
                    self.control.settimeout(STARTUP_TIMEOUT_S)
                    socket.send_fds(self.control, [b"F"], [theirs.fileno()])
                    (pid,) = _PID.unpack(_recv_exact(self.control, _PID.size))
                except (OSError, EOFError) as exc:
                    raise _ServerGone(f"fork server unreachable ({exc or type(exc).__name__})") from None
            if pid < 0:
                raise _ServerGone(f"fork failed: {os.strerror(-pid)}")
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return _Child(pid, ours)

    def close(self) -> None:
        """Stop the server now (its children are separate processes: they are not affected)."""
        try:
            self.control.shutdown(socket.SHUT_RDWR)   # wakes a fork() waiting on it in another thread
        except OSError:
            pass
        self.control.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class _Child:
    """One query child as the caller sees it: its socket and a pidfd to kill it by."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.killed: str | None = None    # why we killed it: "deadline", "size" or "closed"
        self._lock = threading.Lock()     # kill() (from close() on another thread) vs close()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):  # not Linux >= 5.3, or already gone (we will read EOF)
            self._pidfd = None

    def run(self, job: bytes, limits: SqlLimits) -> tuple[dict, Any]:
        """Send the job, wait for the answer until the deadline; kill the child at the deadline."""
        deadline = time.monotonic() + limits.timeout_s
        try:
            _send_frame(self.sock, job, deadline)
            header = json.loads(_recv_frame(self.sock, deadline, MAX_HEADER_BYTES))
            size = int(header.get("payload_bytes", 0))
            payload = _recv_exact(self.sock, size, deadline) if size <= limits.max_result_bytes else None
        except TimeoutError:
            self.kill(reason="deadline")
            raise SqlLimitError(time_limit_message(limits.timeout_s)) from None
        except (EOFError, OSError, ValueError) as exc:
            if self.killed == "closed":
                raise SqlUnavailable("query stopped: SQL is shutting down") from None
            raise SqlLimitError(
                f"query stopped: its worker ended without an answer ({exc or type(exc).__name__}); "
                f"most likely it needed more than the {limits.memory_limit} memory limit"
            ) from None
        if payload is None:   # the child checks this itself; never read more than the limit anyway
            self.kill(reason="size")
            raise SqlLimitError(result_size_message(size, limits.max_result_bytes))
        return header, payload

    def kill(self, reason: str) -> None:
        with self._lock:
            if self.sock.fileno() < 0:
                return                             # closed: the child has answered or been killed
            self.killed = self.killed or reason
            try:
                if self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                else:
                    os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass   # already gone
            try:
                self.sock.shutdown(socket.SHUT_RDWR)   # wake a caller blocked reading from it
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self.sock.close()
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None


def _shutdown(children: dict[int, _Child], servers: list[_ForkServer]) -> None:
    """Kill a pool's children and stop its server (close(), or the finalizer of a dropped pool)."""
    for child in list(children.values()):
        child.kill(reason="closed")
    while servers:
        servers.pop().close()


def result_size_message(size: int, limit: int) -> str:
    return (f"result is {size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB limit (max_result_bytes): "
            "select fewer columns or rows")


# ============================================================================ framing


def _send_frame(sock: socket.socket, data: bytes, deadline: float | None = None) -> None:
    _settimeout(sock, deadline)
    sock.sendall(_FRAME.pack(len(data)) + data)


def _recv_frame(sock: socket.socket, deadline: float | None, max_bytes: int) -> bytes:
    (size,) = _FRAME.unpack(_recv_exact(sock, _FRAME.size, deadline))
    if size > max_bytes:
        raise ValueError(f"frame of {size} bytes is over {max_bytes}")
    return _recv_exact(sock, size, deadline)


def _recv_exact(sock: socket.socket, size: int, deadline: float | None = None) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        _settimeout(sock, deadline)
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("connection closed")
        got += n
    return bytes(buffer) if size < 4096 else buffer   # large payloads: no copy


def _settimeout(sock: socket.socket, deadline: float | None) -> None:
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        sock.settimeout(remaining)


# ============================================================================ server side


def serve(control_fd: int) -> None:
    """The fork server: import once, keep one warm child, hand each query to it and fork the next."""
    import duckdb  # noqa: F401 - imported here once, so every forked child starts with it loaded
    import pyarrow as pa
    import pyarrow.ipc

    import sponge.store.datasets  # pyarrow.dataset, for stores whose views read Arrow datasets
    import sponge.store.sql  # noqa: F401

    pa.array([0]).to_pylist()   # initialise Arrow's memory pool before forking, not in every child
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is for the caller; we exit on its EOF
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)    # the kernel reaps the children: no zombies
    control = socket.socket(fileno=control_fd)
    spare: tuple[int, socket.socket] | None = None
    while True:
        if spare is None:
            spare = _fork_spare(control)             # warms up while we wait for the next query
        try:
            _, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return
        if not fds:
            return                                   # EOF: the caller closed us or died
        pid = -1
        for _attempt in range(2):                    # a spare that died idle is replaced once
            if spare is None:
                spare = _fork_spare(control)
            try:
                socket.send_fds(spare[1], [b"J"], fds)
                pid = spare[0]
            except OSError:
                pass
            spare[1].close()
            spare = None
            if pid > 0:
                break
        os.close(fds[0])
        control.sendall(_PID.pack(pid if pid > 0 else -errno.ECHILD))


def _fork_spare(control: socket.socket) -> tuple[int, socket.socket] | None:
    """Fork a child that makes its DuckDB now, then waits on a private socket for its one query."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        return None
    if pid == 0:
        code = 1
        try:
            control.close()
            ours.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = _spare(theirs)
        except BaseException:  # noqa: BLE001 - printed, then the child exits: a bug, not a query error
            traceback.print_exc()
        finally:
            os._exit(code)                           # skip interpreter teardown: exit at once
    theirs.close()
    return pid, ours


def _spare(channel: socket.socket) -> int:
    """A warm child: build the DuckDB instance ahead of time, then serve the query socket it gets."""
    from sponge.store.sql import check_read_only, new_connection

    # Everything a query does first in a fresh process (the catalog, the parser's JSON
    # serialiser, the Arrow export) happens here, while nobody waits, not in the query's time.
    conn = new_connection()
    check_read_only("SELECT 1", conn)
    conn.sql("SELECT 1 AS x").to_arrow_table()
    try:
        _, fds, _, _ = socket.recv_fds(channel, 1, 1)
    except OSError:
        return 0
    channel.close()
    if not fds:
        return 0                                     # the server stopped: nothing to do
    return _query_child(socket.socket(fileno=fds[0]), conn)


def _query_child(sock: socket.socket, conn: Any) -> int:
    """Run the one job that arrives on `sock` on `conn` and answer it; returns the exit code."""
    from sponge.store.sql import run_read_only

    try:
        job = json.loads(_recv_frame(sock, None, MAX_HEADER_BYTES))
    except (EOFError, OSError, ValueError):
        return 0                                     # the caller gave up before sending
    limits = SqlLimits(**job["limits"])
    # If the caller dies nobody kills us at the deadline: stop as soon as its end of the socket
    # closes, and in any case a little after the deadline.
    watchdog = threading.Thread(target=_exit_when_caller_gone, args=(sock, limits.timeout_s + ORPHAN_GRACE_S),
                                name="sponge-sql-watchdog", daemon=True)
    watchdog.start()
    _limit_address_space(limits.memory_bytes + ADDRESS_SPACE_HEADROOM)
    payload = b""
    try:
        for attempt in range(3):                     # a segment that vanished under us: retry
            try:
                result = run_read_only(job["query"], setup_sql=job["setup_sql"], allowed_dir=job["allowed_dir"],
                                       limits=limits, conn=conn, datasets=job.get("datasets"))
                break
            except SqlUnavailable:
                if attempt == 2:
                    raise
                time.sleep(0.05)
                conn = None                          # run_read_only closed it: a fresh one next
        payload = _arrow_bytes(result.table, limits.max_result_bytes)
        header: dict[str, Any] = {"ok": True, "truncated": result.truncated, "payload_bytes": len(payload)}
    except SqlError as exc:
        header = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    except MemoryError:
        header = {"ok": False, "error": "SqlLimitError", "message": memory_limit_message(limits.memory_limit)}
    except Exception as exc:  # noqa: BLE001 - the caller gets one line, never a hang
        header = {"ok": False, "error": "SqlError", "message": f"query failed: {type(exc).__name__}: {exc}"}
    try:
        _send_frame(sock, json.dumps(header).encode())
        if payload:
            sock.sendall(payload)
    except OSError:
        pass                                         # the caller is gone (killed us, or timed out)
    return 0


def _exit_when_caller_gone(sock: socket.socket, seconds: float) -> None:
    events = getattr(select, "POLLRDHUP", 0) | select.POLLHUP
    poller = select.poll()
    poller.register(sock.fileno(), events)
    poller.poll(seconds * 1000)   # returns when the caller hangs up, or after `seconds`
    os._exit(3)


def _arrow_bytes(table: Any, max_bytes: int) -> Any:
    import pyarrow as pa

    if table.nbytes > max_bytes:
        raise SqlLimitError(result_size_message(table.nbytes, max_bytes))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    buffer = sink.getvalue()
    if buffer.size > max_bytes:
        raise SqlLimitError(result_size_message(buffer.size, max_bytes))
    return buffer


def _limit_address_space(extra_bytes: int) -> None:
    """Cap this process's address space at what it maps now plus `extra_bytes` (RLIMIT_AS)."""
    import resource

    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mapped + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft == resource.RLIM_INFINITY or cap < soft:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


if __name__ == "__main__":
    serve(int(sys.argv[1]))
