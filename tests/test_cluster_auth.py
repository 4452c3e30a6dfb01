"""Cluster mode refuses a NATS that anyone may use: with no authorization, whoever reaches
it reads the cluster's signing key from the state bucket (and mints tokens) and posts on a
room's subject as anyone (an attacker's run over the lab, 2026-11-25). A real nats-server
with JetStream; no tailnet needed."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import nats_lab
import pytest
from helpers import cluster_flags, free_port, make_config, need

from tsnetchat import cluster
from tsnetchat.cluster import ClusterHistory
from tsnetchat.errors import StoreError
from tsnetchat.store import SqliteHistory

pytestmark = pytest.mark.cluster


@pytest.fixture(name="open_nats")
def a_nats_without_authorization(tmp_path: Path) -> Iterator[str]:
    """One nats-server with JetStream on loopback and no authorization block: its URL."""
    try:
        binary = nats_lab.ensure_binary()
    except nats_lab.NatsLabError as e:
        need("nats-server", str(e))
    port = free_port()
    proc = subprocess.Popen([str(binary), "-js", "-a", "127.0.0.1", "-p", str(port),
                             "-sd", str(tmp_path / "js")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


async def test_a_nats_that_lets_anyone_in_is_refused_before_anything_is_put_there(
        tmp_path: Path, open_nats: str) -> None:
    cfg = make_config(tmp_path, cluster=open_nats, nats_user="chat", nats_password="any")
    history = ClusterHistory(await SqliteHistory.open(cfg.db_path), cfg)
    try:
        with pytest.raises(StoreError) as refused:
            await history.start(b"k" * 32, 20)
    finally:
        await history.close()
    said = str(refused.value)
    assert "without credentials" in said and "signing key" in said, said
    assert "nats_credentials" in said, said  # (what to do)
    # Nothing of the cluster's was made there: no stream, no signing key to read.
    nc = await nats.connect(servers=[open_nats])
    try:
        names = [s.config.name for s in await nc.jetstream().streams_info()]
    finally:
        await nc.close()
    assert cluster.STREAM not in names and f"KV_{cluster.STATE}" not in names, names


async def test_a_nats_that_asks_for_credentials_is_used(
        tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    """The lab's cluster has an authorization block: asked without credentials, it says no."""
    assert not await cluster.anyone_may_connect(nats_cluster.urls)
    cfg = make_config(tmp_path, **cluster_flags(nats_cluster))
    history = ClusterHistory(await SqliteHistory.open(cfg.db_path), cfg)
    try:
        await asyncio.wait_for(history.start(b"k" * 32, 60), 90)
    finally:
        await history.close()
