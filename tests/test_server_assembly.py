"""The server's assembly and its background tasks, over a real in-process server (the chat
fixture): what runs beside the calls stays as much as the server needs."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from helpers import Chat, chat_server, free_port, until


async def test_reloads_leave_no_task_behind_once_their_work_is_done(chat: Chat) -> None:
    """Every SIGHUP (and every rotated key shared with a cluster, and every metrics
    listener) added a task to a list kept until stop, done or not (a review, 2026-11-25)."""
    server = chat.server
    before = len(server._tasks)
    for _ in range(20):
        server.reload(server.cfg)
    await until(lambda: len(server._tasks) == before, "each reload's revocation check ended")


async def test_a_server_with_metrics_starts_following_tailscaled_without_a_failed_listen(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The IPN bus's first word, read while start() was still making the metrics listener,
    listened on the metrics port a second time: "following tailscaled's IPN bus failed ...
    the port is in use" in the log, and at 100 msg/s into 1,000 subscribers the p99 went
    from 27-29 ms to 37-47 (bench/compare.py, 4 rounds, 2026-11-25)."""
    caplog.set_level(logging.WARNING)
    async with chat_server(tmp_path, metrics_port=free_port()) as chat:
        await chat.connect("alice@tailnet.test")  # (the bus's first word has come)
        await asyncio.sleep(0.1)
        assert len(chat.server._metrics_servers) == 1
    assert "IPN bus failed" not in caplog.text and "in use" not in caplog.text, caplog.text
