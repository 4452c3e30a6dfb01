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


@pytest.mark.parametrize(("held", "says"), [
    (b"", "is empty: put the auth key (tskey-auth-...), or an OAuth client's secret, in it"),
    (b" \n", "is empty: put the auth key (tskey-auth-...), or an OAuth client's secret, in it"),
    (b"\xff\xfe\x00", "does not hold an auth key (one word, tskey-auth-..., or an OAuth "
     "client's secret)"),
    (b"tskey-auth-a tskey-auth-b\n", "does not hold an auth key (one word, tskey-auth-..., "
     "or an OAuth client's secret)"),
    (b"k" * 5000, "does not hold an auth key (one word, tskey-auth-..., or an OAuth client's "
     "secret)"),
], ids=["empty", "blank", "not-text", "two-words", "too-long"])
def test_an_auth_key_file_that_holds_no_key_is_said_to_be_that(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: bytes, says: str) -> None:
    """Not UTF-8, it ended in "unexpected UnicodeDecodeError ... a bug"; empty, the server
    said no auth key was given (an operator's run, 2026-11-25)."""
    from tsnetchat.embedded import find_auth_key

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    f = tmp_path / "authkey"
    f.write_bytes(held)
    with pytest.raises(ConfigError) as got:
        find_auth_key(load_config(file=None, env={}, flags={"auth_key_file": str(f)}))
    assert str(got.value) == f"--auth-key-file: {f} {says}"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "authkey").write_bytes(held)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with pytest.raises(ConfigError) as got:
        find_auth_key(load_config(file=None, env={}))
    assert str(got.value) == f"the systemd credential 'authkey': {creds / 'authkey'} {says}"
