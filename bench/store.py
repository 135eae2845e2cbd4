"""Rollout store benchmark: segment write throughput and SQL latency, each beside its baseline.

    python bench/store.py --rows 200000 --batch 5000

(a) write: RolloutStore.write_segment (dedup check, store columns, zstd Parquet, fsync, rename)
    against a bare pyarrow.parquet.write_table of the same batches (default settings, no fsync).
(b) replay: the same batches written again (everything skipped as duplicate).
(c) SQL: `SELECT count(*)` and two GROUP BYs through the `rollouts` view (tombstones hidden)
    against the same query on a raw read_parquet of the files (no tombstone filter).
(d) open: building a store object on the populated root (indexing every rollout id).
Synthetic rollouts: 384-d embeddings, ~300-token responses with log-probs (sponge.streams.synthetic).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from sponge.engine.store import RolloutStore
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts


def timed(fn, repeat: int = 5) -> float:
    """Median wall time of `fn()` over `repeat` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="rollouts to write")
    parser.add_argument("--batch", type=int, default=5_000, help="rollouts per segment write")
    parser.add_argument("--dim", type=int, default=384, help="embedding dimension")
    parser.add_argument("--tokens", type=int, default=300, help="mean response tokens")
    parser.add_argument("--tombstones", type=int, default=1_000, help="rollouts deleted before the SQL timings")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir, removed)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sponge-bench-", dir=args.dir))
    try:
        cfg = SyntheticConfig(embedding_dim=args.dim, response_tokens=args.tokens)
        n_batches = args.rows // args.batch
        # Two policy versions per run so segments are hive-partitioned as in production.
        batches = []
        for b in range(min(n_batches, 8)):  # reuse 8 generated batches with fresh ids to bound memory
            cfg.policy_version = b % 2
            batches.append(synthetic_rollouts(args.batch, seed=b, config=cfg, id_prefix=f"gen{b}"))
        row_bytes = sum(t.nbytes for t in batches) / sum(t.num_rows for t in batches)

        def batch(i: int):
            table = batches[i % len(batches)]
            # fresh ids per batch index: the template's ids with the batch number
            ids = [f"b{i}-{j}" for j in range(table.num_rows)]
            return table.set_column(0, "rollout_id", pa.array(ids, pa.string()))

        prepared = [batch(i) for i in range(n_batches)] if n_batches * row_bytes < 6e9 else None
        store = RolloutStore(work / "store", embedding_dim=args.dim)
        raw_dir = work / "raw"
        raw_dir.mkdir()

        store_time = raw_time = 0.0
        for i in tqdm(range(n_batches), desc="write", unit="seg"):
            table = prepared[i] if prepared else batch(i)
            offsets = np.arange(i * args.batch, (i + 1) * args.batch, dtype=np.int64)
            start = time.perf_counter()
            store.write_segment(table, topic="rollouts", partition=0, offsets=offsets,
                                first_offset=int(offsets[0]), last_offset=int(offsets[-1]))
            store_time += time.perf_counter() - start
            start = time.perf_counter()
            pq.write_table(table, raw_dir / f"{i}.parquet")
            raw_time += time.perf_counter() - start
        rows = n_batches * args.batch

        replay_start = time.perf_counter()
        for i in range(min(n_batches, 10)):
            table = prepared[i] if prepared else batch(i)
            offsets = np.arange(i * args.batch, (i + 1) * args.batch, dtype=np.int64)
            store.write_segment(table, topic="rollouts", partition=0, offsets=offsets,
                                first_offset=int(offsets[0]), last_offset=int(offsets[-1]))
        replay_rate = min(n_batches, 10) * args.batch / (time.perf_counter() - replay_start)
        del prepared

        ids = store.rollout_ids()
        store.delete(ids.slice(0, args.tombstones), reason="bench")

        conn = store.connect()
        raw = f"read_parquet('{store.root}/rollouts/*/*.parquet', hive_partitioning=true)"
        queries = {
            "count(*)": ("SELECT count(*) FROM rollouts", f"SELECT count(*) FROM {raw}"),
            "group by policy_version: count, avg(reward)": (
                "SELECT policy_version, count(*), avg(reward) FROM rollouts GROUP BY 1",
                f"SELECT policy_version, count(*), avg(reward) FROM {raw} GROUP BY 1"),
            "group by prompt_id: avg(reward), avg(len(response_tokens))": (
                "SELECT prompt_id, avg(reward), avg(len(response_tokens)) FROM rollouts GROUP BY 1",
                f"SELECT prompt_id, avg(reward), avg(len(response_tokens)) FROM {raw} GROUP BY 1"),
        }
        sql_rows = []
        for name, (view_q, raw_q) in queries.items():
            t_view = timed(lambda q=view_q: conn.execute(q).fetchall())
            t_raw = timed(lambda q=raw_q: conn.execute(q).fetchall())
            t_user = timed(lambda q=view_q: store.sql(q, max_rows=1_000_000, timeout_s=60))
            sql_rows.append((name, t_view, t_raw, t_user))
        conn.close()
        open_time = timed(lambda: RolloutStore(work / "store", embedding_dim=args.dim), repeat=2)
        stats = store.stats()

        print(f"\nrows={rows:,} batch={args.batch} dim={args.dim} ~{args.tokens} response tokens; "
              f"in-memory Arrow {row_bytes / 1024:.1f} KiB/row; on disk {stats['segment_bytes'] / rows / 1024:.2f} KiB/row "
              f"(zstd-1) vs raw {sum(p.stat().st_size for p in raw_dir.iterdir()) / rows / 1024:.2f} KiB/row")
        print(f"write_segment        : {rows / store_time:10,.0f} rows/s  ({rows * row_bytes / store_time / 2**20:,.0f} MiB/s of Arrow)")
        print(f"bare pq.write_table  : {rows / raw_time:10,.0f} rows/s  -> store/bare = {raw_time / store_time:.2f}")
        print(f"replay (all skipped) : {replay_rate:10,.0f} rows/s")
        print(f"open (index {stats['stored_rows']:,} ids): {open_time * 1000:,.0f} ms")
        print(f"\nSQL on {stats['rows']:,} live rows, {args.tombstones:,} tombstones, {stats['segments']} segments "
              "(median of 5; trusted connection / raw read_parquet / locked store.sql incl. connection setup):")
        for name, t_view, t_raw, t_user in sql_rows:
            print(f"  {name:58s} view {t_view * 1000:7.1f} ms  raw {t_raw * 1000:7.1f} ms  "
                  f"(view/raw {t_view / t_raw:4.2f})  store.sql {t_user * 1000:7.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
