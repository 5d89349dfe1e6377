"""The errors the client raises to its user."""

from __future__ import annotations


class ClientError(Exception):
    """The server answered a command with an error (see docs/protocol.md for codes)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(Exception):
    """The connection dropped before the server answered. The command may or may not have
    taken effect; joins and presence are restored by the client on its own."""
