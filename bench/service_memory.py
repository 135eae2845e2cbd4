"""Where the service's memory goes under a steady stream: RSS split by allocator layer.

Runs the curation server in this process (embedded broker, retention window 2, a new policy version
every 30 s, the soak's 500 rollouts/s with 120-token responses) and prints a CSV line every 30 s:
RSS, Arrow's pool (mimalloc) allocated bytes, and glibc's main arena (size, in use, free but kept).
Python's own heap is what `--tracemalloc` adds to each line (slow: it runs the stream at a lower
effective rate). Compare `--malloc-arenas 0` (glibc's default) with the service's default of 2:

    python bench/service_memory.py --minutes 10 --malloc-arenas 0
    python bench/service_memory.py --minutes 10 --malloc-arenas 2
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
import threading
import time
import tracemalloc

import psutil
import pyarrow as pa

from sponge.service.api import ApiConfig
from sponge.service.curation import CurationConfig
from sponge.service.server import CurationServer, ServerConfig
from sponge.service.ingest import IngestConfig
from sponge.streams.broker import EmbeddedBroker, create_topic
from sponge.streams.producer import RolloutProducer
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long to stream")
    p.add_argument("--rate", type=int, default=500, help="rollouts per second")
    p.add_argument("--malloc-arenas", type=int, default=ServerConfig.malloc_arenas,
                   help="the server's glibc arena cap (0 = glibc's default)")
    p.add_argument("--tracemalloc", action="store_true", help="also report Python's traced heap")
    args = p.parse_args(argv)

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    if args.tracemalloc:
        tracemalloc.start()
    tmp = tempfile.mkdtemp(prefix="sponge-memory-")
    mib = 2**20
    with EmbeddedBroker(log_path=os.path.join(tmp, "tansu.log")) as broker:
        create_topic(broker.bootstrap, "rollouts", partitions=4)
        create_topic(broker.bootstrap, "rollouts.dlq", partitions=1)
        config = ServerConfig(
            ingest=IngestConfig(bootstrap_servers=broker.bootstrap, topic="rollouts", group_id="memory",
                                store_path=os.path.join(tmp, "store"), flush_interval_s=0.3, flush_rows=2000,
                                session_timeout_ms=6000, create_topics=False, log_level="WARNING"),
            curation=CurationConfig(retention_window=2), api=ApiConfig(port=0),
            malloc_arenas=args.malloc_arenas or None)
        server = CurationServer(config)
        stop = threading.Event()
        thread = threading.Thread(target=server.run, args=(stop,), daemon=True)
        thread.start()
        if not server.ready.wait(120):
            raise SystemExit("the server never became ready")
        producer = RolloutProducer(broker.bootstrap, "rollouts", rows_per_message=64)
        proc = psutil.Process()
        print("t_s,rss_mib,arrow_allocated_mib,glibc_arena_mib,glibc_in_use_mib,glibc_free_mib,"
              "python_traced_mib,live_rollouts", flush=True)
        t0, sent, version, next_line = time.monotonic(), 0, 0, time.monotonic()
        try:
            while time.monotonic() - t0 < args.minutes * 60:
                tick = time.monotonic()
                now_version = int((tick - t0) // 30)
                if now_version != version:
                    version = now_version
                    server.curator.report_policy_version(version)
                producer.send(synthetic_rollouts(args.rate, seed=sent, id_prefix=f"m{sent}",
                                                 config=SyntheticConfig(policy_version=version,
                                                                        response_tokens=120)))
                sent += args.rate
                if tick >= next_line:
                    next_line = tick + 30
                    info = libc.mallinfo2()
                    traced = tracemalloc.get_traced_memory()[0] / mib if args.tracemalloc else float("nan")
                    print(f"{tick - t0:.0f},{proc.memory_info().rss / mib:.1f},{pa.total_allocated_bytes() / mib:.1f},"
                          f"{info.arena / mib:.1f},{info.uordblks / mib:.1f},{info.fordblks / mib:.1f},"
                          f"{traced:.1f},{server.curator.describe()['n_live']}", flush=True)
                time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        finally:
            producer.close()
            stop.set()
            thread.join(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
