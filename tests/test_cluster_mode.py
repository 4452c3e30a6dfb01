"""Cluster mode (issue 20) over the real tailnet lab and a real three-node NATS cluster.

Server 1 runs on the lab's chat-server node, server 2 on chat-server-2; both in this
process, each asking its own tailscaled who is calling, both on the same NATS JetStream
cluster (``nats_cluster``: fresh per test). People connect over the tailnet from their
laptops' tailscaled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import nats
import nats_lab
import pytest
from helpers import (
    ALICE,
    BOB,
    CLI,
    LabChat,
    LabDaemon,
    Talker,
    ack_or_error,
    cluster_flags,
    collect,
    eventually,
    free_port,
    hello_events,
    jetstream,
    join,
    lab_server,
    placed,
    send,
    server_1_killed_mid_conversation,
    token_id,
    two_servers,
    until,
    write_lock_held,
)

from tsnetchat import clientcmds, cluster
from tsnetchat.client import link_for
from tsnetchat.clienterrors import ClientError
from tsnetchat.errors import StoreError
from tsnetchat.pb import chat_pb2 as pb

pytestmark = [pytest.mark.tailnet, pytest.mark.cluster]

async def closed_as(call: Any, code: grpc.StatusCode, timeout: float = 10) -> str:
    """The Join stream ``call`` is (or, within ``timeout``, gets) closed with ``code``; the
    status's details."""
    with pytest.raises(grpc.aio.AioRpcError) as closed:
        await collect(call.call, 1, timeout=timeout)
    assert closed.value.code() == code
    return closed.value.details() or ""


async def refused_anew(chat: LabChat, token: str) -> None:
    """A new connection from alice's laptop to ``chat`` with ``token`` is refused (revoked)."""
    fresh = await chat.connect("alice-laptop", token)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await fresh.whoami()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_alice_on_server_1_and_bob_on_server_2_chat_in_one_room(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two):
        alice = await one.connect("alice-laptop", one.token(ALICE))
        bob = await two.connect("bob-laptop", two.token(BOB))
        bob_sees = await join(bob, "general")
        alice_sees = await join(alice, "general")
        first = await alice.send_one("general", "hello from server 1")
        [m] = await collect(bob_sees.call, 1)
        assert (m.id, m.text, m.sender.login) == (first, "hello from server 1", ALICE)
        second = await bob.send_one("general", "hello back from server 2")
        got = await collect(alice_sees.call, 2)
        assert [(x.id, x.sender.login) for x in got] == [(first, ALICE), (second, BOB)]
        assert second == first + 1
        on_one = await alice.history("general")
        on_two = await bob.history("general")
        assert [(x.id, x.text) for x in on_one.messages] == [
            (x.id, x.text) for x in on_two.messages] == [
            (first, "hello from server 1"), (second, "hello back from server 2")]
        assert {r.name: r.last_id for r in (await bob.list_rooms()).rooms}["general"] == second
        bob_sees.cancel()
        alice_sees.cancel()


async def test_a_resend_through_the_other_server_gets_the_original_id(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two):
        token = one.token(ALICE)
        on_one = await one.connect("alice-laptop", token)
        on_two = await two.connect("alice-laptop", token)
        cmid = uuid.uuid4().hex
        first = await join(on_one, "general", then=[send("typed once", cmid)])
        stored = await ack_or_error(first, cmid)
        again = await join(on_two, "general", after=stored.id, then=[send("typed once", cmid)])
        resent = await ack_or_error(again, cmid)
        assert isinstance(resent, pb.Sent) and resent.id == stored.id
        history = await on_two.history("general")
        assert [m.text for m in history.messages] == ["typed once"]
        first.cancel()
        again.cancel()


async def test_a_burst_sent_through_server_2_uses_up_alices_rate_on_server_1_too(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """The rate limit holds across servers: what she sent through one counts on the others
    (Ledger.applied, charging the sender of another server's message); each message counts
    as stored only on the server it was sent through (messages_total)."""
    async with two_servers(lab, tmp_path, nats_cluster, rate_burst=3,
                           rate_per_second=0.01) as (one, two):
        token = one.token(ALICE)
        through_two = await join(await two.connect("alice-laptop", token), "general")
        for i in range(3):
            await through_two.write(send(f"burst {i}", f"b{i}"))
            assert isinstance(await ack_or_error(through_two, f"b{i}"), pb.Sent)
        alice = await one.connect("alice-laptop", token)
        for _ in range(100):  # until server 1 has applied them
            if len((await alice.history("general")).messages) == 3:
                break
            await asyncio.sleep(0.1)
        through_one = await join(alice, "general")
        await through_one.write(send("one more", "m"))
        refused = await ack_or_error(through_one, "m")
        assert isinstance(refused, pb.Error) and "slow down" in refused.message, refused
        assert one.server.metrics.counters["messages_total"] == 0
        assert two.server.metrics.counters["messages_total"] == 3
        through_two.cancel()
        through_one.cancel()


async def test_sends_go_on_when_one_nats_node_dies_and_nothing_acknowledged_is_lost(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two):
        alice = await one.connect("alice-laptop", one.token(ALICE))
        bob = await two.connect("bob-laptop", two.token(BOB))
        call = await join(alice, "general")
        acked: dict[str, int] = {}
        for i in range(5):
            cmid = f"before-{i}"
            await call.write(send(f"before {i}", cmid))
            answer = await ack_or_error(call, cmid)
            acked[cmid] = answer.id
        # The stream's leader: its death stalls appends for an election (4-9 s).
        nats_cluster.kill(nats_cluster.stream_leader("TSNETCHAT"))
        for i in range(5):
            cmid = f"after-{i}"
            while True:  # as a client does: resend the same message until it is confirmed
                await call.write(send(f"after {i}", cmid))
                answer = await ack_or_error(call, cmid)
                if isinstance(answer, pb.Sent):
                    acked[cmid] = answer.id
                    break
                assert answer.code == grpc.StatusCode.UNAVAILABLE.value[0]
        ids = sorted(acked.values())
        assert ids == list(range(ids[0], ids[0] + 10))
        # Server 2 applies what server 1 stored from the stream, a moment later.
        await until(lambda: two.server.store.last_id("general") == ids[-1], "server 2 applying")
        for conn in (alice, bob):
            history = await conn.history("general")
            assert sorted((m.client_msg_id, m.id) for m in history.messages) == sorted(
                acked.items(), key=lambda kv: kv[0])
        call.cancel()


async def test_without_a_nats_quorum_sends_are_refused_as_retryable_and_succeed_when_it_returns(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # (several attempts within cluster_wait, as with the defaults: a later one was refused as
    # "wrong last sequence (10164)", and those words reached people; 2026-11-24)
    monkeypatch.setattr(cluster, "ATTEMPT_TIMEOUT", 0.5)
    async with two_servers(lab, tmp_path, nats_cluster, cluster_wait=2.0) as (one, two):
        alice = await one.connect("alice-laptop", one.token(ALICE))
        bob = await two.connect("bob-laptop", two.token(BOB))
        call = await join(alice, "general", then=[send("with a quorum", "q0")])
        assert isinstance(await ack_or_error(call, "q0"), pb.Sent)
        stopped = [n.name for n in nats_cluster.nodes][:2]
        for name in stopped:
            nats_cluster.stop_node(name)
        await call.write(send("without a quorum", "q1"))
        refusal = await ack_or_error(call, "q1")
        assert isinstance(refusal, pb.Error)
        assert refusal.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "did not confirm" in refusal.message and "same client_msg_id" in refusal.message
        assert "10164" not in refusal.message and "wrong last" not in refusal.message, refusal
        assert refusal.retry_after_ms > 0
        # `tsnetchat send` (the client core) says so too, not "it was not stored": that
        # message, too, appeared once the cluster was back (a script resending it posted it
        # twice; an operator's run, 2026-11-23)
        a = lab.nodes["alice-laptop"]
        link = link_for("chat-server", one.token(ALICE), socket=a.socket, port=one.port,
                        proxy=f"http://{a.http_proxy}")
        await link.get()  # (dialled first, as below: the 5 s are the message's)
        with pytest.raises(ClientError) as unsure:
            await clientcmds.send(link, "random", "sent by a script", kind=1, timeout=5.0,
                                  json_out=False)
        assert "may still store it" in str(unsure.value), str(unsure.value)
        assert "not stored" not in str(unsure.value) and "not sent" not in str(unsure.value)
        # ...also when its --timeout ends before the cluster's refusal (cluster_wait) comes:
        # "it was not stored" (a kill -9 run, 2026-11-24)
        link = link_for("chat-server", one.token(ALICE), socket=a.socket, port=one.port,
                        proxy=f"http://{a.http_proxy}")
        await link.get()  # (dialled first: the 1.5 s are the message's)
        with pytest.raises(ClientError) as early:
            await clientcmds.send(link, "random", "sent with a short timeout", kind=1,
                                  timeout=1.5, json_out=False)
        assert "may still store it" in str(early.value), str(early.value)
        for name in stopped:
            nats_cluster.start_node(name)
        give_up = time.monotonic() + 60
        while True:  # the client's resend, with the same id, until the cluster confirms it
            await call.write(send("without a quorum", "q1"))
            answer = await ack_or_error(call, "q1")
            if isinstance(answer, pb.Sent):
                break
            assert answer.code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert time.monotonic() < give_up, f"still refused after 60 s: {answer.message}"
        await until(lambda: two.server.store.last_id("general") == answer.id,
                    "server 2 applying")
        history = await bob.history("general")
        assert [m.client_msg_id for m in history.messages] == ["q0", "q1"]
        call.cancel()


@pytest.mark.parametrize("election", [False, True],
                         ids=["bucket-led", "while-the-revocations-bucket-elects-a-leader"])
async def test_a_token_revoked_through_server_2_closes_alices_stream_on_server_1(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster, election: bool) -> None:
    # (elections measured 4-9 s; cluster_wait's 12 s default left little room on a loaded
    # machine: a review, 2026-11-25)
    async with two_servers(lab, tmp_path, nats_cluster, cluster_wait=30.0) as (one, two):
        token = one.token(ALICE)
        alice = await one.connect("alice-laptop", token)
        # alice's admin token (the lab grants alice admin), on her laptop, through server 2
        admin = await two.connect("alice-laptop", two.token(ALICE, admin=True))
        call = await join(alice, "general")
        if election:  # no leader for the bucket until the other two nodes elect one
            leader = nats_cluster.stream_leader("KV_" + cluster.REVOKED)
            assert leader
            nats_cluster.kill(leader)
        started = time.monotonic()
        await admin.stub.RevokeToken(pb.RevokeTokenRequest(token_id=token_id(token)),
                                     metadata=admin.metadata)
        await closed_as(call, grpc.StatusCode.UNAUTHENTICATED)
        print(f"revoked on server 2 -> closed on server 1: {time.monotonic() - started:.3f}s")
        await refused_anew(one, token)


async def test_a_token_revoked_through_server_1_counts_the_streams_it_closed_there(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """The cluster's word of the revocation came back to server 1 and closed alice's streams
    before RevokeToken counted them: it answered, and logged, 0 streams closed (an
    attacker's run over the lab, 2026-11-25)."""
    async with two_servers(lab, tmp_path, nats_cluster) as (one, _two):
        admin = await one.connect("alice-laptop", one.token(ALICE, admin=True))
        said = []
        for _ in range(5):  # (which comes first is a race: 2 runs in 3 said 0 by hand)
            token = one.token(ALICE)
            alice = await one.connect("alice-laptop", token)
            calls = [await join(alice, room) for room in ("general", "random")]
            res = await admin.stub.RevokeToken(pb.RevokeTokenRequest(token_id=token_id(token)),
                                               metadata=admin.metadata)
            for call in calls:
                await closed_as(call, grpc.StatusCode.UNAUTHENTICATED)
            said.append(res.streams_closed)
        assert said == [2] * 5


async def test_a_revocation_without_a_nats_quorum_is_refused_and_the_token_works_until_it_succeeds(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster, cluster_wait=2.0) as (one, two):
        token = one.token(ALICE)
        alice = await one.connect("alice-laptop", token)
        admin = await two.connect("alice-laptop", two.token(ALICE, admin=True))
        call = await join(alice, "general")
        stopped = [n.name for n in nats_cluster.nodes][:2]
        for name in stopped:
            nats_cluster.stop_node(name)
        revoke = pb.RevokeTokenRequest(token_id=token_id(token))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.stub.RevokeToken(revoke, metadata=admin.metadata)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "nothing was revoked, try again" in refused.value.details()
        # As it said: the token still works, on server 2 as on server 1.
        assert (await alice.whoami()).identity.login == ALICE
        fresh = await two.connect("alice-laptop", token)
        assert (await fresh.whoami()).identity.login == ALICE
        for name in stopped:
            nats_cluster.start_node(name)

        async def revoked() -> str:  # as the refusal says: again, until the bucket has a leader
            try:
                await admin.stub.RevokeToken(revoke, metadata=admin.metadata)
            except grpc.aio.AioRpcError as e:  # (its leader elected after cluster_wait, 2 s)
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                return e.details() or ""
            return "revoked"

        await eventually(revoked, lambda said: said == "revoked", "the revocation, tried again",
                         timeout=30)
        # (open through the refusal, closed now)
        await closed_as(call, grpc.StatusCode.UNAUTHENTICATED)


async def test_without_a_nats_quorum_a_room_change_is_refused_before_the_callers_deadline(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    # The server would wait up to cluster_wait (30 s) for the ROOMS bucket; the caller waits
    # 3 s, so it must hear the server's reason within those, not its own DEADLINE_EXCEEDED.
    async with two_servers(lab, tmp_path, nats_cluster, cluster_wait=30.0) as (one, _two):
        admin = await one.connect("alice-laptop", one.token(ALICE, admin=True))
        for name in [n.name for n in nats_cluster.nodes][:2]:
            nats_cluster.stop_node(name)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.stub.CreateRoom(pb.CreateRoomRequest(room="+ops", members=[BOB]),
                                        metadata=admin.metadata, timeout=3.0)
        took = time.monotonic() - started
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        assert "the cluster did not confirm the change of '+ops'" in refused.value.details()
        assert took < 3.0, took
        print(f"refused after {took:.2f}s")


def operator(chat: LabChat | Path, cluster: nats_lab.NatsCluster, *args: str) -> str:
    """`tsnetchat ARGS` as an operator runs it on that server's machine (or the one whose
    state directory is given), whose config names the cluster (so the command opens the
    server's cluster.db)."""
    state_dir = chat if isinstance(chat, Path) else chat.cfg.state_dir
    env = {**os.environ, "TSNETCHAT_CLUSTER": ",".join(cluster.urls)}
    return subprocess.run([CLI, *args, "--state-dir", str(state_dir)], env=env,
                          capture_output=True, text=True, check=True, timeout=60).stdout


async def test_a_token_revoked_with_the_cli_on_server_2s_machine_closes_alices_stream_on_server_1(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two):
        token = one.token(ALICE)
        jti = token_id(token)

        def listed(chat: LabChat) -> set[str]:
            rows = json.loads(operator(chat, nats_cluster, "token", "list", "--json"))
            return {r["jti"] for r in rows}

        assert jti in listed(one) and jti not in listed(two)  # records are not shared (README)
        alice = await one.connect("alice-laptop", token)
        call = await join(alice, "general")
        assert operator(two, nats_cluster, "token", "revoke", jti).strip() == f"revoked {jti}"
        await closed_as(call, grpc.StatusCode.UNAUTHENTICATED)
        await refused_anew(one, token)


async def test_a_cli_revocation_made_without_a_nats_quorum_reaches_the_other_server_when_it_returns(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two):
        token = one.token(ALICE)
        alice = await one.connect("alice-laptop", token)
        call = await join(alice, "general")
        stopped = [n.name for n in nats_cluster.nodes][:2]
        for name in stopped:
            nats_cluster.stop_node(name)
        jti = token_id(token)
        assert operator(two, nats_cluster, "token", "revoke", jti).strip() == f"revoked {jti}"
        await until(lambda: jti in two.server.gate.revoked, "server 2 taking the revocation")
        for name in stopped:
            nats_cluster.start_node(name)
        await closed_as(call, grpc.StatusCode.UNAUTHENTICATED, timeout=30)


async def test_a_cli_revocation_made_while_its_server_was_down_reaches_the_other_server_at_start(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    flags = cluster_flags(nats_cluster)
    async with lab_server(lab, tmp_path, **flags) as one:
        token = one.token(ALICE)
        alice = await one.connect("alice-laptop", token)
        call = await join(alice, "general")
        async with lab_server(lab, tmp_path, node="chat-server-2", **flags) as two:
            state_2 = two.cfg.state_dir
        jti = token_id(token)
        assert operator(state_2, nats_cluster, "token", "revoke", jti).strip() == f"revoked {jti}"
        async with lab_server(lab, tmp_path, node="chat-server-2", **flags):
            await closed_as(call, grpc.StatusCode.UNAUTHENTICATED, timeout=30)


async def test_a_server_joining_after_a_revocation_refuses_the_token_from_its_first_call(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """A server with no copy of its own yet (new, or its cluster.db deleted) took the
    cluster's revocations only at its first poll of that copy: a revoked token worked
    there for a second after it was ready (a kill -9 run, 2026-11-24)."""
    flags = cluster_flags(nats_cluster)
    async with lab_server(lab, tmp_path, **flags) as one:
        token = one.token(ALICE)
        admin = await one.connect("alice-laptop", one.token(ALICE, admin=True))
        await admin.stub.RevokeToken(pb.RevokeTokenRequest(token_id=token_id(token)),
                                     metadata=admin.metadata)
        async with lab_server(lab, tmp_path, node="chat-server-2", **flags) as two:
            assert token_id(token) in two.server.gate.revoked  # (as it starts to serve)
            await refused_anew(two, token)


async def test_a_server_that_starts_later_catches_up_from_the_stream(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    flags = cluster_flags(nats_cluster)
    async with lab_server(lab, tmp_path, **flags) as one:
        alice = await one.connect("alice-laptop", one.token(ALICE))
        ids = [await alice.send_one("general", f"early {i}") for i in range(3)]
        async with lab_server(lab, tmp_path, node="chat-server-2", **flags) as two:
            bob = await two.connect("bob-laptop", two.token(BOB))
            history = await bob.history("general")
            assert [m.id for m in history.messages] == ids
            await until(lambda: two.server.store.last_id("general") == ids[-1])


async def test_a_server_started_with_a_smaller_retention_does_not_shrink_the_clusters_history(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster,
        caplog: pytest.LogCaptureFixture) -> None:
    """It cut the shared stream to its own retention_count: everyone's history, said only
    in its own log (an operator's run, 2026-11-23)."""
    flags = cluster_flags(nats_cluster)
    async with lab_server(lab, tmp_path, **flags) as one:
        alice = await one.connect("alice-laptop", one.token(ALICE))
        for i in range(6):
            await alice.send_one("general", f"kept {i}")
        async with lab_server(lab, tmp_path, node="chat-server-2", retention_count=3, **flags):
            async with jetstream(nats_cluster) as js:
                info = await js.stream_info(cluster.STREAM)
            assert info.config.max_msgs_per_subject == one.cfg.retention_count
            assert info.state.messages >= 6
    assert "retention stays the cluster's" in caplog.text


async def test_a_server_started_with_another_replica_count_serves_on_the_clusters(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster,
        caplog: pytest.LogCaptureFixture) -> None:
    """Started with cluster_replicas 1 on a cluster the first server made with 3, it waited
    out startup_timeout and stopped with NATS's words about its state bucket ("stream name
    already in use with a different configuration"), naming no setting (a lab run,
    2026-11-25)."""
    flags = cluster_flags(nats_cluster)
    async with lab_server(lab, tmp_path, **flags) as one:
        alice = await one.connect("alice-laptop", one.token(ALICE))
        await alice.send_one("general", "made with 3 copies")
        async with lab_server(lab, tmp_path, node="chat-server-2", cluster_replicas=1,
                              **flags) as two:
            bob = await two.connect("bob-laptop", two.token(BOB))
            await bob.send_one("general", "sent through a server set to 1")
            async with jetstream(nats_cluster) as js:
                copies = {(await js.stream_info(name)).config.num_replicas
                          for name in (cluster.STREAM, f"KV_{cluster.STATE}",
                                       f"KV_{cluster.KICKS}", f"KV_{cluster.ROOMS}")}
            assert copies == {3}
            history = await bob.history("general")
            assert [m.text for m in history.messages] == [
                "made with 3 copies", "sent through a server set to 1"]
    assert "not this server's cluster_replicas (1)" in caplog.text


async def test_a_bucket_made_otherwise_by_hand_stops_the_start_in_words_that_name_it(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """Not a passing state of the cluster, yet tried again until startup_timeout, then
    given in nats-py's words (a lab run, 2026-11-25)."""
    async with jetstream(nats_cluster) as js:
        await placed(lambda: js.create_key_value(bucket=cluster.KICKS, replicas=3, history=5),
                     cluster.KICKS)
    with pytest.raises(StoreError) as refused_start:
        async with lab_server(lab, tmp_path, **cluster_flags(nats_cluster)):
            pass
    said = str(refused_start.value)
    assert said.startswith("cluster: could not set up the kicks bucket: the NATS cluster has "
                           "it with another configuration than this server's"), said


async def test_when_server_1_is_killed_alice_goes_on_through_server_2_losing_nothing(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    env = {"TSNETCHAT_CLUSTER": ",".join(nats_cluster.urls),
           "TSNETCHAT_NATS_USER": nats_cluster.user,
           "TSNETCHAT_NATS_PASSWORD": nats_cluster.password}
    one = LabDaemon(lab, tmp_path / "state-1", free_port(), (), env).start()
    two = LabDaemon(lab, tmp_path / "state-2", free_port(), (), env, node="chat-server-2")
    people: list[Talker] = []
    try:
        two.start()
        a, b = lab.nodes["alice-laptop"], lab.nodes["bob-laptop"]
        alice = Talker(link_for("chat-server", one.token(ALICE), socket=a.socket,
                                port=one.port, proxy=f"http://{a.http_proxy}"), "general")
        bob = Talker(link_for("chat-server-2", two.token(BOB), socket=b.socket,
                              port=two.port, proxy=f"http://{b.http_proxy}"), "general")
        people += [alice, bob]
        await server_1_killed_mid_conversation(one, alice, bob)
        ids = [m.id for m in alice.messages]
        conn = await bob.link.get()
        history = await conn.history("general")
        assert [m.id for m in history.messages] == ids
    finally:
        for p in people:
            await p.close()  # (its link too)
        one.stop()
        two.stop()


async def test_a_resume_through_a_server_whose_copy_is_behind_waits_for_it_never_starting_over(
        lab: Any, tmp_path: Path, nats_cluster: Any) -> None:
    """bob saw message 2 through server 1 and resumes after it through server 2, whose copy
    has only message 1 yet (its cluster.db locked by another process). Welcomed at once
    with the copy's newest id, 1, his client took the history for a restored one, said so
    and showed the room again. Refused (UNAVAILABLE, as any server not ready), he tries
    again, and once the copy has message 2 he goes on after it."""
    async with two_servers(lab, tmp_path, nats_cluster, cluster_wait=2.0,
                           store_wait=30.0) as (one, two):
        alice = await one.connect("alice-laptop", one.token(ALICE))
        talk = await join(alice, "general", then=[send("m1", "c1")])
        assert isinstance(await ack_or_error(talk, "c1"), pb.Sent)
        bob = await two.connect("bob-laptop", two.token(BOB))
        await until(lambda: two.server.store.last_id("general") == 1, "server 2 has m1")
        async with write_lock_held(two.cfg.db_path):
            await talk.write(send("m2", "c2"))
            seen = await ack_or_error(talk, "c2")
            assert isinstance(seen, pb.Sent) and seen.id == 2
            early = bob.stub.Join(hello_events("general", after=seen.id),
                                  metadata=bob.metadata)
            with pytest.raises(grpc.aio.AioRpcError) as refused_early:
                await collect(early, 1, kind="welcome")
            assert refused_early.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "has not caught up" in (refused_early.value.details() or "")
        resumed = bob.stub.Join(hello_events("general", after=seen.id), metadata=bob.metadata)
        (welcome,) = await collect(resumed, 1, kind="welcome")
        assert welcome.last_id == 2
        events = await collect(resumed, 1, kind="replay_done")
        assert events[0].last_id == 2
        await talk.write(send("m3", "c3"))
        (m3,) = await collect(resumed, 1)
        assert (m3.id, m3.text) == (3, "m3")
        resumed.cancel()


async def test_a_kick_through_server_2_closes_bobs_stream_on_server_1(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two):
        bob = await one.connect("bob-laptop", one.token(BOB))
        admin = await two.connect("alice-laptop", two.token(ALICE, admin=True))
        call = await join(bob, "general")
        await admin.stub.Kick(pb.KickRequest(room="general", login=BOB),
                              metadata=admin.metadata)
        details = await closed_as(call, grpc.StatusCode.PERMISSION_DENIED)
        assert f"kicked out of 'general' by {ALICE}" in details


async def lead_elsewhere(cluster_: nats_lab.NatsCluster, stream: str, node: str) -> None:
    """Make a node other than ``node`` lead ``stream`` (a no-op when one does already)."""
    nc = await nats.connect(servers=cluster_.urls, user=cluster_.user,
                            password=cluster_.password)
    try:
        for _ in range(10):
            if cluster_.stream_leader(stream) != node:
                return
            await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=5)
            await asyncio.sleep(1.0)
        raise AssertionError(f"{node} still leads {stream}")
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def server_1_alone_on_node_1(lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster,
                                   bucket: str) -> AsyncIterator[tuple[Any, Any]]:
    """Two servers: server 1 on the cluster's first NATS node alone, server 2 on the others;
    ``bucket``'s stream led by another node (what is sent must not wait for its bucket to
    elect a leader when node 1 dies: 4-9 s, docs/nats-cluster.md fact 2)."""
    flags = cluster_flags(nats_cluster)
    first, *others = nats_cluster.nodes
    async with lab_server(lab, tmp_path, **{**flags, "cluster": first.url}) as one, \
            lab_server(lab, tmp_path, node="chat-server-2",
                       **{**flags, "cluster": ",".join(n.url for n in others)}) as two:
        await lead_elsewhere(nats_cluster, f"KV_{bucket}", first.name)
        yield one, two


@contextlib.asynccontextmanager
async def on_its_way_when_node_1_dies(nats_cluster: nats_lab.NatsCluster) -> AsyncIterator[None]:
    """What the body sends to server 1 is on its way through node 1 (held by SIGSTOP, and
    given a second to be in its sockets) when node 1 is SIGKILLed."""
    first = nats_cluster.nodes[0]
    os.kill(first.pid, signal.SIGSTOP)
    try:
        yield
        await asyncio.sleep(1.0)
    finally:
        nats_cluster.kill(first.name)


async def test_a_kick_in_flight_to_server_1_when_its_nats_node_dies_still_closes_bobs_stream(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """A kick sent to the other servers on a plain NATS subject was lost on a server that
    was reconnecting to NATS, while the admin was told it worked (once in 9 tries of a
    kill -9 run, 2026-11-25). Here it is on its way to server 1 through server 1's NATS node
    (held by SIGSTOP) when that node is SIGKILLed: server 1 reconnects to another."""
    async with server_1_alone_on_node_1(lab, tmp_path, nats_cluster, cluster.KICKS) as (one, two):
        bob = await one.connect("bob-laptop", one.token(BOB))
        admin = await two.connect("alice-laptop", two.token(ALICE, admin=True))
        call = await join(bob, "general")
        async with on_its_way_when_node_1_dies(nats_cluster):
            await admin.stub.Kick(pb.KickRequest(room="general", login=BOB),
                                  metadata=admin.metadata, timeout=10)
            kicked = time.monotonic()
        details = await closed_as(call, grpc.StatusCode.PERMISSION_DENIED, timeout=30)
        assert f"kicked out of 'general' by {ALICE}" in details
        print(f"bob's stream on server 1 closed {time.monotonic() - kicked:.1f}s after the kick")
        # A moment, not a ban: bob is back at once, and stays.
        again = await join(bob, "general", then=[send("back again", "b1")])
        assert isinstance(await ack_or_error(again, "b1"), pb.Sent)
        again.cancel()


async def test_a_revocation_in_flight_to_server_1_when_its_nats_node_dies_closes_alices_stream(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """The revocations bucket's watch (nats-py's KV watch: an ordered consumer) notices a
    delivery lost on the way only by a heartbeat naming a later consumer sequence than its
    last message, so never while it has delivered nothing, as in a cluster nobody has
    revoked anything in yet; the word on ``REVOCATIONS`` goes the same way. Here both are on
    their way to server 1 through server 1's NATS node (held by SIGSTOP) when that node is
    SIGKILLed: the token went on working on server 1 for as long as it ran."""
    async with server_1_alone_on_node_1(lab, tmp_path, nats_cluster,
                                        cluster.REVOKED) as (one, two):
        token = one.token(ALICE)
        alice = await one.connect("alice-laptop", token)
        admin = await two.connect("alice-laptop", two.token(ALICE, admin=True))
        call = await join(alice, "general")
        async with on_its_way_when_node_1_dies(nats_cluster):
            await admin.stub.RevokeToken(pb.RevokeTokenRequest(token_id=token_id(token)),
                                         metadata=admin.metadata, timeout=10)
            revoked = time.monotonic()
        await closed_as(call, grpc.StatusCode.UNAUTHENTICATED, timeout=30)
        print(f"alice's stream on server 1 closed {time.monotonic() - revoked:.1f}s after "
              "the revocation")
        await refused_anew(one, token)


async def test_a_private_room_made_on_its_way_to_server_1_when_its_nats_node_dies_reaches_it(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """As a revocation (above): server 1's watch of the private rooms' bucket had delivered
    nothing, there being no private room yet, so the first one, lost on its way, never came,
    and server 1 never knew the room. (And when the node of that watch's consumer died, a
    removal confirmed meanwhile reached server 1 only when nats-py made a new one, after two
    missed 5 s heartbeats: more than 10 s in each of 3 runs, bob reading on in the room
    meanwhile; 2.7-6.5 s now, lab runs on 2026-11-25.)"""
    async with server_1_alone_on_node_1(lab, tmp_path, nats_cluster, cluster.ROOMS) as (one, two):
        bob = await one.connect("bob-laptop", one.token(BOB))
        admin = await two.connect("alice-laptop", two.token(ALICE, admin=True))
        async with on_its_way_when_node_1_dies(nats_cluster):
            await admin.create_room("+ops", [ALICE, BOB], timeout=10)
        await eventually(bob.list_rooms, lambda r: "+ops" in [x.name for x in r.rooms],
                         "server 1 learning the room", timeout=30)

async def test_a_kick_crosses_a_rolling_upgrade_to_and_from_a_server_of_the_release_before(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """Servers of the release before KICKS (012c115^) send and take kicks on the core subject
    OLD_KICKS as {room, login, by, o}; with one of them as server 2 (run from that commit
    over the lab, 2026-11-25) a kick made on either server did not close bob's stream on
    the other. Here that server is this test's connection to NATS, saying what it said."""
    async with lab_server(lab, tmp_path, **cluster_flags(nats_cluster)) as one:
        bob = await one.connect("bob-laptop", one.token(BOB))
        admin = await one.connect("alice-laptop", one.token(ALICE, admin=True))
        nc = await nats.connect(servers=nats_cluster.urls, user=nats_cluster.user,
                                password=nats_cluster.password)
        try:
            heard: list[dict[str, Any]] = []

            async def hear(msg: Any) -> None:
                heard.append(json.loads(msg.data))

            await nc.subscribe(cluster.OLD_KICKS, cb=hear)
            await nc.flush()
            call = await join(bob, "general")
            await nc.publish(cluster.OLD_KICKS, json.dumps(
                {"room": "general", "login": BOB, "by": ALICE, "o": "an-old-one"}).encode())
            details = await closed_as(call, grpc.StatusCode.PERMISSION_DENIED)
            assert f"kicked out of 'general' by {ALICE}" in details
            call = await join(bob, "random")
            await admin.stub.Kick(pb.KickRequest(room="random", login=BOB),
                                  metadata=admin.metadata)
            await closed_as(call, grpc.StatusCode.PERMISSION_DENIED)
            await until(lambda: len(heard) == 2, "the kick on the old servers' subject")
            assert [(k["room"], k["login"], k["by"]) for k in heard] == [
                ("general", BOB, ALICE), ("random", BOB, ALICE)]
        finally:
            await nc.close()


async def test_without_a_nats_quorum_a_kick_is_refused_before_the_admins_deadline(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    # The other servers cannot be told: the admin hears so, not that it worked.
    async with lab_server(lab, tmp_path, **cluster_flags(nats_cluster)) as one:
        bob = await one.connect("bob-laptop", one.token(BOB))
        admin = await one.connect("alice-laptop", one.token(ALICE, admin=True))
        call = await join(bob, "general")
        for name in [n.name for n in nats_cluster.nodes][:2]:
            nats_cluster.stop_node(name)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.stub.Kick(pb.KickRequest(room="general", login=BOB),
                                  metadata=admin.metadata, timeout=3.0)
        took = time.monotonic() - started
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        assert refused.value.details().startswith("the chat cluster did not confirm the kick")
        assert f"{BOB}'s streams in 'general' are closed on this server" in (
            refused.value.details())
        assert took < 3.0, took
        await closed_as(call, grpc.StatusCode.PERMISSION_DENIED)  # (this server's: closed)


async def test_bob_on_server_2_sees_alice_join_and_leave_on_server_1(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two):
        bob = await two.connect("bob-laptop", two.token(BOB))
        alice = await one.connect("alice-laptop", one.token(ALICE))
        bob_sees = await join(bob, "general")
        alice_in = await join(alice, "general")
        [own] = await collect(bob_sees.call, 1, kind="presence")  # bob's own join first
        assert (own.kind, own.who.login) == (pb.PRESENCE_KIND_JOINED, BOB)
        [joined] = await collect(bob_sees.call, 1, kind="presence")
        assert (joined.kind, joined.who.login) == (pb.PRESENCE_KIND_JOINED, ALICE)
        assert [m.login for m in joined.members] == [ALICE, BOB]
        # A later Welcome on server 2 lists her too.
        again = bob.stub.Join(hello_events("general"), metadata=bob.metadata)
        [welcome] = await collect(again, 1, kind="welcome")
        assert [m.login for m in welcome.members] == [ALICE, BOB]
        again.cancel()
        alice_in.cancel()
        [left] = await collect(bob_sees.call, 1, kind="presence")
        assert (left.kind, left.who.login) == (pb.PRESENCE_KIND_LEFT, ALICE)
        assert [m.login for m in left.members] == [BOB]
        bob_sees.cancel()
