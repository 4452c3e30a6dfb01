"""The metrics port's connections, over a real in-process server: what one address may hold
open there."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from helpers import chat_server, free_port

from tsnetchat.server import METRICS_OPEN_PER_ADDRESS


async def test_connections_to_the_metrics_port_that_send_nothing_hold_no_more_than_their_share(
        tmp_path: Path) -> None:
    """Each connection was held 5 s for its request, and the address's budget was asked
    only once it came: a device opening connections that send nothing held as many as it
    opened, each a file of the server's (whose limit is every connection's, the chat's
    too; a review, 2026-11-25). One more than the address's share is answered at once."""
    mport = free_port()
    async with chat_server(tmp_path, metrics_port=mport) as chat:
        front = await chat.net.front("mallory@tailnet.test", port=mport)
        host, port = front.rsplit(":", 1)
        idle = [await asyncio.open_connection(host, int(port))
                for _ in range(METRICS_OPEN_PER_ADDRESS)]
        r, w = await asyncio.open_connection(host, int(port))
        w.write(b"GET /metrics HTTP/1.1\r\nHost: chat-server\r\n\r\n")
        answer = await asyncio.wait_for(r.read(), 10)
        assert answer.startswith(b"HTTP/1.1 429"), answer
        assert b"too many open metrics connections" in answer
        w.close()
        for _, iw in idle:
            iw.close()
            with contextlib.suppress(ConnectionError):
                await iw.wait_closed()
