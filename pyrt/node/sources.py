"""Source plugins: where events come from besides clients (Postgres NOTIFY, the WAL, Redis).

A source (`pyrt.plugin.Source`) is an object with a `name` and
`async def run(self, ctx, *, task_status)`. The node starts every configured source in its
nursery, after the transports' run hooks and before it accepts connections, and cancels it at
shutdown. `run` calls `task_status.started()` once it is live (events from then on get
published) and publishes through its `pyrt.plugin.SourceContext`. It handles the outages it
expects (reconnect with backoff); anything else it raises, and the node stops with that error
rather than run on without the source. `pyrt.testing.check_source` checks a source against
that contract.

Sources are registered under the `pyrt.sources` entry point group and configured with one
`[sources.<name>]` table each; only configured sources run:

```toml
[sources.notify]                 # the entry point name...
host = "db.internal"
channels = { orders = "db:orders" }

[sources.audit]                  # ...or any name, with the plugin named explicitly
plugin = "notify"
database = "audit"
channels = { audit = "audit:all" }
```
The table's other keys are keyword arguments for the plugin's factory.

A source declares the channels it feeds with an `owned_channels` attribute (a sequence of
channel patterns; optional: `pyrt.plugin.OwnsChannels`): clients may not publish to them or
change their records (error 423 `read_only`), so nobody can pass an event off as the
source's. `[hub] client_writable` opens chosen ones again.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

from .plugins import Source

SOURCE_GROUP = "pyrt.sources"

__all__ = ["SOURCE_GROUP", "SourceError", "load_sources"]


class SourceError(Exception):
    """A source cannot run (bad credentials, no such database, no server within its startup
    timeout). The message names the source (`sources.<name>`) and says why; `pyrt serve`
    prints it and exits."""


def load_sources(options: Mapping[str, Mapping[str, Any]]) -> list[Source]:
    """The sources configured in `options` (`[sources.<name>]` tables), in name order.

    Each table names its plugin with `plugin` (default: the table's name); its other keys
    are keyword arguments for the plugin's factory. Raises LookupError for an unknown plugin
    and ValueError (naming `sources.<name>`) for options the factory refuses."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=SOURCE_GROUP)}
    sources: list[Source] = []
    for name in sorted(options):
        table = dict(options[name])
        plugin = table.pop("plugin", name)
        if not isinstance(plugin, str) or plugin not in found:
            raise LookupError(
                f"sources.{name}: no source plugin named {plugin!r}; have {sorted(found)}"
            )
        try:
            source = found[plugin].load()(**table)
        except (TypeError, ValueError) as e:
            raise ValueError(f"sources.{name}: {e}") from None
        if plugin != name:
            source.name = name
        sources.append(source)
    return sources
