"""`sponge demo` end to end at a tiny budget: broker, service, ReMix on curated replay, baseline, report."""

from __future__ import annotations

import json

import duckdb

from sponge.demo import DemoConfig, run_demo


def test_demo_writes_a_complete_report(tmp_path):
    out = tmp_path / "report"
    summary = run_demo(DemoConfig(out=str(out), rollout_budget=320, warm_start_steps=10, k=16, reincarnate_at=4))
    for name in ("reward_vs_rollouts.png", "service_over_time.png", "queries.sql", "summary.json",
                 "timeline.parquet", "store_by_policy_version.csv", "replay_subset.csv"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "summary.json").read_text())
    assert saved["remix-curated_rollouts"] >= 320 and saved["grpo_rollouts"] >= 320
    assert not saved["interrupted"]
    assert summary["service"]["policy_version"] >= 4            # the trainer's versions reached the service
    assert summary["service"]["n_live"] > 0 and summary["service"]["selection_version"] > 0
    # The saved queries are the ones that made the plots: they run as saved.
    queries = (out / "queries.sql").read_text()
    timeline_sql = queries.split("-- timeline")[1].split(";")[0]
    rows = duckdb.sql(timeline_sql).fetchall()
    assert len(rows) >= 2
