"""A server listed in the cluster for failover (``ClusterHistory.register``), on a real
three-node NATS JetStream cluster; no tailnet needed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats_lab
import pytest
from helpers import cluster_flags, make_config, until

from tsnetchat.cluster import ClusterHistory
from tsnetchat.store import SqliteHistory

pytestmark = pytest.mark.cluster


async def test_a_server_registered_again_under_a_new_node_is_listed_so_and_watches_once(
        tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """Registered again (its node deleted and joined anew), each registration started one
    more watch of the servers' list (a review, 2026-11-25)."""
    cfg = make_config(tmp_path, **cluster_flags(nats_cluster))
    history = ClusterHistory(await SqliteHistory.open(cfg.db_path), cfg)
    try:
        await asyncio.wait_for(history.start(b"k" * 32, 60), 90)
        await history.register("chat-server", 50051, "nOLD")
        await until(lambda: history.server_nodes.get("chat-server") == "nOLD",
                    "the first registration listed")
        await history.register("chat-server", 50051, "nNEW")
        await until(lambda: history.server_nodes.get("chat-server") == "nNEW",
                    "the second registration listed")
        watches = [t for t in history._tasks
                   if not t.done() and "_watch_servers" in repr(t.get_coro())]
        assert len(watches) == 1, watches
    finally:
        await history.close()
