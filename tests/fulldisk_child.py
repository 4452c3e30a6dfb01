"""Run by tests/test_disk.py inside a private mount namespace on a small tmpfs: a real full
disk. ``first DIR``: a server stores three messages and dies without closing anything (as
SIGKILL leaves it). ``fill DIR``: fill the disk. ``second DIR``: start a server again; print
what a client could read and what happened to its send, as JSON."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
from helpers import chat_server


async def first(d: Path) -> None:
    async with chat_server(d) as chat:
        token = chat.token("alice@tailnet.test")
        (d / "token").write_text(token)
        alice = await chat.connect("alice@tailnet.test", token)
        for i in range(3):
            await alice.send_one("general", f"m{i}")
        os._exit(0)  # no clean close: the -wal and -shm files stay, as after a crash


def fill(d: Path) -> None:
    fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    try:
        while True:
            os.write(fd, b"\0" * 512)
    except OSError:
        os.close(fd)


async def second(d: Path) -> None:
    out: dict[str, object] = {}
    async with chat_server(d) as chat:
        alice = await chat.connect("alice@tailnet.test", (d / "token").read_text())
        page = await alice.history("general", after=0)
        out["history"] = [m.text for m in page.messages]
        try:
            out["sent"] = await alice.send_one("general", "on a full disk")
        except grpc.aio.AioRpcError as e:
            out["refused"] = [e.code().name, e.details()]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    step, where = sys.argv[1], Path(sys.argv[2])
    if step == "fill":
        fill(where)
    else:
        asyncio.run(first(where) if step == "first" else second(where))
