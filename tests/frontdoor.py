"""`pyrt serve` in a subprocess, and plain blocking sockets to attack and probe it: the
front-door fuzzer's machinery (tests/fuzz/test_fuzz_front_door.py, docs/fuzzing.md).

The node is the real command with a config file, so "the process ended" is observable and
what is attacked is what users run. `ServedNode.check` is the fuzzer's invariant: the process
is alive, nothing it wrote to stderr is a traceback, and a well-behaved subscriber receives
what a well-behaved publisher sends through it.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import itertools
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import h11
import orjson
from httpkit import SseParser
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

API_KEY = "front-door-fuzz-key"
JWT_SECRET = "pyrt-test-secret-at-least-32-bytes-long!"
"""The node's JWT secret: the fuzzer signs some of its tokens with it, so they get in."""
CONFIG = f"""
[server]
port = 0
api_keys = ["{API_KEY}"]
api_key_max_failures = 0

[hub.record_policies]
"rec:>" = "lww"

[auth]
jwt_secret = "{JWT_SECRET}"
anonymous = true

[[auth.rules]]
channel = ">"
subscribe = "anyone"
publish = "anyone"
mutate = "anyone"
"""
"""What the fuzzed node runs with: the defaults, plus an API key (the REST API and the
Supabase socket need one), a records channel pattern (so `mutate` reaches the records), and
every channel open to anonymous clients (so the fuzzer's frames reach the commands; tokens it
sends are still verified, against a known secret).
The fuzzer sends wrong keys on purpose, all from 127.0.0.1: the pause after wrong keys
(tests/node/test_abuse.py) would refuse its right ones too, so it is off."""

PROBE_TIMEOUT = 10.0
"""Seconds the well-behaved clients wait for each answer before the node counts as hung."""

_ESCAPED = ("Traceback (most recent call last)", "Exception ignored", "ExceptionGroup")


class NodeFailure(AssertionError):
    """The invariant broke: the node ended, hung, or wrote a traceback."""


class ProbeError(Exception):
    """A well-behaved client did not get what it should have."""


class ServedNode:
    """`pyrt serve --config <file>` on a free port of 127.0.0.1, restarted when it died.

    Its stdout and stderr go to files in `workdir`, one pair per start, so what a crash
    printed is kept and quoted in the failure."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.config = workdir / "pyrt.toml"
        self.config.write_text(CONFIG)
        self.starts = 0
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Path | None = None
        self._stderr_seen = 0
        self._probes = itertools.count(1)
        self.examples = 0
        """Examples run against it (`ensure_running` calls), for the failure messages."""
        self.first_failure: int | None = None

    def start(self) -> None:
        self.starts += 1
        stdout = self.workdir / f"stdout-{self.starts}.log"
        self._stderr = self.workdir / f"stderr-{self.starts}.log"
        self._stderr_seen = 0
        with stdout.open("wb") as out, self._stderr.open("wb") as err:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pyrt._cli", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30.0
        while True:
            match = re.search(rb"serving on http://127\.0\.0\.1:(\d+)/", stdout.read_bytes())
            if match is not None:
                self.port = int(match.group(1))
                return
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"pyrt serve did not start:\n{self.stderr()}")
            time.sleep(0.02)  # another process: its log is only seen by reading it

    def ensure_running(self) -> None:
        """Starts the node if it is not running (before each example: the one before may
        have ended it, and the next must meet a live node to show what it does itself)."""
        self.examples += 1
        if self._proc is None or self._proc.poll() is not None:
            self.start()

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def stderr(self) -> str:
        if self._stderr is None:
            return ""
        return self._stderr.read_bytes().decode(errors="replace")

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> int:
        """SIGINT, as an operator's Ctrl-C; returns the exit code (killed after 15 s)."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(15.0)
            except subprocess.TimeoutExpired:
                self.kill()
        return self._proc.returncode

    def _fail(self, what: str) -> None:
        # Whatever state it is in, the next example gets a fresh node.
        code = self.returncode
        self.kill()
        if self.first_failure is None:
            self.first_failure = self.examples
        status = "it is still running" if code is None else f"exit code {code}"
        stderr = self.stderr()
        escaped = escaped_exception(stderr)
        message = (
            f"{what} ({status}; example {self.examples} of this module, the first failure"
            f" was example {self.first_failure})"
            + (f"\nescaped: {escaped}" if escaped else "")
            + f"\nthe node's stderr:\n{stderr[-8000:]}"
        )
        # Raised from an exception named after what escaped, so that hypothesis tells
        # different crashes apart (it reports and shrinks each on its own).
        cause = _escaped_type(escaped.split(":")[0]) if escaped else None
        if cause is None:
            raise NodeFailure(message)
        raise NodeFailure(message) from cause(escaped)

    def check(self) -> None:
        """The invariant after each example (raises NodeFailure)."""
        if self.returncode is not None:
            self._fail("the node process ended")
        failed = None
        try:
            round_trip(self.port, f"probe:{next(self._probes)}")
        except Exception as e:  # whatever went wrong, the node failed the probe
            failed = f"a well-behaved client's round trip failed: {e!r}"
        if failed is not None:
            # It may be ending just now: give it a moment, to say which. (Failing outside
            # the except block keeps the probe's error out of the exception's context,
            # where hypothesis would take it for a different failure.)
            with contextlib.suppress(subprocess.TimeoutExpired):
                if self._proc is not None:
                    self._proc.wait(1.0)
            self._fail(failed)
        if self.returncode is not None:
            self._fail("the node process ended")
        text = self.stderr()
        new, self._stderr_seen = text[self._stderr_seen :], len(text)
        if any(marker in new for marker in _ESCAPED):
            self._fail("the node wrote a traceback")


class EscapedException(Exception):
    """Stands for an exception that escaped in the node (its type is named after it)."""


@functools.cache
def _escaped_type(name: str) -> type[EscapedException]:
    return type(name, (EscapedException,), {})


_EXCEPTION_LINE = re.compile(r"^[ |+-]*((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)(?:: (.*))?$", re.MULTILINE)


def escaped_exception(stderr: str) -> str | None:
    """The innermost exception of the last traceback in `stderr` ("TypeError: ..."), if any."""
    start = max(stderr.rfind(marker) for marker in _ESCAPED)
    if start < 0:
        return None
    found = None
    for match in _EXCEPTION_LINE.finditer(stderr, start):
        name = match.group(1).rsplit(".", 1)[-1]
        if name.endswith(("Error", "Exception", "Exit", "Interrupt")) or name == "Exception":
            found = f"{match.group(1)}: {match.group(2) or ''}"
    return found


# -- the well-behaved clients ----------------------------------------------------------------


class WsClient:
    """A blocking WebSocket client that follows the rules (wsproto)."""

    def __init__(self, port: int, target: str = "/connection/websocket") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._parts: list[str] = []
        try:
            self.sock.sendall(self.ws.send(Request(host="127.0.0.1", target=target)))
            while True:
                event = self._next_event()
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    raise ProbeError(f"upgrade refused with {event.status_code}")
        except BaseException:
            self.sock.close()
            raise

    def _next_event(self) -> object:
        while True:
            for event in self.ws.events():
                return event
            data = self.sock.recv(65536)
            if not data:
                raise ProbeError("the server closed the connection")
            self.ws.receive_data(data)

    def send(self, frame: Mapping[str, Any]) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=orjson.dumps(frame).decode())))

    def receive(self) -> dict[str, Any]:
        while True:
            event = self._next_event()
            if isinstance(event, TextMessage):
                self._parts.append(event.data)
                if event.message_finished:
                    text = "".join(self._parts)
                    self._parts.clear()
                    value: dict[str, Any] = orjson.loads(text)
                    return value
            elif isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise ProbeError(f"closed by the server: {event.code} {event.reason}")

    def receive_until(self, wanted: Mapping[str, Any]) -> dict[str, Any]:
        """The next frame holding every key and value of `wanted` (pings are skipped)."""
        while True:
            frame = self.receive()
            if all(frame.get(k) == v for k, v in wanted.items()):
                return frame
            if "error" in frame or frame.get("push") == "error":
                raise ProbeError(f"unexpected error: {frame}")

    def close(self) -> None:
        """The closing handshake, as a polite client does it: our close, then theirs."""
        try:
            self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
            while not isinstance(self._next_event(), CloseConnection):
                pass
        except (OSError, LocalProtocolError, ProbeError):
            pass
        finally:
            self.sock.close()


def round_trip(port: int, channel: str) -> None:
    """A subscriber joins `channel`, a publisher joins it and publishes with `ack`; the
    subscriber must receive exactly that data."""
    subscriber = WsClient(port)
    try:
        subscriber.send({"cmd": "join", "id": 1, "channel": channel})
        subscriber.receive_until({"reply": 1})
        publisher = WsClient(port)
        try:
            publisher.send({"cmd": "join", "id": 1, "channel": channel})
            publisher.receive_until({"reply": 1})
            data = {"probe": channel}
            publisher.send(
                {"cmd": "publish", "id": 2, "channel": channel, "data": data, "ack": True}
            )
            ack = publisher.receive_until({"reply": 2})
            if "ok" not in ack:
                raise ProbeError(f"publish refused: {ack}")
            pub = subscriber.receive_until({"push": "pub", "channel": channel})
            if pub["data"] != data:
                raise ProbeError(f"received {pub['data']!r}, published {data!r}")
        finally:
            publisher.close()
    finally:
        subscriber.close()


def http_request(
    port: int,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One well-formed request on its own connection (http.client); status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class SseStream:
    """An SSE stream opened with a plain GET; its `session` push read."""

    def __init__(self, port: int, target: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT)
        try:
            self._open(target)
        except BaseException:
            self.sock.close()
            raise

    def _open(self, target: str) -> None:
        http = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target=target, headers=[("host", "127.0.0.1")])
        self.sock.sendall((http.send(request) or b"") + (http.send(h11.EndOfMessage()) or b""))
        parser = SseParser()
        self.status = 0
        self.session = self.token = ""
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(self.sock.recv(65536))
                continue
            if isinstance(event, h11.Response):
                self.status = event.status_code
                if self.status != 200:
                    return
                continue
            if not isinstance(event, h11.Data):
                raise ProbeError(f"the SSE stream ended before its session push: {event}")
            for sse in parser.feed(bytes(event.data)):
                frame = orjson.loads(sse.data) if sse.data else {}
                if frame.get("push") == "session":
                    self.session, self.token = frame["session"], frame["token"]
                    return

    def close(self) -> None:
        self.sock.close()


# -- attacking -------------------------------------------------------------------------------


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def reset(sock: socket.socket) -> None:
    """Closes with a TCP reset (SO_LINGER 0): the peer's next write fails."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def drain(sock: socket.socket, seconds: float) -> bytes:
    """What arrives within `seconds` (or until the peer closes), ignoring errors."""
    received = bytearray()
    deadline = time.monotonic() + seconds
    with contextlib.suppress(OSError):
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                break
            received += data
    return bytes(received)


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """Sends; False when the server had closed (which is its right, whatever we send)."""
    try:
        sock.sendall(data)
    except OSError:
        return False
    return True


def ws_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"\x00\x00\x00\x00",
    wide: int = 0,
) -> bytes:
    """One WebSocket frame, as a client may or may not be allowed to send it: any opcode,
    RSV bits, masked or not, and the length in its shortest form or (`wide` 1 or 2) in the
    16- or 64-bit form even when shorter would do."""
    first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)
    masked = 0x80 if mask is not None else 0
    length = len(payload)
    if wide == 0 and length < 126:
        head = bytes((first, masked | length))
    elif wide <= 1 and length < 1 << 16:
        head = struct.pack("!BBH", first, masked | 126, length)
    else:
        head = struct.pack("!BBQ", first, masked | 127, length)
    if mask is None:
        return head + payload
    key = (mask * 4)[:4]
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + body


def upgrade_request(target: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_head(sock: socket.socket, timeout: float = PROBE_TIMEOUT) -> tuple[int, bytes]:
    """Reads a response head; its status (0 if the connection ended first) and what followed."""
    buffer = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0:
            return 0, buffer
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except OSError:
            return 0, buffer
        if not data:
            return 0, buffer
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.1 (\d{3})", head)
    return (int(match.group(1)) if match else 0), rest


# -- JSON of any depth -----------------------------------------------------------------------


@attrs.frozen(slots=True)
class RawJson:
    """JSON text put into a document as it is (numbers and escapes a serializer would not
    write, like 1e400 or a lone surrogate)."""

    text: str


def _chunks(value: Any) -> Iterator[str]:
    # An explicit stack: the documents are as deep as the fuzzer likes, recursion is not.
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, RawJson):
            yield item.text
        elif isinstance(item, list):
            parts: list[Any] = [RawJson("[")]
            for index, element in enumerate(item):
                if index:
                    parts.append(RawJson(","))
                parts.append(element)
            parts.append(RawJson("]"))
            stack.extend(reversed(parts))
        elif isinstance(item, dict):
            parts = [RawJson("{")]
            for index, (key, element) in enumerate(item.items()):
                if index:
                    parts.append(RawJson(","))
                parts += [RawJson(json.dumps(key) + ":"), element]
            parts.append(RawJson("}"))
            stack.extend(reversed(parts))
        else:
            yield json.dumps(item)


def dumps(value: Any) -> bytes:
    """`value` as JSON, however deep (orjson gives up at 255 levels, json at about 1000)."""
    return "".join(_chunks(value)).encode()
