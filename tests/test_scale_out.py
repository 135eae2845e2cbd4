"""Scale-out on one machine: two service processes' worth of shards in one consumer group over one store.
Each keeps a selector over its own partitions; the replay subset is greedy over the union of both."""

from __future__ import annotations

import contextlib

from helpers import wait_for

from sponge.client import ServiceClient
from sponge.service.api import ApiConfig
from sponge.service.curation import CurationConfig, Curator
from sponge.service.server import ServerConfig, serve_in_thread
from sponge.service.ingest import IngestConfig
from sponge.streams.producer import RolloutProducer
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts


def test_two_shards_split_the_partitions_and_merge_their_subsets(broker, topic, tmp_path):
    store_path = tmp_path / "store"
    stack = contextlib.ExitStack()
    servers = []
    for shard in ("a", "b"):
        config = ServerConfig(
            ingest=IngestConfig(bootstrap_servers=broker, topic=topic, group_id=f"g-{topic}",
                                store_path=str(store_path), flush_interval_s=0.2, session_timeout_ms=6000,
                                create_topics=False, log_level="WARNING"),
            curation=CurationConfig(k=16, n_references=64, shard=shard, seed=1), api=ApiConfig(port=0))
        servers.append(stack.enter_context(serve_in_thread(config)))
    try:
        wait_for(lambda: all(s.curator.partitions for s in servers)
                 and set().union(*(s.curator.partitions for s in servers)) == {0, 1, 2, 3}
                 and not set.intersection(*(s.curator.partitions for s in servers)), 60, "the group to split")
        rows = synthetic_rollouts(800, seed=9, config=SyntheticConfig(response_tokens=30), id_prefix="so")
        with RolloutProducer(broker, topic, rows_per_message=32) as producer:
            producer.send(rows)
            producer.flush()
        store = servers[0].store
        wait_for(lambda: store.count() == 800, 90, "800 rollouts stored")
        # Each shard selects over its own partitions only, and together they cover everything.
        wait_for(lambda: sum(s.curator.describe()["n_live"] for s in servers) == 800, 60, "both selectors filled")
        assert min(s.curator.describe()["n_live"] for s in servers) > 0
        # The global subset: both shards answer the same merge of both solutions.
        clients = [ServiceClient(s.http.url) for s in servers]
        # Each shard publishes its solution to the store after its own selection step, so for a moment
        # one shard may merge the other's previous solution: the two answers converge, they are not
        # instantly equal.
        def subsets() -> list[list[str]]:
            return [sorted(c.subset().column("rollout_id").to_pylist()) for c in clients]
        wait_for(lambda: (lambda s: s[0] == s[1])(subsets()), 60, "both shards to serve the same merged subset")
        assert len(subsets()[0]) == 16
        merged_value = servers[0].curator.describe_run("synthetic")["objective_value"]
        single = Curator(store, CurationConfig(k=16, n_references=64, seed=1))   # one selector, all data
        single.rebuild()
        assert single.describe()["n_live"] == 800
        single_value = single.describe_run("synthetic")["objective_value"]
        print(f"merged f = {merged_value:.3f}, single selector f = {single_value:.3f}")
        assert merged_value >= 0.9 * single_value
        single.close()
        for c in clients:
            c.close()
    finally:
        stack.close()
