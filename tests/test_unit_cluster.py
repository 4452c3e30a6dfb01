"""Cluster mode's settings and credentials (pure logic; the behaviour is proven over a real
NATS cluster in tests/test_cluster_mode.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tsnetchat.cluster import connect_options
from tsnetchat.config import load_config
from tsnetchat.errors import ConfigError


def test_without_cluster_the_server_keeps_its_single_server_database(tmp_path: Path) -> None:
    cfg = load_config(file=None, env={}, flags={"state_dir": str(tmp_path)})
    assert cfg.cluster == "" and cfg.db_path == tmp_path / "tsnetchat.db"


def test_the_cluster_comes_from_the_environment_and_keeps_a_database_of_its_own(
        tmp_path: Path) -> None:
    cfg = load_config(file=None, env={"TSNETCHAT_CLUSTER": "nats://a:4222, nats://b:4222"},
                      flags={"state_dir": str(tmp_path)})
    assert cfg.cluster_urls == ["nats://a:4222", "nats://b:4222"]
    assert cfg.db_path == tmp_path / "cluster.db"


def test_a_bad_cluster_url_is_refused_naming_where_it_came_from(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text('cluster = "http://nats:4222"\n')
    with pytest.raises(ConfigError, match=r"config.toml: cluster: 'http://nats:4222' is not"):
        load_config(file=conf, env={})
    with pytest.raises(ConfigError, match="TSNETCHAT_CLUSTER_REPLICAS: must be 1, 3 or 5"):
        load_config(file=None, env={"TSNETCHAT_CLUSTER_REPLICAS": "2"})


def test_the_nats_password_is_masked_in_config_show() -> None:
    cfg = load_config(file=None, env={"TSNETCHAT_NATS_PASSWORD": "s3cret"})
    assert cfg.masked()["nats_password"] == "********"


def test_nats_credentials_come_from_a_creds_file_or_the_systemd_credential(
        tmp_path: Path) -> None:
    creds = tmp_path / "user.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\nxyz\n------END NATS USER JWT------\n")
    cfg = load_config(file=None, env={}, flags={"cluster": "nats://a:4222",
                                                 "nats_credentials": str(creds)})
    assert connect_options(cfg, env={})["user_credentials"] == str(creds)
    cred_dir = tmp_path / "credentials"
    cred_dir.mkdir()
    (cred_dir / "nats").write_text("pa55word\n")
    cfg = load_config(file=None, env={}, flags={"cluster": "nats://a:4222", "nats_user": "chat"})
    opts = connect_options(cfg, env={"CREDENTIALS_DIRECTORY": str(cred_dir)})
    assert (opts["user"], opts["password"]) == ("chat", "pa55word")


def test_a_password_without_a_user_is_refused_naming_the_setting(tmp_path: Path) -> None:
    cfg = load_config(file=None, env={}, flags={"cluster": "nats://a:4222",
                                                 "nats_password": "x"})
    with pytest.raises(ConfigError, match="nats_user"):
        connect_options(cfg, env={})
    cfg = load_config(file=None, env={}, flags={"cluster": "nats://a:4222",
                                                 "nats_credentials": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="nats_credentials: cannot read"):
        connect_options(cfg, env={})
