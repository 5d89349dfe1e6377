"""The errors the client raises to its user."""

from __future__ import annotations


class ClientError(Exception):
    """The server answered a command with an error (see docs/protocol.md for codes)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AuthenticationError(ClientError):
    """The server refused the connection's token, and the client stopped: it is raised out
    of `connect`'s block. `code` says why (docs/protocol.md, "Close codes"):

    - 401 (at the door) or 4401: no token, or a token the server refused (bad signature,
      expired, wrong audience...), with no `token_provider` to ask for another, or one whose
      new token was refused as well;
    - 4419: the token expired and there was no `token_provider` to get a new one;
    - 4403: the server ended the connection on purpose (its user was disconnected, or its
      token revoked, through the REST API). The client never reconnects after it.
    """


class Unsubscribed(ClientError):
    """The server removed this connection from the channel (the REST API's
    `POST /api/unsubscribe`): raised by the channel's `async for` once the messages that
    came before it are taken. The client does not join it again on its own."""


class ConnectionLost(Exception):
    """The connection dropped before the server answered. The command may or may not have
    taken effect; joins and presence are restored by the client on its own."""
