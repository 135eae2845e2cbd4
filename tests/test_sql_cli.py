"""`sponge sql`: output formats, the store path from the environment, errors as one line + exit 2."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from test_store_fixtures import make_rollouts

from sponge.cli import main
from sponge.store import RolloutStore

DIM = 8


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-store")
    store = RolloutStore(root, embedding_dim=DIM)
    store.write_segment(make_rollouts(40, dim=DIM, policy_versions=(0, 1)), topic="rollouts", partition=0,
                        offsets=np.arange(40), first_offset=0, last_offset=39)
    return root


def test_table_output_is_readable_and_shortens_long_values(store_path, capsys):
    rc = main(["sql", "SELECT rollout_id, prompt, embedding, reward FROM rollouts ORDER BY 1 LIMIT 3",
               "--store", str(store_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| rollout_id" in out and "r-000000000" in out
    assert "…" in out  # embeddings and long strings shortened, not dumped in full
    assert "(3 rows;" in out
    assert max(len(line) for line in out.splitlines()) < 200


def test_csv_json_and_arrow_outputs(store_path, capsys, tmp_path):
    query = "SELECT rollout_id, policy_version, embedding FROM rollouts ORDER BY rollout_id"
    assert main(["sql", query, "--store", str(store_path), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 40 and rows[0]["rollout_id"] == "r-000000000"
    assert len(json.loads(rows[0]["embedding"])) == DIM

    assert main(["sql", query, "--store", str(store_path), "--format", "json", "--max-rows", "5"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(lines) == 5 and lines[0]["policy_version"] == 0 and len(lines[0]["embedding"]) == DIM
    assert "truncated to 5 rows" in captured.err

    out_file = tmp_path / "result.arrow"
    assert main(["sql", query, "--store", str(store_path), "--format", "arrow", "--output", str(out_file)]) == 0
    table = pa.ipc.open_stream(out_file.read_bytes()).read_all()
    assert table.num_rows == 40 and table.column_names == ["rollout_id", "policy_version", "embedding"]


def test_store_path_from_environment(store_path, capsys, monkeypatch):
    monkeypatch.setenv("SPONGE_STORE_PATH", str(store_path))
    assert main(["sql", "SELECT count(*) AS n FROM rollouts", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"n": 40}


@pytest.mark.parametrize("args, message", [
    (["DELETE FROM rollouts"], "DELETE statements are not allowed"),
    (["SELECT * FROM read_csv('/etc/passwd')"], "only the rollout store's own files"),
    (["SELECT count(*) FROM range(1000000000000)", "--timeout", "0.3"], "time limit"),
    (["SELECT * FROM no_such_view"], "query failed"),
])
def test_errors_are_one_line_on_stderr_with_exit_code_2(store_path, capsys, args, message):
    rc = main(["sql", *args, "--store", str(store_path)])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("sponge sql: error: ") and message in captured.err


def test_missing_store_is_a_clear_error(tmp_path, capsys):
    assert main(["sql", "SELECT 1", "--store", str(tmp_path / "nowhere")]) == 2
    assert "no rollout store at" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()  # a query never creates a store
