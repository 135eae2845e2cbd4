"""The HTTP API served by a real uvicorn server over a real store and selector."""

from __future__ import annotations

import httpx
import numpy as np
import pyarrow.compute as pc
import pytest

from sponge.service.api import ApiConfig, ApiServer, create_app
from sponge.client import ServiceClient, ServiceError
from sponge.service.curation import CurationConfig, Curator
from sponge.store import RolloutStore
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
    for path in ("/readyz", "/metrics", "/replay/sample", "/policy", "/runs", "/docs", "/openapi.json",
                 "/no-such-route"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 401, path
        assert "bearer token" in r.json()["detail"]
    assert httpx.post(f"{url}/runs", json={"run_id": "x"}).status_code == 401
    r = httpx.get(f"{url}/readyz", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(f"{url}/openapi.json", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200


@pytest.mark.parametrize("header", [b"Bearer s3cr\xe9t", b"Bearer \xff\xfe", b"\xc3\xa9", b"Bearer", b"Basic s3cret"])
def test_a_malformed_or_odd_byte_authorization_header_is_401_not_500(service, header):
    url = service[0].url
    r = httpx.get(f"{url}/readyz", headers=[(b"authorization", header)])
    assert r.status_code == 401
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_replay_sample_is_arrow_with_weights(client, service):
    _, _, curator = service
    table = client.sample(256, weighting="recency", seed=7)   # one run here: ?run= may be left out
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
    for version in (2**63, 10**30, 1.5, "7"):   # beyond int64, or not an integer: refused, nothing written
        assert httpx.post(f"{url}/policy", json={"policy_version": version}, headers=h).status_code == 422
    assert httpx.post(f"{url}/runs", json={"run_id": "../etc"}, headers=h).status_code == 400
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
    with pytest.raises(ServiceError, match="422 query stopped after 1 s"):
        client.sql("SELECT count(*) FROM range(100000000000) a", timeout_s=1.0)


def test_sql_reads_the_views(client):
    table = client.sql("SELECT policy_version, count(*) AS n FROM rollouts GROUP BY 1 ORDER BY 1")
    # Runs before the eviction test below (tests in a module run in order).
    assert table.column("policy_version").to_pylist() == [0, 1, 2]
    assert table.column("n").to_pylist() == [160, 160, 160]


def test_policy_report_evicts_and_candidates_come_from_the_window(client, service):
    _, store, _ = service
    result = client.report_policy_version(2)        # window 1: keep versions >= 1
    assert result["policy_version"] == 2 and result["evicted"] == 160
    assert store.sql("SELECT min(policy_version) FROM rollouts").column(0)[0].as_py() == 1
    candidates, info = client.candidates("synthetic", 2)
    assert candidates.num_rows > 0 and info["complete"]
    assert set(candidates.column("policy_version").to_pylist()) == {1}
    with pytest.raises(ServiceError, match="backwards"):
        client.report_policy_version(1)
    with pytest.raises(ServiceError, match="largest jump"):
        client.report_version("synthetic", 2 + 10**7)
    assert client.run("synthetic")["policy_version"] == 2 and store.retired_below("synthetic") == 1


def test_runs_over_http(client, service):
    h = client.register_run("trainer-1", "fp-1", window=2)
    assert h["created"] and h["policy_version"] == 0 and h["window"] == 2
    assert not client.register_run("trainer-1", "fp-1")["created"]
    with pytest.raises(ServiceError, match="409.*fingerprint"):
        client.register_run("trainer-1", "fp-2")
    assert {r["run_id"] for r in client.runs()} == {"synthetic", "trainer-1"}
    client.report_version("trainer-1", 3, sent={2: 5})
    run = client.run("trainer-1")
    assert run["policy_version"] == 3 and run["expected"] == {"2": 5} and run["refused"] == {}
    table, info = client.candidates("trainer-1", 3, expect={2: 5}, wait_s=0.2)
    assert table.num_rows == 0 and not info["complete"] and info["missing"] == {2: 5}
    assert client.run("trainer-1")["incomplete_draws"] == 1
    with pytest.raises(ServiceError, match="say which"):
        client.subset()                                    # two runs now: the legacy route must be told
    assert client.subset(run="synthetic").num_rows > 0
    with pytest.raises(ServiceError, match="404"):
        client.run("nobody")
    assert client.delete_run("trainer-1")["deleted"]
    with pytest.raises(ServiceError, match="410"):
        client.report_version("trainer-1", 4)


def test_metrics_show_runs(service):
    url = service[0].url
    # The app here was built with a stub metrics_text; the server's per-run collector is tested with the
    # real server in test_replay_loop.py. Here: /metrics answers with the token.
    r = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200


def test_explicit_removal_reports_unknown_ids_and_writes_nothing_for_them(client, service):
    _, store, curator = service
    victim = curator.subset_ids("synthetic")[0]
    tombstone_files = len(list((store.root / "tombstones").glob("*.parquet")))
    answer = client.remove([victim, "never-stored"], reason="bad label")
    assert answer["removed"] == 1 and answer["unknown"] == ["never-stored"]
    assert victim not in curator.subset_ids("synthetic")
    again = client.remove([victim, "never-stored"])
    assert again["removed"] == 0 and again["unknown_count"] == 2
    assert len(list((store.root / "tombstones").glob("*.parquet"))) == tombstone_files + 1
