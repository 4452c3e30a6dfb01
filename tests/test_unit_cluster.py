"""Cluster mode's settings and credentials (pure logic; the behaviour is proven over a real
NATS cluster in tests/test_cluster_mode.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tsnetchat.cluster import ClusterHistory, _decode, _encode, _Kicks, connect_options
from tsnetchat.config import load_config
from tsnetchat.errors import ConfigError, StoreError
from tsnetchat.loop import cancel_all
from tsnetchat.store import (
    DELETE,
    EDIT,
    TEXT,
    Draft,
    Imported,
    Refused,
    Sender,
    SqliteHistory,
    Store,
    StoredMessage,
    Written,
)


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
    creds.chmod(0o644)  # whoever reads it reads the cluster's signing key from NATS
    with pytest.raises(ConfigError, match=r"readable by others \(mode 0644\).*chmod 600"):
        connect_options(cfg, env={})
    creds.chmod(0o600)
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
    with pytest.raises(ConfigError, match=r"^--nats-credentials: cannot read"):
        connect_options(cfg, env={})
    toml = tmp_path / "config.toml"
    toml.write_text(f'cluster = "nats://a:4222"\nnats_credentials = "{tmp_path / "none"}"\n')
    with pytest.raises(ConfigError, match=f"^{toml}: nats_credentials: cannot read"):
        connect_options(load_config(file=toml, env={}), env={})


# --- applying the stream: edits and deletions as the embedded store makes them -----------

ALICE = Sender("alice@example.com", "Alice", "laptop")
BOB = Sender("bob@example.com", "Bob", "laptop")


def _as_stream(written: list[StoredMessage], drafts: list[Draft]) -> list[Imported]:
    """What the stream would carry for messages a Store wrote (its seq = list position)."""
    out = []
    for i, (m, d) in enumerate(zip(written, drafts, strict=True), 1):
        data = _encode(d, m.id, m.ts_ms, "o:1")
        out.append(_decode("tsnetchat.msg.room.general", data, i)[0])
    return out


def _written(store: Store, drafts: list[Draft]) -> list[StoredMessage]:
    out = []
    for d in drafts:
        (w,) = store.write([d])
        assert isinstance(w, Written), w
        out.append(w.message)
    return out


def test_an_imported_edit_and_deletion_leave_the_copy_as_the_embedded_store_leaves_it(
        tmp_path: Path) -> None:
    drafts = [Draft("general", ALICE, TEXT, "my token is hunter2xyzzy", "c1"),
              Draft("general", BOB, TEXT, "ok", "c2"),
              Draft("general", ALICE, EDIT, "my token is hunter2xyzzy!", "c3", target=1),
              Draft("general", BOB, TEXT, "fixed wording", "c4"),
              Draft("general", ALICE, EDIT, "corrected and clean", "c5", target=4)]
    embedded = Store(tmp_path / "embedded.db")
    written = _written(embedded, drafts[:3])
    copy = Store(tmp_path / "copy.db")
    assert copy.import_messages(_as_stream(written, drafts[:3]), "s", 3) == {}
    dele = Draft("general", ALICE, DELETE, "", "c6", target=1)
    verdict = copy.decide_change(dele, written[-1].ts_ms)
    assert not isinstance(verdict, Refused)
    assert [(seq, m.id) for seq, m in verdict] == [(1, 1), (3, 3)]
    (w,) = embedded.write([dele])
    assert isinstance(w, Written)
    data = _encode(dele, w.message.id, w.message.ts_ms, "o:2", verdict)
    imported, _, erases = _decode("tsnetchat.msg.room.general", data, 4)
    assert erases == [1, 3]
    assert copy.import_messages([imported], "s", 4) == {}
    assert copy.after("general", 0, 10) == embedded.after("general", 0, 10)
    assert copy.search("hunter2xyzzy", ["general"]) == []
    assert copy.purge_due  # the writer thread purges the text from the files
    assert copy.applied("s") == 4
    embedded.close()
    copy.close()


def test_a_copy_that_never_got_a_deleted_message_gets_its_tombstone_and_never_its_text(
        tmp_path: Path) -> None:
    drafts = [Draft("general", ALICE, TEXT, "secret hunter2xyzzy", "c1"),
              Draft("general", ALICE, EDIT, "secret hunter2xyzzy v2", "c2", target=1),
              Draft("general", BOB, TEXT, "after", "c3")]
    embedded = Store(tmp_path / "embedded.db")
    written = _written(embedded, drafts)
    dele = Draft("general", ALICE, DELETE, "", "c4", target=1)
    verdict = embedded.decide_change(dele, written[-1].ts_ms)
    assert not isinstance(verdict, Refused)
    (w,) = embedded.write([dele])
    assert isinstance(w, Written)
    late = Store(tmp_path / "late.db")  # the stream has lost messages 1 and 2 (erased)
    stream = _as_stream(written, drafts)[2:]
    data = _encode(dele, w.message.id, w.message.ts_ms, "o:2", verdict)
    stream.append(_decode("tsnetchat.msg.room.general", data, 4)[0])
    assert late.import_messages(stream, "s", 4) == {}
    assert late.after("general", 0, 10) == embedded.after("general", 0, 10)
    gone = late.after("general", 0, 1)[0]
    assert (gone.text, gone.deleted_by) == ("", ALICE.login)
    embedded.close()
    late.close()


def test_a_change_is_decided_on_the_copy_as_the_embedded_store_decides_it(
        tmp_path: Path) -> None:
    copy = Store(tmp_path / "copy.db")
    d = Draft("general", BOB, TEXT, "mine", "c1")
    copy.import_messages(_as_stream(_written(Store(tmp_path / "e.db"), [d]), [d]), "s", 1)
    now = copy.after("general", 0, 1)[0].ts_ms
    edit = copy.decide_change(Draft("general", ALICE, EDIT, "x", "c2", target=1), now)
    assert isinstance(edit, Refused) and "only its author" in str(edit.error)
    admin = copy.decide_change(Draft("general", ALICE, DELETE, "", "c3", target=1,
                                     admin=True), now)
    assert not isinstance(admin, Refused) and [m.id for _, m in admin] == [1]
    late = copy.decide_change(Draft("general", BOB, EDIT, "x", "c4", target=1,
                                    edit_window_ms=1000), now + 5000)
    assert isinstance(late, Refused) and "edit_window_seconds" in str(late.error)
    missing = copy.decide_change(Draft("general", BOB, EDIT, "x", "c5", target=9), now)
    assert isinstance(missing, Refused) and "no message 9" in str(missing.error)
    copy.close()


async def test_a_nats_cluster_that_cannot_be_reached_fails_the_start_within_startup_timeout(
        tmp_path: Path) -> None:
    """It waited for ever, without a word (an operator's run, 2026-11-23)."""
    from fakenet import FakeTailnet
    from helpers import free_port, make_config

    from tsnetchat.errors import StoreError
    from tsnetchat.server import Server

    cfg = make_config(tmp_path, cluster=f"nats://127.0.0.1:{free_port()}", nats_user="chat",
                      nats_password="x", startup_timeout=2.0)
    server = Server(cfg, tailnet=FakeTailnet())
    try:
        with pytest.raises(StoreError, match=r"cannot reach the NATS cluster .* within 2s"):
            await asyncio.wait_for(server.start(), 60)
    finally:
        await server.stop(grace=0)


def test_an_imported_edit_gives_its_target_the_new_texts_mentions_and_an_old_one_keeps_them(
        tmp_path: Path) -> None:
    """A server older than edits' mentions (2026-11-24) writes no "m" for an edit: a copy
    rebuilt from the stream must not take that for "mentions nobody"."""
    bob = ("bob@example.com",)
    drafts = [Draft("general", ALICE, TEXT, "hey bob", "c1", mentions=bob),
              Draft("general", ALICE, EDIT, "hey team", "c2", target=1),
              Draft("general", ALICE, EDIT, "hey team and bob", "c3", target=1, mentions=bob)]
    embedded = Store(tmp_path / "embedded.db")
    written = _written(embedded, drafts)
    assert [m.mentions for m in written] == [bob, (), ()]  # (an edit's are its target's)
    copy = Store(tmp_path / "copy.db")
    stream = _as_stream(written, drafts)
    assert copy.import_messages(stream[:2], "s", 2) == {}
    assert copy.mentions_of("bob@example.com", include_read=True, limit=10) == []
    assert copy.import_messages(stream[2:], "s", 3) == {}
    assert [m.id for m in copy.mentions_of("bob@example.com", include_read=True, limit=10)
            ] == [1] == [m.id for m in embedded.mentions_of("bob@example.com",
                                                           include_read=True, limit=10)]
    # the same edit from an older server: no "m" in the stream, and bob stays mentioned
    old = Store(tmp_path / "old.db")
    legacy = _as_stream(written[:2], drafts[:2])
    legacy[1] = _decode("tsnetchat.msg.room.general",
                        _encode(drafts[1], 2, written[1].ts_ms, "o:1").replace(b',"m":[]', b""),
                        2)[0]
    assert legacy[1].edit_mentions is None
    assert old.import_messages(legacy, "s", 2) == {}
    assert [m.id for m in old.mentions_of("bob@example.com", include_read=True, limit=10)
            ] == [1]
    for s in (embedded, copy, old):
        s.close()


def test_a_server_applies_each_kick_stored_after_it_started_once_and_none_of_its_own() -> None:
    kicks = _Kicks("me", after=5)  # the kicks bucket's last sequence when it started

    def kick(seq: int, kid: str, origin: str = "other") -> tuple[str, str, str] | None:
        return kicks.take(seq, json.dumps({"id": kid, "room": "general", "login": "bob@x",
                                           "by": "alice@x", "o": origin}).encode())

    assert kick(5, "before") is None  # a moment, not a ban: bob may have joined again since
    assert kick(6, "k1") == ("general", "bob@x", "alice@x")
    assert kick(6, "k1") is None  # delivered again by a re-created consumer
    assert kick(2, "older") is None  # ... re-created from the stream's start
    assert kick(7, "k1") is None  # stored twice: a publish tried again after a time-out
    assert kick(8, "mine", origin="me") is None  # closed here before it was published
    assert kicks.take(9, b"") is None and kicks.take(10, b"{not json") is None
    assert kick(11, "k2") == ("general", "bob@x", "alice@x")


async def test_a_message_still_being_appended_when_the_server_stops_is_refused_not_left_waiting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(file=None, env={}, flags={"state_dir": str(tmp_path),
                                                "cluster": "nats://127.0.0.1:1"})
    local = await SqliteHistory.open(cfg.db_path)
    history = ClusterHistory(local, cfg)
    reached = asyncio.Event()

    async def looking_for_resends(room: str, batch: list[object]) -> None:
        reached.set()  # (as while the copy is read for resends, before anything is sent)
        await asyncio.Event().wait()

    monkeypatch.setattr(history, "_append", looking_for_resends)
    answers: list[object] = []
    sender = Sender("alice", "Alice", "n1")
    history.submit(Draft("general", sender, TEXT, "hello", client_msg_id="c1"), answers.append)
    history.submit(Draft("general", sender, TEXT, "again", client_msg_id="c2"), answers.append)
    await asyncio.wait_for(reached.wait(), 5)
    await cancel_all(list(history._appenders.values()))
    try:
        assert len(answers) == 2
        assert all(isinstance(a, StoreError) and "shutting down" in str(a) for a in answers)
        assert history.pending() == 0
    finally:
        await local.close()


async def test_a_server_moved_to_cluster_mode_says_its_earlier_history_is_not_served(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It served empty rooms without a word, the team's history left in tsnetchat.db (an
    operator's run, 2026-11-25)."""
    from fakenet import FakeTailnet
    from helpers import free_port, make_config

    from tsnetchat.server import Server
    from tsnetchat.store import Sender, Store

    before = make_config(tmp_path)
    single = Store(before.db_path)
    single.append("general", Sender("a@example.com", "A", "a"), 1, "from before the cluster")
    single.close()
    cfg = make_config(tmp_path, cluster=f"nats://127.0.0.1:{free_port()}", nats_user="chat",
                      nats_password="x", startup_timeout=0.5)
    server = Server(cfg, tailnet=FakeTailnet())
    try:
        assert (f"cluster mode: {before.db_path} holds the history this server had before "
                "cluster mode; the cluster does not serve it") in caplog.text
    finally:
        await server.stop(grace=0)


def _copy_applied_through(db_path: Path, seq: int) -> None:
    """A server's copy of the cluster that has applied the stream up to ``seq``."""
    import sqlite3

    from tsnetchat.cluster import SOURCE

    Store(db_path).close()
    db = sqlite3.connect(db_path)
    db.execute("CREATE TABLE IF NOT EXISTS applied (source TEXT PRIMARY KEY, seq INTEGER)")
    db.execute("INSERT INTO applied (source, seq) VALUES (?, ?)", (SOURCE, seq))
    db.commit()
    db.close()


@pytest.mark.cluster
async def test_a_copy_ahead_of_the_clusters_stream_refuses_to_start_and_says_why(
        tmp_path: Path, nats_cluster: Any) -> None:
    """NATS rebuilt empty (or another cluster named): the server said "joined; stream at
    20109", took its copy's sequences for applied and refused every send for good as not
    caught up (an operator's run, 2026-11-25)."""
    from fakenet import FakeTailnet
    from helpers import cluster_flags, make_config

    from tsnetchat.errors import StoreError
    from tsnetchat.server import Server

    cfg = make_config(tmp_path, **cluster_flags(nats_cluster), startup_timeout=20.0)
    _copy_applied_through(cfg.db_path, 20109)
    server = Server(cfg, tailnet=FakeTailnet())
    try:
        with pytest.raises(StoreError, match=r"has applied the stream TSNETCHAT up to sequence "
                                             r"20109, but the stream on .* ends at 0: it was "
                                             r"deleted and made again, or this is another"):
            await asyncio.wait_for(server.start(), 60)
    finally:
        await server.stop(grace=0)


@pytest.mark.cluster
async def test_doctor_fails_a_copy_ahead_of_the_clusters_stream_as_serve_refuses_it(
        tmp_path: Path, nats_cluster: Any) -> None:

    import nats
    from helpers import cluster_flags, make_config, placed

    from tsnetchat.cluster import PREFIX, STREAM
    from tsnetchat.doctor import FAIL, OK, _cluster

    cfg = make_config(tmp_path, **cluster_flags(nats_cluster))
    nc = await nats.connect(nats_cluster.urls, user=nats_cluster.user,
                            password=nats_cluster.password)
    try:
        await placed(lambda: nc.jetstream(timeout=20).add_stream(
            name=STREAM, subjects=[PREFIX + ">"], num_replicas=3), STREAM)
    finally:
        await nc.close()
    # (no copy yet: OK once the new stream's copies are current, which takes a moment: asked
    # at once it failed 1 run in 15; a review, 2026-11-25)
    deadline = asyncio.get_running_loop().time() + 20
    while (found := await _cluster(cfg)).verdict != OK:
        assert asyncio.get_running_loop().time() < deadline, found
        await asyncio.sleep(0.2)
    _copy_applied_through(cfg.db_path, 20109)
    found = await _cluster(cfg)
    assert found.verdict == FAIL, found
    assert ("has applied the stream up to sequence 20109, but the cluster's ends at 0"
            in found.detail)


@pytest.mark.cluster
async def test_doctor_does_not_fail_a_running_copy_that_applied_what_came_after_it_asked(
        tmp_path: Path, nats_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A running server applies messages while doctor looks: read after the stream's end
    was asked, its copy was ahead of that answer, and a busy cluster failed as "deleted
    and made again" (a review, 2026-11-25)."""
    import sqlite3

    import nats
    from helpers import cluster_flags, make_config, placed, until_stream_answers
    from nats.js.client import JetStreamContext

    from tsnetchat.cluster import PREFIX, SOURCE, STREAM
    from tsnetchat.doctor import OK, _cluster

    cfg = make_config(tmp_path, **cluster_flags(nats_cluster))
    nc = await nats.connect(nats_cluster.urls, user=nats_cluster.user,
                            password=nats_cluster.password)
    try:
        js = nc.jetstream(timeout=20)
        await placed(lambda: js.add_stream(name=STREAM, subjects=[PREFIX + ">"],
                                           num_replicas=3), STREAM)
        await until_stream_answers(js, PREFIX + "general")
        first = await js.publish(PREFIX + "general", b"m1")
        # (every copy current first, as the test above waits: asked at once, doctor warned
        # of a copy not yet current in 1 run in 15; a review, 2026-11-25)
        deadline = asyncio.get_running_loop().time() + 20
        while (found := await _cluster(cfg)).verdict != OK:
            assert asyncio.get_running_loop().time() < deadline, found
            await asyncio.sleep(0.2)
        Store(cfg.db_path).close()
        db = sqlite3.connect(cfg.db_path)
        db.execute("CREATE TABLE IF NOT EXISTS applied (source TEXT PRIMARY KEY, seq INTEGER)")
        db.execute("INSERT INTO applied (source, seq) VALUES (?, ?)", (SOURCE, first.seq))
        db.commit()
        asked = JetStreamContext.stream_info

        async def then_a_message_is_sent_and_applied(self: Any, *a: Any, **k: Any) -> Any:
            info = await asked(self, *a, **k)
            ack = await js.publish(PREFIX + "general", b"m2")  # (as the server applies it)
            db.execute("UPDATE applied SET seq=? WHERE source=?", (ack.seq, SOURCE))
            db.commit()
            return info

        monkeypatch.setattr(JetStreamContext, "stream_info", then_a_message_is_sent_and_applied)
        found = await _cluster(cfg)
        db.close()
    finally:
        await nc.close()
    assert found.verdict == OK, found


@pytest.mark.cluster
async def test_a_copy_ahead_of_the_clusters_stream_is_refused_before_anything_is_made_there(
        tmp_path: Path, nats_cluster: Any) -> None:
    """The refusal says nothing was changed; the server had made the stream and every
    bucket there, put its signing key and a new history id in it, and published its
    presence, in what may be another NATS cluster named by mistake."""
    import sqlite3

    import nats
    import nats.js.errors
    from fakenet import FakeTailnet
    from helpers import cluster_flags, make_config

    from tsnetchat.cluster import SOURCE, STATE, STREAM
    from tsnetchat.server import Server

    cfg = make_config(tmp_path, **cluster_flags(nats_cluster), startup_timeout=20.0)
    Store(cfg.db_path).close()
    db = sqlite3.connect(cfg.db_path)
    db.execute("CREATE TABLE IF NOT EXISTS applied (source TEXT PRIMARY KEY, seq INTEGER)")
    db.execute("INSERT INTO applied (source, seq) VALUES (?, 20109)", (SOURCE,))
    db.commit()
    db.close()
    server = Server(cfg, tailnet=FakeTailnet())
    try:
        with pytest.raises(StoreError, match="nothing was changed"):
            await asyncio.wait_for(server.start(), 60)
    finally:
        await server.stop(grace=0)
    nc = await nats.connect(nats_cluster.urls, user=nats_cluster.user,
                            password=nats_cluster.password)
    try:
        js = nc.jetstream()
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.stream_info(STREAM)
        with pytest.raises(nats.js.errors.BucketNotFoundError):
            await js.key_value(STATE)
    finally:
        await nc.close()
