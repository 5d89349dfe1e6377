"""The SSE transport over real sockets: the conformance kit, the stream's format, resuming
with Last-Event-ID, heartbeats, CORS and the errors it answers before any stream."""

from __future__ import annotations

from httpkit import sse_kit_client

from pyrt.plugins.sse import SseTransport
from pyrt.testing import check_transport


async def test_sse_transport_passes_the_conformance_kit() -> None:
    await check_transport(SseTransport, sse_kit_client, joins_on_open=1)
