"""The client's token store: where tokens come from and which server node they belong to."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tsnetchat.discovery import ServerNode
from tsnetchat.errors import ConfigError, InvalidInput, TailnetError, Unauthenticated
from tsnetchat.pb import chat_pb2 as pb
from tsnetchat.tokens import (
    DEAD_FOR,
    Entry,
    Renewal,
    TokenStore,
    _check_server,
    explicit_token,
    outlived,
    save_admin_token,
)

SERVER = ServerNode(short_name="chat-server", dns_name="chat-server.tailnet.test",
                    ips=("100.64.0.1", "fd7a:115c:a1e0::1"), node_id="nSTABLE1")
# The same node as the resolver alone sees it: no stable id, one address.
BY_RESOLVER = ServerNode(short_name="chat-server", dns_name="", ips=("100.64.0.1",))
OTHER = ServerNode(short_name="other", dns_name="other.tailnet.test", ips=("100.64.0.7",),
                   node_id="nOTHER")


def entry(token: str = "tok", **over: object) -> Entry:
    fields: dict[str, object] = dict(node_id="nSTABLE1", name="chat-server.tailnet.test",
                                     ips=["100.64.0.1", "fd7a:115c:a1e0::1"], token=token,
                                     token_id="login-1", source="login",
                                     received=time.time(), lifetime=3600.0)
    fields.update(over)
    return Entry(**fields)  # type: ignore[arg-type]


def test_explicit_sources_come_in_order_flag_file_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TSNETCHAT_TOKEN", raising=False)
    assert explicit_token() is None
    monkeypatch.setenv("TSNETCHAT_TOKEN", "env")
    assert explicit_token() == "env"
    f = tmp_path / "t"
    f.write_text("file\n")
    assert explicit_token(token_file=f) == "file"
    assert explicit_token("flag", f) == "flag"


@pytest.mark.parametrize("make", [None, Path.mkdir, lambda p: p.write_text(" \n"),
                                  lambda p: p.write_bytes(b"\xff\xfe"),
                                  lambda p: p.write_text("two words")],
                         ids=["missing", "a-directory", "empty", "not-text", "not-a-token"])
def test_a_token_file_that_gives_no_token_is_bad_input_whatever_the_cause(
        tmp_path: Path, make: Any) -> None:
    """One exit code (2) for a --token-file that cannot be used: a missing one was 3, an
    empty one 2."""
    f = tmp_path / "t"
    if make is not None:
        make(f)
    with pytest.raises(InvalidInput, match=f"(--token-file|token file) {f}"):
        explicit_token(token_file=f)


def test_a_stored_token_is_found_by_node_id_or_by_address_not_by_the_name_typed(
        tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    store.put(entry())
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"
    for typed in ("chat-server", "chat-server.tailnet.test", "100.64.0.1", "whatever"):
        found = store.find(SERVER, typed)
        assert found is not None and found.token == "tok"
    found = store.find(BY_RESOLVER, "chat-server")
    assert found is not None and found.token == "tok"
    assert store.find(OTHER, "chat-server") is None  # a name alone finds nothing
    # a renamed server with a new address keeps its token: the node id decides
    moved = ServerNode(short_name="chat", dns_name="chat.tailnet.test", ips=("100.64.0.9",),
                       node_id="nSTABLE1")
    assert store.find(moved, "chat") is not None


def test_a_stored_token_is_offered_to_no_other_node_though_it_has_the_servers_address(
        tmp_path: Path) -> None:
    """The node id decides where both sides know one: a device that got the server's old
    address after the server left the tailnet must not be handed its token. Without ids,
    only a shared address finds it."""
    store = TokenStore(tmp_path / "tokens.json")
    store.put(entry())
    impostor = replace(SERVER, node_id="nIMPOSTOR")
    assert store.find(impostor, "chat-server") is None
    elsewhere = ServerNode(short_name="chat-server", dns_name="", ips=("100.64.0.7",))
    assert store.find(elsewhere, "chat-server") is None


def test_a_token_kept_for_the_servers_port_comes_before_one_kept_for_any_port(
        tmp_path: Path) -> None:
    """(``TokenStore.find``: a token for no port in particular, kept after the port's own,
    is the other ports' and must not take the place of the one kept for this port.)"""
    store = TokenStore(tmp_path / "tokens.json")
    store.put(entry("team", port=50051))
    store.put(entry("any port"))
    assert sorted((e.token, e.port) for e in store.read()[0]) == [
        ("any port", 0), ("team", 50051)]
    assert (kept_for(store, 50051), kept_for(store, 50052)) == ("team", "any port")


def test_keeping_a_token_replaces_the_one_for_the_same_node_only(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    store.put(entry("first"))
    store.put(entry("other", node_id="nOTHER", ips=["100.64.0.7"]))
    store.put(entry("second"))
    entries, _ = store.read()
    assert sorted(e.token for e in entries) == ["other", "second"]


def kept_for(store: TokenStore, port: int) -> str | None:
    found = store.find(SERVER, "chat-server", port)
    return found.token if found else None


async def test_two_servers_on_one_node_each_keep_their_own_token(tmp_path: Path) -> None:
    """A login to a second server on the server's node (another port) replaced the first
    server's token, which the first then refused as another key's (an operator's run,
    2026-11-25). An entry of no port (an older tsnetchat's) is any port's until replaced."""
    old = TokenStore(tmp_path / "old.json")
    old.put(entry("older"))  # (port 0)
    assert kept_for(old, 50051) == kept_for(old, 50052) == "older"
    store = TokenStore(tmp_path / "tokens.json")
    store.put(entry("older"))
    store.put(entry("team", port=50051))
    store.put(entry("test", port=50052))
    assert sorted((e.token, e.port) for e in store.read()[0]) == [
        ("team", 50051), ("test", 50052)]
    assert (kept_for(store, 50051), kept_for(store, 50052), kept_for(store, 50053)) == (
        "team", "test", None)
    assert [Renewal.for_server(SERVER, "chat-server", store, port=p).token
            for p in (50051, 50052)] == ["team", "test"]
    store.put(entry("team again", port=50051))
    save_admin_token(SERVER, "admin-issued", store, port=50052)
    assert sorted(e.token for e in store.read()[0]) == ["admin-issued", "team again"]
    assert (kept_for(store, 50051), kept_for(store, 50052)) == ("team again", "admin-issued")


def test_a_file_from_the_older_version_is_read_as_tokens_by_name(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"chat-server": "old"}))
    os.chmod(path, 0o600)
    store = TokenStore(path)
    assert store.find(SERVER, "Chat-Server.").token == "old"  # type: ignore[union-attr]
    assert store.find(OTHER, "other") is None
    store.put(entry("new", node_id="nOTHER", ips=["100.64.0.7"]))
    assert store.find(SERVER, "chat-server").token == "old"  # type: ignore[union-attr]


def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    store.put(entry())
    os.chmod(store.path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        store.read()
    store.path.write_text("{garbage")  # (said to "hold tokens" too: a newcomer, 2026-11-24)
    with pytest.raises(ConfigError, match="is where your tokens are kept, and others can"):
        store.read()


@pytest.mark.parametrize("mode", [0o640, 0o620, 0o610, 0o604, 0o602, 0o601])
def test_a_token_file_any_bit_of_the_group_or_others_has_is_refused(tmp_path: Path,
                                                                    mode: int) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    store.put(entry())
    os.chmod(store.path, mode)
    with pytest.raises(ConfigError, match=f"others can read it \\(mode {mode:04o}\\)"):
        store.read()


@pytest.mark.parametrize(("found", "claimed", "ip", "kept"), [
    ("nA", ("nA", ["100.64.0.1"]), "100.64.0.1", True),
    ("nA", ("nB", ["100.64.0.1"]), "100.64.0.1", False),  # tailscale knows better
    ("nA", ("", []), "100.64.0.1", True),  # (an older server says nothing)
    ("", ("nB", ["100.64.0.1", "fd7a::1"]), "100.64.0.1", True),
    ("", ("nB", ["100.64.0.2"]), "100.64.0.1", False),  # not the address dialled
])
def test_a_login_keeps_a_token_only_from_the_server_tailscale_says_it_dialled(
        found: str, claimed: tuple[str, list[str]], ip: str, kept: bool) -> None:
    """(``tokens._check_server``: a server's word about its node must agree with
    tailscale's, else its token is kept for a node it is not.)"""
    node = replace(SERVER, node_id=found)
    says = pb.ServerNode(node_id=claimed[0], addresses=claimed[1])
    if kept:
        _check_server(node, says, ip)
    else:
        with pytest.raises(TailnetError, match="not keeping its token"):
            _check_server(node, says, ip)


def test_an_admin_token_is_kept_with_its_expiry_and_is_not_renewable(tmp_path: Path) -> None:
    import base64

    payload = {"sub": "alice@x", "jti": "j1", "iat": 1000, "exp": 4000}
    part = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    store = TokenStore(tmp_path / "tokens.json")
    save_admin_token(SERVER, f"h.{part}.s", store)
    kept = store.find(SERVER, "chat-server")
    assert kept is not None and kept.source == "admin" and kept.token_id == "j1"
    assert kept.expires == 4000 and not kept.renewable()


async def test_no_stored_token_says_how_to_get_one(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    with pytest.raises(Unauthenticated, match="tsnetchat login chat-server"):
        Renewal.for_server(SERVER, "chat-server", store)


async def test_an_expired_token_whose_renewal_was_refused_says_why(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    store.put(entry(received=time.time() - 7200, refused="no grant any more"))
    with pytest.raises(Unauthenticated, match=r"expired on .*had refused to renew it: no grant"):
        Renewal.for_server(SERVER, "chat-server", store)
    store.put(entry(refused="token lock: this token has been revoked", dead=True,
                    refused_at=time.time()))
    with pytest.raises(Unauthenticated, match=re.escape(
            "refused to renew your token: token lock: this token has been revoked. Run "
            "`tsnetchat login")):
        Renewal.for_server(SERVER, "chat-server", store)


async def test_a_token_whose_renewal_was_refused_for_good_is_tried_again_a_minute_later(
        tmp_path: Path) -> None:
    """A server that ran for a while with another key refused every renewal, and the
    tokens it refused were dead for ever, also once the right server was back."""
    store = TokenStore(tmp_path / "tokens.json")
    wrong_key = "token lock: the token's signature does not match"
    store.put(entry(received=time.time() - 2000, refused=wrong_key, dead=True,
                    refused_at=time.time() - DEAD_FOR - 1))
    again = Renewal.for_server(SERVER, "chat-server", store)
    assert again.entry.renewable() and not again.entry.dead  # the server decides
    assert time.time() >= again.entry.renew_at()  # (renewed first, by ready())
    # The same in a process whose own renewal was refused (its Renewal is kept per server),
    # also where the store could not be written (the refusal is then only in memory).
    alive = again.entry
    again.entry = replace(alive, refused=wrong_key, dead=True, refused_at=time.time())
    with pytest.raises(Unauthenticated, match="signature does not match"):
        Renewal.for_server(SERVER, "chat-server", store)  # (the store says nothing of it)
    store.put(again.entry)
    with pytest.raises(Unauthenticated, match="signature does not match"):
        Renewal.for_server(SERVER, "chat-server", store)
    again.entry = replace(again.entry, refused_at=time.time() - DEAD_FOR - 1)  # a minute on
    store.put(again.entry)
    assert Renewal.for_server(SERVER, "chat-server", store) is again and again.entry.renewable()


async def test_a_login_token_is_due_for_renewal_after_half_its_life(tmp_path: Path) -> None:
    young, old = entry(received=time.time() - 1000), entry(received=time.time() - 2000)
    assert time.time() < young.renew_at() and time.time() >= old.renew_at()
    assert young.renewable() and not entry(refused="x").renewable()


def test_a_token_past_its_own_end_is_told_apart_without_checking_it() -> None:
    """A chat given an expired --token does not wait for it to work again (a review)."""
    import base64

    def jwt_with(claims: dict[str, object]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"eyJhbGciOiJIUzI1NiJ9.{body}.sig"

    now = time.time()
    assert outlived(jwt_with({"exp": int(now) - 1}), now)
    assert not outlived(jwt_with({"exp": int(now) + 60}), now)
    assert not outlived(jwt_with({}), now) and not outlived("not a jwt", now)
