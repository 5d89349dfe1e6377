"""docs/configuration.md against the configuration schema, both ways.

The schema comes from the code, not from a list kept here: `[server]` and `[history]` are the
fields of `NodeConfig`, `[hub]` those of `HubConfig` (attrs.fields), `[transports.<name>]` and
`[sources.<name>]` the keyword parameters of each built-in plugin's factory (found through its
entry point), and the Postgres sources' connection options the fields of `PgOptions`, with
the defaults a source actually gets. Every key must be documented once, with its type and
default, and nothing may be documented that the code does not take. Then the documented
defaults go through the real loader, which must accept them and give the defaults back.
"""

from __future__ import annotations

import enum
import importlib.metadata
import inspect
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from pyrt import HubConfig, NodeConfig
from pyrt.node.auth import AuthConfig
from pyrt.node.config import _SERVER_KEYS, node_config
from pyrt.node.node import load_transports
from pyrt.node.sources import load_sources
from pyrt.postgres import PgOptions

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
GROUPS = {"transports": "pyrt.transports", "sources": "pyrt.sources"}
BUILT_IN = ("pyrt.plugins.", "pyrt_redis:")
"""Entry points of the plugins documented there: those shipped in pyrt's wheel and the
distributions of plugins/ (scripts/bootstrap installs them); other installed plugins document
themselves."""
REQUIRED_OPTIONS: dict[str, dict[str, Any]] = {
    "notify": {"channels": {"orders": "db:orders"}},
    "redis": {"channels": {"orders": "redis:orders"}},
}
"""Values for the options a factory cannot do without, to build it with every default."""
NODE_ONLY = {"hub", "transport_options", "sources", "auth"}
"""NodeConfig fields that are tables of their own, not keys of `[server]`."""


class _Marker(enum.Enum):
    REQUIRED = "required"
    UNSET = "unset"


REQUIRED, UNSET = _Marker.REQUIRED, _Marker.UNSET


@attrs.frozen
class Key:
    type: str
    default: Any  # a TOML-shaped value, UNSET (None in the code) or REQUIRED


@attrs.frozen
class Row:
    type: str
    default: str
    meaning: str


# -- the doc ---------------------------------------------------------------------------------


def _lines_outside_code(text: str) -> Iterator[str]:
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield line


def documented() -> dict[str, dict[str, Row]]:
    """Table name (`server`, `transports.sse`, ...) -> key -> its row. A section documents
    the tables its heading names (`[hub]`); its rows are those of the markdown table in it."""
    tables: dict[str, dict[str, Row]] = {}
    names: list[str] = []
    for line in _lines_outside_code(DOC.read_text()):
        if line.startswith("#"):
            names = re.findall(r"`\[([^\]`]+)\]`", line)
            for name in names:
                tables.setdefault(name, {})
            continue
        if not line.startswith("|") or not names:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "key" or set(cells[0]) <= {"-"}:
            continue  # the header and the rule under it
        assert len(cells) == 4, f"a row is | key | type | default | meaning |: {line}"
        match = re.fullmatch(r"`([a-z_]+)`", cells[0])
        assert match, f"a key is written as `key`: {line}"
        for name in names:
            assert match[1] not in tables[name], f"{name}.{match[1]} is documented twice"
            tables[name][match[1]] = Row(*cells[1:])
    return tables


def parse_default(cell: str) -> Any:
    """`required`, `unset...`, or a TOML value in backticks (what follows it is prose)."""
    if cell == "required":
        return REQUIRED
    if cell.startswith("unset"):
        return UNSET
    match = re.match(r"`([^`]+)`", cell)
    assert match, f"a default is `a TOML value`, 'unset: ...' or 'required', not {cell!r}"
    return tomllib.loads(f"value = {match[1]}")["value"]


# -- the code --------------------------------------------------------------------------------


def toml_type(hint: Any) -> str | None:
    """How a config file writes a value of this annotation; None when it cannot."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        written = [toml_type(a) for a in args if a is not type(None)]
        kinds = sorted({w for w in written if w is not None})
        return " or ".join(kinds) if kinds else None
    if hint is bool:
        return "boolean"
    if hint is int:
        return "integer"
    if hint is float:
        return "number"
    if hint is str or (isinstance(hint, type) and issubclass(hint, enum.Enum)):
        return "string"  # an enum is written as its value
    if origin in (Mapping, dict):
        return "table"
    if origin in (tuple, Sequence, list) and args and args[0] is str:
        return "array of strings"
    if origin in (tuple, Sequence, list) and args and typing.get_origin(args[0]) is Mapping:
        return "array of tables"
    if origin is Callable:
        return None  # given by code that builds the config, not by the file
    raise AssertionError(f"no TOML form known for {hint!r}: teach toml_type")


def toml_value(value: Any) -> Any:
    """A default as the file would write it."""
    if value is None:
        return UNSET
    if isinstance(value, attrs.Factory):
        return toml_value(value.factory())
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {k: toml_value(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [toml_value(v) for v in value]
    return value


def attrs_keys(cls: type, only: Callable[[str], bool] = lambda name: True) -> dict[str, Key]:
    hints = typing.get_type_hints(cls)
    keys = {}
    for field in attrs.fields(cls):
        if only(field.name):
            keys[field.name] = Key(str(toml_type(hints[field.name])), toml_value(field.default))
    return keys


def built_in_plugins(kind: str) -> dict[str, Callable[..., Any]]:
    points = importlib.metadata.entry_points(group=GROUPS[kind])
    return {ep.name: ep.load() for ep in points if ep.value.startswith(BUILT_IN)}


def test_the_plugins_of_the_plugins_folder_are_installed() -> None:
    """docs/configuration.md documents them: without them the comparison below would fail
    for a reason this says (`pip install -e plugins/<name>`, as scripts/bootstrap does)."""
    names = {ep.value for ep in importlib.metadata.entry_points(group=GROUPS["sources"])}
    assert "pyrt_redis:RedisSource" in names, "pip install -e plugins/pyrt-redis"


def factory_keys(name: str, factory: Callable[..., Any]) -> dict[str, Key]:
    """A plugin's options: its factory's keyword parameters. A factory that takes **options
    hands them to `PgOptions` (the instance's `pg`); their defaults are the instance's."""
    hints = typing.get_type_hints(factory.__init__)
    keys = {}
    more = False
    for p in inspect.signature(factory).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            more = True
            continue
        assert p.kind is p.KEYWORD_ONLY, f"{name}: option {p.name} is not keyword-only"
        default = REQUIRED if p.default is p.empty else toml_value(p.default)
        type_ = toml_type(hints[p.name])
        assert type_ is not None, f"{name}.{p.name}: a file cannot give a {hints[p.name]}"
        keys[p.name] = Key(type_, default)
    if more:
        instance = factory(**REQUIRED_OPTIONS.get(name, {}))
        assert isinstance(instance.pg, PgOptions), f"{name} takes **options but has no pg"
        for field, key in attrs_keys(PgOptions).items():
            keys[field] = attrs.evolve(key, default=toml_value(getattr(instance.pg, field)))
    return keys


def schema() -> dict[str, dict[str, Key]]:
    fields = {f.name for f in attrs.fields(NodeConfig)}
    server = {f for f in fields if f not in NODE_ONLY and not f.startswith("history_")}
    assert server == set(_SERVER_KEYS), "NodeConfig and the loader's [server] keys differ"
    tables = {
        "server": attrs_keys(NodeConfig, lambda name: name in server),
        "hub": attrs_keys(HubConfig),
        "history": {
            name.removeprefix("history_"): key
            for name, key in attrs_keys(NodeConfig, lambda n: n.startswith("history_")).items()
        },
        "auth": attrs_keys(AuthConfig),
        "transports.<name>": {},  # what every transport's table holds: nothing in common
        "sources.<name>": {"plugin": Key("string", UNSET)},  # load_sources; tested below
    }
    for kind in GROUPS:
        for name, factory in built_in_plugins(kind).items():
            tables[f"{kind}.{name}"] = factory_keys(name, factory)
    return tables


# -- the comparison --------------------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same type (a float default is written as a float)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def test_every_table_is_documented_and_nothing_else() -> None:
    assert sorted(documented()) == sorted(schema())


@pytest.mark.parametrize("table", sorted(schema()))
def test_every_key_of_a_table_is_documented_with_its_type_and_default(table: str) -> None:
    code, doc = schema()[table], documented().get(table, {})
    assert sorted(doc) == sorted(code), f"[{table}]: documented keys differ from the code's"
    for key, expected in code.items():
        row = doc[key]
        assert row.type == expected.type, f"{table}.{key}: type"
        default = parse_default(row.default)
        assert same(default, expected.default), f"{table}.{key}: default {default!r}"
        assert row.meaning, f"{table}.{key}: say what it means"


def test_the_documented_defaults_load_and_are_the_defaults(tmp_path: Path) -> None:
    """A file of every documented default, through `pyrt serve`'s loader and the plugins'
    factories: accepted, and the same as no file at all."""
    doc = documented()
    lines = []
    for table in ("server", "hub", "history"):
        lines.append(f"[{table}]")
        for key, row in doc[table].items():
            value = parse_default(row.default)
            if value is not UNSET:
                lines.append(f"{key} = {_toml(value)}")
    path = tmp_path / "defaults.toml"
    path.write_text("\n".join(lines) + "\n")
    assert node_config(path) == NodeConfig()

    for name, rows in _plugin_tables(doc, "transports"):
        (transport,) = load_transports([name], {name: _defaults(name, rows)})
        assert transport.name == name
    for name, rows in _plugin_tables(doc, "sources"):
        (source,) = load_sources({name: _defaults(name, rows)})
        assert source.name == name


def test_a_source_table_names_its_plugin() -> None:
    """`plugin` (documented under `[sources.<name>]`): another name for a plugin's table."""
    (source,) = load_sources({"orders": {"plugin": "notify", **REQUIRED_OPTIONS["notify"]}})
    assert source.name == "orders"
    assert type(source) is built_in_plugins("sources")["notify"]


def test_the_example_file_loads(tmp_path: Path) -> None:
    example = DOC.read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.toml"
    path.write_text(example)
    config = node_config(path)
    assert config.hub.history_size == 256
    assert [t.name for t in load_transports(config.transports, config.transport_options)] == [
        "websocket",
        "sse",
    ]
    assert [s.name for s in load_sources(config.sources)] == ["notify"]


def _plugin_tables(doc: dict[str, dict[str, Row]], kind: str) -> list[tuple[str, dict[str, Row]]]:
    return [
        (table.split(".", 1)[1], rows)
        for table, rows in sorted(doc.items())
        if table.startswith(f"{kind}.") and not table.endswith("<name>")
    ]


def _defaults(name: str, rows: dict[str, Row]) -> dict[str, Any]:
    values = dict(REQUIRED_OPTIONS.get(name, {}))
    for key, row in rows.items():
        value = parse_default(row.default)
        if value not in (UNSET, REQUIRED):
            values[key] = value
    return values


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)
