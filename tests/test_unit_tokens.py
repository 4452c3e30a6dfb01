"""Where the client finds its token."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tsnetchat.errors import ConfigError, Unauthenticated
from tsnetchat.tokens import find_token, load_store, save_token

# --- client token store ------------------------------------------------------------------


def test_token_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "tokens.json"
    save_token("Chat-Server.", "saved", store)
    assert oct(store.stat().st_mode & 0o777) == "0o600"
    monkeypatch.delenv("TSNETCHAT_TOKEN", raising=False)
    assert find_token("chat-server", path=store) == "saved"
    monkeypatch.setenv("TSNETCHAT_TOKEN", "env")
    assert find_token("chat-server", path=store) == "env"
    f = tmp_path / "t"
    f.write_text("file\n")
    assert find_token("chat-server", token_file=f, path=store) == "file"
    assert find_token("chat-server", token="flag", token_file=f, path=store) == "flag"
    monkeypatch.delenv("TSNETCHAT_TOKEN")
    with pytest.raises(Unauthenticated, match="no token for other"):
        find_token("other", path=store)
    os.chmod(store, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_store(store)
