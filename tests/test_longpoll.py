"""The long-poll transport over real sockets."""

from __future__ import annotations

from httpkit import longpoll_kit_client

from pyrt.plugins.longpoll import LongPollTransport
from pyrt.testing import check_transport


async def test_longpoll_transport_passes_the_conformance_kit() -> None:
    await check_transport(LongPollTransport, longpoll_kit_client, joins_on_open=1)
