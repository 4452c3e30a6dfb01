"""Search over a real grpc.aio server in-process (the chat fixture): what one page may hold."""

from __future__ import annotations

import pytest
from helpers import Chat, collect, hello_events, send

from tsnetchat.service import HISTORY_PAGE_BYTES

ALICE, CAROL = "alice@tailnet.test", "carol@tailnet.test"


@pytest.mark.server_config(max_message_bytes=60_000, max_search_page=200)
async def test_a_search_page_of_big_messages_stops_short_of_what_a_client_can_read(
        chat: Chat) -> None:
    """With max_search_page raised, 80 matches of 59 KB made one answer of 4.7 MB, which
    this client (every stock gRPC client) refused: "Received message larger than max" (a
    review, 2026-11-25). A page keeps to service.HISTORY_PAGE_BYTES, as History does, and
    its next offset is where it stopped: the next page goes on from there."""
    carol = await chat.connect(CAROL)
    sends = [send(f"heron {i} " + "x" * 59_000, f"m{i}") for i in range(80)]
    call = carol.stub.Join(hello_events("general", then=sends), metadata=carol.metadata)
    await collect(call, 80, kind="sent")
    call.cancel()
    alice = await chat.connect(ALICE)
    seen: list[int] = []
    offset, pages = 0, 0
    while True:
        page = await alice.search("heron", newest=True, limit=200, offset=offset)
        pages += 1
        assert 0 < sum(m.ByteSize() for m in page.messages) <= HISTORY_PAGE_BYTES
        seen += [m.id for m in page.messages]
        if not page.more:
            assert page.next_offset == 0
            break
        assert page.next_offset == offset + len(page.messages)
        offset = page.next_offset
    assert seen == list(range(80, 0, -1)) and pages > 1
