"""Connections held open without calls (connguard.py), over the real lab: mallory, with no
token and no grant, opens HTTP/2 connections to the real `tsnetchat serve` on chat-server
through her own tailscaled and never makes a call. 1,050 of them stopped a server at the
default file limit from accepting anyone (an attacker's run, 2026-11-24); now the server
closes a device's connections beyond ``max_connections_per_device``."""

from __future__ import annotations

import asyncio
import signal
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import LabDaemon, free_port, run_cli, until

pytestmark = [pytest.mark.tailnet, pytest.mark.security]

LIMIT = 6
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + bytes(4) + payload


class Idle:
    """One HTTP/2 connection from ``node`` through its tailscaled that answers SETTINGS and
    PINGs (so gRPC keeps it) and makes no call. ``ended`` once the server closes it."""

    def __init__(self) -> None:
        self.ended = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def open(self, lab: Any, node: str, port: int) -> Idle:
        host, proxy_port = lab.nodes[node].http_proxy.rsplit(":", 1)
        r, w = await asyncio.open_connection(host, int(proxy_port))
        w.write(f"CONNECT chat-server:{port} HTTP/1.1\r\nHost: chat-server:{port}\r\n\r\n"
                .encode())
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert b" 200" in head.split(b"\r\n")[0], head
        w.write(PREFACE + frame(4, 0))  # an empty SETTINGS
        self.task = asyncio.create_task(self._answer(r, w))
        return self

    async def _answer(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readexactly(9)
                body = await r.readexactly(int.from_bytes(head[:3], "big"))
                if head[3] == 4 and not head[4] & 1:
                    w.write(frame(4, 1))  # SETTINGS ack
                elif head[3] == 6 and not head[4] & 1:
                    w.write(frame(6, 1, body))  # PING ack
                elif head[3] == 7:
                    break  # GOAWAY
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.ended.set()
            w.close()


@pytest.fixture(scope="module")
def server(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabDaemon]:
    s = LabDaemon(lab, tmp_path_factory.mktemp("connguard") / "state", free_port(),
                  env={"TSNETCHAT_MAX_CONNECTIONS_PER_DEVICE": str(LIMIT)})
    s.start()
    try:
        yield s
    finally:
        s.stop(signal.SIGKILL)


async def test_a_device_holding_connections_without_calls_keeps_only_its_limit_of_them(
        lab: Any, server: LabDaemon) -> None:
    held = [await Idle().open(lab, "mallory-laptop", server.port) for _ in range(LIMIT + 9)]
    try:
        ends = [asyncio.create_task(c.ended.wait()) for c in held]
        done, _ = await asyncio.wait(ends, timeout=30, return_when=asyncio.ALL_COMPLETED)
        assert len(done) == 9  # (the rest stay open: 30 s is many sweeps)
        for t in ends:
            t.cancel()
        log = server.log.read_text()
        assert ("closed 9 connection(s) of device 'mallory-laptop.tailnet.test "
                f"(mallory@tailnet.test)': it held {LIMIT + 9} open at once, more than "
                f"max_connections_per_device ({LIMIT})") in log, log[-2000:]
        # another device is not held to mallory's count, and alice gets in on a new one
        token = server.token("alice@tailnet.test")
        out = run_cli("whoami", "chat-server", "--token", token,
                      *server.client_args("alice-laptop"))
        assert out.returncode == 0 and '"login": "alice@tailnet.test"' in out.stdout, out
    finally:
        for c in held:
            if c.task is not None:
                c.task.cancel()



async def test_a_device_renamed_by_its_owner_is_held_to_the_same_limit(
        lab: Any, server: LabDaemon) -> None:
    """A device's name is its owner's to change (``tailscale set --hostname``); counted by
    name, mallory's phone held the limit once under each name it took (an attacker's run
    over the lab, 2026-11-25). Counted by its node id, it is held to one limit."""
    phone = await asyncio.to_thread(lab.add_node, "mallory-phone", "mallory")
    held: list[Idle] = []
    try:
        held += [await Idle().open(lab, "mallory-phone", server.port) for _ in range(LIMIT + 2)]
        ends = [asyncio.create_task(c.ended.wait()) for c in held]
        done, _ = await asyncio.wait(ends, timeout=30, return_when=asyncio.ALL_COMPLETED)
        assert len(done) == 2  # the guard knows the others as hers now
        for t in ends:
            t.cancel()
        await asyncio.to_thread(lab.tailscale, phone, "set", "--hostname=mallory-renamed")
        await until(lambda: any(p.get("HostName") == "mallory-renamed" for p in (
            lab.status(lab.nodes["chat-server"]).get("Peer") or {}).values()),
            timeout=30, what="chat-server seeing the phone's new name")
        more = [await Idle().open(lab, "mallory-phone", server.port) for _ in range(LIMIT)]
        held += more
        ends = [asyncio.create_task(c.ended.wait()) for c in held if not c.ended.is_set()]
        done, _ = await asyncio.wait(ends, timeout=30, return_when=asyncio.ALL_COMPLETED)
        assert len(done) == LIMIT, len(done)
        for t in ends:
            t.cancel()
    finally:
        for c in held:
            if c.task is not None:
                c.task.cancel()
        await asyncio.to_thread(lab.drop_node, "mallory-phone")
