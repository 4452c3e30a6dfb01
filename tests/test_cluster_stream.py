"""Cluster mode when the stream itself is gone (deleted under running servers). A
ClusterHistory on a real three-node NATS JetStream cluster (``nats_cluster``) and its own
SQLite copy; no tailnet needed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats_lab
import pytest
from helpers import cluster_flags, jetstream, make_config

from tsnetchat.cluster import STREAM, ClusterHistory
from tsnetchat.errors import Unconfirmed
from tsnetchat.store import TEXT, Draft, Outcome, Sender, SqliteHistory, Written

pytestmark = pytest.mark.cluster


async def test_a_send_after_the_stream_was_deleted_is_refused_saying_so_not_no_quorum(
        tmp_path: Path, nats_cluster: nats_lab.NatsCluster,
        caplog: pytest.LogCaptureFixture) -> None:
    """Deleted under running servers, every send was refused as "no stream leader answers:
    the NATS cluster has no quorum", which waiting never mends."""
    cfg = make_config(tmp_path, **cluster_flags(nats_cluster), cluster_wait=2.0)
    history = ClusterHistory(await SqliteHistory.open(cfg.db_path), cfg)
    answers: list[Outcome] = []
    got = asyncio.Event()

    def then(outcome: Outcome) -> None:
        answers.append(outcome)
        got.set()

    alice = Sender("alice", "Alice", "n1")
    try:
        await history.start(b"k" * 32, 60)
        history.submit(Draft("general", alice, TEXT, "before", client_msg_id="c1"), then)
        await got.wait()
        assert isinstance(answers[0], Written)
        async with jetstream(nats_cluster) as js:
            await js.delete_stream(STREAM)
        got.clear()
        history.submit(Draft("general", alice, TEXT, "after", client_msg_id="c2"), then)
        await got.wait()
    finally:
        await history.close()
    assert isinstance(answers[1], Unconfirmed)
    assert f"the NATS cluster has no stream {STREAM} any more" in str(answers[1])
    assert "quorum" not in str(answers[1])
    assert f"cluster: the NATS cluster has no stream {STREAM}" in caplog.text
