"""Cluster mode (issue 20) with the tokens people actually keep: a stored `tsnetchat login`
token fails over with its person, and a key rotated on one server is every server's.

Over the real tailnet lab and a real three-node NATS cluster (``nats_cluster``: fresh per
test): servers on chat-server and chat-server-2, people on their laptops' tailscaled.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import grpc
import nats_lab
import pytest
from helpers import (
    ALICE,
    BOB,
    LabDaemon,
    Talker,
    collect,
    free_port,
    hello_events,
    refused,
    run_cli,
    server_1_killed_mid_conversation,
    two_servers,
    until,
)

from tsnetchat.client import link_for

TTL = 12.0  # seconds a login token lasts in the failover test: renewed after 6 s


def cluster_env(cluster: nats_lab.NatsCluster) -> dict[str, str]:
    return {"TSNETCHAT_CLUSTER": ",".join(cluster.urls),
            "TSNETCHAT_NATS_USER": cluster.user, "TSNETCHAT_NATS_PASSWORD": cluster.password}


@pytest.mark.tailnet
@pytest.mark.cluster
async def test_alice_logged_in_without_a_token_fails_over_to_server_2_with_her_stored_token(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster,
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**cluster_env(nats_cluster), "TSNETCHAT_ENROLL_TTL_HOURS": str(TTL / 3600)}
    one = LabDaemon(lab, tmp_path / "state-1", free_port(), ("--enroll", "grant"), env)
    two = LabDaemon(lab, tmp_path / "state-2", free_port(), ("--enroll", "grant"), env,
                    node="chat-server-2")
    people: list[Talker] = []
    try:
        one.start()
        two.start()
        a, b = lab.nodes["alice-laptop"], lab.nodes["bob-laptop"]
        home = tmp_path / "alice-config"
        login = await asyncio.to_thread(
            run_cli, "login", "chat-server", "--socket", a.socket, "--port", str(one.port),
            "--proxy", f"http://{a.http_proxy}", env={**os.environ, "XDG_CONFIG_HOME": str(home)})
        assert login.returncode == 0, login.stderr
        store = home / "tsnetchat" / "tokens.json"
        [first] = json.loads(store.read_text())["servers"]
        monkeypatch.setenv("XDG_CONFIG_HOME", str(home))  # alice's client reads it there
        alice = Talker(link_for("chat-server", None, socket=a.socket, port=one.port,
                                proxy=f"http://{a.http_proxy}"), "general")
        bob = Talker(link_for("chat-server-2", two.token(BOB), socket=b.socket,
                              port=two.port, proxy=f"http://{b.http_proxy}"), "general")
        people += [alice, bob]
        await server_1_killed_mid_conversation(one, alice, bob)
        # The token is renewed through server 2 (server 1 is gone) and keeps her going
        # past the first token's expiry; it is kept for server 1's node only.
        await until(lambda: json.loads(store.read_text())["servers"][0]["received"]
                    > first["received"], "the token renewed through server 2", 2 * TTL)
        [renewed] = json.loads(store.read_text())["servers"]
        assert (renewed["token_id"], renewed["node_id"]) == (first["token_id"],
                                                             first["node_id"])
        assert f"renew issued token={first['token_id']}" in two.log.read_text()
        # past the first token's expiry and the server's 5 s leeway: its stream is closed
        await asyncio.sleep(max(0.0, first["received"] + TTL + 7 - time.time()))
        alice.session.send("alice after the first token expired")
        await until(lambda: "alice after the first token expired" in alice.sent
                    and len(bob.messages) == 13, "a message after the expiry", 30)
        assert not alice.fatal, alice.fatal
        assert [m.id for m in alice.messages] == list(range(1, 14))
    finally:
        for p in people:
            await p.close()
        one.stop()
        two.stop()


@pytest.mark.tailnet
@pytest.mark.cluster
async def test_a_key_rotated_on_server_2_is_every_servers_and_ends_the_old_tokens(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    async with two_servers(lab, tmp_path, nats_cluster) as (one, two):
        old = one.token(ALICE)
        alice = await one.connect("alice-laptop", old)
        call = alice.stub.Join(hello_events("general"), metadata=alice.metadata)
        await collect(call, 1, kind="replay_done")
        rotated = await asyncio.to_thread(
            run_cli, "token", "rotate-key", "--state-dir", str(two.cfg.state_dir),
            env={**os.environ, **cluster_env(nats_cluster)})
        assert rotated.returncode == 0, rotated.stderr
        assert "shares the new key with the cluster" in rotated.stdout
        started = time.monotonic()
        closed = await refused(collect(call, 1, timeout=30))
        assert closed.code() == grpc.StatusCode.UNAUTHENTICATED
        print(f"rotated on server 2 -> alice's stream on server 1 closed: "
              f"{time.monotonic() - started:.3f}s (server 2 reads its key file every second)")
        assert one.cfg.key_path.read_bytes() == two.cfg.key_path.read_bytes()
        for server in (one, two):  # new connections, each its own TCP connection
            fresh = await server.connect("alice-laptop", old)
            assert (await refused(fresh.whoami())).code() == grpc.StatusCode.UNAUTHENTICATED
        new = two.token(ALICE)  # signed on server 2 with the new key
        on_one = await one.connect("alice-laptop", new)
        assert (await on_one.whoami()).identity.login == ALICE
        # ... and `tsnetchat token issue` on server 1 signs with it too (its key file).
        assert (await (await two.connect("alice-laptop", one.token(ALICE))).whoami()
                ).identity.login == ALICE


def test_rotating_the_key_of_a_stopped_cluster_server_is_refused_in_words(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    out = run_cli("token", "rotate-key", "--state-dir", str(state),
                  env={**os.environ, "TSNETCHAT_CLUSTER": "nats://127.0.0.1:4222"})
    assert out.returncode == 3, out.stderr
    assert "cluster mode: no tsnetchat server is running on" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (state / "jwt.key").exists()  # nothing was rotated
