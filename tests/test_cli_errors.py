"""Commands a newcomer gets wrong answer in one line and a clear exit status, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys


def sponge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sponge.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_serve_on_a_store_of_another_format_says_how_to_migrate(tmp_path):
    (tmp_path / "_sponge_store.json").write_text(json.dumps({"format_version": 1, "embedding_dim": 384}))
    done = sponge("serve", "--store", str(tmp_path), "--http-port", "0")
    assert done.returncode == 2
    assert "sponge store migrate" in one_line(done.stderr)


def test_serve_with_a_corrupt_retention_mark_is_a_final_one_line_error(tmp_path):
    from deltalake import DeltaTable

    from sponge.store import RolloutStore

    RolloutStore(tmp_path)
    DeltaTable(str(tmp_path / "rollouts")).alter.set_table_properties(   # a mark beyond int64, set by hand
        {"sponge.retired.r": "9223372036854775808"}, raise_if_not_exists=False)
    done = sponge("serve", "--store", str(tmp_path), "--http-port", "0")
    assert done.returncode == 2
    assert "out of range" in one_line(done.stderr)


def test_sql_and_store_on_a_missing_store_say_where_they_looked(tmp_path):
    for args in (("sql", "SELECT 1"), ("store", "stats")):
        done = sponge(*args, "--store", str(tmp_path / "nowhere"))
        assert done.returncode == 2
        assert "no rollout store at" in one_line(done.stderr)


def test_every_command_shares_one_default_store_path():
    from sponge.service.ingest import IngestConfig
    from sponge.store import DEFAULT_STORE_PATH

    assert IngestConfig().store_path == DEFAULT_STORE_PATH
    for command in ("sql", "store"):
        assert f"(default: {DEFAULT_STORE_PATH})" in " ".join(sponge(command, "--help").stdout.split())
