"""End to end on real parts: trainer → Kafka → service (store + selector) → replay → trainer → policy report
→ eviction of stale rows from the store's views and the selector."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from helpers import wait_for

from sponge.client import ServiceClient, ServiceReplaySource
from sponge.service.api import ApiConfig
from sponge.service.curation import CurationConfig
from sponge.service.server import ServerConfig, serve_in_thread
from sponge.service.ingest import IngestConfig
from sponge.streams.producer import RolloutProducer
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts


@pytest.fixture
def running_server(broker, topic, tmp_path):
    config = ServerConfig(
        ingest=IngestConfig(bootstrap_servers=broker, topic=topic, group_id=f"g-{topic}",
                            store_path=str(tmp_path / "store"), flush_interval_s=0.2, session_timeout_ms=6000,
                            create_topics=False, log_level="WARNING"),
        curation=CurationConfig(k=8, n_references=32, retention_window=1, snapshot_interval_s=0.0),
        api=ApiConfig(port=0), compact_interval_s=1.0)
    with serve_in_thread(config) as server:
        yield server


def test_missing_embeddings_are_computed_with_minilm(running_server, broker, topic):
    rows = synthetic_rollouts(48, seed=3, id_prefix="noemb")
    rows = rows.set_column(rows.schema.get_field_index("embedding"), rows.schema.field("embedding"),
                           pa.nulls(rows.num_rows, rows.schema.field("embedding").type))
    with RolloutProducer(broker, topic, rows_per_message=16) as producer:
        producer.send(rows)
        producer.flush()
    store = running_server.store
    wait_for(lambda: store.count() == 48, what="48 rollouts stored")
    emb = store.sql("SELECT embedding FROM rollouts").column("embedding")
    assert emb.null_count == 0
    first = emb[0].values.to_numpy()
    assert len(first) == 384 and abs(float((first ** 2).sum()) - 1.0) < 1e-3   # unit-norm MiniLM vectors
    wait_for(lambda: running_server.curator.describe()["n_live"] == 48, what="selector to hold 48 rollouts")


def test_trainer_runs_on_live_curated_replay(running_server, broker, topic):
    from sponge.trainer import (
        CharTokenizer,
        ReMixConfig,
        ReMixTrainer,
        build_tiny_model,
        make_task,
        warm_start,
    )

    server = running_server
    task = make_task("reverse")
    tok = CharTokenizer(task.alphabet)
    model = build_tiny_model(tok, seed=0)
    warm_start(model, tok, task, steps=50, seed=0)   # enough that some groups have reward variance
    cfg = ReMixConfig(prompts_per_step=4, group_size=4, rollout_budget=10_000, max_iterations=5, eval_size=16,
                      eval_every=5, replay_window=1, replay_sampling="resample", reincarnate_at=None,
                      progress=False, run_name="e2e")
    source = ServiceReplaySource(server.http.url, broker, topic, window=1, wait_s=60)
    trainer = ReMixTrainer(model, tok, task, cfg, replay_source=source)
    history = trainer.train()
    source.close()
    run = trainer.run_id

    assert trainer.version == 5
    assert server.curator.describe_run(run)["policy_version"] == 5
    # Replay came from the service's curated groups once there was something to replay.
    assert any(h.get("n_replay", 0) > 0 for h in history[2:]), [h.get("n_replay") for h in history]
    # The last step's rollouts (version 4) were sent a moment ago and are durable at the service's next
    # flush: reading the store at once races that flush (on a loaded machine it lost, and found nothing).
    sent_last = source.sent[4]
    wait_for(lambda: server.store.version_counts(run).get(4, 0) == sent_last, 60, what="the last step's rollouts")
    # Retention (window 1): versions older than 4 are gone from the store view and the selector.
    versions = server.store.sql(f"SELECT DISTINCT policy_version FROM rollouts WHERE run_id = '{run}' ORDER BY 1"
                                ).column(0).to_pylist()
    assert versions and min(versions) >= 4
    client = ServiceClient(server.http.url)
    subset = client.subset(run=run)
    assert subset.num_rows > 0 and pc.min(subset.column("policy_version")).as_py() >= 4
    assert server.worker.drain(30)
    assert server.curator.describe_run(run)["n_live"] == server.store.version_counts(run).get(4, 0) + \
        server.store.version_counts(run).get(5, 0)
    assert server.store.retired_below(run) == 4   # one mark, no tombstone per evicted rollout
    assert server.store.sql("SELECT count(*) FROM tombstones").column(0)[0].as_py() == 0
    # Compaction (every second here) reclaims the evicted rows from the segment files.
    def compacted() -> bool:
        stats = server.store.stats()
        return stats["stored_rows"] == stats["rows"]

    wait_for(compacted, 30, what="compaction to drop evicted rows from disk")
    client.close()


def test_a_draw_not_ready_is_answered_at_once_with_the_last_one_a_version_behind(running_server, broker, topic):
    """While the service still computes the candidates for the trainer's version, the trainer gets
    the newest draw that has come (max_lag=1) instead of waiting; the one being computed is kept."""
    source = ServiceReplaySource(running_server.http.url, broker, topic, window=2, wait_s=8)
    source.register("lagged", "a-tokenizer")

    def batch(version: int) -> pa.Table:
        return synthetic_rollouts(64, seed=version, id_prefix=f"lagged-v{version}",
                                  config=SyntheticConfig(run_id="lagged", policy_version=version, response_tokens=20))

    try:
        source.send(batch(0))
        source.report_version(1)
        first = source.candidates(1)        # nothing fetched before: waits for version 0, computed for 1
        assert first.num_rows > 0 and "lag" not in source.last_draw
        source.send(batch(1))
        source.sent[0] += 4                 # claimed but never sent: the fetch for version 2 waits for them
        source.report_version(2)
        t0 = time.monotonic()
        table = source.candidates(2)
        assert time.monotonic() - t0 < 4, "the trainer waited for a draw still being computed"
        assert source.last_draw["lag"] == 1 and source.lagged_draws == 1
        assert table.to_pylist() == first.to_pylist()   # the draw made for version 1
    finally:
        source.close()


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_server_can_cap_malloc_arenas():
    from sponge.service.server import ServerConfig, limit_malloc_arenas

    assert ServerConfig().malloc_arenas == 2
    assert limit_malloc_arenas(2) is True
