"""Which node a client fails over to with its token (pure logic; the failover itself is
proven over the real lab and NATS in test_cluster_failover.py)."""

from __future__ import annotations

import grpc
import pytest

from tsnetchat.client import Connection, Link, _failover_target
from tsnetchat.clienterrors import ClientError
from tsnetchat.discovery import ServerNode, Target


def dialled(node_id: str) -> Connection:
    """A Connection whose discovery found a node with ``node_id`` (no call is ever made)."""
    node = ServerNode(short_name="chat-server-2", dns_name="chat-server-2.tailnet.test",
                      ips=("100.64.0.9",), node_id=node_id)
    target = Target(name="chat-server-2", host=node.dns_name, ip="100.64.0.9", port=1,
                    mode="direct", node=node)
    return Connection(grpc.aio.insecure_channel("127.0.0.1:1"), "t", target=target)


@pytest.mark.parametrize("registered,found,stored", [
    ("nTWO", "nTWO", True), ("nTWO", "nTWO", False), ("", "", False), ("nTWO", "", False),
    ("", "nTWO", False)])
async def test_a_token_goes_to_the_node_the_cluster_registered(
        registered: str, found: str, stored: bool) -> None:
    _failover_target(dialled(found), "chat-server-2", registered, stored=stored)


@pytest.mark.parametrize("stored", [True, False])
async def test_a_name_now_on_another_node_never_gets_the_token(stored: bool) -> None:
    with pytest.raises(ClientError) as refused:
        _failover_target(dialled("nMALLORY"), "chat-server-2", "nTWO", stored=stored)
    assert "not failing over to chat-server-2 with your token" in str(refused.value)
    assert "nMALLORY, not nTWO" in str(refused.value)
    assert refused.value.retryable


@pytest.mark.parametrize("registered,found", [("", "nTWO"), ("nTWO", ""), ("", "")])
async def test_a_stored_token_needs_both_sides_to_know_the_node(registered: str,
                                                                found: str) -> None:
    with pytest.raises(ClientError) as refused:
        _failover_target(dialled(found), "chat-server-2", registered, stored=True)
    assert "cannot confirm" in str(refused.value)


async def test_a_link_learns_the_other_servers_and_their_nodes_from_a_welcome() -> None:
    async def never() -> Connection:
        raise AssertionError("not dialled")

    async def other(name: str, port: int, node_id: str) -> Connection:
        raise AssertionError("not dialled")

    link = Link(never, name="chat-server", dial_other=other)
    link.learn([("chat-server", 1, "nONE"), ("chat-server-2", 2, "nTWO")])
    assert link.servers == [("chat-server-2", 2)]
    assert link.node_ids["chat-server-2"] == "nTWO"
    assert link.alternates
