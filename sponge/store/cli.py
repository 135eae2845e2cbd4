"""`sponge store`: look after a rollout store on disk (describe it, migrate it, mend retention).

    sponge store stats   --store ./sponge-data
    sponge store migrate --store ./sponge-data            # Parquet segments (an older sponge) -> Delta tables
    sponge store migrate --store ./sponge-data --to s3://bucket/prefix   # ... into another location
    sponge store retention --store ./sponge-data --run R --lower-to V

Each prints one JSON object; a refused operation prints one line to stderr and exits with status 2.
Stop `sponge serve` on the store before `migrate` or `retention`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HELP = "look after a rollout store: stats, migrate an older format, lower a retention mark"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sponge.store import DEFAULT_STORE_PATH

    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("action", choices=("stats", "migrate", "retention"),
                        help="stats: describe the store; migrate: turn a Parquet-segment store into Delta tables; "
                             "retention: show the runs' retention marks, or lower one (--run, --lower-to)")
    parser.add_argument("--store", default=os.environ.get("SPONGE_STORE_PATH", DEFAULT_STORE_PATH),
                        help="rollout store: a directory or s3://bucket/prefix (env SPONGE_STORE_PATH)")
    parser.add_argument("--to", default=None,
                        help="migrate: write the Delta tables here (a directory or s3://bucket/prefix with the "
                             "AWS_* settings in the environment) and leave the old store as it is; default: in place")
    parser.add_argument("--run", default=None, help="retention: the run whose mark to lower")
    parser.add_argument("--lower-to", type=int, default=None,
                        help="retention: the new, lower mark (0 clears it); rollouts of versions between "
                             "it and the old mark that compaction has not deleted come back")


def run(args: argparse.Namespace) -> int:
    from sponge.store import RolloutStore, StoreError
    from sponge.store.delta import migrate_to_delta

    try:
        if args.action == "migrate":
            moved = migrate_to_delta(args.store, args.to, progress=True)
            out = {**RolloutStore.open(args.to or args.store).stats(), **moved}
        elif args.action == "stats":
            out = RolloutStore.open(args.store).stats()
        else:
            store = RolloutStore.open(args.store)
            if args.run is not None or args.lower_to is not None:
                if args.run is None or args.lower_to is None:
                    raise StoreError("lowering a mark needs both --run and --lower-to")
                out = {"restored": store.lower_retirement(args.lower_to, run=args.run)}
            else:
                out = {}
            out["retirement_marks"] = store.retirement_marks()
    except (StoreError, OSError, ValueError) as exc:
        print(f"sponge store: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, default=str))
    return 0
