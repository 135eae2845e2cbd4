"""One configuration mechanism for every component: its dataclass becomes flags, environment and file.

Each component keeps one dataclass whose fields are documented where they are declared, by a `#:`
comment above the field. This module turns any such dataclass, nested ones included (a field whose
type is a dataclass is a section: the server's config holds the store's, the ingest's, the
curation's, the API's), into

- command-line flags with that help text, the default and, for a `Literal` type, the choices:
  `--flush-rows 5000`, `--no-selection`; a name used in two sections is given with its section,
  `--curation.seed 3`;
- `SPONGE_*` environment variables: `SPONGE_FLUSH_ROWS=5000`, `SPONGE_CURATION_SEED=3`;
- a YAML or TOML file (`--config file.yaml`) with a mapping per section, or the flat names:
  `{"ingest": {"flush_rows": 5000}}` or `{"flush_rows": 5000}`.

A field may say how users call it: `field(..., metadata={"name": "http_port"})` renames the knob
(flag `--http-port`, env `SPONGE_HTTP_PORT`); `metadata={"alias": "store"}` adds a second flag.

Precedence: flags > environment > config file > the dataclass defaults. A value that does not fit
its field (a typo in a name, "ten" for an int, a choice not offered) is a `ConfigError` naming the
field and where the value came from.

    parser = argparse.ArgumentParser()
    add_flags(parser, ServerConfig)
    config = load(ServerConfig, parser.parse_args())
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import os
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "Knob", "add_flags", "field_docs", "knobs", "load"]

ENV_PREFIX = "SPONGE_"


class ConfigError(ValueError):
    """A configuration value was refused; the message names the field and where the value came from."""


@dataclass(frozen=True)
class Knob:
    """One leaf field of a (nested) config dataclass."""

    #: field names from the root, e.g. ("ingest", "flush_rows")
    path: tuple[str, ...]
    #: the name users type: the field's own when unique in the tree, else section.field
    name: str
    type: Any
    default: Any
    help: str
    #: another flag for the same knob (`--store` for `--store-path`)
    alias: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> list[str]:
        return [self.flag] + ([f"--{self.alias.replace('_', '-')}"] if self.alias else [])

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.replace(".", "_").upper()

    @property
    def dest(self) -> str:
        return "cfg__" + "__".join(self.path)


def knobs(cls: type) -> list[Knob]:
    """Every leaf field of `cls` and its nested sections, with the names users type."""
    leaves = list(_leaves(cls, ()))
    counts: dict[str, int] = {}
    for path, _, _, _, meta in leaves:
        name = meta.get("name", path[-1])
        counts[name] = counts.get(name, 0) + 1
    out = []
    for path, typ, default, doc, meta in leaves:
        name = meta.get("name", path[-1])
        name = name if counts[name] == 1 else ".".join(path[:-1] + (name,))
        out.append(Knob(path, name, typ, default, doc, meta.get("alias")))
    return out


def add_flags(parser: argparse.ArgumentParser, cls: type, *, config_flag: bool = True) -> None:
    """Add a flag for every knob of `cls` (grouped by section) and, with `config_flag`, `--config FILE`.

    Flags left unset do not appear in the parsed namespace, so environment and file values stand."""
    if config_flag:
        parser.add_argument("--config", default=None, metavar="FILE",
                            help="a YAML or TOML file of settings (a mapping per section, or the flat names)")
    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}
    for knob in knobs(cls):
        section = knob.path[:-1]
        if section not in groups:
            groups[section] = parser.add_argument_group(_section_title(cls, section)) if section else parser
        group = groups[section]
        help_text = f"{knob.help} (default: {_show(knob.default)}; env {knob.env})".strip().replace("%", "%%")
        base, optional = _unwrap_optional(knob.type)
        if base is bool and not optional:
            group.add_argument(*knob.flags, dest=knob.dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": knob.dest, "default": argparse.SUPPRESS, "help": help_text,
                                  "metavar": _metavar(base, optional)}
        choices = _choices(base)
        if choices is not None:
            kwargs["choices"] = choices + (["none"] if optional else [])
            kwargs.pop("metavar")
        group.add_argument(*knob.flags, **kwargs)


def load(cls: type, args: argparse.Namespace | None = None, *, env: Mapping[str, str] | None = None,
         file: str | os.PathLike | None = None, **overrides: Any) -> Any:
    """An instance of `cls` from its defaults ← the config file ← SPONGE_* environment ← flags ← overrides.

    `file` defaults to the `--config` flag's value; `overrides` are keyword arguments by knob name."""
    env = os.environ if env is None else env
    all_knobs = knobs(cls)
    by_name = {k.name: k for k in all_knobs}
    values: dict[tuple[str, ...], Any] = {}
    file = file if file is not None else getattr(args, "config", None)
    if file:
        for name, value in _flatten(_read_file(Path(file)), all_knobs).items():
            values[by_name[name].path] = _coerce(by_name[name], value, f"config file {file}")
    for knob in all_knobs:
        if knob.env in env:
            values[knob.path] = _coerce(knob, env[knob.env], f"environment variable {knob.env}")
    if args is not None:
        for knob in all_knobs:
            if hasattr(args, knob.dest):
                values[knob.path] = _coerce(knob, getattr(args, knob.dest), f"flag {knob.flag}")
    for name, value in overrides.items():
        if name not in by_name:
            raise ConfigError(f"unknown setting {name!r}; known: {', '.join(sorted(by_name))}")
        values[by_name[name].path] = value
    return _build(cls, (), values)


# ---- building --------------------------------------------------------------------------------------

def _build(cls: type, prefix: tuple[str, ...], values: dict[tuple[str, ...], Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path = prefix + (f.name,)
        typ = _hints(cls)[f.name]
        if _is_config(typ):
            kwargs[f.name] = _build(typ, path, values)
        elif path in values:
            kwargs[f.name] = values[path]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def _leaves(cls: type, prefix: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any, Any, str, Mapping]]:
    docs = field_docs(cls)
    hints = _hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        typ = hints[f.name]
        if _is_config(typ):
            yield from _leaves(typ, prefix + (f.name,))
        else:
            yield prefix + (f.name,), typ, getattr(defaults, f.name), docs.get(f.name, ""), f.metadata


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The `#:` comment lines above each field of `cls` (and its dataclass bases), joined."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        pending: list[str] = []
        for line in source.splitlines():
            stripped = line.strip()
            if stripped.startswith("#:"):
                pending.append(stripped[2:].strip())
            elif ":" in stripped and pending and not stripped.startswith(("@", "def ", "class ", '"', "#")):
                docs[stripped.split(":")[0].strip()] = " ".join(pending)
                pending = []
            elif not stripped.startswith("#"):
                pending = []
    return docs


def _section_title(cls: type, section: tuple[str, ...]) -> str:
    typ = cls
    for name in section:
        typ = _hints(typ)[name]
    doc = (inspect.getdoc(typ) or "").split("\n")[0]
    if doc.startswith(f"{typ.__name__}("):   # the signature @dataclass writes when a class has no docstring
        doc = ""
    return f"{'.'.join(section)} ({doc.rstrip('.')})" if doc else ".".join(section)


def _is_config(typ: Any) -> bool:
    return isinstance(typ, type) and dataclasses.is_dataclass(typ)


def _unwrap_optional(typ: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(typ)) == 2:
            return args[0], True
    return typ, False


def _choices(typ: Any) -> list | None:
    if typing.get_origin(typ) is typing.Literal:
        return list(typing.get_args(typ))
    return None


def _metavar(typ: Any, optional: bool) -> str:
    name = {int: "INT", float: "FLOAT", str: "TEXT", dict: "JSON", bool: "BOOL"}.get(typ)
    if name is None:
        origin = typing.get_origin(typ)
        name = "A,B,..." if origin in (tuple, list) else "VALUE"
    return f"{name}|none" if optional else name


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(none)"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _coerce(knob: Knob, value: Any, source: str) -> Any:
    """`value` (a string from a flag or the environment, or a parsed file value) as the knob's type."""
    base, optional = _unwrap_optional(knob.type)
    where = f"{knob.name} (from {source})"
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true/false, got {value!r}")
        choices = _choices(base)
        if choices is not None:
            kind = type(choices[0])
            value = kind(value)
            if value not in choices:
                raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
            return value
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected an integer, got {value!r}")
            try:
                return int(str(value).replace("_", "")) if isinstance(value, str) else int(value)
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
        if base is float:
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if base is str:
            return str(value)
        if base is dict:
            return json.loads(value) if isinstance(value, str) else dict(value)
        if typing.get_origin(base) in (tuple, list):
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            inner = (typing.get_args(base) or (str,))[0]
            return tuple(inner(v) for v in items) if typing.get_origin(base) is tuple else [inner(v) for v in items]
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return value


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix in (".toml", ".tml"):
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - YAML and TOML raise their own error types
        raise ConfigError(f"config file {path} is not valid {'TOML' if path.suffix in ('.toml', '.tml') else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings")
    return data


def _flatten(data: dict, all_knobs: list[Knob]) -> dict[str, Any]:
    """A file's mapping (sections and/or flat names) as {knob name: value}; unknown keys are an error."""
    by_path = {k.path: k.name for k in all_knobs}
    by_name = {k.name: k.name for k in all_knobs}
    sections = {p[:i] for p in by_path for i in range(1, len(p))}
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: tuple[str, ...]) -> None:
        for key, value in node.items():
            path = prefix + (str(key),)
            if isinstance(value, dict) and path in sections:
                walk(value, path)
            elif path in by_path:
                out[by_path[path]] = value
            elif not prefix and str(key) in by_name:
                out[str(key)] = value
            else:
                raise ConfigError(f"unknown setting {'.'.join(path)!r} in the config file; known: "
                                  f"{', '.join(sorted(by_name))}")

    walk(data, ())
    return out
