"""Cluster mode (issue 20) when things die: tsnetchat servers killed, NATS nodes killed or
stopped, a server's copy deleted. Over the real tailnet lab and a real three-node NATS
JetStream cluster (``nats_cluster``: fresh per test); servers on chat-server and
chat-server-2 (helpers.two_servers)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import nats.errors
import nats_lab
import pytest
from helpers import (
    ALICE,
    BOB,
    ack_or_error,
    bounded,
    cluster_flags,
    collect,
    eventually,
    file_holds,
    jetstream,
    join,
    lab_server,
    refused,
    send,
    stream_holding,
    two_servers,
    until,
    write_lock_held,
)
from nats.js.kv import KeyValue

from tsnetchat.cluster import PRESENCE, READS, REVOKED, ROOMS, STATE, STREAM, ClusterHistory
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.rooms import NOT_VISIBLE

pytestmark = [pytest.mark.tailnet, pytest.mark.cluster]


async def unread(conn: Any, room: str) -> int:
    return next(r.unread for r in (await conn.unread()).rooms if r.name == room)


async def test_a_deletion_applied_just_before_its_only_server_died_is_erased_when_it_restarts(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster,
        monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "walrus77ochre"
    flags = cluster_flags(nats_cluster)

    async def dies_first() -> None:  # as a SIGKILL between the apply and the erasure
        await asyncio.Event().wait()

    async with jetstream(nats_cluster) as js:
        with monkeypatch.context() as m:
            m.setattr(ClusterHistory, "_erase_loop", lambda self: dies_first())
            async with lab_server(lab, tmp_path, **flags) as one:
                alice = await one.connect("alice-laptop", one.token(ALICE))
                mid = await alice.send_one("general", f"the code is {secret}")
                await alice.delete("general", mid)  # acknowledged: applied here
                assert await stream_holding(js, secret)  # ... and not erased yet
        async with lab_server(lab, tmp_path, **flags):
            await eventually(lambda: stream_holding(js, secret), lambda held: not held,
                             "the restarted server erasing the text from the stream")


async def test_a_read_mark_made_without_a_nats_quorum_reaches_the_other_server_once_it_returns(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two):
        alice = await one.connect("alice-laptop", one.token(ALICE))
        bob_one = await one.connect("bob-laptop", one.token(BOB))
        bob_two = await two.connect("bob-laptop", two.token(BOB))
        await alice.send_one("general", "one")
        last = await alice.send_one("general", "two")
        await eventually(lambda: unread(bob_two, "general"), lambda n: n == 2, "server 2")
        # The bucket's leader and another node: the one left cannot keep the write for
        # later (docs/nats-cluster.md, fact 5), so it is lost unless shared again.
        leader = nats_cluster.stream_leader(f"KV_{READS}")
        stopped = [leader, next(n.name for n in nats_cluster.nodes if n.name != leader)]
        for name in stopped:
            nats_cluster.kill(name)
        assert await bob_one.mark_read("general", last) == last  # kept on server 1
        for name in stopped:
            nats_cluster.start_node(name)
        await eventually(lambda: unread(bob_two, "general"), lambda n: n == 0,
                         "bob's read mark reaching server 2", timeout=30)


async def test_a_server_starts_when_the_cluster_first_leaves_each_of_its_watches_unanswered(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # As in a CI run (2026-11-22): a new bucket's consumer was not made within nats-py's
    # 5 s, and the server did not start. Here the first ask for each watch times out.
    unanswered: list[tuple[str, str]] = []
    real_watch = KeyValue.watch

    async def watch(self: KeyValue, keys: str, **kwargs: Any) -> Any:
        if (self._name, keys) not in unanswered:
            unanswered.append((self._name, keys))
            raise nats.errors.TimeoutError
        return await real_watch(self, keys, **kwargs)

    monkeypatch.setattr(KeyValue, "watch", watch)
    async with lab_server(lab, tmp_path, **cluster_flags(nats_cluster)) as one:
        alice = await one.connect("alice-laptop", one.token(ALICE))
        assert await alice.send_one("general", "hello") > 0
        await until(lambda: one.server.store.servers == {"chat-server": one.server.ports[0]},
                    "server 1 listing itself for failover", 10)
    assert sorted(unanswered) == sorted([
        (PRESENCE, ">"), (READS, ">"), (REVOKED, ">"), (ROOMS, ">"),
        (STATE, "signing-key"), (STATE, "server.*")])


async def test_a_burst_from_both_servers_across_a_stream_leader_kill_loses_and_doubles_nothing(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster, rate_burst=1000,
                           rate_per_second=1000.0) as (one, two):
        conns = [await one.connect("alice-laptop", one.token(ALICE)),
                 await two.connect("bob-laptop", two.token(BOB))]
        alice, bob = [await join(c, "general") for c in conns]
        acked: dict[str, int] = {}

        async def burst(call: Any, who: str, n: int) -> None:
            for i in range(n):
                cmid = f"{who}-{i}"
                while True:  # as a client does: the same message again until confirmed
                    await call.write(send(f"{who} {i}", cmid))
                    answer = await ack_or_error(call, cmid, timeout=60)
                    if isinstance(answer, pb.Sent):
                        acked[cmid] = answer.id
                        break
                    assert answer.code == grpc.StatusCode.UNAVAILABLE.value[0], answer

        sending = [asyncio.create_task(burst(c, w, 30)) for c, w in ((alice, "a"), (bob, "b"))]
        await until(lambda: len(acked) >= 10, "the burst under way", 30)
        nats_cluster.kill(nats_cluster.stream_leader("TSNETCHAT"))
        await asyncio.gather(*sending)
        assert sorted(acked.values()) == list(range(1, 61))  # no gap, no double
        for server in (one, two):
            await until(lambda s=server: s.server.store.last_id("general") == 60,
                        "both copies applying", 30)
        for conn in conns:  # every acknowledged message, under its id, on both copies
            history = await conn.history("general", limit=100)
            assert {m.client_msg_id: m.id for m in history.messages} == acked
        alice.cancel()
        bob.cancel()


async def test_a_copy_rebuilt_after_a_member_was_removed_and_a_text_deleted_keeps_both(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    secret = "ferret31indigo"
    flags = cluster_flags(nats_cluster)
    async with lab_server(lab, tmp_path, **flags) as one:
        admin = await one.connect("alice-laptop", one.token(ALICE, admin=True))
        await admin.create_room("+ops", [ALICE, BOB])
        async with lab_server(lab, tmp_path, node="chat-server-2", **flags) as two:
            db = Path(two.cfg.db_path)
            bob = await two.connect("bob-laptop", two.token(BOB))
            mid = await eventually(lambda: bob.send_one("+ops", f"the key is {secret}"),
                                   lambda i: i > 0, "bob posting in +ops")
            # (server 1 applies it a moment after server 2 answered: a deletion made
            # through server 1 before that found "no message 1"; a loaded CI run,
            # 2026-11-25)
            await eventually(lambda: admin.history("+ops"),
                             lambda page: any(m.id == mid for m in page.messages),
                             "server 1 applying bob's message")
        # Server 2 is down: bob is removed, his text deleted; then its copy is lost.
        await admin.set_room_members("+ops", remove=[BOB])
        await admin.delete("+ops", mid)
        for f in db.parent.glob(db.name + "*"):
            f.unlink()
        async with lab_server(lab, tmp_path, node="chat-server-2", **flags) as two:
            bob = await two.connect("bob-laptop", two.token(BOB))
            assert (await refused(bob.history("+ops"))).details() == NOT_VISIBLE
            assert "+ops" not in [r.name for r in (await bob.list_rooms()).rooms]
            alice = await two.connect("alice-laptop", two.token(ALICE))
            page = await alice.history("+ops")
            assert [(m.id, m.text, m.deleted_by) for m in page.messages if m.id == mid] == [
                (mid, "", ALICE)]
            assert not file_holds(db, secret)


async def test_when_the_streams_consumers_stop_delivering_each_server_subscribes_again(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster,
        caplog: pytest.LogCaptureFixture) -> None:
    # A paused consumer delivers nothing and goes on sending heartbeats, so nats-py sees
    # nothing wrong: a stall its own recovery never notices.
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two), \
            jetstream(nats_cluster) as js:
        alice = await one.connect("alice-laptop", one.token(ALICE))
        bob = await two.connect("bob-laptop", two.token(BOB))
        call = await join(alice, "general", then=[send("before the stall", "s0")])
        assert isinstance(await ack_or_error(call, "s0"), pb.Sent)
        consumers = [c.name for c in await js.consumers_info(STREAM)]
        assert len(consumers) >= 2  # (one per server)
        for name in consumers:
            await js.pause_consumer(STREAM, name, "2099-01-01T00:00:00Z")
        # Each server acknowledges a send once its own copy has applied it.
        await call.write(send("still there?", "s1"))
        assert isinstance(await ack_or_error(call, "s1"), pb.Sent)
        mid = await bob.send_one("general", "during the stall")
        history = await eventually(lambda: alice.history("general"),
                                   lambda h: len(h.messages) == 3, "server 1 applying")
        assert [m.text for m in history.messages] == [
            "before the stall", "still there?", "during the stall"]
        assert history.messages[-1].id == mid
        assert "the stream's consumer delivered nothing" in caplog.text
        call.cancel()


async def test_a_server_stops_in_time_with_a_message_its_stalled_copy_never_applied(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def never_notices() -> None:  # a stall the server does not recover from
        await asyncio.Event().wait()

    monkeypatch.setattr(ClusterHistory, "_watch_consumer", lambda self: never_notices())
    async with two_servers(lab, tmp_path, nats_cluster, cluster_wait=2.0) as (one, _two), \
            jetstream(nats_cluster) as js:
        alice = await one.connect("alice-laptop", one.token(ALICE))
        call = await join(alice, "general")
        for c in await js.consumers_info(STREAM):
            await js.pause_consumer(STREAM, c.name, "2099-01-01T00:00:00Z")
        await call.write(send("in the stream, never applied on server 1", "n1"))
        await eventually(lambda: js.stream_info(STREAM), lambda i: i.state.messages == 1,
                         "the stream holding it")
        # Before: server 1 waited for it to be applied, for ever (systemd's stop timeout).
        await bounded(one.server.stop(grace=0.2), "stopping server 1", timeout=30)
        assert "stopping with 1 message(s) not applied here" in caplog.text
        call.cancel()


async def test_a_message_the_stream_took_while_the_copy_was_locked_is_refused_in_time_and_kept_once(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """Another process holds the write lock of server 1's copy (cluster.db) while the stream
    acknowledges a message: its sender waited for the copy with no deadline (a `send` until
    its own time-out, a /topic until the client's deadline; a kill -9 run, 2026-11-25)."""
    flags = {**cluster_flags(nats_cluster), "cluster_wait": 3.0, "store_wait": 1.0}
    text = "sent while the copy was locked"
    async with lab_server(lab, tmp_path, **flags) as one, jetstream(nats_cluster) as js:
        alice = await one.connect("alice-laptop", one.token(ALICE))
        call = await join(alice, "general", then=[send("before the lock", "m0")])
        assert isinstance(await ack_or_error(call, "m0"), pb.Sent)
        async with write_lock_held(one.cfg.db_path) as lock:
            began = time.monotonic()
            await call.write(send(text, "m1"))
            refusal = await ack_or_error(call, "m1", timeout=20)
            assert isinstance(refusal, pb.Error), refusal
            assert refusal.code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert time.monotonic() - began < 3.0 + 2  # cluster_wait, with room for a slow CI
            assert "the chat cluster has this message" in refusal.message
            assert "this server cannot write its copy of the stream" in refusal.message
            with pytest.raises(grpc.aio.AioRpcError) as topic:
                await alice.set_topic("general", "set while locked", timeout=10)
            assert topic.value.code() == grpc.StatusCode.UNAVAILABLE, topic.value
            # Sent again meanwhile: refused again, and not appended to the stream twice.
            await call.write(send(text, "m1"))
            assert isinstance(await ack_or_error(call, "m1", timeout=20), pb.Error)
            assert len(await stream_holding(js, text)) == 1
            await lock.release()
        shown = await collect(call.call, 2, timeout=20)  # applied once the lock is gone
        assert [(m.text, m.kind) for m in shown] == [
            (text, pb.MESSAGE_KIND_TEXT), ("set while locked", pb.MESSAGE_KIND_TOPIC)]
        # Stored through this server, so counted here, as every other of its messages is.
        assert one.server.metrics.counters["messages_total"] == 3
        await call.write(send(text, "m1"))
        resent = await ack_or_error(call, "m1")
        assert isinstance(resent, pb.Sent) and resent.id == shown[0].id
        history = await alice.history("general")
        assert [m.text for m in history.messages if m.kind == pb.MESSAGE_KIND_TEXT] == [
            "before the lock", text]
        assert len(await stream_holding(js, text)) == 1
        call.cancel()


async def test_doctor_says_the_cluster_refused_the_servers_credentials_and_which_to_check(
        tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """It said only "nats: 'Authorization Violation'" (an operator's run, 2026-11-25)."""
    from tsnetchat.config import load_config
    from tsnetchat.doctor import FAIL, _cluster

    cfg = load_config(env={}, flags={**cluster_flags(nats_cluster), "nats_password": "wrong",
                                     "state_dir": str(tmp_path / "doctor")})
    found = await _cluster(cfg)
    assert found.verdict == FAIL, found
    assert "refused this server's credentials: check nats_user and its password" in found.detail


async def test_doctor_says_whether_the_cluster_has_its_stream_a_leader_and_every_copy(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """With two of three NATS nodes down every send was refused as not confirmed, and doctor
    did not look (an operator's run)."""
    from tsnetchat.config import load_config
    from tsnetchat.doctor import FAIL, OK, WARN, _cluster

    cfg = load_config(env={}, flags={**cluster_flags(nats_cluster),
                                     "state_dir": str(tmp_path / "doctor")})
    assert (await _cluster(cfg)).verdict == WARN  # no stream yet
    async with lab_server(lab, tmp_path, **cluster_flags(nats_cluster)):
        found = await _cluster(cfg)
        assert found.verdict == OK and "3 copies current" in found.detail, found
        leader = nats_cluster.stream_leader(STREAM)
        other = next(n.name for n in nats_cluster.nodes if n.name != leader)
        nats_cluster.kill(other)
        found = await eventually(lambda: _cluster(cfg), lambda c: c.verdict != OK,
                                 "the leader noticing a copy gone", timeout=30)
        assert found.verdict == WARN, found
        assert f"offline or behind: {other}; 2 of 3 copies current: 1 more lost" in found.detail
        nats_cluster.kill(leader)
        found = await eventually(lambda: _cluster(cfg), lambda c: c.verdict == FAIL,
                                 "doctor seeing no quorum", timeout=30)
        assert "did not answer" in found.detail or "no leader" in found.detail, found
        for name in (leader, other):
            nats_cluster.start_node(name)
        # The two that do not lead: the leader goes on naming itself for a while, and doctor
        # said "no problems; 1 warning" while every send was refused (2026-11-24).
        found = await eventually(lambda: _cluster(cfg), lambda c: c.verdict == OK,
                                 "the cluster whole again", timeout=60)
        leader = nats_cluster.stream_leader(STREAM)
        others = [n.name for n in nats_cluster.nodes if n.name != leader]
        for name in others:
            nats_cluster.kill(name)
        found = await eventually(lambda: _cluster(cfg), lambda c: c.verdict == FAIL or all(
            n in c.detail for n in others), "the leader noticing both gone", timeout=30)
        assert found.verdict == FAIL, found
        for name in others:
            nats_cluster.start_node(name)
