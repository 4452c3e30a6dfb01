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
    ({"flags": {"metrics_port": 50051}}, "--metrics-port: must be a free TCP port other than"),
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
