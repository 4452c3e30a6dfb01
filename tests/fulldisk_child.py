"""Run by tests/test_disk.py inside a private mount namespace on a small tmpfs: a real full
disk. ``first DIR``: a server stores three messages and dies without closing anything (as
SIGKILL leaves it). ``fill DIR``: fill the disk. ``second DIR``: start a server again; print
what a client could read and what happened to its send, as JSON. ``paced DIR``: a server
with 3 MB free takes 150 messages one at a time (each its own commit, as paced chat is),
then more on a disk filled up until one is refused, then 150 more once 3 MB is freed again;
prints how many were refused in each part, as JSON."""

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


def leave_free(d: Path, free: int) -> None:
    """Make the filler file as large as leaves ``free`` bytes free."""
    st = os.statvfs(d)
    with open(d / "filler", "ab") as f:  # (written: a file extended by truncate is a hole)
        f.write(b"\0" * (st.f_bavail * st.f_frsize - free))


async def paced(d: Path) -> None:
    free = 3 * 2**20
    leave_free(d, free)
    out: dict[str, int] = {"before": 0, "full": 0, "sent_while_full": 0, "after": 0}
    async with chat_server(d) as chat:
        alice = await chat.connect("alice@tailnet.test")

        async def send(i: int) -> bool:
            await asyncio.sleep(0.02)
            try:
                await alice.send_one("general", f"message {i}", timeout=30)
            except grpc.aio.AioRpcError:
                return False
            return True

        for i in range(150):
            out["before"] += not await send(i)
        fill(d)
        for i in range(150, 450):  # (the WAL's file is reused as long as it can be)
            if not await send(i):
                out["full"] += 1
                break
            out["sent_while_full"] += 1
        os.truncate(d / "filler", (d / "filler").stat().st_size - free)
        for i in range(450, 600):
            out["after"] += not await send(i)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    step, where = sys.argv[1], Path(sys.argv[2])
    if step == "fill":
        fill(where)
    else:
        asyncio.run({"first": first, "second": second, "paced": paced}[step](where))
