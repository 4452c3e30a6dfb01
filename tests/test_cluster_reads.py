"""Cluster mode's read positions (the READS bucket) when NATS has no quorum or the bucket
holds what no server put there. A ClusterHistory on a real three-node NATS JetStream
cluster (``nats_cluster``) and its own SQLite copy; no tailnet needed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats.js.errors
import nats_lab
import pytest
from helpers import cluster_flags, eventually, jetstream, make_config

from tsnetchat.cluster import READS, ClusterHistory, _b64
from tsnetchat.errors import StoreError
from tsnetchat.store import SqliteHistory

pytestmark = pytest.mark.cluster


@asynccontextmanager
async def cluster_history(tmp: Path, cluster: nats_lab.NatsCluster
                          ) -> AsyncIterator[ClusterHistory]:
    cfg = make_config(tmp, **cluster_flags(cluster))
    history = ClusterHistory(await SqliteHistory.open(cfg.db_path), cfg)
    try:
        await history.start(b"k" * 32, 60)
        yield history
    finally:
        await history.close()


async def held(js: Any, login: str, room: str) -> bytes | None:
    kv = await js.key_value(READS)
    try:
        entry = await kv.get(f"{_b64(login)}.{_b64(room)}")
    except nats.js.errors.KeyNotFoundError:
        return None
    return bytes(entry.value) if entry.value is not None else None


async def test_without_a_quorum_a_batch_of_read_positions_asks_once_and_all_reach_it_later(
        tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """Each position was tried in turn, each waiting for NATS: 20 of them asked 20 times
    (a batch of the ledger's is everybody's positions of MARK_DELAY)."""
    marks = [("bob", f"room{i}", i + 1) for i in range(20)]
    async with cluster_history(tmp_path, nats_cluster) as history:
        asked = 0
        share: Callable[[str, int], Awaitable[None]] = history._share_read

        async def counted(key: str, last_read: int) -> None:
            nonlocal asked
            asked += 1
            await share(key, last_read)

        history._share_read = counted  # type: ignore[method-assign]
        leader = nats_cluster.stream_leader(f"KV_{READS}")
        stopped = [leader, next(n.name for n in nats_cluster.nodes if n.name != leader)]
        for name in stopped:
            nats_cluster.kill(name)
        with pytest.raises(StoreError, match=r"20 read position\(s\) not shared .* and 17 more"):
            await history.mark_read(marks)
        assert asked == 1
        assert [await history.read_mark("bob", room) for _, room, _ in marks] == list(
            range(1, 21))  # kept here meanwhile
        for name in stopped:
            nats_cluster.start_node(name)
        async with jetstream(nats_cluster) as js:
            for _, room, last_read in marks:
                await eventually(lambda room=room: held(js, "bob", room),  # type: ignore[misc]
                                 lambda got, n=last_read: got == str(n).encode(),
                                 f"bob's position in {room} shared again", timeout=60)


@pytest.mark.parametrize("junk", [b"junk", b"99999999999999999999999"])
async def test_a_read_position_entry_that_is_no_position_is_replaced_and_the_watch_goes_on(
        tmp_path: Path, nats_cluster: nats_lab.NatsCluster, junk: bytes) -> None:
    """Put there by hand (or by something else): sharing a position over it raised
    ValueError, and a number past SQLite's integers, applied, ended the watch that applies
    every other server's positions here."""
    async with cluster_history(tmp_path, nats_cluster) as history, \
            jetstream(nats_cluster) as js:
        kv = await js.key_value(READS)
        await kv.put(f"{_b64('bob')}.{_b64('general')}", junk)
        await kv.put(f"{_b64('carol')}.{_b64('general')}", junk)
        await history.mark_read([("bob", "general", 5)])
        assert await held(js, "bob", "general") == b"5"
        await kv.put(f"{_b64('carol')}.{_b64('general')}", b"7")  # as another server would
        await eventually(lambda: history.read_mark("carol", "general"), lambda n: n == 7,
                         "carol's position from the cluster applied here")
