"""Run by tests/test_disk.py inside a private mount namespace, its state dir on a small ext4
file system of its own (a loop device) that it freezes (``fsfreeze``): a real hung disk,
where writes block instead of failing. Prints, as JSON, what became of the sends made while
it was frozen, and what the database holds once it is thawed. ``DIR`` is the mount point.

The disk is thawed in ``finally``, before the server is stopped (a frozen file system
leaves every process that writes to it unkillable); the test's shell thaws it too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import chat_server, collect, join, send

from tsnetchat.client import acks_in
from tsnetchat.errors import StoreError

FROZEN_FOR = 30.0  # the most the sends get to be answered while frozen (a bound, not a time)


def writer_held(pid_task: Path = Path("/proc/self/task")) -> bool:
    """Whether the history's writer thread waits on the disk (state D)."""
    for t in pid_task.iterdir():
        if (t / "comm").read_text().strip() == "tsnetchat-write":
            return (t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "D"
    return False


async def main(d: Path) -> None:
    out: dict[str, object] = {}
    answers: dict[str, str] = {}  # the last answer to each client_msg_id
    said: list[str] = []  # every answer to "a"
    changed = asyncio.Event()

    async def until(check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + FROZEN_FOR
        while not check() and time.monotonic() < deadline:
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 0.05)

    async with chat_server(d, store_wait=1.0) as chat:
        alice = await chat.connect("alice@tailnet.test")
        await alice.send_one("general", "before")
        bob = await chat.connect("bob@tailnet.test")
        watcher = bob.subscribe("general", after=1)  # what a reader of the room is shown
        await collect(watcher, 1, kind="replay_done")
        call = await join(alice, "general", after=2**62)

        async def read() -> None:
            async for ev in call:
                for a in acks_in(ev):
                    answers[a.client_msg_id] = f"ack {a.id}"
                    said.extend([f"ack {a.id}"] if a.client_msg_id == "a" else [])
                if ev.WhichOneof("event") == "error":
                    answers[ev.error.client_msg_id] = f"error {ev.error.message}"
                    said.extend([f"error {ev.error.message}"] if ev.error.client_msg_id == "a"
                                else [])
                changed.set()

        reader = asyncio.create_task(read())
        frozen = False
        try:
            subprocess.run(["fsfreeze", "-f", str(d)], check=True)
            frozen = True
            await call.write(send("a", "a"))
            await until(writer_held)  # inside a's commit, which the disk holds
            await call.write(send("b", "b"))  # queued behind it
            await call.write(send("c", "c"))
            await until(lambda: {"a", "b", "c"} <= answers.keys())
            out["while_frozen"] = dict(answers)
            await call.write(send("a", "a"))  # sent again while its write still hangs
            await until(lambda: len(said) == 2)
            await call.write(send("d", "d"))  # a new one while the writer is still held
            await until(lambda: "d" in answers)
            out["d"] = answers.pop("d")
            out["pending"] = chat.server.store.pending()  # (every send has had its answer)
            found = await bob.search("before", timeout=FROZEN_FOR)  # (a read, after the job)
            out["search"] = [m.text for m in found.messages]
            marked = chat.server.store.mark_read([("alice@tailnet.test", "general", 1)])
            try:  # a job (here a read position) queued behind the write, as MarkRead's
                await asyncio.wait_for(marked, FROZEN_FOR)
                out["job"] = "done"
            except StoreError as e:
                out["job"] = f"error {e}"
            except TimeoutError:
                out["job"] = "no answer"
        finally:
            if frozen:
                subprocess.run(["fsfreeze", "-u", str(d)], check=True)
        await until(lambda: answers.get("a", "").startswith("ack"))  # its write returned
        await call.write(send("b", "b"))
        await call.write(send("c", "c"))
        await until(lambda: all(answers.get(k, "").startswith("ack") for k in "abc"))
        out["after"] = dict(answers)
        out["said_of_a"] = said
        out["seen"] = [(m.id, m.text) for m in await collect(watcher, 3)]
        watcher.cancel()
        call.cancel()
        reader.cancel()
    db = sqlite3.connect(d / "state" / "tsnetchat.db")
    out["stored"] = [r[0] for r in db.execute("SELECT text FROM messages ORDER BY seq")]
    db.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
