"""The examples run as written, and the README's training snippet is the example's code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import serve, stop

ROOT = Path(__file__).resolve().parents[1]


def code_lines(text: str) -> list[str]:
    """The example's training lines: from the task to `source.close()`, comments stripped."""
    start, end = text.index("task = make_task("), text.index("source.close()")
    return [re.sub(r"\s+#.*$", "", line).rstrip() for line in text[start:end].splitlines() if line.strip()]


def test_the_readme_snippet_is_the_example():
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "remix_with_service.py").read_text()
    assert code_lines(readme[readme.index("## From a training script"):]) == code_lines(example)


@pytest.mark.long
@pytest.mark.slow
def test_remix_with_service_trains_and_replays_against_a_default_service(broker, topic, tmp_path):
    proc, url = serve(broker, topic, tmp_path / "store", tmp_path / "serve.log")
    try:
        done = subprocess.run([sys.executable, str(ROOT / "examples" / "remix_with_service.py"), "--url", url,
                               "--bootstrap-servers", broker, "--topic", topic, "--iterations", "4"],
                              capture_output=True, text=True, timeout=900, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        line = done.stdout.strip().splitlines()[-1]
        match = re.search(r"version (\d+), last eval success [0-9.]+, replayed groups in (\d+) of (\d+)", line)
        assert match, line
        version, replayed, iterations = map(int, match.groups())
        assert version == 4 and iterations == 4
        assert replayed >= 2, line      # every iteration after the first has replay to draw
    finally:
        stop(proc)
