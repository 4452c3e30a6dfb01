"""Configuration and the public surface: one config type, sourced errors."""

from __future__ import annotations

from pathlib import Path

import pytest

import tsnetchat
from tsnetchat.config import Limits, ServerConfig, load_config
from tsnetchat.errors import ConfigError

# --- public surface -----------------------------------------------------------------------


def test_public_api_is_sorted_and_importable() -> None:
    assert tsnetchat.__all__ == sorted(tsnetchat.__all__)
    for name in tsnetchat.__all__:
        assert hasattr(tsnetchat, name)


# --- configuration ------------------------------------------------------------------------


def test_precedence_is_defaults_then_file_then_env_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("port = 1000\nmax_page = 10\nrate_burst = 7\n")
    cfg = load_config(file=f, env={"TSNETCHAT_PORT": "2000", "TSNETCHAT_MAX_PAGE": "20"},
                      flags={"port": 3000, "rate_burst": None})
    assert (cfg.port, cfg.max_page, cfg.rate_burst) == (3000, 20, 7)
    assert cfg.history_on_join == ServerConfig().history_on_join


@pytest.mark.parametrize("source,expect", [
    ({"flags": {"port": 70000}}, "--port: 70000 is not a TCP port"),
    ({"flags": {"metrics_port": 99999}}, "--metrics-port: 99999 is not a TCP port (1-65535)"),
    ({"flags": {"metrics_port": 50051}}, "--metrics-port: must differ from the server's own"),
    ({"env": {"TSNETCHAT_PORT": "abc"}},
     "TSNETCHAT_PORT: invalid value 'abc' for port: expected a whole number$"),
    ({"env": {"TSNETCHAT_STORE_WAIT": "soon"}},
     "TSNETCHAT_STORE_WAIT: invalid value 'soon' for store_wait: expected a number$"),
    ({"env": {"TSNETCHAT_REQUIRE_GRANT": "maybe"}}, "expected true or false"),
    ({"flags": {"listen": "0.0.0.0"}}, "--listen: 0.0.0.0 would listen on every interface"),
    ({"flags": {"listen": "::"}}, "would listen on every interface"),
    ({"flags": {"listen": "::ffff:0.0.0.0"}}, "would listen on every interface"),
    ({"flags": {"state_dir": "/var/lib/a\x00b"}}, "--state-dir: contains a NUL character"),
    ({"flags": {"cluster": ",,,"}}, "--cluster: lists no NATS URL"),
    ({"env": {"TSNETCHAT_CLUSTER": "nats://a:4222,nats://chat:s3cret@b:4222"}},
     "TSNETCHAT_CLUSTER: a NATS URL carries no user, password or token"),
    ({"flags": {"cap_domain": "not a domain"}}, "--cap-domain"),
    ({"flags": {"shutdown_grace": -1}}, "--shutdown-grace: must not be negative"),
    ({"env": {"TSNETCHAT_STARTUP_TIMEOUT": "0"}},
     "TSNETCHAT_STARTUP_TIMEOUT: must be greater than 0"),
    ({"flags": {"recheck_interval": 0}}, "--recheck-interval: must be greater than 0"),
    ({"flags": {"whois_timeout": 1e-9}}, "--whois-timeout: must be at least 0.1 seconds"),
    ({"env": {"TSNETCHAT_STORE_WAIT": "0.01"}},
     "TSNETCHAT_STORE_WAIT: must be at least 0.1 seconds"),
])
def test_bad_settings_name_where_they_came_from(source: dict[str, dict[str, object]],
                                               expect: str) -> None:
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        load_config(file=None, env=source.get("env", {}),  # type: ignore[arg-type]
                    flags=source.get("flags", {}))


def test_unknown_file_key_and_bad_toml_are_reported(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'prot'"):
        load_config(file=f, env={})
    f.write_text("port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(file=f, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(file=tmp_path / "missing.toml", env={})


@pytest.mark.parametrize(("line", "says"), [
    ("rate_brust = 10", "unknown key 'rate_brust': did you mean 'rate_burst'?"),
    ("cap-domain = 'x.com'", "unknown key 'cap-domain': did you mean 'cap_domain'?"),
    ("[server]\nport = 1", "unknown key 'server' (known: admins_read_dms, "),
], ids=["typo", "dash", "table"])
def test_a_mistyped_key_is_answered_with_the_key_it_is_closest_to(
        tmp_path: Path, line: str, says: str) -> None:
    """Only the list of all 60 keys was given, and a reload refused for a typo said no
    more in the log (an operator's run, 2026-11-25). A table is no key's typo."""
    f = tmp_path / "c.toml"
    f.write_text(line + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(file=f, env={})
    assert says in str(e.value)


def test_config_show_masks_secrets() -> None:
    cfg = load_config(file=None, env={"TSNETCHAT_AUTH_KEY": "tskey-auth-secret"})
    assert cfg.masked()["auth_key"] == "********"
    assert "tskey" not in str(cfg.masked())


def test_limits_are_defined_once_and_read_from_the_config(tmp_path: Path) -> None:
    assert ServerConfig().limits == Limits()
    f = tmp_path / "c.toml"
    f.write_text("rate_burst = 7\ncall_rate = 3.5\n")
    limits = load_config(file=f, env={}).limits
    assert (limits.rate_burst, limits.call_rate) == (7, 3.5)


def test_a_missing_config_file_named_by_the_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^TSNETCHAT_CONFIG: config file /nonexistent\.toml "
                                          r"does not exist$"):
        load_config(env={"TSNETCHAT_CONFIG": "/nonexistent.toml"})


def test_a_secret_in_a_config_file_others_may_read_is_named(tmp_path: Path) -> None:
    """nats_password in a 0644 config.toml was taken without a word (an operator's run)."""
    f = tmp_path / "config.toml"
    f.write_text('nats_user = "chat"\nnats_password = "s3cret"\nport = 50052\n')
    f.chmod(0o644)
    cfg = load_config(file=f, env={})
    assert cfg.secrets_open_to_others() == ["nats_password"]
    assert cfg.where("nats_password") == f"{f}: nats_password"
    f.chmod(0o600)
    assert load_config(file=f, env={}).secrets_open_to_others() == []
    from_env = load_config(file=None, env={"TSNETCHAT_NATS_PASSWORD": "s3cret"})
    assert from_env.secrets_open_to_others() == []


def test_an_operators_command_by_another_user_reads_the_units_state_dir_only_when_unsaid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user other than root without server state of their own means the units' server
    (the systemd test holds the whole of it: tests/test_systemd_units.py); one who named a
    state dir, or has one, keeps it."""
    from tsnetchat import config

    units, home = tmp_path / "var-lib-tsnetchat", tmp_path / "state"
    units.symlink_to(tmp_path / "private")  # (as DynamicUser= makes it)
    monkeypatch.setattr(config, "SERVICE_STATE_DIR", units)
    monkeypatch.setattr(config.os, "geteuid", lambda: 1000)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    unsaid = load_config(env={}, flags={})
    assert config.for_operator(unsaid).state_dir == units
    said = load_config(env={}, flags={"state_dir": str(tmp_path / "mine")})
    assert config.for_operator(said).state_dir == tmp_path / "mine"
    (home / "tsnetchat").mkdir(parents=True)
    (home / "tsnetchat" / "tsnetchat.db").write_bytes(b"")
    assert config.for_operator(load_config(env={}, flags={})).state_dir == home / "tsnetchat"


def test_a_list_setting_may_be_a_toml_list_of_strings(tmp_path: Path) -> None:
    """`tags = ["tag:chat"]`, as TOML lists are written, was refused as "expected a string"
    (an operator's run, 2026-11-25)."""
    f = tmp_path / "c.toml"
    f.write_text('tags = ["tag:chat", "tag:bot"]\ncluster = ["nats://a:4222", "nats://b:4222"]\n'
                 'listen = ["100.64.0.1"]\n')
    cfg = load_config(file=f, env={})
    assert cfg.tag_list == ["tag:chat", "tag:bot"] and cfg.tags == "tag:chat,tag:bot"
    assert cfg.cluster_urls == ["nats://a:4222", "nats://b:4222"]
    assert cfg.listen == "100.64.0.1"
    f.write_text("tags = [1]\n")
    with pytest.raises(ConfigError, match=r'tags: invalid value \[1\] for tags: expected a '
                                          r'string, or a list of them \(\["a", "b"\]\)'):
        load_config(file=f, env={})


@pytest.mark.parametrize(("source", "says"), [
    ({"flags": {"metrics_port": 50051}}, "--metrics-port: must differ from the server's own "
                                         "port (port = 50051)"),
    ({"flags": {"metrics_port": 7000, "port": 7000}}, "--metrics-port: must differ from the "
                                                      "server's own port (--port = 7000)"),
])
def test_a_metrics_port_that_is_the_servers_names_where_the_servers_came_from(
        source: dict[str, dict[str, object]], says: str) -> None:
    """It said "other than --port" when no --port had been given (a newcomer's config,
    2026-11-25)."""
    with pytest.raises(ConfigError) as caught:
        load_config(env={}, **source)  # type: ignore[arg-type]
    assert str(caught.value) == says


@pytest.mark.parametrize(("line", "says"), [
    ("enroll = true", "enroll: invalid value true for enroll: expected a string: one of off, "
                      "grant, any"),
    ("stale_device = false", "stale_device: invalid value false for stale_device: expected a "
                             "string: one of remove, report"),
    ("port = true", "port: invalid value true for port: expected a whole number"),
])
def test_a_toml_value_of_the_wrong_kind_is_said_as_toml_writes_it_with_the_words_allowed(
        tmp_path: Path, line: str, says: str) -> None:
    """`enroll = true` said "invalid value True ... expected a string": Python's spelling,
    and not which words (a newcomer's config, 2026-11-25)."""
    f = tmp_path / "c.toml"
    f.write_text(line + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(file=f, env={})
    assert str(caught.value) == f"{f}: {says}"
