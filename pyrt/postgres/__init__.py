"""A PostgreSQL client for trio, written for pyrt's sources (docs/sources.md).

- `protocol`: the frontend/backend protocol as sans-IO code (messages, the parser, SCRAM).
- `connection`: `PgConnection`, which does the I/O for it over a trio stream.
- `replication`: logical replication over a connection (slots, publications, the stream).
- `options`: `PgOptions`, the connection settings the WAL and NOTIFY sources share.

`import pyrt` loads none of this; the sources import it when they are configured.
"""

from .._errors import DecodeError as DecodeError
from .connection import PgConnection as PgConnection
from .errors import PgAuthError as PgAuthError
from .errors import PgConnectionError as PgConnectionError
from .errors import PgError as PgError
from .errors import PgProtocolError as PgProtocolError
from .options import PgOptions as PgOptions
from .protocol import NotificationResponse as NotificationResponse
from .protocol import ResultSet as ResultSet
from .protocol import quote_ident as quote_ident
from .protocol import quote_literal as quote_literal

__all__ = [
    "DecodeError",
    "NotificationResponse",
    "PgAuthError",
    "PgConnection",
    "PgConnectionError",
    "PgError",
    "PgOptions",
    "PgProtocolError",
    "ResultSet",
    "quote_ident",
    "quote_literal",
]
