"""Which port a kept token is for, said when a command asks another port."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_unit_tokens import SERVER, entry

from tsnetchat.errors import Unauthenticated
from tsnetchat.tokens import Renewal, TokenStore


async def test_a_command_without_the_port_of_the_server_logged_in_to_is_told_which_port(
        tmp_path: Path) -> None:
    """Logged in with --port 45791, `whoami` without it said "no token for chat-server: run
    `tsnetchat login chat-server`", a login that asks port 50051 (a newcomer over the lab,
    2026-11-25)."""
    store = TokenStore(tmp_path / "tokens.json")
    store.put(entry("at 45791", port=45791))
    with pytest.raises(Unauthenticated) as refused:
        Renewal.for_server(SERVER, "chat-server", store, port=50051)
    said = str(refused.value)
    assert "no token for chat-server at port 50051" in said, said
    assert "pass `--port 45791`" in said and "TSNETCHAT_PORT=45791" in said, said
    assert Renewal.for_server(SERVER, "chat-server", store, port=45791).token == "at 45791"


async def test_no_token_kept_for_the_server_at_all_still_says_to_log_in(tmp_path: Path) -> None:
    with pytest.raises(Unauthenticated) as refused:
        Renewal.for_server(SERVER, "chat-server", TokenStore(tmp_path / "t.json"), port=50051)
    assert "run `tsnetchat login chat-server`" in str(refused.value)
    assert "--port" not in str(refused.value)
