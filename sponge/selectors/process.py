"""A selector that runs in a child process, behind the Selector interface.

Why: selection is CPU work done in many short numpy calls, and between them it holds the GIL.
Inside the ingest service it shares one interpreter with Kafka decoding, validation and Parquet
writing, so on a small machine the two take turns on one core instead of using two. In a child
process the selector has a core (and a GIL) of its own; the service's curation thread only ships
batches to it and waits, and waiting releases the GIL.

    host = SelectorHost()                                  # the child starts on first use
    sel = host.new_selector("dynamic", objective, k=64, eps=0.2, seed=0, slot="run-a")
    sel.insert(ids, vectors, quality)                      # pipelined: returns once sent
    sel.solution(); sel.value(); sel.stats()               # wait for everything sent before
    host.drop_selector("run-a"); host.close()

The host keeps one selector per slot (the service keeps one per run, all in one child: an
interpreter with numpy, faiss and the compiled kernels costs ~150 MB, a selector only what it
holds). `new_selector` replaces the slot's selector (the curator rebuilds from the store often
enough that a fresh interpreter per rebuild would cost more than the rebuild).

Inserts and deletes are sent without waiting for an answer, so the parent can read the next batch
from the store while the child works on this one. The child never answers them: an error one
raises is kept and raised by the next call that does wait (solution, value, stats, sync), and
from then on that selector is broken (its state is unknown) until `new_selector` replaces it.
A child that dies is noticed the same way (a closed pipe) and restarted by the next `new_selector`;
the selectors of every other slot went with it, and their next call says so.

An insert's vectors travel through a shared ring (`_VectorRing`: one memfd both processes map),
not through the socket: pickling a 16k x 384 float32 batch and pushing it through a socket cost
about 3 us per rollout, split between the two processes; a copy into the ring costs 0.1. The
socket carries only the ids, the quality column and where the batch lies in the ring. A batch
that does not fit (the child has not yet read far enough, or it is bigger than the ring) goes
through the socket as before, so the ring only ever saves time and never makes the parent wait.
"""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
import weakref
from multiprocessing.connection import Connection

import numpy as np

from sponge.selectors.objectives import OBJECTIVES, Objective


class SelectorProcessError(RuntimeError):
    """The hosted selector failed (the child's traceback is in the message) or its process is gone."""


class _VectorRing:
    """A byte ring in memory both processes map: the parent writes, the child reads and frees.

    Positions are byte counts since the start, so they only grow: the parent's `head` (the end
    of what it has written) and the child's `consumed` (the end of what it has read), which the
    child stores in the ring's first 8 bytes. A write of n bytes may use [head, head + n) unless
    that would reach past consumed + capacity (it would overwrite unread data); a write that
    would wrap skips to the start of the buffer, and the skipped bytes count as read once the
    child reads the write after them. Writes and the message saying where they are go in the same
    order as the socket's messages, so the child always reads a region the parent finished.
    """

    HEADER = 64   # the consumed counter, alone on its cache line

    def __init__(self, fd: int, capacity: int) -> None:
        self.fd, self.capacity = fd, capacity
        self.buffer = mmap.mmap(fd, self.HEADER + capacity)
        self.head = 0

    @classmethod
    def create(cls, capacity: int) -> _VectorRing:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("sponge-selector-ring")
        else:   # no memfd (not Linux): an unlinked temporary file serves, at the price of write-back
            with tempfile.TemporaryFile() as file:
                fd = os.dup(file.fileno())
        os.ftruncate(fd, cls.HEADER + capacity)
        return cls(fd, capacity)

    def put(self, array: np.ndarray) -> tuple[int, int] | None:
        """Copy `array` in; returns (offset, end) for the child's `take`, None when it does not fit now."""
        n = array.nbytes
        start = self.head
        if start % self.capacity + n > self.capacity:
            start += self.capacity - start % self.capacity   # wrap: skip the tail of the buffer
        end = start + n
        if n > self.capacity or end - self.consumed() > self.capacity:
            return None
        offset = start % self.capacity
        target = np.frombuffer(self.buffer, np.uint8, n, self.HEADER + offset)
        target[:] = array.reshape(-1).view(np.uint8)
        self.head = end
        return offset, end

    def take(self, offset: int, end: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """The child's side: a private copy of what `put` wrote at offset; the space is free again."""
        count = int(np.prod(shape))
        array = np.frombuffer(self.buffer, np.dtype(dtype), count, self.HEADER + offset).reshape(shape).copy()
        # Published after the copy in program order; x86 keeps loads before a later store. (A
        # weakly ordered CPU could in principle let the parent overwrite before the copy's last
        # loads land; nothing here has run on one.)
        np.frombuffer(self.buffer, np.uint64, 1, 0)[0] = end
        return array

    def consumed(self) -> int:
        return int(np.frombuffer(self.buffer, np.uint64, 1, 0)[0])

    def close(self) -> None:
        self.buffer.close()
        os.close(self.fd)


class SelectorHost:
    """Owns the child process that hosts one selector at a time.

    Args:
        start_timeout_s: how long the child may take to import and load its kernels.
        ring_bytes: size of the shared ring that carries inserted vectors to the child (memory
            both processes share once it has been written through; 0 sends everything over the
            socket). The default holds two batches of the curator's default 16k rows x 384 floats.
    """

    def __init__(self, start_timeout_s: float = 60.0, ring_bytes: int = 64 << 20) -> None:
        self.start_timeout_s = start_timeout_s
        self.ring_bytes = ring_bytes
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._ring: _VectorRing | None = None
        self._generation = 0          # bumps with every new selector, in any slot
        self._slots: dict[str, int] = {}   # slot -> the generation of its selector in the live child
        # One conversation at a time: a pipelined insert must not interleave with a waiting call.
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> SelectorHost:
        """Start the child now (its imports and compiled kernels loaded) rather than on first use."""
        with self._lock:
            self._ensure_started()
        return self

    def _ensure_started(self) -> Connection:
        if self._process is not None and self._process.poll() is None:
            return self._conn
        self._stop_child()
        # A fresh interpreter running this module, not multiprocessing's spawn: spawn re-imports
        # the parent's __main__, which re-runs any user script without a __main__ guard. (And
        # fork would copy the locks of the parent's Kafka/faiss/torch threads.)
        ours, theirs = socket.socketpair()
        ring = _VectorRing.create(self.ring_bytes) if self.ring_bytes > 0 else None
        # The child imports sponge from where this process did (a script may have extended sys.path);
        # its BLAS gets one thread, like faiss: the point of the child is one core beside the parent.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
                   OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        argv = [sys.executable, "-m", "sponge.selectors.process", str(theirs.fileno())]
        fds = [theirs.fileno()]
        if ring is not None:
            argv += [str(ring.fd), str(ring.capacity)]
            fds.append(ring.fd)
        try:
            process = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        failure = None
        if not conn.poll(self.start_timeout_s):
            process.kill()
            failure = f"the selector process did not start within {self.start_timeout_s}s"
        else:
            try:
                conn.recv()  # the child's "ready"
            except EOFError:
                process.wait(5)
                failure = f"the selector process exited at start (code {process.returncode})"
        if failure is not None:
            conn.close()
            if ring is not None:
                ring.close()
            raise SelectorProcessError(failure)
        self._process, self._conn, self._ring = process, conn, ring
        self._finalizer = weakref.finalize(self, _shutdown, process, conn, ring)
        return conn

    def _stop_child(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._process = self._conn = self._finalizer = self._ring = None
        self._slots.clear()   # every selector lived in that child

    def close(self) -> None:
        """End the child process (the hosted selector goes with it)."""
        with self._lock:
            self._stop_child()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- the hosted selector ------------------------------------------------------------------------

    def new_selector(self, method: str, objective: Objective, slot: str = "main", **params) -> HostedSelector:
        """Replace the slot's selector with a new, empty one (restarting the child if it died)."""
        scalars, arrays = objective.params()
        with self._lock:
            conn = self._ensure_started()
            self._generation += 1
            try:
                conn.send(("new", slot, (method, type(objective).__name__, scalars, arrays, params)))
                _answer(conn)
            except (OSError, EOFError) as exc:
                self._stop_child()
                raise SelectorProcessError(f"the selector process went away: {exc!r}") from exc
            self._slots[slot] = self._generation
        return HostedSelector(self, slot, self._generation, method, objective, params)

    def drop_selector(self, slot: str) -> None:
        """Free the slot's selector in the child (nothing happens if there is none)."""
        with self._lock:
            if self._slots.pop(slot, None) is not None and self._conn is not None:
                try:
                    self._conn.send(("drop", slot, ()))
                except (OSError, EOFError):
                    self._stop_child()

    @property
    def slots(self) -> list[str]:
        """The slots that hold a selector in the live child."""
        return sorted(self._slots)

    def _call(self, slot: str, generation: int, op: str, args: tuple, wait: bool):
        with self._lock:
            if self._conn is None:
                raise SelectorProcessError("the selector process is closed")
            if self._slots.get(slot) != generation:
                raise SelectorProcessError("this selector was replaced (a newer one in its slot, or its "
                                           "process restarted)")
            try:
                if op == "insert" and self._ring is not None and args[1].dtype != object:
                    ids, vectors, quality = args
                    where = self._ring.put(vectors)
                    if where is not None:
                        op, args = "insert_ring", (ids, *where, vectors.dtype.str, vectors.shape, quality)
                self._conn.send((op, slot, args))
                return _answer(self._conn) if wait else None
            except (OSError, EOFError) as exc:
                self._stop_child()
                raise SelectorProcessError(f"the selector process went away: {exc!r}") from exc


class HostedSelector:
    """The Selector interface, forwarded to the host's child process (see the module docstring)."""

    def __init__(self, host: SelectorHost, slot: str, generation: int, method: str, objective: Objective,
                 params: dict):
        self._host, self._slot, self._generation = host, slot, generation
        #: a local copy of the objective (for saving parameters and merging shard solutions)
        self.objective = objective
        self.method = method
        self.k = int(params.get("k", 64))
        self._params = dict(params)

    def params(self) -> dict:
        return dict(self._params)

    def insert(self, ids, vectors, quality: np.ndarray | None = None) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors)
        quality = None if quality is None else np.ascontiguousarray(quality)
        self._host._call(self._slot, self._generation, "insert", (ids, vectors, quality), wait=False)

    def delete(self, ids) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids):
            self._host._call(self._slot, self._generation, "delete", (ids,), wait=False)

    def sync(self) -> None:
        """Wait until everything sent has been applied; raises what any of it raised."""
        self._host._call(self._slot, self._generation, "sync", (), wait=True)

    def solution(self) -> np.ndarray:
        return self._host._call(self._slot, self._generation, "solution", (), wait=True)

    def value(self) -> float:
        return self._host._call(self._slot, self._generation, "value", (), wait=True)

    def stats(self) -> dict:
        return self._host._call(self._slot, self._generation, "stats", (), wait=True)

    def __len__(self) -> int:
        return int(self.stats()["n_live"])

    def close(self) -> None:
        """Free this selector in the child (the host and the other slots go on)."""
        if self._host._slots.get(self._slot) == self._generation:
            self._host.drop_selector(self._slot)


def _answer(conn: Connection):
    status, payload = conn.recv()
    if status == "error":
        raise SelectorProcessError(f"the selector process raised:\n{payload}")
    return payload


def _shutdown(process: subprocess.Popen, conn: Connection, ring: _VectorRing | None) -> None:
    try:
        conn.send(("exit", "", ()))
    except (OSError, EOFError):
        pass
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
    conn.close()
    if ring is not None:
        ring.close()


# ---- the child ------------------------------------------------------------------------------------

def _serve(conn: Connection, ring: _VectorRing | None) -> None:
    """The child's loop: apply what arrives; answer only the calls that wait."""
    import faiss

    from sponge.selectors import METHODS
    from sponge.selectors.kernels import warm_up

    # One thread: the point of this process is one core beside the parent's work, and idle OpenMP
    # threads spin-wait, burning the cores the parent needs.
    faiss.omp_set_num_threads(1)
    if os.environ.get("SPONGE_NICE"):
        os.nice(int(os.environ["SPONGE_NICE"]))
    warm_up()
    conn.send(("ok", "ready"))
    selectors: dict = {}   # slot -> the selector
    failures: dict = {}    # slot -> the first error of a pipelined call, until the next waiting call
    while True:
        try:
            op, slot, args = conn.recv()
        except (EOFError, OSError):
            return   # the parent is gone
        if op == "exit":
            return
        selector, failure = selectors.get(slot), failures.get(slot)
        try:
            if op == "insert_ring":   # take the vectors out first: even a dropped insert frees its space
                ids, offset, end, dtype, shape, quality = args
                op, args = "insert", (ids, ring.take(offset, end, dtype, shape), quality)
            if op == "new":
                method, objective_name, scalars, arrays, params = args
                objective = OBJECTIVES[objective_name].from_params(scalars, arrays)
                selectors[slot] = METHODS[method](objective, **params)
                failures.pop(slot, None)
                conn.send(("ok", None))
            elif op == "drop":
                selectors.pop(slot, None)
                failures.pop(slot, None)
            elif failure is not None:
                if op in ("sync", "solution", "value", "stats"):
                    conn.send(("error", failure))
                # pipelined calls after a failure are dropped: the selector is already broken
            elif op == "insert":
                selector.insert(*args)
            elif op == "delete":
                selector.delete(*args)
            elif op == "sync":
                conn.send(("ok", None))
            elif op == "solution":
                conn.send(("ok", selector.solution()))
            elif op == "value":
                conn.send(("ok", float(selector.value())))
            elif op == "stats":
                conn.send(("ok", selector.stats()))
            else:
                conn.send(("error", f"unknown operation {op!r}"))
        except Exception:
            failures[slot] = traceback.format_exc()
            if op not in ("insert", "delete"):
                conn.send(("error", failures[slot]))


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])),
           _VectorRing(int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else None)
