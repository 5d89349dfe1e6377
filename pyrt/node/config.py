"""`pyrt serve` configuration: a TOML file, then command-line flags on top.

```toml
[server]
host = "127.0.0.1"
port = 8000
transports = ["websocket"]   # default: every installed transport plugin

cors_origins = ["https://app.example.com"]   # browsers on these origins may use SSE etc.
api_keys = ["change-me"]     # for the REST API (pyrt serve makes one up when none is set)
request_timeout = 10.0       # seconds for a whole request, head and body (docs/http.md#limits)
max_head_bytes = 16384       # request line and headers; 431 beyond
max_body_bytes = 1048576     # REST API request bodies; 413 beyond

# Abuse limits (docs/http.md#limits). A client address is an IPv4 address or an IPv6 /64.
max_connections_per_ip = 256 # open connections per address (0: none): over it, 503 and close;
                             # behind a reverse proxy every client has the proxy's address
api_key_max_failures = 10    # this many wrong API keys from one address (0: never) ...
api_key_failure_window = 60.0 # ... within this many seconds pause the address:
api_key_pause = 60.0         # 429 + retry-after to all its /api/ requests for this long

[transports.longpoll]         # keyword arguments for a transport plugin's factory
poll_timeout = 25.0

[hub]
history_size = 256
history_max_bytes = 67108864  # history of all channels together (64 MiB, the default)
outbox_total_bytes = 268435456  # queued for all clients together (256 MiB, the default)
slow_consumer_policy = "disconnect"
command_rate = 100.0         # commands per second per connection, any transport (0: none):
command_burst = 200          # over it error 430; far over it for long, close 4029
channel_publish_rate = 500.0 # client and REST publications per second per channel (0: none):
channel_publish_burst = 1000 # over it error 432 (REST: 429); sources are not limited
client_writable = ["pg:public:chat"]   # channels a source feeds that clients may write anyway

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
silently falls back to a default.
Values are checked as well: every section is a table, `host` a string, `drain_timeout` and
`request_timeout` positive numbers of seconds, and no float setting is `nan`. Whatever is wrong
with a file (not UTF-8, not TOML, nested too deeply, a bad value) is a `ConfigError` naming the
key, which `pyrt serve` prints before exiting with code 2.

Every key, with its type and default: docs/configuration.md. The memory budgets:
`history_max_bytes` bounds what history holds across all channels (over it, the oldest
publications of any channel are forgotten; clients resuming from before them get `recovered:
false`); `outbox_total_bytes` bounds what is queued for all connections (a connection whose
frame does not fit is a slow consumer under its policy; closed as slow, 4008, under
`disconnect`). See docs/protocol.md.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .. import _json
from ..hub.hub import HubConfig
from ..hub.outbox import SlowConsumerPolicy
from .auth import AuthConfig, auth_config
from .http import MAX_HEAD_BYTES


@attrs.frozen(slots=True, kw_only=True)
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    """0 picks a free port (see Node.port)."""
    hub: HubConfig = attrs.field(factory=HubConfig)
    transports: tuple[str, ...] | None = None
    """Transport plugins to enable, by entry point name; None for every installed one."""
    drain_timeout: float = 5.0
    """On shutdown, how long clients get to receive what is queued for them."""
    request_timeout: float = 10.0
    """How long a client may take to send a whole request, head and body, counted from when
    the connection opened or the previous response was sent (so it also bounds an idle
    keep-alive connection). A body still arriving then is answered 408, and a head still
    arriving is not answered; either way the connection is closed. Responses, streamed ones
    (SSE, long-poll waits, WebSocket) included, are not bounded by it."""
    max_head_bytes: int = MAX_HEAD_BYTES
    """Largest request head (request line and headers) accepted; 431 beyond, then close."""
    transport_options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    """Plugin name -> keyword arguments for its factory."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to use the HTTP endpoints from other sites (`*`: any)."""
    api_keys: tuple[str, ...] = ()
    """Keys that authorize the REST API (server-side publishers). None: the API refuses."""
    max_body_bytes: int = 1024 * 1024
    """Largest request body the REST API accepts."""
    sources: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    """Source name -> its options (`[sources.<name>]`); only these sources run."""
    history_dir: str | None = None
    """Durable history: a directory for the history log (pyrt.hub.historylog), reloaded at
    start so offsets, epochs and recovery survive a restart. None: history in memory."""
    history_fsync_interval: float = 1.0
    """With `history_dir`: fsync the log this often when something was written (sources
    that acknowledge upstream fsync before each acknowledgement anyway)."""
    history_segment_bytes: int = 16 * 1024 * 1024
    """With `history_dir`: the log's segment size; old segments are deleted whole."""
    max_connections_per_ip: int = 256
    """Open connections one peer address may have (an IPv4 address, or an IPv6 /64 network);
    0: no limit. Over it, a new connection is answered 503 and closed at once. Behind a
    reverse proxy every connection comes from the proxy's address: raise it, or use 0."""
    api_key_max_failures: int = 10
    """Wrong API keys (REST API, Supabase keys) from one peer address within
    `api_key_failure_window` that pause the address (0: never pause)."""
    api_key_failure_window: float = 60.0
    """Seconds within which `api_key_max_failures` wrong keys pause an address."""
    api_key_pause: float = 60.0
    """Seconds a paused address is refused (HTTP 429 with `retry-after`), whatever key it
    sends."""

    auth: AuthConfig | None = None
    """Connection authentication (`[auth]`, docs/auth.md). None: no `[auth]` table."""

    def __attrs_post_init__(self) -> None:
        if self.max_connections_per_ip < 0 or self.api_key_max_failures < 0:
            raise ValueError("max_connections_per_ip and api_key_max_failures must be >= 0")
        if not (0 < self.api_key_failure_window < math.inf and 0 < self.api_key_pause < math.inf):
            raise ValueError("api_key_failure_window and api_key_pause must be positive")


_SERVER_KEYS = {
    "host",
    "port",
    "transports",
    "drain_timeout",
    "request_timeout",
    "cors_origins",
    "api_keys",
    "max_body_bytes",
    "max_head_bytes",
    "max_connections_per_ip",
    "api_key_max_failures",
    "api_key_failure_window",
    "api_key_pause",
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
    if not isinstance(table, Mapping):
        raise ConfigError("hub: expected a table, [hub]")
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
        elif key == "client_writable":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError("hub.client_writable: expected a list of channel patterns")
            value = tuple(value)
        else:
            default = fields[key].default
            expected = type(default)
            ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
            if not ok or isinstance(value, bool) != isinstance(default, bool):
                raise ConfigError(f"hub.{key}: expected {expected.__name__}, got {value!r}")
            if isinstance(value, float) and math.isnan(value):
                raise ConfigError(f"hub.{key}: expected a number, got nan")
        values[key] = value
    try:
        return HubConfig(**values)
    except ValueError as e:
        raise ConfigError(f"hub: {e}") from None


MAX_CONFIG_BYTES = 1024 * 1024
"""Largest configuration file `pyrt serve` reads."""


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    if _json.depth_exceeds(data, _json.MAX_DEPTH):
        raise ConfigError(f"{path}: nested deeper than {_json.MAX_DEPTH} levels")
    return data


def node_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> NodeConfig:
    """Reads `path` (if any), applies `overrides` (flags: host, port), and checks everything."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(Path(path))
    unknown = set(data) - {"server", "hub", "transports", "sources", "history", "auth"}
    if unknown:
        known = "server, hub, transports, sources, history, auth"
        raise ConfigError(f"unknown section(s) {', '.join(sorted(unknown))}; known: {known}")
    server = dict(_table(data, "server"))
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
    options = _table(data, "transports")
    if not all(isinstance(v, Mapping) for v in options.values()):
        raise ConfigError("transports: expected a table per plugin, [transports.<name>]")
    sources = _table(data, "sources")
    if not all(isinstance(v, Mapping) for v in sources.values()):
        raise ConfigError("sources: expected a table per source, [sources.<name>]")
    host = server.get("host", "127.0.0.1")
    if not isinstance(host, str):
        raise ConfigError(f"server.host: expected a string, got {host!r}")
    max_body = server.get("max_body_bytes", 1024 * 1024)
    if not isinstance(max_body, int) or isinstance(max_body, bool) or max_body < 1:
        raise ConfigError(f"server.max_body_bytes: expected a positive integer, got {max_body!r}")
    max_head = server.get("max_head_bytes", MAX_HEAD_BYTES)
    if not isinstance(max_head, int) or isinstance(max_head, bool) or max_head < 1024:
        raise ConfigError(
            f"server.max_head_bytes: expected an integer of at least 1024, got {max_head!r}"
        )
    limits = _server_limits(server)
    return NodeConfig(
        host=host,
        port=port,
        hub=hub_config(data.get("hub", {})),
        transports=tuple(transports) if transports is not None else None,
        drain_timeout=_seconds(server, "drain_timeout", 5.0),
        request_timeout=_seconds(server, "request_timeout", 10.0),
        cors_origins=lists["cors_origins"],
        api_keys=lists["api_keys"],
        max_body_bytes=max_body,
        max_head_bytes=max_head,
        transport_options={name: dict(table) for name, table in options.items()},
        sources={name: dict(table) for name, table in sources.items()},
        **limits,
        **_history(data.get("history", {})),
        auth=_auth(data),
    )


def _auth(data: Mapping[str, Any]) -> AuthConfig | None:
    if "auth" not in data:
        return None
    try:
        return auth_config(data["auth"])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _server_limits(server: Mapping[str, Any]) -> dict[str, Any]:
    """The abuse limits of `[server]`: counts (0: off) and durations (positive)."""
    values: dict[str, Any] = {}
    for key in ("max_connections_per_ip", "api_key_max_failures"):
        if key in server:
            value = server[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"server.{key}: expected an integer >= 0, got {value!r}")
            values[key] = value
    for key in ("api_key_failure_window", "api_key_pause"):
        if key in server:
            value = server[key]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not 0 < value < math.inf:
                raise ConfigError(f"server.{key}: expected a positive number, got {value!r}")
            values[key] = float(value)
    return values


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


def _table(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, Mapping):
        raise ConfigError(f"{name}: expected a table, [{name}]")
    return table


def _seconds(server: Mapping[str, Any], key: str, default: float) -> float:
    value = server.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"server.{key}: expected a positive number of seconds, got {value!r}")
    return float(value)


def _strings(server: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = server.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"server.{key}: expected a list of non-empty strings, got {value!r}")
    return tuple(value)
