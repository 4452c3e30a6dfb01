"""Cluster mode (issue 20) for a read-only client: `tsnetchat tail` (Subscribe, which has no
Welcome) learns the cluster's servers from its ReplayDone and fails over like a chat does.

Over the real tailnet lab and a real three-node NATS cluster (``nats_cluster``: fresh per
test): `tsnetchat serve` processes on chat-server and chat-server-2, and the real CLI on the
people's laptops' tailscaled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import nats_lab
import pytest
from helpers import ALICE, BOB, CLI, LabDaemon, Lines, free_port, run_cli

pytestmark = [pytest.mark.tailnet, pytest.mark.cluster]


def cluster_env(cluster: nats_lab.NatsCluster) -> dict[str, str]:
    return {"TSNETCHAT_CLUSTER": ",".join(cluster.urls),
            "TSNETCHAT_NATS_USER": cluster.user, "TSNETCHAT_NATS_PASSWORD": cluster.password}


def send_through(server: LabDaemon, name: str, token: str, text: str) -> int:
    """`tsnetchat send` from bob's laptop through ``server`` (named ``name``): the id."""
    out = run_cli("send", name, text, "--room", "general", "--json", "--token", token,
                  *server.client_args("bob-laptop"))
    assert out.returncode == 0, out.stderr
    sent: int = json.loads(out.stdout)["id"]
    return sent


def test_tail_through_server_1_goes_on_through_server_2_when_server_1_is_killed(
        lab: Any, tmp_path: Path, nats_cluster: nats_lab.NatsCluster) -> None:
    env = cluster_env(nats_cluster)
    one = LabDaemon(lab, tmp_path / "state-1", free_port(), (), env)
    two = LabDaemon(lab, tmp_path / "state-2", free_port(), (), env, node="chat-server-2")
    tail: subprocess.Popen[str] | None = None
    try:
        one.start()
        two.start()  # adopts server 1's signing key: a token of either is good on both
        bob = two.token(BOB)
        tail = subprocess.Popen(
            [CLI, "tail", "chat-server", "--room", "general", "--json", "--count", "6",
             "--token", one.token(ALICE), *one.client_args("alice-laptop")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "alice-config")})
        lines = Lines(tail)
        assert json.loads(lines.next()) == {"type": "live", "room": "general", "last_id": 0}
        before = [send_through(one, "chat-server", bob, f"before {i}") for i in range(2)]
        before.append(send_through(two, "chat-server-2", bob, "before 2"))
        seen = [lines.message() for _ in range(3)]
        one.stop(signal.SIGKILL)  # the server the tail follows the room through
        after = [send_through(two, "chat-server-2", bob, f"after {i}") for i in range(3)]
        seen += [lines.message() for _ in range(3)]
        _, stderr = tail.communicate(timeout=30)  # --count 6: it ends after the sixth
        assert tail.returncode == 0, stderr
        assert before + after == list(range(1, 7))
        assert [m["id"] for m in seen] == list(range(1, 7))  # no gap, nothing twice
        assert [m["text"] for m in seen] == [f"before {i}" for i in range(3)] + [
            f"after {i}" for i in range(3)]
        assert "connection lost:" in stderr and "nothing missed" in stderr
        assert "Traceback" not in stderr
        print(f"the tail's stderr: {stderr.strip()}")
    finally:
        if tail is not None and tail.poll() is None:
            tail.kill()
            tail.communicate()
        one.stop()
        two.stop()
