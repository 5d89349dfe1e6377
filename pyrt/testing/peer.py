"""`Peer`: a client of a sans-IO `Hub` at the frame level (see `pyrt.testing`)."""

from __future__ import annotations

import itertools
from typing import Any

import orjson

from ..hub.hub import Hub
from ..hub.identity import ANONYMOUS, Identity
from ._checks import _check

# -- a client at the frame level -----------------------------------------------------------


class Peer:
    """One client of a sans-IO `Hub`, at the frame level: it sends native-protocol commands
    (docs/protocol.md) as JSON frames and reads the frames the hub queued for it. No sockets
    and no trio; time is what the caller passes as `now` (seconds, any monotonic origin).

    ```python
    hub = Hub(HubConfig(history_size=10))
    a, b = Peer(hub), Peer(hub)
    a.request(cmd="join", channel="room")   # {"reply": 1, "ok": {...}}
    b.request(cmd="join", channel="room")
    a.send(cmd="publish", channel="room", data="hi")
    b.frames()                              # [{"push": "pub", "channel": "room", ...}]
    ```
    """

    def __init__(
        self, hub: Hub, now: float = 0.0, *, identity: Identity = ANONYMOUS, pending: bool = False
    ) -> None:
        self.hub = hub
        self.id = hub.open(now, identity=identity, pending=pending).id
        """The hub's id of this connection (what other clients see as a publication's `from`)."""
        self.pending: list[dict[str, Any]] = []
        """The frames the last `request` read besides its reply (pushes, other replies)."""
        self._ids = itertools.count(1)

    def send(self, now: float = 0.0, /, **command: Any) -> Any:
        """Sends one command; returns its request id: the command's own `id` if it has one,
        else the next number of this peer's."""
        rid = command.pop("id") if "id" in command else next(self._ids)
        self.hub.receive(self.id, orjson.dumps({"id": rid, **command}), now)
        return rid

    def raw(self, frame: bytes | str, now: float = 0.0) -> None:
        """Sends a frame as it is (bad input, a command without an id)."""
        self.hub.receive(self.id, frame, now)

    def frames(self) -> list[dict[str, Any]]:
        """Every frame queued for this client since the last call, oldest first (taken)."""
        outbox = self.hub.connection(self.id).outbox
        frames: list[dict[str, Any]] = []
        while len(outbox):
            frames.extend(orjson.loads(frame) for frame in outbox.pop())
        return frames

    def request(self, now: float = 0.0, /, **command: Any) -> dict[str, Any]:
        """Sends one command and returns its reply; the other frames read meanwhile are in
        `pending`. The hub answers at once, so a command that gets no reply fails here."""
        rid = self.send(now, **command)
        frames = self.frames()
        replies = [f for f in frames if f.get("reply") == rid]
        _check(len(replies) == 1, f"one reply to {rid!r}, not: {frames}")
        self.pending = [f for f in frames if f.get("reply") != rid]
        return replies[0]
