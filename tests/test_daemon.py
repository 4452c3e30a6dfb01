"""`tsnetchat serve` as a real process on the lab's chat-server node."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import CLI, Daemon, free_port, lab_connect, start_daemon

pytestmark = pytest.mark.tailnet

@pytest.fixture
def daemon(lab: Any, tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(lab, tmp_path)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        d.notify.close()


def test_ready_is_sent_only_once_listening_and_names_the_magicdns_name(
        lab: Any, daemon: Daemon) -> None:
    msgs = daemon.wait_for("READY=1")
    # At the moment READY arrives, the port already accepts connections.
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=2):
        pass
    status = next(m for m in msgs if m.startswith("STATUS="))
    assert "chat-server.tailnet.test" in status
    # userspace mode: loopback only, never 0.0.0.0
    assert f"127.0.0.1:{daemon.port}" in status
    out = subprocess.run(["ss", "-ltnH", f"sport = :{daemon.port}"], capture_output=True,
                         text=True).stdout
    assert out.strip(), out
    # gRPC binds 127.0.0.1 as the v4-mapped [::ffff:127.0.0.1] on a v6 socket: same address.
    local_addrs = {line.split()[3].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
                   for line in out.strip().splitlines()}
    assert local_addrs == {"127.0.0.1"}


def policies(pid: int) -> dict[int, tuple[str, int]]:
    """Each thread's name and scheduling policy."""
    task = Path(f"/proc/{pid}/task")
    return {int(t.name): ((t / "comm").read_text().strip(), os.sched_getscheduler(int(t.name)))
            for t in task.iterdir()}


@pytest.mark.parametrize("batch", [True, False])
def test_once_ready_only_the_event_loop_and_history_threads_keep_the_normal_policy(
        lab: Any, tmp_path: Path, batch: bool) -> None:
    d = start_daemon(lab, tmp_path, env={"TSNETCHAT_BATCH_HELPER_THREADS": str(batch).lower()})
    try:
        d.wait_for("READY=1")
        threads = policies(d.proc.pid)
        assert threads.pop(d.proc.pid)[1] == os.SCHED_OTHER  # the loop runs on the main thread
        # The history's writer and readers are on every message's path: never batched.
        history = {tid: v for tid, v in threads.items() if v[0].startswith(("tsnetchat-write",
                                                                           "tsnetchat-read"))}
        assert [v[0] for v in history.values()].count("tsnetchat-write") == 1
        assert {v[1] for v in history.values()} == {os.SCHED_OTHER}
        helpers = {v[1] for tid, v in threads.items() if tid not in history}
        assert len(threads) - len(history) > 3  # gRPC's poller and EventEngine threads, ...
        assert helpers == {os.SCHED_BATCH if batch else os.SCHED_OTHER}
    finally:
        d.proc.kill()
        d.proc.wait()
        d.notify.close()


def test_sigterm_drains_streams_and_exits_zero(lab: Any, daemon: Daemon) -> None:
    daemon.wait_for("READY=1")
    tok = daemon.token("alice@tailnet.test")

    async def scenario() -> tuple[grpc.StatusCode, str]:
        conn = await lab_connect(lab, "alice-laptop", "chat-server", daemon.port, tok)
        call = conn.subscribe("general")
        async for ev in call:
            if ev.WhichOneof("event") == "replay_done":
                break
        daemon.proc.send_signal(signal.SIGTERM)
        reason = ""
        try:
            async for ev in call:
                if ev.WhichOneof("event") == "going_away":
                    reason = ev.going_away.reason
        except grpc.aio.AioRpcError as e:
            await conn.close()
            return e.code(), reason
        await conn.close()
        return grpc.StatusCode.OK, reason

    code, reason = asyncio.run(scenario())
    assert code == grpc.StatusCode.UNAVAILABLE and "restarting" in reason
    assert daemon.proc.wait(timeout=15) == 0
    assert any(m == "STOPPING=1" for m in daemon.notifications(1))


def test_sighup_reloads_revocations_and_config(lab: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("max_message_bytes = 4096\n")
    d = start_daemon(lab, tmp_path, "--config", str(cfg))
    try:
        d.wait_for("READY=1")
        cfg.write_text("max_message_bytes = 10\n")
        d.reload()
        tok = d.token("alice@tailnet.test")
        alice = lab.nodes["alice-laptop"]
        out = subprocess.run([CLI, "send", "chat-server", "this is longer than ten bytes",
                              "--token", tok, "--socket", alice.socket, "--port", str(d.port),
                              "--proxy", alice.http_proxy], capture_output=True, text=True)
        assert out.returncode == 2 and "limit is 10 bytes" in out.stderr
        assert d.proc.poll() is None
    finally:
        d.proc.terminate()
        d.proc.wait(timeout=15)
        d.notify.close()


def test_refuses_to_serve_when_tailscaled_is_absent(tmp_path: Path) -> None:
    out = subprocess.run([CLI, "serve", "--state-dir", str(tmp_path / "s"), "--socket",
                          str(tmp_path / "nothing.sock"), "--port", str(free_port())],
                         capture_output=True, text=True, timeout=90,
                         env={**os.environ, "TSNETCHAT_STARTUP_TIMEOUT": "2"})
    assert out.returncode == 4
    assert "not answering" in out.stderr and "Is tailscaled running?" in out.stderr


def test_grpcurl_lists_services_and_calls_list_rooms_over_the_tailnet(
        lab: Any, daemon: Daemon) -> None:
    daemon.wait_for("READY=1")
    tok = daemon.token("alice@tailnet.test")
    alice = lab.nodes["alice-laptop"]
    # grpc-go honours HTTPS_PROXY: grpcurl reaches chat-server through alice's node.
    env = {**os.environ, "HTTPS_PROXY": f"http://{alice.http_proxy}", "NO_PROXY": ""}
    target = f"chat-server:{daemon.port}"
    listed = subprocess.run([str(lab.bin.grpcurl), "-plaintext", target, "list"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {"tsnetchat.v1.Chat", "grpc.health.v1.Health",
                                          "grpc.reflection.v1alpha.ServerReflection"}
    sent = subprocess.run([CLI, "send", "chat-server", "hi", "--json", "--token", tok,
                           "--socket", alice.socket, "--port", str(daemon.port),
                           "--proxy", alice.http_proxy], capture_output=True, text=True)
    assert json.loads(sent.stdout) == {"id": 1, "room": "general"}, sent.stderr
    rooms = subprocess.run([str(lab.bin.grpcurl), "-plaintext", "-H",
                            f"authorization: Bearer {tok}", target,
                            "tsnetchat.v1.Chat/ListRooms"],
                           capture_output=True, text=True, env=env, timeout=30)
    assert rooms.returncode == 0, rooms.stderr
    data = json.loads(rooms.stdout)
    # alice's token says every room; her tailnet grant narrows it to three.
    assert [r["name"] for r in data["rooms"]] == ["general", "ops", "random"]
    assert data["rooms"][0]["last_id"] == "1"
    assert "all_rooms_allowed" not in data
    health = subprocess.run([str(lab.bin.grpcurl), "-plaintext", target,
                             "grpc.health.v1.Health/Check"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert json.loads(health.stdout)["status"] == "SERVING"
    # Without a token the chat service refuses, in words.
    denied = subprocess.run([str(lab.bin.grpcurl), "-plaintext", target,
                             "tsnetchat.v1.Chat/WhoAmI"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr
