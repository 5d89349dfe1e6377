"""The connection options every PostgreSQL source shares (`[sources.<name>]` keys), checked in
one place, with the connect and reconnect-backoff logic that goes with them.

```toml
host = "127.0.0.1"          # default 127.0.0.1
port = 5432
user = "app"                # default postgres
password_env = "PGPASSWORD" # read at each (re)connect; or password = "..." (not both)
database = "app"            # default: the user's name
ssl = false                 # true: TLS, verifying the server against the system CAs
ssl_root_cert = "/etc/ssl/pg-ca.pem"   # implies ssl; verify against this CA instead
reconnect_min = 0.5         # backoff: first delay (seconds), doubling with jitter ...
reconnect_max = 30.0        # ... up to this
connect_timeout = 10.0
startup_timeout = 30.0      # how long the node waits for the first connection
application_name = "pyrt"   # each source has its own default
```
Bad values raise TypeError (wrong kind) or ValueError (out of range) naming the option;
`load_sources` prefixes `sources.<name>:`.
"""

from __future__ import annotations

import os
import random
import ssl as _ssl

import attrs
import trio

from ..plugin import SourceError
from ..plugin import check_integer as integer
from ..plugin import check_seconds as seconds
from .connection import PgConnection
from .errors import PgAuthError, PgError

__all__ = ["PgOptions", "text_option"]


def text_option(name: str, value: object, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string, not {value!r}")
    return value


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, not {value!r}")
    return value


@attrs.frozen(slots=True, kw_only=True)
class PgOptions:
    """Where and how a source connects to PostgreSQL, and how it retries."""

    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: str | None = None
    password_env: str | None = None
    """The environment variable holding the password, read at every (re)connect."""
    database: str | None = None
    """None: the user's name (as libpq)."""
    ssl: bool = False
    ssl_root_cert: str | None = None
    """A CA file to verify the server against (implies `ssl`)."""
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    connect_timeout: float = 10.0
    startup_timeout: float = 30.0
    application_name: str = "pyrt"

    def __attrs_post_init__(self) -> None:
        text_option("host", self.host)
        if integer("port", self.port, 1) > 65535:
            raise ValueError(f"port must be at most 65535, not {self.port}")
        text_option("user", self.user)
        text_option("password", self.password, optional=True)
        text_option("password_env", self.password_env, optional=True)
        if self.password is not None and self.password_env is not None:
            raise ValueError("give password or password_env, not both")
        text_option("database", self.database, optional=True)
        _flag("ssl", self.ssl)
        if text_option("ssl_root_cert", self.ssl_root_cert, optional=True) is not None:
            object.__setattr__(self, "ssl", True)
        for name in ("reconnect_min", "reconnect_max", "connect_timeout", "startup_timeout"):
            object.__setattr__(self, name, seconds(name, getattr(self, name)))
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must not be less than reconnect_min")
        text_option("application_name", self.application_name)

    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}/{self.database}"

    def current_password(self) -> str | None:
        """The password, from `password_env` when given (PgAuthError if it is unset)."""
        if self.password_env is None:
            return self.password
        password = os.environ.get(self.password_env)
        if password is None:
            raise PgAuthError(f"the environment variable {self.password_env} is not set")
        return password

    async def connect(self, *, replication: bool = False) -> PgConnection:
        """A connection (`replication=database` with `replication`)."""
        password = self.current_password()
        context = _ssl.create_default_context(cafile=self.ssl_root_cert) if self.ssl else None
        return await PgConnection.connect(
            self.host,
            self.port,
            self.user,
            password,
            self.database,
            replication=replication,
            ssl_context=context,
            timeout=self.connect_timeout,
            application_name=self.application_name,
        )

    def retry_delay(
        self,
        source: str,
        error: Exception,
        attempt: int,
        rng: random.Random,
        *,
        started: bool,
        deadline: float,
        retried_codes: tuple[str, ...] = (),
    ) -> float:
        """The delay before reconnect attempt `attempt` after `error`. Before the first
        connection (`started` false) an error that retrying will not fix, or a delay that
        would pass `deadline` (startup_timeout), raises SourceError for `sources.<source>`
        instead. Retried: connection trouble (SQLSTATE class 08), a server shutting down or
        starting up (57), resources (53), client-side timeouts, and `retried_codes`; not
        retried: credentials, a missing database and other server errors."""
        delay = self.backoff(attempt, rng)
        if not started:
            fatal = isinstance(error, PgAuthError) or (
                isinstance(error, PgError)
                and not error.code.startswith(("08", "57", "53"))
                and error.code not in retried_codes
            )
            if fatal:
                raise SourceError(f"sources.{source}: {error}") from error
            if trio.current_time() + delay > deadline:
                raise SourceError(
                    f"sources.{source}: no connection to PostgreSQL within"
                    f" startup_timeout ({self.startup_timeout:g} s): {error}"
                ) from error
        return delay

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The delay before reconnect attempt `attempt` (0, 1, ...): doubling from
        `reconnect_min` up to `reconnect_max`, with "equal jitter" (50-100 % of it)."""
        ceiling = min(self.reconnect_max, self.reconnect_min * 2 ** min(attempt, 30))
        return rng.uniform(ceiling / 2, ceiling)
