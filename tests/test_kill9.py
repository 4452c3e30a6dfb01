"""The real server SIGKILLed under its readers: what `tsnetchat tail` shows after it resumes.
Over the real tailnet lab (a `tsnetchat serve` process on chat-server)."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, LabDaemon, free_port, run_cli

pytestmark = pytest.mark.tailnet


class Lines:
    """A process's stdout, a JSON object a line, read on a thread (select on the pipe misses
    lines already read into the file object's buffer)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.q.put(line)

    def next(self, timeout: float = 30) -> dict[str, Any]:
        try:
            return json.loads(self.q.get(timeout=timeout))  # type: ignore[no-any-return]
        except queue.Empty:
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"tail printed nothing within {timeout}s: {err}") from None


def test_a_tail_that_joined_an_empty_room_shows_every_message_stored_while_it_was_away(
        lab: Any, tmp_path: Path) -> None:
    # A tail follows a room with nothing in it yet: an empty backlog, then "live". Its server
    # is SIGKILLed and comes back, and more messages than a join's backlog are stored before
    # the tail's stream notices. It resumed asking for the recent backlog (it had shown no
    # message, so it had no position) and showed only 3 and 4 (2026-11-25): it resumes
    # after 0, the position the server's "live" gave it.
    s = LabDaemon(lab, tmp_path / "state", free_port(),
                  env={"TSNETCHAT_HISTORY_ON_JOIN": "2"}).start()
    try:
        bob = s.token("bob@tailnet.test", ("random",))
        tail = subprocess.Popen([CLI, "tail", "chat-server", "--room", "random", "--json",
                                 "--token", bob, *s.client_args("bob-laptop")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = Lines(tail)
        try:
            assert lines.next() == {"type": "live", "room": "random", "last_id": 0}
            tail.send_signal(signal.SIGSTOP)  # away while the server dies and comes back
            s.stop(signal.SIGKILL)
            s.start()
            alice = s.token("alice@tailnet.test", ("random",))
            for i in range(1, 5):
                out = run_cli("send", "chat-server", f"line {i}", "--room", "random", "--json",
                              "--token", alice, *s.client_args("alice-laptop"))
                assert out.returncode == 0, out.stderr
                assert json.loads(out.stdout)["id"] == i
            tail.send_signal(signal.SIGCONT)
            shown: list[int] = []
            while not shown or shown[-1] < 4:
                line = lines.next()
                if line["type"] == "message":
                    shown.append(line["id"])
            assert shown == [1, 2, 3, 4]
        finally:
            tail.kill()
            tail.wait()
    finally:
        s.stop(signal.SIGKILL)
