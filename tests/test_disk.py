"""The event loop never waits on the disk: another process holding SQLite's write lock, a
bounded wait for sends, and what shutdown does with messages waiting for their commit."""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Chat
from helpers import (
    collect,
    hello_events,
    need,
    need_mount_namespace,
    on_tmpfs,
    send,
    until,
    write_lock_held,
)

from tsnetchat.client import RoomSession, acks_in
from tsnetchat.pb import chat_pb2 as pb


def stored_ids(chat: Chat, room: str = "general") -> list[int]:
    db = sqlite3.connect(f"file:{chat.cfg.db_path}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute(
            "SELECT m.id FROM messages m JOIN rooms r ON r.id = m.room WHERE r.name=? "
            "ORDER BY m.id", (room,))]
    finally:
        db.close()


class Outcomes:
    """Acks and refusals of a Join stream's sends, as they arrive."""

    def __init__(self, call: Any) -> None:
        self.acks: dict[str, int] = {}
        self.errors: dict[str, pb.Error] = {}
        self.kinds: set[str] = set()  # of the events seen (replay_done: the stream is live)
        self.task = asyncio.create_task(self._read(call))

    async def _read(self, call: Any) -> None:
        async for ev in call:
            self.kinds.add(ev.WhichOneof("event") or "")
            for a in acks_in(ev):
                self.acks[a.client_msg_id] = a.id
            if ev.WhichOneof("event") == "error":
                self.errors[ev.error.client_msg_id] = ev.error

    def settled(self, *cmids: str) -> bool:
        return all(c in self.acks or c in self.errors for c in cmids)


@pytest.mark.server_config(store_wait=60.0)
async def test_while_a_send_waits_for_a_locked_database_everything_else_is_served(
        chat: Chat) -> None:
    """WhoAmI, rooms, history pages, a replay and presence are all answered while a send is
    still waiting for the lock another process holds; the send is stored once it is free."""
    alice = await chat.connect("alice@tailnet.test")
    for i in range(3):
        await alice.send_one("general", f"old{i}")
    bob = await chat.connect("bob@tailnet.test")  # (issuing a token writes a record)
    store = chat.server.store
    assert store is not None
    async with write_lock_held(chat.cfg.db_path) as lock:
        writer = alice.stub.Join(hello_events("general", after=2**62, then=[send("late", "k")]),
                                 metadata=alice.metadata)
        out = Outcomes(writer)
        await until(lambda: store.pending() == 1, "the send waits for the lock")
        assert (await bob.whoami()).identity.login == "bob@tailnet.test"
        assert [(r.name, r.last_id) for r in (await bob.list_rooms()).rooms] == [("general", 3)]
        assert [m.text for m in (await bob.history("general")).messages] == [
            "old0", "old1", "old2"]
        replay = bob.subscribe("general", after=0)
        assert [m.id for m in await collect(replay, 3)] == [1, 2, 3]
        member = bob.stub.Join(hello_events("general", after=2**62), metadata=bob.metadata)
        (joined,) = await collect(replay, 1, kind="presence")
        assert joined.who.login == "bob@tailnet.test"
        assert lock.held and store.pending() == 1 and not out.settled("k")  # still waiting
        await lock.release()
        (late,) = await collect(replay, 1)
        assert (late.id, late.text) == (4, "late")
    await until(lambda: out.settled("k"), "the send is acknowledged")
    assert out.acks == {"k": 4} and stored_ids(chat) == [1, 2, 3, 4]
    for c in (writer, replay, member):
        c.cancel()


@pytest.mark.server_config(store_wait=0.3)
async def test_sends_are_refused_as_not_stored_after_a_bounded_wait_and_work_again_after(
        chat: Chat) -> None:
    alice = await chat.connect("alice@tailnet.test")
    assert await alice.send_one("general", "before") == 1
    call = alice.stub.Join(metadata=alice.metadata)
    await call.write(pb.ClientEvent(hello=pb.Hello(room="general", after_id=2**62,
                                                   batch_acks=True)))
    out = Outcomes(call)
    async with write_lock_held(chat.cfg.db_path):
        for i in range(3):
            await call.write(send(f"locked{i}", f"l{i}"))
        await until(lambda: out.settled("l0", "l1", "l2"), "the waiting sends are refused")
    assert out.acks == {}
    for e in out.errors.values():
        assert e.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "did not take this message within 0.3s" in e.message
        assert "not stored: send it again" in e.message
        assert e.retry_after_ms > 0
    for i in range(3):  # the same messages again, once the lock is gone
        await call.write(send(f"locked{i}", f"l{i}"))
    await until(lambda: len(out.acks) == 3, "the resends are acknowledged")
    assert sorted(out.acks.values()) == [2, 3, 4]
    assert stored_ids(chat) == [1, 2, 3, 4]  # everything acknowledged, nothing else
    call.cancel()


@pytest.mark.server_config(store_wait=0.1, rate_burst=1000, rate_per_second=1000.0)
async def test_a_client_refused_for_storage_waits_the_servers_retry_after_before_resending(
        chat: Chat) -> None:
    """It waited what its pacer allowed (here a millisecond) and not the second the server
    asked for: thousands of resends in 10 s against a full disk (an operator's run)."""
    session = RoomSession(lambda: chat.connect("alice@tailnet.test"), "general")
    kinds: list[str] = []

    async def follow() -> None:
        async for ev in session.events():
            kinds.append(ev.kind)

    follower = asyncio.create_task(follow())
    await until(lambda: session.connected, "alice is in")
    async with write_lock_held(chat.cfg.db_path):
        session.send("while the disk is locked")
        await asyncio.sleep(3.0)
        refused = kinds.count("deferred")
    assert 1 <= refused <= 4, refused  # one a second (a refusal takes store_wait, 0.1 s)
    await until(lambda: "sent" in kinds, "sent once the lock is gone")
    assert stored_ids(chat) == [1]
    follower.cancel()
    await session.close()


@pytest.mark.server_config(store_wait=60.0)
async def test_on_shutdown_waiting_messages_are_stored_and_acknowledged_before_streams_close(
        chat: Chat) -> None:
    """Messages waiting for their commit when the server is told to stop are committed and
    acknowledged first; a send read after that is refused as not stored (never a bare
    UNAVAILABLE that could mean "maybe stored"); then the stream closes."""
    bob = await chat.connect("bob@tailnet.test")
    watcher = bob.subscribe("general")
    await collect(watcher, 1, kind="replay_done")
    alice = await chat.connect("alice@tailnet.test")
    call = alice.stub.Join(metadata=alice.metadata)
    await call.write(pb.ClientEvent(hello=pb.Hello(room="general", batch_acks=True)))
    events: list[pb.ServerEvent] = []

    async def read() -> grpc.StatusCode:
        try:
            async for ev in call:
                events.append(ev)
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    reader = asyncio.create_task(read())
    store = chat.server.store
    service = chat.server.service
    assert store is not None and service is not None
    async with write_lock_held(chat.cfg.db_path) as lock:
        for i in range(3):
            await call.write(send(f"m{i}", f"c{i}"))
        await until(lambda: store.pending() == 3, "three sends wait for their commit")
        stopping = asyncio.create_task(chat.server.stop(grace=5))
        await until(lambda: not service.ledger.accepting, "the server stops taking sends")
        await call.write(send("too late", "late"))
        await until(lambda: any(ev.WhichOneof("event") == "error" for ev in events),
                    "the late send is refused")
        await lock.release()
    assert await asyncio.wait_for(reader, 10) == grpc.StatusCode.UNAVAILABLE
    await asyncio.wait_for(stopping, 10)
    acks = [(a.client_msg_id, a.id) for ev in events for a in acks_in(ev)]
    assert acks == [("c0", 1), ("c1", 2), ("c2", 3)]
    (late,) = [ev.error for ev in events if ev.WhichOneof("event") == "error"]
    assert late.client_msg_id == "late" and late.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "shutting down" in late.message and "not stored" in late.message
    kinds = [ev.WhichOneof("event") for ev in events]
    assert kinds.index("going_away") > max(i for i, ev in enumerate(events) if acks_in(ev))
    assert stored_ids(chat) == [1, 2, 3]
    seen = await collect(watcher, 3, timeout=5)
    assert [m.id for m in seen] == [1, 2, 3]
    chat.server.service = None  # already stopped; the fixture's stop is then a no-op
    chat.server._grpc = None


CLI = Path(sys.executable).with_name("tsnetchat")


def on_a_small_disk(tmp_path: Path, *steps: str, timeout: float = 120) -> Any:
    """Run tests/fulldisk_child.py's ``steps`` in turn, in a mount namespace of their own on
    an 8 MB tmpfs: a real full disk. Returns the JSON of the last line they printed."""
    child = Path(__file__).with_name("fulldisk_child.py")
    disk = tmp_path / "disk"
    py = shlex.quote(sys.executable)
    run = " && ".join(f"{py} {shlex.quote(str(child))} {step} {shlex.quote(str(disk))}"
                      for step in steps)
    proc = on_tmpfs(disk, "8m", run, why="the full-disk test mounts a tmpfs", timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sends_a_hung_disk_holds_are_answered_after_store_wait_and_stored_once(
        tmp_path: Path) -> None:
    """A real hung disk: an ext4 file system of its own, frozen (``fsfreeze``), where writes
    block instead of failing. The messages queued behind the write it holds waited as long
    (none answered in 30 s, store_wait 1 s), and so did jobs (a read position, a room's
    members); so did the message in the write. Queued ones are refused as not stored; the
    one in the write is told it may still appear (and so is its resend, which the write
    may yet store), and when the thaw lets its write commit it is acknowledged and shown to
    the room's readers then. A search is answered from what is indexed (it waited for the
    writer, and was refused). A send made while the writer is still held is refused at once,
    and not kept: the queue grew by every send for as long as the disk hung, and counted
    as "messages waiting to be stored". Sent again, the others are stored once each."""
    need_mount_namespace("the hung-disk test mounts a file system")
    if not (shutil.which("mkfs.ext4") and shutil.which("fsfreeze")):
        need("mkfs.ext4 and fsfreeze", "the hung-disk test freezes an ext4 file system")
    image, disk = tmp_path / "disk.img", tmp_path / "disk"
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    disk.mkdir()
    child = Path(__file__).with_name("hungdisk_child.py")
    d = shlex.quote(str(disk))
    # The child thaws it in ``finally``; the shell after it; a watchdog if the child is killed
    # frozen (a process whose thread waits on a frozen file system cannot end until the thaw,
    # so the shell would wait for ever). The watchdog is stopped when the child ends.
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -o loop {shlex.quote(str(image))} {d} && "
         f"{{ (sleep 60 & s=$!; trap 'kill $s; exit' TERM; wait $s; fsfreeze -u {d}) "
         f">/dev/null 2>&1 & w=$!; "
         f"{shlex.quote(sys.executable)} {shlex.quote(str(child))} {d}; rc=$?; "
         f"kill $w; fsfreeze -u {d} 2>/dev/null; exit $rc; }}"],
        capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    refused = out["while_frozen"]
    assert sorted(refused) == ["a", "b", "c"], out
    assert all(refused[k].startswith("error ") and "not stored" in refused[k] and
               "within 1s" in refused[k] for k in "bc"), refused
    assert refused["a"].startswith("error the history database did not finish writing this "
                                   "message within 1s (the disk is stalled); it may still "
                                   "appear"), refused
    assert out["job"].startswith("error the history database did not take this within 1s")
    assert out["search"] == ["before"], out  # (it waited for the writer, and was refused)
    assert out["after"] == {"a": "ack 2", "b": "ack 3", "c": "ack 4"}, out
    first, again, *acks = out["said_of_a"]  # (sent again while frozen: not "not stored")
    assert out["d"].startswith("error the history database is not taking messages: a write "
                               "has not returned for over 1s (the disk is stalled); this "
                               "message was not stored"), out
    assert out["pending"] == 0, out  # (it counted the refused ones while they were queued)
    assert first == again == refused["a"] and set(acks) == {"ack 2"}, out
    assert out["seen"] == [[2, "a"], [3, "b"], [4, "c"]], out
    assert out["stored"] == ["before", "a", "b", "c"]


def test_a_restart_on_a_full_disk_serves_reads_and_refuses_sends_as_not_stored(
        tmp_path: Path) -> None:
    """A real full disk (a small tmpfs in a mount namespace of its own). The server died
    while the disk filled; started again, it serves what it has and refuses sends as not
    stored. (Issue 18: start-up pruning opened a write transaction with nothing to prune,
    and the server did not start.)"""
    out = on_a_small_disk(tmp_path, "first", "fill", "second")
    assert out["history"] == ["m0", "m1", "m2"]
    code, message = out["refused"]
    assert code == "UNAVAILABLE"
    assert "disk is full" in message and "not stored: send it again" in message


def test_a_server_with_3_mb_free_stores_paced_messages_and_stores_again_once_space_is_freed(
        tmp_path: Path) -> None:
    """Each message committed alone puts about 48 KB in the WAL, and a checkpoint came every
    100: with 3 MB free the disk was full after 49, and once full, freeing space did not
    help, as no checkpoint was asked for while every write failed (a reliability run,
    2026-11-25: 251 of 300 refused; 1,029 left pending after 2.5 MB was freed). 150 with
    3 MB free, then more on a disk filled until one is refused, then 150 once 3 MB is
    freed."""
    refused = on_a_small_disk(tmp_path, "paced", timeout=300)
    assert refused["before"] == 0 and refused["after"] == 0, refused
    assert refused["full"] == 1, refused  # (the disk was full: the test tested something)


class DiskFull:
    """The writer's connection on a full disk: every message insert fails."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" or sql.startswith("INSERT INTO messages"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, *args)


async def test_sends_refused_for_a_full_disk_are_not_strikes_and_the_stream_stays_open(
        chat: Chat, caplog: pytest.LogCaptureFixture) -> None:
    """More refusals in a row than the flooding limit (20 malformed events): a well-behaved
    client on a full disk is told each time that its message was not stored, and is never
    cut off as "flooding" (issue 18). The journal says so, a few lines, not one a send."""
    caplog.set_level(logging.WARNING, logger="tsnetchat.ledger")
    alice = await chat.connect("alice@tailnet.test")
    call = alice.stub.Join(metadata=alice.metadata)
    await call.write(pb.ClientEvent(hello=pb.Hello(room="general", after_id=2**62,
                                                   batch_acks=True)))
    out = Outcomes(call)
    writer = chat.server.store._store
    real = writer._db
    writer._db = DiskFull(real)  # type: ignore[assignment]
    cmids = [f"f{i}" for i in range(30)]
    for c in cmids:
        await call.write(send(f"text {c}", c))
    await until(lambda: out.settled(*cmids), "every send is answered")
    writer._db = real
    assert out.acks == {} and set(out.errors) == set(cmids)
    for e in out.errors.values():
        assert "database or disk is full" in e.message and "not stored" in e.message
    lines = [r.getMessage() for r in caplog.records if "refusing messages" in r.getMessage()]
    assert 1 <= len(lines) <= 4 and "database or disk is full" in lines[0], lines
    await call.write(send("room again", "ok"))
    await until(lambda: out.settled("ok"), "the same stream is answered")
    assert out.acks == {"ok": 1} and not out.task.done()  # still open, and stored
    call.cancel()


@pytest.mark.server_config(rate_burst=10**5, rate_per_second=1e5, call_burst=10**5,
                           call_rate=1e5)
async def test_a_server_started_on_a_damaged_database_says_so_and_answers_data_loss(
        chat: Chat, caplog: pytest.LogCaptureFixture) -> None:
    """It said "ready", refused sends with "send it again" (which cannot help) and reads as
    "the server does not answer", and only `doctor` named the damage (an operator's run,
    2026-11-24)."""
    from tsnetchat.server import Server

    alice = await chat.connect("alice@tailnet.test")
    for i in range(300):
        await alice.send_one("general", f"message {i} " + "words and more words " * 50)
    await chat.server.stop(grace=0.5)
    db = chat.cfg.db_path
    page = int.from_bytes(db.read_bytes()[16:18], "big")
    pages = db.stat().st_size // page
    with db.open("r+b") as f:  # garbage over a tenth of the pages, in the middle
        for n in range(pages * 6 // 10, pages * 7 // 10):
            f.seek(n * page)
            f.write(b"\xde\xad" * (page // 2))
    with caplog.at_level(logging.ERROR, logger="tsnetchat.server"):
        chat.server = Server(chat.cfg, tailnet=chat.net, pacing=chat.pacing)
        await chat.server.start()
        await until(lambda: any("is damaged" in r.getMessage() for r in caplog.records),
                    "the start-up check says so")
    said = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert said[0].startswith(f"the history database {db} is damaged ("), said
    assert said[0].endswith("the server's operator must stop it and restore the last backup "
                            "(`tsnetchat doctor` checks it; README, Troubleshooting)")
    bob = await chat.connect("bob@tailnet.test")
    assert await bob.send_one("general", "what is sound still works") == 301
    codes = []
    for before in range(25, 301, 25):
        try:
            await bob.history("general", limit=25, before=before)
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as e:
            codes.append(e.code())
            assert "is damaged" in (e.details() or "") and "send it again" not in (
                e.details() or "")
    assert grpc.StatusCode.DATA_LOSS in codes and set(codes) <= {
        grpc.StatusCode.OK, grpc.StatusCode.DATA_LOSS}, codes


def test_a_first_start_on_a_full_disk_says_so_and_leaves_no_empty_key(tmp_path: Path) -> None:
    """It said "unexpected OSError: [Errno 28] ... a bug in tsnetchat" and left an empty
    jwt.key behind (an operator's run, 2026-11-24)."""
    disk = tmp_path / "disk"
    cli = shlex.quote(str(CLI))
    d = shlex.quote(str(disk))
    proc = on_tmpfs(
        disk, "1m", f"(dd if=/dev/zero of={d}/fill bs=4k 2>/dev/null; true) && {cli} serve "
        f"--state-dir {d}/state --socket {d}/no.sock; echo exit $?; ls -A {d}/state",
        why="the full-disk test mounts a tmpfs")
    assert f"error: cannot write the signing key {disk}/state/jwt.key: No space left on device " \
        f"(the disk holding {disk}/state has 0 bytes free: free some space, then start " \
        f"again)" in proc.stderr, proc.stderr
    assert "bug" not in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stdout.split()
    assert lines[:2] == ["exit", "3"] and not [n for n in lines if "jwt.key" in n], proc.stdout


def test_a_backup_from_a_read_only_file_system_is_made_and_token_list_says_it_is_read_only(
        tmp_path: Path) -> None:
    """They said only "unable to open database file" (an operator's run, 2026-11-25). The
    backup reads the database as it is (nothing can write it there): it had to be told to
    copy the state dir to a writable disk first."""
    disk = tmp_path / "disk"
    cli = shlex.quote(str(CLI))
    d, out = shlex.quote(str(disk)), shlex.quote(str(tmp_path / "b.db"))
    proc = on_tmpfs(
        disk, "4m", f"{cli} token issue a@example.com --state-dir {d}/state >/dev/null 2>&1 "
        f"&& mount -o remount,ro {d} && {{ {cli} backup --state-dir {d}/state {out}; "
        f"echo exit $?; {cli} token list --state-dir {d}/state; echo exit $?; }}",
        why="the test mounts a read-only tmpfs")
    backed, *rest = proc.stdout.splitlines()
    assert backed.startswith("backed up 0 messages") and rest == ["exit 0", "exit 8"], (
        proc.stdout, proc.stderr)
    said = proc.stderr.splitlines()
    assert len(said) == 1 and "Traceback" not in proc.stderr
    assert f"{disk}/state is on a read-only file system (`findmnt -T {disk}/state`" in said[0]
    db = sqlite3.connect(tmp_path / "b.db")
    assert db.execute("SELECT sub FROM tokens").fetchall() == [("a@example.com",)]
    db.close()
    assert not list(tmp_path.glob(".b.db*"))


def test_the_state_dirs_lock_on_a_read_only_file_system_says_to_remount_it(
        tmp_path: Path) -> None:
    """`serve` there said "cannot open the lock file ...: Read-only file system", with no word
    of what to do (an operator's run, 2026-11-25)."""
    disk = tmp_path / "disk"
    d = shlex.quote(str(disk))
    take = ("import sys; from pathlib import Path; from tsnetchat.statedir import StateLock; "
            "from tsnetchat.errors import ConfigError\n"
            "try: StateLock(Path(sys.argv[1]), 'server')\n"
            "except ConfigError as e: print(e)")
    proc = on_tmpfs(disk, "1m", f"mkdir {d}/state && mount -o remount,ro {d} && "
                    f"{shlex.quote(sys.executable)} -c {shlex.quote(take)} {d}/state",
                    why="the test mounts a read-only tmpfs")
    said = proc.stdout.strip()
    assert said.startswith(f"cannot open the lock file {disk}/state/tsnetchat.lock: "
                           "Read-only file system"), (said, proc.stderr)
    assert f"`findmnt -T {disk}/state`" in said and "remount it read-write" in said, said


def test_lines_the_chat_cannot_keep_on_a_full_disk_leave_no_empty_file_and_say_why(
        tmp_path: Path) -> None:
    """A full disk under the chat's state left an empty unsent.txt (the next chat announced
    it as holding the lines) and the exit said nothing of it (a kill -9 run, 2026-11-24).
    Now what was there stays as it was, and the caller is told why nothing was kept."""
    disk = tmp_path / "disk"
    d = shlex.quote(str(disk))
    keep = ("import json, os, sys; from tsnetchat import tui; "
            "print(json.dumps(tui._keep_unsent(['#general: hello ' * 2000], 's:1'), "
            "default=str))")
    py = shlex.quote(sys.executable)
    proc = on_tmpfs(
        disk, "64k",
        f"mkdir -p {d}/fresh/tsnetchat {d}/old/tsnetchat && printf 'kept before\\n' > "
        f"{d}/old/tsnetchat/unsent.txt && touch -d 2026-01-02 {d}/old/tsnetchat/unsent.txt && "
        f"(dd if=/dev/zero of={d}/fill bs=4k 2>/dev/null; true) && "
        f"XDG_STATE_HOME={d}/fresh {py} -c {shlex.quote(keep)} && "
        f"XDG_STATE_HOME={d}/old {py} -c {shlex.quote(keep)} && "
        f"ls -A {d}/fresh/tsnetchat && cat {d}/old/tsnetchat/unsent.txt && "
        f"stat -c %y {d}/old/tsnetchat/unsent.txt",
        why="the full-disk test mounts a tmpfs")
    assert proc.returncode == 0, proc.stderr
    fresh, old, *rest = proc.stdout.splitlines()
    assert json.loads(fresh) == [f"{disk}/fresh/tsnetchat/unsent.txt",
                                 "No space left on device"]
    assert json.loads(old)[1] == "No space left on device"
    assert "unsent.txt" not in rest  # (ls of fresh/tsnetchat: nothing left there)
    assert rest[0] == "kept before" and rest[1].startswith("2026-01-02"), rest


@pytest.mark.server_config(store_wait=60.0)
async def test_a_member_removed_while_the_database_is_locked_is_cut_off_when_it_commits(
        chat: Chat) -> None:
    """The admin's call ends (its deadline) while the removal waits for the lock; the
    removal is stored once the lock is free, and the removed member's open stream in the
    room must end then too. (It stayed open, reading and writing the room.)"""
    admin = await chat.connect("alice@tailnet.test", chat.token("alice@tailnet.test",
                                                                admin=True))
    bob = await chat.connect("bob@tailnet.test")
    await admin.create_room("+ops", ["alice@tailnet.test", "bob@tailnet.test"])
    call = bob.stub.Join(hello_events("+ops", hold=asyncio.Event()), metadata=bob.metadata)
    await collect(call, 1, kind="replay_done")
    async with write_lock_held(chat.cfg.db_path) as lock:
        with pytest.raises(grpc.aio.AioRpcError) as gave_up:
            await admin.set_room_members("+ops", remove=["bob@tailnet.test"], timeout=0.5)
        assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await lock.release()
    with pytest.raises(grpc.aio.AioRpcError) as closed:
        await collect(call, 1, kind="never", timeout=10)
    assert closed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "removed from '+ops'" in (closed.value.details() or "")


@pytest.mark.server_config(store_wait=1.0)
async def test_a_membership_change_that_fails_after_its_caller_gave_up_is_said_in_the_log(
        chat: Chat, caplog: pytest.LogCaptureFixture) -> None:
    """The change goes on without its caller (shielded); when it then failed (the lock held
    past store_wait) nobody took its error: asyncio's "Task exception was never retrieved"
    and a traceback were all the log said, and the admin had only their deadline."""
    import gc

    admin = await chat.connect("alice@tailnet.test", chat.token("alice@tailnet.test",
                                                                admin=True))
    await chat.connect("bob@tailnet.test")
    await admin.create_room("+ops", ["alice@tailnet.test", "bob@tailnet.test"])
    caplog.set_level(logging.WARNING)
    async with write_lock_held(chat.cfg.db_path) as lock:
        with pytest.raises(grpc.aio.AioRpcError) as gave_up:
            await admin.set_room_members("+ops", remove=["bob@tailnet.test"], timeout=0.3)
        assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: "after its caller stopped waiting" in caplog.text, timeout=10)
        await lock.release()
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text
    assert ("private room '+ops': the change by 'alice@tailnet.test' failed after its caller "
            "stopped waiting (nobody was added or removed)") in caplog.text


async def test_a_database_deleted_or_replaced_under_the_server_is_written_no_more(
        chat: Chat) -> None:
    """SQLite writes on to the file it opened: a server whose database was deleted went on
    acknowledging messages (145 of 145) that nobody could read after its restart (a
    reliability run, 2026-11-25). A copy moved over it (a restore by hand), or the file
    removed, and sends are refused as not stored, saying why."""
    alice = await chat.connect("alice@tailnet.test")
    for i in range(3):
        assert await alice.send_one("general", f"m{i}") == i + 1
    db = chat.cfg.db_path
    call = alice.stub.Join(metadata=alice.metadata)
    await call.write(pb.ClientEvent(hello=pb.Hello(room="general", after_id=2**62,
                                                   batch_acks=True)))
    out = Outcomes(call)
    # (live first: in a full run the stream's own reads came after the removal, from a
    # reader thread started then, and the stream ended before its sends were answered)
    await until(lambda: "replay_done" in out.kinds, "the stream is live")
    shutil.copy(db, db.with_name("copy.db"))
    db.with_name("copy.db").rename(db)  # (over it: another file by the same name)
    await call.write(send("after the copy", "c"))
    db.unlink()
    await call.write(send("after the removal", "r"))
    await until(lambda: out.settled("c", "r"), "both are answered")
    assert out.acks == {}
    for e in out.errors.values():
        assert e.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert e.message.startswith(f"the history database {db} was deleted or replaced while "
                                    "the server had it open"), e.message
        assert "not stored: send it again" in e.message
    call.cancel()


def test_a_backup_of_a_stopped_servers_history_on_a_full_disk_is_made_on_another_disk(
        tmp_path: Path) -> None:
    """Reading the database made its -wal and -shm files, which a full disk cannot hold:
    "cannot open history database ...: disk I/O error", when a copy elsewhere is what the
    operator wants before making room (a reliability run, 2026-11-25)."""
    disk = tmp_path / "disk"
    cli = shlex.quote(str(CLI))
    d, out = shlex.quote(str(disk)), shlex.quote(str(tmp_path / "b.db"))
    proc = on_tmpfs(
        disk, "4m", f"{cli} token issue a@example.com --state-dir {d}/state >/dev/null && "
        f"(dd if=/dev/zero of={d}/fill bs=4k 2>/dev/null; true) && "
        f"{cli} backup --state-dir {d}/state {d}/here.db; echo exit $?; "
        f"{cli} backup --state-dir {d}/state {out}; echo exit $?",
        why="the full-disk test mounts a tmpfs")
    assert proc.stdout.split("\n")[0] == "exit 8", (proc.stdout, proc.stderr)  # (that disk)
    assert "database or disk is full" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout.split("\n")[1].startswith("backed up 0 messages"), proc.stdout
    assert proc.stdout.split("\n")[2] == "exit 0", (proc.stdout, proc.stderr)
    db = sqlite3.connect(tmp_path / "b.db")
    assert db.execute("SELECT sub FROM tokens").fetchall() == [("a@example.com",)]
    db.close()


def test_a_reader_opened_after_the_database_is_gone_makes_no_empty_one_in_its_place(
        tmp_path: Path) -> None:
    """A reader thread started after the database was deleted under the server made an empty
    database at its path, and its reads said "no such table" (a run of the suite,
    2026-11-25)."""
    from tsnetchat.errors import StoreError
    from tsnetchat.store import Store

    db = tmp_path / "tsnetchat.db"
    Store(db).close()
    db.unlink()
    with pytest.raises(StoreError) as refused:
        Store(db, readonly=True)
    assert str(db) in str(refused.value)
    assert not db.exists()
