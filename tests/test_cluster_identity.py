"""Who a cluster's server admits (issue 20), over the real tailnet lab and a real three-node
NATS JetStream cluster: server 1 on the lab's chat-server node, server 2 on chat-server-2
(helpers.two_servers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import nats_lab
import pytest
from helpers import refused, two_servers, until

from tsnetchat.pb import chat_pb2 as pb

pytestmark = [pytest.mark.tailnet, pytest.mark.cluster]

CHAT = "chat@tailnet.test"  # the user the lab's server nodes belong to


async def test_a_process_on_another_servers_node_is_refused_as_a_servers_own(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """Only the server's own node was refused: a process on chat-server-2 going out through
    its tailscaled to server 1 was admitted as the node's user, and with enroll = any got a
    token (an attacker's run, 2026-11-25; it matters where server nodes are untagged).
    Server 2 started after server 1: server 1 learns its node from the cluster's list."""
    async with two_servers(lab, tmp_path, nats_cluster, enroll="any") as (one, _two):
        await until(lambda: "chat-server-2" in one.server.store.servers, "server 2 listed")
        _, e = await one.refused_at_last("chat-server-2", one.token(CHAT),
                                         "admitted from another server's node")
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "another server of this chat cluster" in e.details()
        conn = await one.connect("chat-server-2", one.token(CHAT))
        e = await refused(conn.stub.Login(pb.LoginRequest(), timeout=10))
        assert "another server of this chat cluster" in e.details()
        alice = await one.connect("alice-laptop", one.token("alice@tailnet.test"))
        assert (await alice.whoami()).identity.login == "alice@tailnet.test"

