"""The HTTP API served by a real uvicorn server over a real store and selector."""

from __future__ import annotations

import httpx
import numpy as np
import pyarrow.compute as pc
import pytest

from sponge.engine.api import ApiConfig, ApiServer, create_app
from sponge.engine.client import ServiceClient, ServiceError, ServiceReplaySource
from sponge.engine.curation import CurationConfig, Curator
from sponge.engine.store import RolloutStore
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    store = RolloutStore(tmp_path_factory.mktemp("api") / "store")
    curator = Curator(store, CurationConfig(k=16, n_references=64, retention_window=1))
    first = 0
    for version in range(3):
        rows = synthetic_rollouts(160, seed=version, id_prefix=f"v{version}",
                                  config=SyntheticConfig(policy_version=version, response_tokens=40))
        offsets = np.arange(first, first + rows.num_rows, dtype=np.int64)
        w = store.write_segment(rows, topic="rollouts", partition=0, offsets=offsets,
                                first_offset=first, last_offset=first + rows.num_rows - 1)
        curator.on_segment(w, rows.filter(pc.is_in(rows.column("rollout_id"), w.new_ids)))
        first += rows.num_rows
    server = ApiServer(create_app(store, curator, ApiConfig(port=0, token=TOKEN, max_sample=1000),
                                  metrics_text=lambda: (b"sponge_up 1\n", "text/plain")),
                       ApiConfig(host="127.0.0.1", port=0)).start()
    yield server, store, curator
    server.stop()


@pytest.fixture
def client(service):
    c = ServiceClient(service[0].url, token=TOKEN)
    yield c
    c.close()


def test_health_needs_no_token_but_everything_else_does(service):
    url = service[0].url
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    for path in ("/readyz", "/metrics", "/replay/sample", "/policy"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 401, path
        assert "bearer token" in r.json()["detail"]
    r = httpx.get(f"{url}/readyz", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_replay_sample_is_arrow_with_weights(client, service):
    _, _, curator = service
    table = client.sample(256, weighting="recency", seed=7)
    assert table.num_rows == 256
    assert {"rollout_id", "behavior_logprobs", "policy_version", "advantage", "weight", "sample_prob"} \
        <= set(table.column_names)
    assert set(table.column("rollout_id").to_pylist()) <= set(curator.subset_ids())
    again = client.sample(256, weighting="recency", seed=7)
    assert again.column("rollout_id").equals(table.column("rollout_id"))
    subset = client.subset()
    assert sorted(subset.column("rollout_id").to_pylist()) == sorted(curator.subset_ids())


def test_bad_requests_get_clear_4xx(client, service):
    url = service[0].url
    h = {"authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{url}/replay/sample", params={"n": 0}, headers=h).status_code == 422
    assert httpx.get(f"{url}/replay/sample", params={"n": "many"}, headers=h).status_code == 422
    r = httpx.get(f"{url}/replay/sample", params={"n": 5000}, headers=h)
    assert r.status_code == 400 and "exceeds the limit" in r.json()["detail"]
    assert httpx.get(f"{url}/replay/sample", params={"weighting": "magic"}, headers=h).status_code == 422
    assert httpx.post(f"{url}/sql", content=b"{not json", headers=h).status_code == 422
    assert httpx.post(f"{url}/policy", json={"policy_version": -1}, headers=h).status_code == 422
    assert httpx.post(f"{url}/rollouts/remove", json={"rollout_ids": []}, headers=h).status_code == 422
    assert httpx.get(f"{url}/healthz").status_code == 200  # still up


@pytest.mark.parametrize("query", [
    "DELETE FROM rollouts",
    "COPY rollouts TO '/tmp/stolen.csv'",
    "ATTACH '/tmp/x.duckdb' AS x",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT 1; SELECT 2",
])
def test_hostile_sql_is_refused(client, query):
    with pytest.raises(ServiceError, match="400"):
        client.sql(query)


def test_sql_runaway_query_is_stopped(client):
    with pytest.raises(ServiceError, match="400"):
        client.sql("SELECT count(*) FROM range(100000000000) a", timeout_s=1.0)


def test_sql_reads_the_views(client):
    table = client.sql("SELECT policy_version, count(*) AS n FROM rollouts GROUP BY 1 ORDER BY 1")
    # Runs before the eviction test below (tests in a module run in order).
    assert table.column("policy_version").to_pylist() == [0, 1, 2]
    assert table.column("n").to_pylist() == [160, 160, 160]


def test_policy_report_evicts_and_replay_source_filters(client, service):
    _, store, _ = service
    source = ServiceReplaySource(client, window=1)
    result = client.report_policy_version(2)        # window 1: keep versions >= 1
    assert result["policy_version"] == 2 and result["evicted"] == 160
    assert store.sql("SELECT min(policy_version) FROM rollouts").column(0)[0].as_py() == 1
    candidates = source.candidates(2)
    assert candidates.num_rows > 0
    assert min(candidates.column("policy_version").to_pylist()) >= 1
    with pytest.raises(ServiceError, match="backwards"):
        client.report_policy_version(1)
    source.clear()
    assert source.candidates(2).num_rows == 0


def test_explicit_removal(client, service):
    _, _, curator = service
    victim = curator.subset_ids()[0]
    assert client.remove([victim], reason="bad label") == 1
    assert victim not in curator.subset_ids()
    assert client.remove([victim]) == 0
