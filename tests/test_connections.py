"""One Connection, one TCP connection.

grpc's Python client shares one TCP connection between every channel to the same target
unless told otherwise (its global subchannel pool); the server decides identity per TCP
connection. So a client-side "new connection" that silently reused an old one would reuse
its server-side identity too, for people and for tests alike. tsnetchat's Connection always
opens its own (discovery.CHANNEL_OPTIONS); tests that mean a new connection get one.
"""

from __future__ import annotations

import grpc
from helpers import Chat, refused


async def test_two_connections_to_the_same_server_are_two_tcp_connections(chat: Chat) -> None:
    token = chat.token("alice@tailnet.test")
    first, second = await chat.direct(token), await chat.direct(token)
    for conn in (first, second):  # plain loopback: WhoIs is asked, and has no match
        assert (await refused(conn.whoami())).code() == grpc.StatusCode.UNAUTHENTICATED
    asked = chat.net.whois_addrs[-2:]
    assert len(asked) == 2 and asked[0] != asked[1]


async def test_calls_on_one_connection_share_it(chat: Chat) -> None:
    conn = await chat.connect("alice@tailnet.test")
    await conn.whoami()
    await conn.whoami()
    ports = {addr.rsplit(":", 1)[1] for addr in chat.net.whois_addrs}
    assert len(ports) == 1
