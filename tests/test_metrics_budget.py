"""The metrics endpoint's budgets: one device's scrapes may not use up everyone's."""

from __future__ import annotations

import asyncio
from pathlib import Path

from helpers import chat_server, free_port

from tsnetchat.server import METRICS_PER_DEVICE


async def scrape(front: str) -> int:
    """One scrape through ``front``: the HTTP status."""
    host, port = front.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        return int((await reader.readline()).split()[1])
    finally:
        writer.close()


async def test_a_device_past_its_metrics_budget_waits_for_the_hold_and_others_are_answered(
        tmp_path: Path) -> None:
    """One budget for every scraper: mallory scraping 10 times a second made 3 of alice's
    10 scrapes, one a second, get 429 (an attacker's run over the lab, 2026-11-25). Now a
    device has a budget of its own, and past it each answer waits ``Gate.hold``: its
    scrapes, one after the other, no longer spend everyone's."""
    mport = free_port()
    async with chat_server(tmp_path, metrics_port=mport) as chat:
        chat.server.gate.hold = 3600.0  # (never answered while this test runs)
        mallory = await chat.net.front("mallory@tailnet.test", port=mport)
        alice = await chat.net.front("alice@tailnet.test", port=mport)
        for _ in range(METRICS_PER_DEVICE[0]):
            assert await scrape(mallory) == 200
        held = asyncio.ensure_future(scrape(mallory))
        for _ in range(3):
            assert await scrape(alice) == 200
        done, _ = await asyncio.wait({held}, timeout=1.0)
        assert not done, "a scrape past the device's budget was answered at once"
        held.cancel()
        chat.server.gate.hold = 0.0
        assert 429 in [await scrape(mallory) for _ in range(METRICS_PER_DEVICE[0] + 1)]
