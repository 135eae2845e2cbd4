"""SQL latency: a small query through the OS-bounded worker against the same query in-process.

    python bench/sql_latency.py --rows 20000 --rounds 15

(a) store.query: the worker path (fork server, warm child: guard, views, query in a child with
    RLIMIT_AS and a SIGKILL deadline) against `run_read_only` in the calling process, which is
    what store.query did before the worker (guard + locked connection + query, same views).
    Alternated call by call, with a pause between calls (a trainer's occasional query) and
    back to back (a loop of queries).
(b) `sponge sql` as a whole process (startup, imports, store open, query, print) against a
    `python -c` doing the old in-process path with the same imports and output, alternated.
Prints medians, the ratio new/old and the spread (p10-p90), all measured here.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sponge.store.sql import run_read_only
from sponge.store import RolloutStore
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts

QUERY = "SELECT policy_version, count(*) AS n, avg(reward) AS r FROM rollouts GROUP BY 1 ORDER BY 1"

OLD_CLI = """
import sys
from sponge.store.sql import run_read_only
from sponge.store.sql_cli import format_table
from sponge.store import RolloutStore
store = RolloutStore.open(sys.argv[1])
limits = store.config.sql_limits
result = run_read_only(sys.argv[2], setup_sql=store.view_sql(), allowed_dir=store.root, limits=limits)
sys.stdout.write(format_table(result.table))
"""


def summary(times: list[float]) -> str:
    q = np.percentile(times, [10, 50, 90]) * 1000
    return f"median {q[1]:7.1f} ms (p10 {q[0]:.1f}, p90 {q[2]:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pause-s", type=float, default=0.5, help="pause between paced calls")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = RolloutStore(Path(tmp) / "store")
        for version in range(4):
            rows = synthetic_rollouts(args.rows // 4, seed=version, id_prefix=f"v{version}",
                                      config=SyntheticConfig(policy_version=version))
            first = version * rows.num_rows
            store.write_segment(rows, topic="rollouts", partition=0,
                                offsets=np.arange(first, first + rows.num_rows),
                                first_offset=first, last_offset=first + rows.num_rows - 1)
        limits = store.config.sql_limits

        def old() -> None:
            run_read_only(QUERY, setup_sql=store.view_sql(), allowed_dir=store.root, limits=limits)

        def new() -> None:
            store.query(QUERY)

        assert store.query(QUERY).table.equals(
            run_read_only(QUERY, setup_sql=store.view_sql(), allowed_dir=store.root, limits=limits).table)
        print(f"store: {args.rows} rollouts, 4 policy versions; query: {QUERY}")
        for label, pause in ((f"paced (one call every ~{args.pause_s:.1f} s)", args.pause_s), ("back to back", 0.0)):
            times: dict[str, list[float]] = {"in-process (before)": [], "worker (after)": []}
            for _ in range(args.rounds):
                for name, fn in (("in-process (before)", old), ("worker (after)", new)):
                    time.sleep(pause)
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            ratio = statistics.median(times["worker (after)"]) / statistics.median(times["in-process (before)"])
            print(f"(a) store.query, {label}:")
            for name, ts in times.items():
                print(f"    {name:22s} {summary(ts)}")
            print(f"    ratio after/before     {ratio:.2f}")

        cli = {"old in-process (before)": [sys.executable, "-c", OLD_CLI, str(store.root), QUERY],
               "sponge sql (after)": [sys.executable, "-m", "sponge.cli", "sql", QUERY, "--store", str(store.root)]}
        times = {name: [] for name in cli}
        for _ in range(max(3, args.rounds // 2)):
            for name, command in cli.items():
                t0 = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                times[name].append(time.perf_counter() - t0)
        ratio = statistics.median(times["sponge sql (after)"]) / statistics.median(times["old in-process (before)"])
        print("(b) whole process, startup to exit:")
        for name, ts in times.items():
            print(f"    {name:24s} {summary(ts)}")
        print(f"    ratio after/before       {ratio:.2f}")


if __name__ == "__main__":
    main()
