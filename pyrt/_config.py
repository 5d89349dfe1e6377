"""`pyrt serve` configuration: a TOML file, then command-line flags on top.

```toml
[server]
host = "127.0.0.1"
port = 8000
transports = ["websocket"]   # default: every installed transport plugin

cors_origins = ["https://app.example.com"]   # browsers on these origins may use SSE etc.
api_keys = ["change-me"]     # for the REST API (pyrt serve makes one up when none is set)

[transports.longpoll]         # keyword arguments for a transport plugin's factory
poll_timeout = 25.0

[hub]
history_size = 256
history_max_bytes = 67108864  # history of all channels together (64 MiB, the default)
outbox_total_bytes = 268435456  # queued for all clients together (256 MiB, the default)
slow_consumer_policy = "disconnect"

[hub.channel_policies]
"ticker:>" = "conflate"

[sources.notify]              # a source plugin and its options (docs/sources.md)
database = "app"
channels = { orders = "db:orders" }

[history]                     # durable history (default: in memory; docs/sources.md)
dir = "/var/lib/pyrt/history"
fsync_interval = 1.0
```
Every key of `[hub]` is a field of `pyrt.HubConfig`; unknown keys are errors, so a typo never
silently falls back to a default. The memory budgets: `history_max_bytes` bounds what history
holds across all channels (over it, the oldest publications of any channel are forgotten;
clients resuming from before them get `recovered: false`); `outbox_total_bytes` bounds what
is queued for all connections (a connection whose frame does not fit is a slow consumer
under its policy; closed as slow, 4008, under `disconnect`). See docs/protocol.md.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from ._hub import HubConfig
from ._node import NodeConfig
from ._outbox import SlowConsumerPolicy

_SERVER_KEYS = {
    "host",
    "port",
    "transports",
    "drain_timeout",
    "request_timeout",
    "cors_origins",
    "api_keys",
    "max_body_bytes",
}


class ConfigError(ValueError):
    """A configuration file or flag that pyrt cannot use; the message names the key."""


def _policy(value: Any, key: str) -> SlowConsumerPolicy:
    try:
        return SlowConsumerPolicy(value)
    except ValueError:
        choices = ", ".join(p.value for p in SlowConsumerPolicy)
        raise ConfigError(f"{key}: {value!r} is not one of {choices}") from None


def hub_config(table: Mapping[str, Any]) -> HubConfig:
    fields = {f.name: f for f in attrs.fields(HubConfig)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"hub.{key}: unknown setting; known: {', '.join(sorted(fields))}")
        if key == "slow_consumer_policy":
            value = _policy(value, f"hub.{key}")
        elif key == "channel_policies":
            if not isinstance(value, Mapping):
                raise ConfigError("hub.channel_policies: must be a table of pattern = policy")
            value = {p: _policy(v, f"hub.channel_policies.{p}") for p, v in value.items()}
        elif key == "record_policies":
            # Pattern = "reject" | "lww" | "merge" | the name of a resolver given to the Hub.
            if not isinstance(value, Mapping) or not all(
                isinstance(v, str) for v in value.values()
            ):
                raise ConfigError("hub.record_policies: must be a table of pattern = policy name")
            value = dict(value)
        else:
            default = fields[key].default
            expected = type(default)
            ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
            if not ok or isinstance(value, bool) != isinstance(default, bool):
                raise ConfigError(f"hub.{key}: expected {expected.__name__}, got {value!r}")
        values[key] = value
    try:
        return HubConfig(**values)
    except ValueError as e:
        raise ConfigError(f"hub: {e}") from None


def node_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> NodeConfig:
    """Reads `path` (if any), applies `overrides` (flags: host, port), and checks everything."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    unknown = set(data) - {"server", "hub", "transports", "sources", "history"}
    if unknown:
        known = "server, hub, transports, sources, history"
        raise ConfigError(f"unknown section(s) {', '.join(sorted(unknown))}; known: {known}")
    server = dict(data.get("server", {}))
    server.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for key in server:
        if key not in _SERVER_KEYS:
            known = ", ".join(sorted(_SERVER_KEYS))
            raise ConfigError(f"server.{key}: unknown setting; known: {known}")
    port = server.get("port", 8000)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"server.port: expected an integer 0..65535, got {port!r}")
    transports = server.get("transports")
    if transports is not None and (
        not isinstance(transports, list) or not all(isinstance(t, str) for t in transports)
    ):
        raise ConfigError("server.transports: expected a list of plugin names")
    lists = {key: _strings(server, key) for key in ("cors_origins", "api_keys")}
    options = data.get("transports", {})
    if not all(isinstance(v, Mapping) for v in options.values()):
        raise ConfigError("transports: expected a table per plugin, [transports.<name>]")
    sources = data.get("sources", {})
    if not isinstance(sources, Mapping) or not all(
        isinstance(v, Mapping) for v in sources.values()
    ):
        raise ConfigError("sources: expected a table per source, [sources.<name>]")
    max_body = server.get("max_body_bytes", 1024 * 1024)
    if not isinstance(max_body, int) or isinstance(max_body, bool) or max_body < 1:
        raise ConfigError(f"server.max_body_bytes: expected a positive integer, got {max_body!r}")
    return NodeConfig(
        host=str(server.get("host", "127.0.0.1")),
        port=port,
        hub=hub_config(data.get("hub", {})),
        transports=tuple(transports) if transports is not None else None,
        drain_timeout=float(server.get("drain_timeout", 5.0)),
        request_timeout=float(server.get("request_timeout", 10.0)),
        cors_origins=lists["cors_origins"],
        api_keys=lists["api_keys"],
        max_body_bytes=max_body,
        transport_options={name: dict(table) for name, table in options.items()},
        sources={name: dict(table) for name, table in sources.items()},
        **_history(data.get("history", {})),
    )


def _history(table: Any) -> dict[str, Any]:
    """`[history]`: dir (durable history; none: in memory), fsync_interval, segment_bytes."""
    if not isinstance(table, Mapping):
        raise ConfigError("history: expected a table, [history]")
    known = {"dir": str, "fsync_interval": float, "segment_bytes": int}
    values: dict[str, Any] = {}
    for key, value in table.items():
        expected = known.get(key)
        if expected is None:
            raise ConfigError(f"history.{key}: unknown setting; known: {', '.join(sorted(known))}")
        ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
        if not ok or isinstance(value, bool):
            raise ConfigError(f"history.{key}: expected {expected.__name__}, got {value!r}")
        if key == "dir" and not value:
            raise ConfigError("history.dir: must not be empty")
        if key == "fsync_interval" and not value > 0:
            raise ConfigError(f"history.fsync_interval: must be positive, got {value!r}")
        if key == "segment_bytes" and value < 4096:
            raise ConfigError(f"history.segment_bytes: must be at least 4096, got {value!r}")
        values[f"history_{key}"] = float(value) if expected is float else value
    return values


def _strings(server: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = server.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"server.{key}: expected a list of non-empty strings, got {value!r}")
    return tuple(value)
