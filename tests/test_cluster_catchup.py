"""Cluster mode's copy of a large history: a server with no copy of its own (new, or its
cluster.db moved aside, as README says to) builds one from the stream. A ClusterHistory on
a real three-node NATS JetStream cluster (``nats_cluster``) and its own SQLite copy; no
tailnet needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nats
import nats_lab
import pytest
from helpers import cluster_flags, eventually, make_config, placed, until_stream_answers

from tsnetchat import cluster
from tsnetchat.cluster import ClusterHistory
from tsnetchat.store import TEXT, Draft, Sender, SqliteHistory, Store

pytestmark = pytest.mark.cluster

N = 30_000  # messages of one room already in the stream, six times INBOX_MAX


async def seed(nats_cluster: nats_lab.NatsCluster) -> None:
    """Put N messages of 'general' into the stream as servers append them (ids 1..N)."""
    nc = await nats.connect(servers=nats_cluster.urls, user=nats_cluster.user,
                            password=nats_cluster.password)
    try:
        js = nc.jetstream(timeout=20)
        await placed(lambda: js.add_stream(name=cluster.STREAM, subjects=[cluster.PREFIX + ">"],
                                           num_replicas=3, allow_atomic=True), cluster.STREAM)
        # (a publish without an answer is lost without a word if the stream is not ready)
        await until_stream_answers(js, cluster.ROOM_PREFIX + "general")
        alice = Sender("alice@tailnet.test", "Alice", "alice-laptop")
        for i in range(1, N + 1):
            draft = Draft("general", alice, TEXT, f"{i:06d} " + "x" * 400, f"c{i}")
            data = cluster._encode(draft, i, 1_700_000_000_000 + i, "seed:1")
            if i % 1000 == 0:  # an answer each thousand: what is sent is stored, in order
                ack = await js.publish(cluster.ROOM_PREFIX + "general", data)
                assert ack.seq == i, (ack.seq, i)
            else:
                await nc.publish(cluster.ROOM_PREFIX + "general", data)

        async def stored() -> int:
            return int((await js.stream_info(cluster.STREAM)).state.messages)

        await eventually(stored, lambda n: n == N, "the stream storing them all", timeout=60)
    finally:
        await nc.close()


async def test_a_new_copy_of_a_large_history_is_built_in_bounded_steps_losing_nothing(
        tmp_path: Path, nats_cluster: nats_lab.NatsCluster,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything delivered and not yet applied was held at once: 100,000 messages went in
    transactions of up to 61,859 and the process grew by 184 MB (a lab run, 2026-11-25)."""
    await seed(nats_cluster)
    imported: list[int] = []
    real = cluster._import

    def counted(items: Any, seq: int, s: Store) -> Any:
        imported.append(len(items))
        return real(items, seq, s)

    monkeypatch.setattr(cluster, "_import", counted)
    cfg = make_config(tmp_path, **cluster_flags(nats_cluster))
    history = ClusterHistory(await SqliteHistory.open(cfg.db_path), cfg)
    try:
        await history.start(b"k" * 32, 120)
        assert history.last_id("general") == N
        ids = [m.id for m in await history.after("general", 0, N)]
        assert ids == list(range(1, N + 1))
    finally:
        await history.close()
    assert sum(imported) == N
    assert max(imported) <= cluster.INBOX_MAX, imported
