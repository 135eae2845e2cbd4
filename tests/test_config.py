"""The one configuration mechanism: a documented dataclass → flags, SPONGE_* environment, config file."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from sponge.config import ConfigError, add_flags, knobs, load


@dataclass
class Inner:
    """The inner section."""

    #: rows per batch
    rows: int = 10
    #: the inner seed
    seed: int = 0
    #: how to do it
    mode: Literal["a", "b"] = "a"
    #: an optional cap
    cap: float | None = None
    #: columns kept as they are
    cols: tuple[str, ...] = ("x", "y")


@dataclass
class Outer:
    """The whole thing."""

    inner: Inner = field(default_factory=Inner)
    #: the outer seed
    seed: int = 1
    #: switch it on
    on: bool = True
    #: extra client settings
    extra: dict = field(default_factory=dict)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser, Outer)
    return parser.parse_args(list(argv))


def test_names_are_short_where_unique_and_sectioned_where_not():
    names = {k.name: (k.flag, k.env, k.help) for k in knobs(Outer)}
    assert names["rows"] == ("--rows", "SPONGE_ROWS", "rows per batch")
    assert names["inner.seed"][:2] == ("--inner.seed", "SPONGE_INNER_SEED")
    assert names["seed"][:2] == ("--seed", "SPONGE_SEED")


def test_help_shows_every_knob_with_its_doc_default_choices_and_env(capsys):
    parser = argparse.ArgumentParser()
    add_flags(parser, Outer)
    parser.print_help()
    text = " ".join(capsys.readouterr().out.split())
    for piece in ("--rows INT rows per batch (default: 10; env SPONGE_ROWS)", "--mode {a,b}",
                  "--cap FLOAT|none", "--on, --no-on", "inner (The inner section)", "--config FILE"):
        assert piece in text, piece


def test_precedence_is_flags_then_environment_then_file_then_defaults(tmp_path):
    file = tmp_path / "settings.yaml"
    file.write_text("inner:\n  rows: 30\n  mode: b\nseed: 5\n")
    env = {"SPONGE_ROWS": "20", "SPONGE_CAP": "2.5"}
    config = load(Outer, parse("--config", str(file), "--rows", "40", "--no-on", "--cols", "p,q"), env=env)
    assert config == Outer(Inner(rows=40, seed=0, mode="b", cap=2.5, cols=("p", "q")), seed=5, on=False)
    assert load(Outer, parse("--config", str(file)), env=env).inner.rows == 20
    assert load(Outer, parse("--config", str(file)), env={}).inner.rows == 30
    toml = tmp_path / "settings.toml"
    toml.write_text("rows = 7\n[inner]\nseed = 9\n")
    assert load(Outer, parse("--config", str(toml)), env={}).inner == Inner(rows=7, seed=9)
    assert load(Outer, parse(), env={}) == Outer()


@pytest.mark.parametrize("argv, env, message", [
    (("--rows", "ten"), {}, "rows (from flag --rows): expected an integer, got 'ten'"),
    ((), {"SPONGE_ON": "maybe"}, "on (from environment variable SPONGE_ON): expected true/false"),
    ((), {"SPONGE_MODE": "c"}, "mode (from environment variable SPONGE_MODE): expected one of a, b"),
    ((), {"SPONGE_EXTRA": "{not json"}, "extra (from environment variable SPONGE_EXTRA)"),
])
def test_a_value_that_does_not_fit_is_one_clear_error(argv, env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(Outer, parse(*argv), env=env)


def test_unknown_or_unreadable_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner:\n  rowz: 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'inner.rowz'"):
        load(Outer, parse("--config", str(bad)), env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(Outer, parse("--config", str(tmp_path / "missing.yaml")), env={})
    bad.write_text("inner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(Outer, parse("--config", str(bad)), env={})
