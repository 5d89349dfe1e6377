"""The errors of the PostgreSQL client: the server's (`PgError`) and the connection's."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["PgAuthError", "PgConnectionError", "PgError", "PgProtocolError", "PgStateError"]


class PgError(Exception):
    """An ErrorResponse from the server: `code` is the SQLSTATE (`28P01` bad password,
    `42601` syntax error, ...), the other attributes the fields the server filled in.

    `context` says what the client was doing (the address and user when connecting)."""

    def __init__(self, fields: Mapping[str, str], context: str | None = None) -> None:
        self.fields = dict(fields)
        self.context = context
        super().__init__(str(self))

    @property
    def code(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def severity(self) -> str:
        """Not localized: ERROR, FATAL or PANIC."""
        return self.fields.get("V", self.fields.get("S", ""))

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")

    @property
    def position(self) -> int | None:
        """1-based character position in the query the error refers to."""
        value = self.fields.get("P")
        return int(value) if value is not None and value.isdigit() else None

    def __str__(self) -> str:
        text = f"{self.message} (SQLSTATE {self.code})"
        if self.detail:
            text += f"\nDETAIL: {self.detail}"
        if self.hint:
            text += f"\nHINT: {self.hint}"
        if self.context:
            text += f"\n({self.context})"
        return text

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.fields, self.context))


class PgConnectionError(Exception):
    """No usable connection: refused, unreachable, timed out, closed, or broken by a
    cancelled call. The message names the server's address."""


class PgAuthError(PgConnectionError):
    """Authentication failed on the client's side (no password given, a method pyrt does not
    speak, a server that failed SCRAM's proof). A wrong password is a `PgError` with SQLSTATE
    28P01: the server decides that."""


class PgProtocolError(PgConnectionError):
    """The server sent something that is not the protocol; the connection is unusable."""


class PgStateError(RuntimeError):
    """A message the connection's state does not allow was about to be sent (a query while
    another runs, CopyData outside COPY): a bug in the caller, and nothing was sent."""
