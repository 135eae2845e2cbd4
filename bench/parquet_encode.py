"""What encoding a flush of rollouts as Parquet costs, whole and column by column.

The ingest service's writer encodes every stored rollout once; on a 2-core machine that bounds
its throughput. This prints the seconds to encode `--rows` synthetic rollouts (384-d embeddings,
~300-token responses) in memory with the store's settings and with alternatives (best of
`--repeat`, each alternative timed in turn), then each column alone with the store's codec.

    .venv/bin/python bench/parquet_encode.py --rows 10000
"""

from __future__ import annotations

import argparse
import io
import time

import pyarrow as pa
import pyarrow.parquet as pq

from sponge.store.delta import DeltaStoreConfig
from sponge.streams.synthetic import synthetic_rollouts


def encode_seconds(table: pa.Table, repeat: int, **options) -> tuple[float, int]:
    best, size = float("inf"), 0
    for _ in range(repeat):
        out = io.BytesIO()
        t0 = time.perf_counter()
        pq.write_table(table, out, **options)
        best, size = min(best, time.perf_counter() - t0), out.tell()
    return best, size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000, help="rollouts per encoded file")
    p.add_argument("--repeat", type=int, default=3, help="timings per variant (the best is printed)")
    args = p.parse_args(argv)

    cfg = DeltaStoreConfig()
    table = synthetic_rollouts(args.rows, seed=0).drop_columns(["run_id", "policy_version"])
    names = table.schema.names
    plain = set(cfg.uncompressed_columns)
    store = {"compression": {n: ("none" if n in plain else cfg.compression) for n in names},
             "compression_level": {n: cfg.compression_level for n in names if n not in plain},
             "row_group_size": cfg.row_group_size, "use_dictionary": ["prompt_id", "prompt"]}
    variants = {
        "the store's settings": store,
        "no compression at all": dict(store, compression="none", compression_level=None),
        "snappy instead of zstd": dict(store, compression={n: ("none" if n in plain else "snappy") for n in names},
                                       compression_level=None),
    }
    print(f"{args.rows} rollouts, {table.nbytes / 1e6:.1f} MB of Arrow data")
    for label, options in variants.items():
        seconds, size = encode_seconds(table, args.repeat, **options)
        print(f"  {label:28s} {seconds:.3f} s  ({args.rows / seconds:,.0f} rollouts/s)  {size / 1e6:.1f} MB")
    print("column by column, the store's codec:")
    for name in names:
        codec = "none" if name in plain else cfg.compression
        seconds, size = encode_seconds(table.select([name]), args.repeat, compression=codec,
                                       compression_level=None if codec == "none" else cfg.compression_level)
        print(f"  {name:20s} {seconds:.3f} s  {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
