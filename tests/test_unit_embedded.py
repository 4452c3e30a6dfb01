"""The embedded tailscaled's auth key sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from tsnetchat.config import load_config
from tsnetchat.errors import ConfigError


def test_embedded_auth_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tsnetchat.embedded import find_auth_key

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "authkey").write_text("tskey-from-systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert find_auth_key(load_config(file=None, env={})) == "tskey-from-systemd"
    f = tmp_path / "k"
    f.write_text("tskey-from-file")
    assert find_auth_key(load_config(file=None, env={}, flags={"auth_key_file": str(f)})) \
        == "tskey-from-file"
    assert find_auth_key(load_config(file=None, env={"TSNETCHAT_AUTH_KEY": "tskey-env"})) \
        == "tskey-env"
    with pytest.raises(ConfigError, match=r"^--auth-key-file: "):
        find_auth_key(load_config(file=None, env={}, flags={"auth_key_file": str(tmp_path / "x")}))
    # named where it was set (it said --auth-key-file of a config file's setting too)
    toml = tmp_path / "config.toml"
    toml.write_text(f'auth_key_file = "{tmp_path / "x"}"\n')
    with pytest.raises(ConfigError, match=f"^{toml}: auth_key_file: .*: No such file"):
        find_auth_key(load_config(file=toml, env={}))
    with pytest.raises(ConfigError, match=r"^TSNETCHAT_AUTH_KEY_FILE: "):
        find_auth_key(load_config(file=None, env={"TSNETCHAT_AUTH_KEY_FILE": str(tmp_path)}))
