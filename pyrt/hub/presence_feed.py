"""Presence as connections see it: the `track`, `untrack` and `presence` commands, who watches
the presence of which channel (joins with `presence`), and the diffs they are sent. Who is
present is kept by the storage engine's `PresenceManager` (`pyrt.hub.presence` for the
memory engine)."""

from __future__ import annotations

from .broker import PresenceManager
from .connection import ChannelJoin, Connection
from .output import Output
from .presence import PresenceDiff
from .protocol import ErrorCode, PresenceQuery, RequestId, Track, Untrack, is_pattern


class PresenceFeed:
    """The presence side of one hub's connections."""

    def __init__(self, manager: PresenceManager, output: Output) -> None:
        self.manager = manager
        self._out = output
        self._watchers: dict[str, dict[str, Connection]] = {}
        """Channel -> the connections that joined it with `presence`, by id."""

    def watch(self, conn: Connection, channel: str) -> None:
        """`conn` joined `channel` with `presence`: it gets the state now, diffs from now."""
        self._watchers.setdefault(channel, {})[conn.id] = conn
        self._out.send(conn, conn.codec.presence_state(channel, self.manager.presence(channel)))

    def left(self, conn: Connection, channel: str, join: ChannelJoin) -> None:
        """`conn` left `channel`: it watches no more, and what it tracked there leaves."""
        watchers = self._watchers.get(channel)
        if watchers is not None:
            watchers.pop(conn.id, None)
            if not watchers:
                del self._watchers[channel]
        for key in join.tracked_keys:
            self.broadcast(channel, self.manager.untrack(channel, conn.id, key))

    def gone(self, conn: Connection) -> None:
        """`conn` is gone: every entry it tracked expires."""
        for channel, diff in self.manager.untrack_conn(conn.id).items():
            self.broadcast(channel, diff)

    def track(self, conn: Connection, command: Track) -> None:
        rid, channel = command.id, command.channel
        if not self._require_channel(conn, rid, channel):
            return
        key = command.key or conn.id
        try:
            ref, diff = self.manager.track(channel, conn.id, key, command.meta, command.ref)
        except KeyError:
            self._out.error(conn, rid, ErrorCode.BAD_REQUEST, f"no presence entry '{command.ref}'")
            return
        conn.joins[channel].tracked_keys.add(key)
        self.broadcast(channel, diff)
        self._out.reply(conn, rid, {"ref": ref})

    def untrack(self, conn: Connection, command: Untrack) -> None:
        rid, channel = command.id, command.channel
        if self._require_channel(conn, rid, channel):
            diff = self.manager.untrack(channel, conn.id, command.key or conn.id, command.ref)
            self.broadcast(channel, diff)
            self._out.reply(conn, rid, {})

    def query(self, conn: Connection, command: PresenceQuery) -> None:
        rid, channel = command.id, command.channel
        if self._require_channel(conn, rid, channel) and rid is not None:
            state = self.manager.presence(channel)
            self._out.send(conn, conn.codec.presence_reply(rid, channel, state))

    def broadcast(self, channel: str, diff: PresenceDiff) -> None:
        """Sends `diff` to the watchers of `channel` (encoded once per codec)."""
        watchers = self._watchers.get(channel)
        if not watchers or diff.is_empty():
            return
        frames: dict[str, bytes] = {}
        for conn in watchers.values():
            frame = frames.get(conn.codec.name)
            if frame is None:
                frame = frames[conn.codec.name] = conn.codec.presence_diff(channel, diff)
            self._out.send(conn, frame)

    def _require_channel(self, conn: Connection, rid: RequestId, channel: str) -> bool:
        if channel not in conn.joins:
            self._out.error(conn, rid, ErrorCode.NOT_JOINED, f"not joined to '{channel}'")
            return False
        if is_pattern(channel):
            message = "presence needs a channel name, not a pattern"
            self._out.error(conn, rid, ErrorCode.BAD_REQUEST, message)
            return False
        return True
