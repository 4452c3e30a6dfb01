"""Parsing what grpc and tailscaled say about peers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tsnetchat.errors import LocalAPIUnavailable
from tsnetchat.tailnet import LocalAPI, format_addr, parse_grpc_peer

# --- peers and encoding -------------------------------------------------------------------


@pytest.mark.parametrize("peer,expect", [
    ("ipv4:127.0.0.1:33634", ("127.0.0.1", 33634)),
    ("ipv6:[::1]:56980", ("::1", 56980)),
    ("ipv6:%5B::1%5D:56980", ("::1", 56980)),
    ("ipv6:[fd7a:115c:a1e0::2]:443", ("fd7a:115c:a1e0::2", 443)),
])
def test_grpc_peer_strings_parse(peer: str, expect: tuple[str, int]) -> None:
    assert parse_grpc_peer(peer) == expect
    assert format_addr(*expect).endswith(f":{expect[1]}")


@pytest.mark.parametrize("peer", ["unix:/tmp/x.sock", "ipv4:nope", "ipv6:::1:5", ""])
def test_non_ip_peers_are_rejected(peer: str) -> None:
    with pytest.raises(ValueError):
        parse_grpc_peer(peer)


# --- IPN bus notices ----------------------------------------------------------------------

from tsnetchat.tailnet import Change, parse_notice  # noqa: E402


@pytest.mark.parametrize("notice,expect", [
    ({"Version": "1.102.3"}, None),
    ({"PeerChangedPatch": [{"NodeID": 3, "Online": True}]}, None),
    ({"SelfChange": {"ID": 1}}, Change(everything=True)),
    # Our own node, registered again: the gate refuses its new id as the server's own too.
    ({"SelfChange": {"ID": 7, "StableID": "n7"}}, Change(everything=True, self_node="n7")),
    ({"NetMap": {"SelfNode": {"StableID": "n7"}}}, Change(everything=True, self_node="n7")),
    ({"NetMap": ["not", "a", "netmap"]}, Change(everything=True)),
    ({"State": 6}, Change(everything=True)),
    ({"PeersRemoved": [3]}, Change(everything=True)),
    ({"UserProfiles": {"1": {"LoginName": "a"}}}, Change(everything=True)),
    ({"PeersChanged": [{"ID": 3, "StableID": "n3"}, {"ID": 4, "StableID": "n4"}]},
     Change(nodes=frozenset({"n3", "n4"}))),
    ({"PeersChanged": [{"ID": 3}]}, Change(everything=True)),
    ({"PeerChangedPatch": [{"NodeID": 6, "Online": False}, {"NodeID": 3, "Online": True}]},
     Change(offline=frozenset({6}))),
    ({"PeersChanged": [{"ID": 4, "StableID": "n4", "Online": False}]},
     Change(nodes=frozenset({"n4"}), offline=frozenset({4}))),
    ({"PeerChangedPatch": [{"NodeID": 6, "Online": False}], "SelfChange": {"ID": 1}},
     Change(everything=True, offline=frozenset({6}))),
])
def test_bus_notices_say_which_identities_may_have_changed(notice: dict[str, object],
                                                           expect: Change | None) -> None:
    assert parse_notice(notice) == expect


async def test_a_socket_path_that_is_missing_a_file_or_a_directory_is_said_so_by_every_caller(
        tmp_path: Path) -> None:
    """`serve`, `doctor` and the gate all said "not answering (ConnectError)" for each (an
    operator's run, 2026-11-25); the LocalAPI's one translation says which it is."""
    (tmp_path / "file").write_text("")
    said = {}
    for name in ("none.sock", "file", "."):
        api = LocalAPI(str(tmp_path / name), timeout=1.0)
        try:
            with pytest.raises(LocalAPIUnavailable) as caught:
                await api.status()
        finally:
            await api.aclose()
        said[name] = str(caught.value)
    assert "there is no socket there. Is tailscaled running?" in said["none.sock"]
    assert "that is a regular file, not tailscaled's socket" in said["file"]
    assert "that is a directory, not tailscaled's socket" in said["."]
