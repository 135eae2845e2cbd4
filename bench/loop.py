"""The curation loop's costs, each measured beside its comparison in the same run.

1. Produce M synthetic rollouts (384-d embeddings, ~300-token responses, GRPO groups of 8)
   to the embedded broker.
2. (a) ingest alone (decode, validate, write, commit) and (b) the curation server: the same
   ingest, plus the dynamic selector (in its own process, fed by a curation thread) and replay
   snapshots, with HTTP up. Each run is its own consumer group over the same messages; (a) and
   (b) alternate `--repeats` times so the machine's noise hits both alike. (b) ends when every
   rollout is durable *and* inside the selector. Printed: rollouts/s and CPU per rollout of
   each run, and the selection cost 1 − b/a per pair and its median (target ≤ 30%).
3. Replay-sample latency over HTTP for n = 256 (p50/p99 over repeated requests), against a
   bare /healthz round trip as the floor.
4. Restart: a fresh curator rebuilt from (b)'s store (seconds for M rollouts).
5. Scale-out: the rollouts split into two shards by Kafka partition, one selector each, the
   global subset greedy over the union of the shard solutions; its objective against one
   selector over all data and against lazy greedy over all data.

    .venv/bin/python bench/loop.py                     # 100k rollouts (a few minutes)
    .venv/bin/python bench/loop.py --rollouts 20000    # quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


#: The run the synthetic rollouts belong to (sponge.streams.synthetic's default).
RUN = "synthetic"


def drain(poll_once, totals, target: int, timeout_s: float) -> float:
    """Poll until `target` rollouts are durable; seconds from the first message to the last flush."""
    t_first = None
    deadline = time.monotonic() + timeout_s
    while totals.ingested < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {totals.ingested}/{target} rollouts ingested in {timeout_s}s")
        poll_once()
        if t_first is None and totals.messages > 0:
            t_first = time.perf_counter()
    return time.perf_counter() - t_first


def cpu_seconds(selector_pid: int | None = None) -> np.ndarray:
    """CPU seconds (user + system) of [this process (the service), the selector's process, the other
    children (the embedded broker, which serves the consumer's fetches)]."""
    import psutil

    me = psutil.Process()
    cpu = np.array([sum(me.cpu_times()[:2]), 0.0, 0.0])
    for child in me.children(recursive=True):
        try:
            cpu[1 if child.pid == selector_pid else 2] += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return cpu


def run_alone(config, rollouts: int) -> tuple[float, np.ndarray]:
    """(a): plain ingest; returns (rollouts/s, CPU us/rollout [service, selector (0), broker])."""
    from sponge.service.ingest import IngestService

    service = IngestService(config).start()
    cpu0 = cpu_seconds()
    secs = drain(service.poll_once, service.totals, rollouts, 1800)
    cpu = cpu_seconds() - cpu0
    service.close()
    return rollouts / secs, cpu / rollouts * 1e6


def run_curated(config, rollouts: int, close: bool):
    """(b): the curation server (ingest + selector process + HTTP); ends when every rollout is
    durable *and* inside the selector. Returns (rollouts/s, stored/s, CPU us/rollout [service,
    selector, broker], the server if still open)."""
    from sponge.service.server import CurationServer

    server = CurationServer(config).start()
    selector_pid = server.curator.selector_pid
    cpu0 = cpu_seconds(selector_pid)
    secs_stored = drain(server.ingest.poll_once, server.ingest.totals, rollouts, 3600)
    t_stored = time.perf_counter()
    server.worker.drain(3600)   # sustained means selected too, not just queued for selection
    secs = secs_stored + (time.perf_counter() - t_stored)
    cpu = cpu_seconds(selector_pid) - cpu0
    if close:
        server.close()
    return rollouts / secs, rollouts / secs_stored, cpu / rollouts * 1e6, server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=100_000)
    parser.add_argument("--rows-per-message", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="alternating (a)/(b) pairs; the median is reported")
    parser.add_argument("--samples", type=int, default=200, help="replay-sample requests to time")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import httpx

    from sponge.service.api import ApiConfig
    from sponge.service.curation import CurationConfig, Curator
    from sponge.service.server import ServerConfig
    from sponge.service.ingest import IngestConfig, configure_json_logging
    from sponge.streams.broker import EmbeddedBroker, create_topic
    from sponge.streams.synthetic import produce

    configure_json_logging("WARNING")
    work = Path(tempfile.mkdtemp(prefix="sponge-loop-"))
    results: dict = {"rollouts": args.rollouts, "k": args.k, "rows_per_message": args.rows_per_message}
    try:
        with EmbeddedBroker() as broker:
            topic = "rollouts"
            create_topic(broker.bootstrap, topic, partitions=4)
            create_topic(broker.bootstrap, f"{topic}.dlq", partitions=1)
            t0 = time.perf_counter()
            produce(broker.bootstrap, topic, args.rollouts, rows_per_message=args.rows_per_message, progress=True)
            print(f"produced {args.rollouts} rollouts in {time.perf_counter() - t0:.1f}s")

            def ingest_config(group: str, store: str) -> IngestConfig:
                return IngestConfig(bootstrap_servers=broker.bootstrap, topic=topic, group_id=group,
                                    store_path=str(work / store), create_topics=False, session_timeout_ms=6000,
                                    log_level="WARNING")

            # (a) and (b) alternate, `repeats` times each: the machine's noise then hits both alike,
            # and the figure is the median of the paired ratios.
            pairs, cpus = [], []
            for rep in range(args.repeats):
                rate_a, cpu_a = run_alone(ingest_config(f"alone-{rep}", f"store-a{rep}"), args.rollouts)
                shutil.rmtree(work / f"store-a{rep}", ignore_errors=True)
                last = rep == args.repeats - 1   # its server stays up for the latency and restart figures
                store_b = "store-b" if last else f"store-b{rep}"
                server_config = ServerConfig(ingest=ingest_config(f"curated-{rep}", store_b),
                                             curation=CurationConfig(k=args.k, retention_window=None),
                                             api=ApiConfig(port=0))
                rate_b, stored_b, cpu_b, server = run_curated(server_config, args.rollouts, close=not last)
                if not last:
                    shutil.rmtree(work / store_b, ignore_errors=True)
                pairs.append((rate_a, rate_b, stored_b, 1 - rate_b / rate_a))
                print(f"[{rep + 1}/{args.repeats}] (a) ingest alone {rate_a:8,.0f}/s  "
                      f"(b) ingest + selection {rate_b:8,.0f}/s stored and selected, {stored_b:,.0f}/s stored  "
                      f"cost {1 - rate_b / rate_a:.1%}\n"
                      f"      CPU us/rollout: (a) service {cpu_a[0]:.0f} + broker {cpu_a[2]:.0f};  "
                      f"(b) service {cpu_b[0]:.0f} + selector process {cpu_b[1]:.0f} + broker {cpu_b[2]:.0f}")
                cpus.append((cpu_a, cpu_b))
            rate_a, rate_b, stored_b, cost = np.median(np.array(pairs), axis=0)
            costs = [p[3] for p in pairs]
            print(f"(a) ingest alone:          {rate_a:10,.0f} rollouts/s (median of {args.repeats})")
            print(f"(b) ingest + selection:    {rate_b:10,.0f} rollouts/s stored and selected "
                  f"({stored_b:,.0f}/s stored)\n"
                  f"selection cost 1 - b/a:    {cost:10.1%} median of the pairs (each: "
                  f"{', '.join(f'{c:.1%}' for c in costs)}; target <= 30%)")
            results.update(ingest_alone_per_s=rate_a, ingest_with_selection_per_s=rate_b,
                           stored_with_selection_per_s=stored_b, selection_cost=cost,
                           selection_cost_each=costs, selector=server.curator.describe(),
                           cpu_us_per_rollout={
                               "columns": ["service", "selector_process", "broker"],
                               "alone_median": np.median([a for a, _ in cpus], axis=0).round(1).tolist(),
                               "curated_median": np.median([b for _, b in cpus], axis=0).round(1).tolist()})

            # replay-sample latency
            lat, floor = [], []
            with httpx.Client(base_url=server.http.url, timeout=30) as http:
                http.get("/replay/sample", params={"n": 256}).raise_for_status()   # warm the cache
                for i in range(args.samples):
                    t = time.perf_counter()
                    http.get("/healthz").raise_for_status()
                    floor.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    r = http.get("/replay/sample", params={"n": 256, "weighting": "recency", "seed": i})
                    r.raise_for_status()
                    lat.append(time.perf_counter() - t)
            p50, p99 = np.percentile(np.array(lat) * 1000, [50, 99])
            f50, f99 = np.percentile(np.array(floor) * 1000, [50, 99])
            print(f"replay sample n=256:       p50 {p50:.1f} ms  p99 {p99:.1f} ms   "
                  f"(/healthz floor p50 {f50:.1f} ms, p99 {f99:.1f} ms)")
            results.update(sample_p50_ms=p50, sample_p99_ms=p99, healthz_p50_ms=f50, healthz_p99_ms=f99)
            value_before = server.curator.describe_run(RUN)["objective_value"]
            server.close()

        # restart: rebuild the selector from the store
        store = server.store
        restarted = Curator(store, CurationConfig(k=args.k, retention_window=None))
        secs = restarted.rebuild(progress=True)
        rebuilt_value = restarted.describe_run(RUN)["objective_value"]
        print(f"restart: selector rebuilt from {store.count():,} stored rollouts in {secs:.1f}s "
              f"(f = {rebuilt_value:.2f} vs {value_before:.2f} before)")
        results.update(rebuild_seconds=secs, rebuild_value=rebuilt_value, value_before=value_before)

        results.update(scale_out(store, restarted, args.k))
        restarted.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return 0


def scale_out(store, curator, k: int) -> dict:
    """Two shard selectors (by partition) merged greedily, against one selector over everything."""
    from sponge.service.curation import embedding_matrix
    from sponge.service.shards import greedy_subset, merge_shard_solutions
    from sponge.selectors import DynamicSelector

    objective = curator.selection(RUN).selector.objective
    conn = store.connect()
    rows = conn.sql("SELECT rollout_id, partition, embedding FROM rollouts ORDER BY rollout_id").to_arrow_table()
    emb = embedding_matrix(rows)
    part = rows.column("partition").to_numpy()
    shards = []
    for members in (np.isin(part, [0, 1]), np.isin(part, [2, 3])):
        sel = DynamicSelector(objective, k=k, seed=0)
        ids = np.flatnonzero(members)
        sel.insert(ids, emb[ids])
        shards.append(sel.solution())
    _, merged_value = merge_shard_solutions(objective, [(s, emb[s]) for s in shards], k)
    single_value = curator.describe_run(RUN)["objective_value"]
    _, greedy_value = greedy_subset(objective, np.arange(len(emb)), emb, k)
    print(f"scale-out (2 shards):      merged f = {merged_value:.2f}; one selector over all f = {single_value:.2f}; "
          f"lazy greedy over all f = {greedy_value:.2f}  (merged/greedy = {merged_value / greedy_value:.3f})")
    return {"merged_value": merged_value, "single_selector_value": single_value, "lazy_greedy_value": greedy_value}


if __name__ == "__main__":
    raise SystemExit(main())
