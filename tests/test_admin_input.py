"""Bad input to the operator's commands (token, config, doctor, serve) and to the numbers of
the client's: a clear error and the right exit code, nothing changed, never a traceback.
Each case was found from outside (2026-11-23) doing the wrong thing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import CLI, chat_server, free_port, need, run_cli, write_lock_held

from tsnetchat import statedir
from tsnetchat.config import load_config
from tsnetchat.doctor import FAIL, OK, WARN, checks
from tsnetchat.errors import ConfigError
from tsnetchat.store import Store


def issued_state(tmp_path: Path) -> tuple[Path, str]:
    """A state dir with one token issued (as `token issue` on a new machine), and its id."""
    state = tmp_path / "state"
    out = run_cli("token", "issue", "alice@tailnet.test", "--json", "--state-dir", str(state))
    assert out.returncode == 0, out.stderr
    return state, out.stdout.split('"id": "')[1].split('"')[0]


def test_revoking_an_id_that_was_never_issued_is_refused_and_revokes_nothing(
        tmp_path: Path) -> None:
    state, jti = issued_state(tmp_path)
    for wrong in (jti[:12], "nosuchid", " "):
        out = run_cli("token", "revoke", wrong, "--state-dir", str(state))
        assert out.returncode == 2, (wrong, out.stdout)
        assert "Traceback" not in out.stderr and out.stderr.startswith("error: ")
    listed = run_cli("token", "list", "--state-dir", str(state))
    assert listed.stdout.rstrip().endswith("active")
    done = run_cli("token", "revoke", jti, "--state-dir", str(state))
    assert (done.returncode, done.stdout.strip()) == (0, f"revoked {jti}")


def test_after_a_key_rotation_the_tokens_signed_before_are_listed_as_refused(
        tmp_path: Path) -> None:
    state, old = issued_state(tmp_path)
    time.sleep(1.0)  # (the list compares whole seconds: a rotation in the same one is unseen)
    assert run_cli("token", "rotate-key", "--state-dir", str(state)).returncode == 0
    new = run_cli("token", "issue", "bob@tailnet.test", "--json", "--state-dir", str(state))
    rows = json.loads(run_cli("token", "list", "--json", "--state-dir", str(state)).stdout)
    assert [(r["jti"], r["state"]) for r in rows] == [
        (old, "old-key"), (json.loads(new.stdout)["id"], "active")]
    listed = run_cli("token", "list", "--state-dir", str(state)).stdout.splitlines()
    assert listed[0].endswith(" old-key") and listed[1].endswith(" active")
    assert "signed before the signing key was last rotated" in listed[2]


def test_rotating_a_key_that_is_a_directory_says_so_not_that_there_is_none(
        tmp_path: Path) -> None:
    """It said "there is no signing key at ... (is --state-dir or the config file the
    server's?)" of the server's own state dir (an operator's run, 2026-11-25)."""
    state, _ = issued_state(tmp_path)
    key = state / "jwt.key"
    key.unlink()
    key.mkdir()
    out = run_cli("token", "rotate-key", "--state-dir", str(state))
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert out.stderr == (f"error: the token signing key {key} is not a regular file; remove "
                          "it (the next start makes a new key, and every token must be issued "
                          "again); nothing was rotated\n")
    assert key.is_dir() and list(key.iterdir()) == []


@pytest.mark.parametrize("command", [("token", "list"), ("token", "revoke", "abc"),
                                     ("token", "rotate-key"), ("backup", "/tmp/never.db")])
def test_an_operators_command_on_a_state_dir_that_does_not_exist_creates_nothing(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    """A mistyped --state-dir used to get a new directory, key and database, and "rotated" or
    "revoked": the server's real state was untouched and the operator told otherwise. Each
    says it as a configuration error, exit 3 (backup said it with 8)."""
    missing = tmp_path / "typo"
    out = run_cli(*command, "--state-dir", str(missing))
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert "is --state-dir or the config file the server's?" in out.stderr
    assert not missing.exists()


def test_an_operators_command_on_a_cluster_servers_state_dir_asks_for_its_cluster_settings(
        tmp_path: Path) -> None:
    """It said there was no history there (an attacker's run over the lab, 2026-11-25)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "cluster.db").write_bytes(b"")
    out = run_cli("token", "revoke", "abc", "--state-dir", str(state))
    assert out.returncode == 3, out.stdout
    assert "is a cluster server's (cluster.db): give this command the server's cluster" in (
        out.stderr)
    assert not (state / "tsnetchat.db").exists()


@pytest.mark.parametrize("command", [("token", "issue", "dave@tailnet.test"),
                                     ("token", "rotate-key"), ("backup", "OUT")])
def test_issue_rotate_key_and_backup_on_a_cluster_servers_state_dir_ask_for_its_settings(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    """Without the cluster settings, `token issue` made a tsnetchat.db the cluster server
    never reads (its record lost to `token list`), `rotate-key` rotated the key of a stopped
    server that would adopt the cluster's again, and `backup` said there was no history (an
    operator's run, 2026-11-25)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "cluster.db").write_bytes(b"")
    (state / "jwt.key").write_bytes(os.urandom(32))
    (state / "jwt.key").chmod(0o600)
    key = (state / "jwt.key").read_bytes()
    args = [str(tmp_path / "b.db") if a == "OUT" else a for a in command]
    out = run_cli(*args, "--state-dir", str(state))
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert "is a cluster server's (cluster.db): give this command the server's cluster" in (
        out.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    assert sorted(p.name for p in state.iterdir()) == ["cluster.db", "jwt.key"]
    assert (state / "jwt.key").read_bytes() == key


@pytest.mark.parametrize("cluster", ["nats://127.0.0.1:1", ""])
def test_a_restore_for_a_cluster_server_is_refused_and_changes_nothing(
        tmp_path: Path, cluster: str) -> None:
    """A cluster server's history is the stream: a restore put the backup in place of its
    copy, said clients start over from it, and nothing changed (a newcomer's run,
    2026-11-25). With or without the cluster settings, the state dir is left as it was."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "cluster.db").write_bytes(b"the copy")
    backup_file = tmp_path / "b.db"
    Store(backup_file).close()
    env = {**os.environ, "TSNETCHAT_CLUSTER": cluster}
    out = run_cli("restore", "--state-dir", str(state), str(backup_file), env=env)
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert "is a cluster server's: its history is the NATS cluster's stream TSNETCHAT" in (
        out.stderr)
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in state.iterdir()) == ["cluster.db"]
    assert (state / "cluster.db").read_bytes() == b"the copy"


@pytest.mark.parametrize("command", [("token", "list"), ("backup", "OUT")])
def test_a_fifo_or_a_dangling_link_in_place_of_the_database_is_said_as_such_not_as_no_history(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    """Both said there was no history database there (an operator's run, 2026-11-25)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    args = [str(tmp_path / "b.db") if a == "OUT" else a for a in command]
    for make, says in ((os.mkfifo, "is not a regular file"),
                       (lambda p: p.symlink_to(tmp_path / "gone.db"), "is a symbolic link")):
        make(state / "tsnetchat.db")
        out = run_cli(*args, "--state-dir", str(state))
        assert out.returncode == 3, (out.stdout, out.stderr)
        assert out.stderr == (f"error: {state}/tsnetchat.db {says}; the state dir holds only "
                              "the server's own files: remove it (nothing was opened)\n")
        (state / "tsnetchat.db").unlink()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_issuing_into_a_new_state_dir_says_it_made_a_new_key(tmp_path: Path) -> None:
    state = tmp_path / "new"
    out = run_cli("token", "issue", "alice@tailnet.test", "--state-dir", str(state))
    assert out.returncode == 0
    assert f"made a new signing key at {state / 'jwt.key'}" in out.stderr
    again = run_cli("token", "issue", "bob@tailnet.test", "--state-dir", str(state))
    assert "made a new signing key" not in again.stderr


@pytest.mark.parametrize("ttl", ["0", "-5h", "1e400h", "99999999999d", "nanh"])
def test_a_token_lifetime_that_is_not_positive_or_is_absurd_is_refused(
        tmp_path: Path, ttl: str) -> None:
    state, _ = issued_state(tmp_path)
    out = run_cli("token", "issue", "bob@tailnet.test", "--ttl", ttl, "--state-dir", str(state))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: --ttl: {ttl!r} is not a lifetime between 1s and 3650d"
    assert "bob@" not in run_cli("token", "list", "--state-dir", str(state)).stdout


@pytest.mark.parametrize("subject", ["tag:", "alice", "alice @x.y", "", "tag:Bot!",
                                     "a" * 250 + "@x.test"])
def test_a_token_for_something_that_is_not_a_login_or_a_tag_is_bad_input(
        tmp_path: Path, subject: str) -> None:
    state, _ = issued_state(tmp_path)
    out = run_cli("token", "issue", subject, "--state-dir", str(state))
    assert out.returncode == 2, out.stdout
    assert "is not a tailnet login (alice@example.com) or a tag (tag:bot)" in out.stderr
    assert len(run_cli("token", "list", "--state-dir", str(state)).stdout.splitlines()) == 1


def test_an_empty_state_dir_is_refused_rather_than_taken_for_the_current_directory(
        tmp_path: Path) -> None:
    """`serve --state-dir ""` made the current directory 0700 and wrote its key and database
    there."""
    here = tmp_path / "checkout"
    here.mkdir(mode=0o755)
    (tmp_path / "c.toml").write_text('state_dir = ""\n')
    for args in (["serve", "--state-dir", ""], ["serve", "--state-dir", "  "],
                 ["serve", "--config", str(tmp_path / "c.toml")],
                 ["token", "issue", "alice@tailnet.test", "--state-dir", ""]):
        out = subprocess.run([CLI, *args], capture_output=True, text=True, cwd=here, timeout=60)
        assert out.returncode == 3, args
        assert "must name a directory" in out.stderr
    assert list(here.iterdir()) == [] and stat.S_IMODE(here.stat().st_mode) == 0o755


def test_a_state_dir_that_is_a_file_is_said_to_be_one(tmp_path: Path) -> None:
    """"cannot prepare the state dir /etc/passwd: [Errno 17] File exists" (a newcomer,
    2026-11-24)."""
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    for where in (a_file, a_file / "state"):
        out = run_cli("token", "issue", "alice@tailnet.test", "--state-dir", str(where))
        assert out.returncode == 3 and "Errno" not in out.stderr, out.stderr
        assert f"the state dir {where} is not a directory" in " ".join(out.stderr.split())
    assert a_file.read_text() == "root:x:0:0\n"


@pytest.mark.parametrize(("line", "says"), [
    ("port = 1.5", "expected a whole number"),
    ("port = 1e400", "expected a whole number"),
    ("state_dir = 5", "expected a string"),
    ("rate_per_second = inf", "expected a finite number"),
    ("rate_per_second = nan", "expected a finite number"),
])
def test_a_config_value_of_the_wrong_kind_is_refused_in_words(
        tmp_path: Path, line: str, says: str) -> None:
    (tmp_path / "c.toml").write_text(line + "\n")
    out = run_cli("config", "show", "--config", str(tmp_path / "c.toml"))
    assert out.returncode == 3 and says in out.stderr and "Traceback" not in out.stderr


def test_a_config_file_that_is_a_directory_or_not_text_is_refused_in_words(
        tmp_path: Path) -> None:
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    for path, says in ((tmp_path, "is a directory, not a file"),
                       (tmp_path / "bin.toml", "is not text (TOML is UTF-8)")):
        out = run_cli("config", "show", "--config", str(path))
        assert (out.returncode, out.stderr.strip()) == (3, f"error: config file {path} {says}")


def test_the_doctor_does_not_call_warnings_all_good(capsys: pytest.CaptureFixture[str]) -> None:
    """With a mistyped --state-dir it warned twice and ended "all good"."""
    from tsnetchat.doctor import Check, _print

    assert _print([Check("a", OK, "fine"), Check("b", WARN, "look")])
    assert capsys.readouterr().out.splitlines()[-1] == "no problems; 1 warning(s) (!) above"
    assert _print([Check("a", OK, "fine")])
    assert capsys.readouterr().out.splitlines()[-1] == "all good"
    assert not _print([Check("a", FAIL, "broken"), Check("b", WARN, "look")])
    assert capsys.readouterr().out.splitlines()[-1] == "1 problem(s) found"


def test_the_doctor_looks_at_a_state_dir_without_making_it(tmp_path: Path) -> None:
    state = tmp_path / "nowhere"
    cfg = load_config(env={}, flags={"state_dir": str(state), "socket": "/nonexistent"})
    found = {c.name: c for c in asyncio.run(checks(cfg))}
    assert found["history store"].verdict == WARN
    assert "does not exist yet" in found["history store"].detail
    assert not state.exists()


async def test_the_doctor_fails_a_damaged_history_and_a_short_key_and_says_what_to_do(
        tmp_path: Path) -> None:
    state, _ = issued_state(tmp_path)
    cfg = load_config(env={}, flags={"state_dir": str(state), "socket": "/nonexistent"})
    assert {c.name: c for c in await checks(cfg)}["history store"].verdict == OK
    db = state / "tsnetchat.db"
    page = int.from_bytes(db.read_bytes()[16:18], "big")  # (the header's page size)
    with db.open("r+b") as f:  # garbage over the second page: a table's b-tree page
        f.seek(page)
        f.write(b"\xa5" * page)
    (state / "jwt.key").write_text("short\n")
    short = {c.name: c for c in await checks(cfg)}["key file"]
    assert short.verdict == FAIL and "too short" in short.detail, short
    found = {c.name: c for c in await checks(cfg)}["history store"]
    assert found.verdict == FAIL and f"{db} is damaged (SQLite's quick_check: " in found.detail
    assert f"tsnetchat restore --state-dir {state} BACKUP" in found.detail
    db.write_text("not a database at all\n" * 100)  # (doctor ended in a traceback)
    found = {c.name: c for c in await checks(cfg)}["history store"]
    assert found.verdict == FAIL and "is damaged" in found.detail and "not a database" in \
        found.detail, found
    db.write_bytes(b"")
    found = {c.name: c for c in await checks(cfg)}["history store"]
    assert found.verdict == FAIL and "is empty (0 bytes)" in found.detail, found


def test_a_backup_of_a_damaged_history_says_the_history_is_damaged_not_the_backups_place(
        tmp_path: Path) -> None:
    """It said "cannot copy ... to <backup>.partial: ..." (a newcomer, 2026-11-24)."""
    state, _ = issued_state(tmp_path)
    db = state / "tsnetchat.db"
    page = int.from_bytes(db.read_bytes()[16:18], "big")
    with db.open("r+b") as f:  # garbage over the last page
        f.seek(db.stat().st_size - page)
        f.write(b"\xa5" * page)
    dest = tmp_path / "backups" / "monday.db"
    dest.parent.mkdir()
    out = run_cli("backup", "--state-dir", str(state), str(dest))
    assert out.returncode == 8 and "Traceback" not in out.stderr
    said = " ".join(out.stderr.split())
    assert f"the history database {db} is damaged" in said, said
    assert "restore the last backup" in said and "backups" not in said
    assert list(dest.parent.iterdir()) == []  # nothing half made left behind


def test_a_bad_option_is_a_plain_line_and_help_wraps_without_cutting_a_word() -> None:
    """Rich drew a bad option's error in a box, and cut `connect --help`'s proxy example to
    "socks5://127.0.0.1…" at 80 columns (a new user's day, 2026-11-24); plain click cut the
    commands' descriptions (a review, the same day)."""
    out = run_cli("send", "chat-server", "--count", "3", "hello")
    assert out.returncode == 2 and out.stdout == ""
    assert "\nError: No such option: --count (" in out.stderr, out.stderr
    assert not set("╭│╰…") & set(out.stderr)
    for width in ("80", "200"):
        shown = run_cli("connect", "--help", env={**os.environ, "COLUMNS": width})
        assert shown.returncode == 0, shown.stderr
        assert "socks5://127.0.0.1:1055" in shown.stdout and "…" not in shown.stdout
        assert max(map(len, shown.stdout.splitlines())) <= int(width)
    # `tsnetchat` alone: its help on stdout, each command's first paragraph whole (click cut
    # them to a line ending in "...")
    top = run_cli(env={**os.environ, "COLUMNS": "60"})
    assert top.returncode == 2 and top.stderr == "" and top.stdout.startswith("Usage: ")
    assert "send Send one message and print its id once the server has stored it." in (
        " ".join(top.stdout.split()))
    assert not [line for line in top.stdout.splitlines()[1:] if line.endswith("...")]


def test_a_command_that_fails_unforeseen_says_so_in_one_line_without_a_traceback(
        tmp_path: Path) -> None:
    script = ("import sys\nimport tsnetchat.doctor as d\n"
              "async def boom(*a, **k):\n    raise RuntimeError('boom')\n"
              "d.checks = boom\n"
              f"sys.argv = ['tsnetchat', 'doctor', '--state-dir', {str(tmp_path)!r}]\n"
              "from tsnetchat.cli import main\nmain()\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: unexpected RuntimeError: boom. This is a bug")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "TSNETCHAT_TRACEBACK": "1"})
    assert out.returncode != 0 and "RuntimeError: boom" in out.stderr
    assert "Traceback" in out.stderr or "───" in out.stderr  # (Typer's own, with rich)


async def test_a_lost_key_is_a_failure_for_the_doctor_and_a_warning_at_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A new key was made without a word, and every token refused (an operator's run)."""
    state, _ = issued_state(tmp_path)
    (state / "jwt.key").unlink()
    cfg = load_config(env={}, flags={"state_dir": str(state), "socket": "/nonexistent"})
    key = {c.name: c for c in await checks(cfg)}["key file"]
    assert key.verdict == FAIL and "is missing, but 1 unexpired token(s) were issued" in \
        key.detail, key
    in_cluster = load_config(env={}, flags={"state_dir": str(state), "socket": "/nonexistent",
                                            "cluster": "nats://nats1:4222"})
    key = {c.name: c for c in await checks(in_cluster)}["key file"]
    assert key.verdict == WARN, key  # (the key comes from the cluster there)
    (state / "jwt.key").symlink_to(tmp_path / "elsewhere")
    key = {c.name: c for c in await checks(cfg)}["key file"]
    assert key.verdict == FAIL and "is a symbolic link" in key.detail, key
    (state / "jwt.key").unlink()
    (state / "jwt.key").write_text("k" * 64)  # root reads it; the server's user could not
    (state / "jwt.key").chmod(0)
    key = {c.name: c for c in await checks(cfg)}["key file"]
    assert (key.verdict, key.detail) == (FAIL, f"{state / 'jwt.key'} mode 0000: its owner "
                                         "cannot read it (the units run the server as its own "
                                         "user, which would refuse to start); chmod 600 "
                                         f"{state / 'jwt.key'}"), key
    (state / "jwt.key").unlink()
    with caplog.at_level(logging.WARNING, logger="tsnetchat.server"):
        async with chat_server(tmp_path):  # (its state dir is tmp_path / "state")
            pass
    assert any("but 1 unexpired token(s) were issued with one before: they no longer work"
               in r.getMessage() for r in caplog.records), caplog.text


async def test_the_doctor_fails_a_history_written_by_a_newer_tsnetchat(tmp_path: Path) -> None:
    """`serve` refuses it; doctor said nothing."""
    import sqlite3

    state, _ = issued_state(tmp_path)
    with contextlib.closing(sqlite3.connect(state / "tsnetchat.db")) as c:
        c.execute("PRAGMA user_version=99")
    cfg = load_config(env={}, flags={"state_dir": str(state), "socket": "/nonexistent"})
    found = {c.name: c for c in await checks(cfg)}["history store"]
    assert found.verdict == FAIL and "written by a newer tsnetchat (schema version 99" in \
        found.detail, found


async def test_the_doctor_fails_the_history_store_while_another_process_holds_its_write_lock(
        tmp_path: Path) -> None:
    """Every send was refused while a `sqlite3` shell held the lock, and doctor said "all
    good"."""
    state, _ = issued_state(tmp_path)
    cfg = load_config(env={}, flags={"state_dir": str(state), "socket": "/nonexistent"})
    async with write_lock_held(state / "tsnetchat.db"):
        held = {c.name: c for c in await checks(cfg)}["history store"]
    assert held.verdict == FAIL and "write lock" in held.detail, held
    assert {c.name: c for c in await checks(cfg)}["history store"].verdict == OK
    assert sorted(p.name for p in state.iterdir()) == ["jwt.key", "tsnetchat.db"]


def test_serve_stops_at_sigterm_while_it_still_waits_for_tailscaled(tmp_path: Path) -> None:
    """It used to ignore SIGTERM (and ^C) until its startup_timeout, 60 s, had passed."""
    proc = subprocess.Popen([CLI, "serve", "--socket", str(tmp_path / "no.sock"),
                             "--state-dir", str(tmp_path / "state"), "--port", "50999"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    # (waiting, it names the socket: a mistyped --socket read as a tailscaled still
    # starting; an operator's run, 2026-11-24)
    while f"waiting: tailscaled's LocalAPI at {tmp_path / 'no.sock'} is not answering" not in \
            proc.stdout.readline():
        pass
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - sent < 10
    assert "stopped before start-up was done" in proc.stdout.read()


@pytest.mark.parametrize("args", [
    ("tail", "x", "--after", "-1"), ("delete", "x", "-r", "general", "--", "-1"),
    ("edit", "x", "99999999999999999999", "new", "-r", "general"),
    ("history", "x", "--limit", "-5"),
    ("history", "x", "--before", "-1"), ("history", "x", "--limit", "99999999999999999999"),
    ("search", "x", "q", "--offset", "-1"), ("search", "x", "q", "--limit", "0"),
    ("send", "x", "hi", "--timeout", "nan"), ("send", "x", "hi", "--timeout", "0"),
    ("send", "x", "hi", "--port", "70000"), ("tail", "x", "--count", "-1"),
    ("tail", "x", "--new", "--after", "3"), ("doctor", "--server", ""),
    ("doctor", "--server", "x", "--port", "0"), ("doctor", "--server", "x", "--port", "-5"),
    ("TSNETCHAT_PORT=²", "doctor", "--server", "x"), ("TSNETCHAT_PORT=abc", "whoami", "x"),
])
def test_a_number_out_of_range_on_a_client_command_is_bad_input_before_anything_is_dialled(
        args: tuple[str, ...]) -> None:
    """These were "internal error in the client (ValueError: Value out of range)", a
    64-line traceback, or a dial of port 70000 retried for 8 s."""
    started = time.monotonic()
    env = {**os.environ, "TSNETCHAT_SOCKET": "/nonexistent"}
    while "=" in args[0]:  # (a variable for the command)
        name, value = args[0].split("=", 1)
        env, args = {**env, name: value}, args[1:]
    out = run_cli(*args, env=env)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "internal error" not in out.stderr
    assert time.monotonic() - started < 7.5  # before the 8 s a dial would keep trying


def test_a_message_on_stdin_that_is_not_utf8_is_refused_before_anything_is_dialled() -> None:
    """It used to wait the whole --timeout and then blame the server."""
    out = subprocess.run([CLI, "send", "x", "-"], input=b"\xff\xfe hi", capture_output=True,
                         timeout=60)
    assert out.returncode == 2
    assert out.stderr.decode().strip() == "error: the message was not sent: it is not UTF-8 text"


@pytest.mark.parametrize(("line", "says"), [
    ("token_ttl_hours = 1e15", "token_ttl_hours: must be at most 87,600"),
    ("rate_burst = 4294967296", "rate_burst: must be at most 2,147,483,647"),
    ("max_page = 99999999999", "max_page: must be at most 2,147,483,647"),
    ("history_on_join = 5000000000", "history_on_join: must be at most 2,147,483,647"),
    ("retention_days = 1e9", "retention_days: must be at most 36,500"),
    ("edit_window_seconds = 1e300", "edit_window_seconds: must be at most 2,147,483,647"),
    ("store_wait = 2147484", "store_wait: must be at most 2,147,483"),
])
def test_a_config_number_beyond_what_the_server_can_use_is_refused_naming_its_key(
        tmp_path: Path, line: str, says: str) -> None:
    """`token_ttl_hours = 1e15` issued tokens that broke `token list`; counts beyond the
    protocol's 32-bit fields started a server that failed every call."""
    (tmp_path / "c.toml").write_text(line + "\n")
    out = run_cli("config", "show", "--config", str(tmp_path / "c.toml"))
    assert out.returncode == 3 and says in out.stderr, out.stderr
    at_bound = line.split("=")[0] + f"= {says.rsplit(' ', 1)[1].replace(',', '')}\n"
    (tmp_path / "c.toml").write_text(at_bound)
    assert run_cli("config", "show", "--config", str(tmp_path / "c.toml")).returncode == 0


def test_an_empty_token_lifetime_is_refused_rather_than_taken_as_the_default(
        tmp_path: Path) -> None:
    state, _ = issued_state(tmp_path)
    out = run_cli("token", "issue", "bob@tailnet.test", "--ttl", "", "--state-dir", str(state))
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --ttl: '' is not a duration like 12h, 30d"
    assert "bob@" not in run_cli("token", "list", "--state-dir", str(state)).stdout


def test_roots_admin_commands_never_follow_a_link_the_servers_user_put_in_its_state_dir(
        tmp_path: Path) -> None:
    """Through such links `sudo tsnetchat token rotate-key` gave a root file to the service's
    user, and `token list` changed a root file's mode (an attacker over the lab)."""
    if os.geteuid() != 0:
        need("root", "root's admin commands in a state dir another user owns")
    state, _ = issued_state(tmp_path)
    for p in (state, *state.iterdir()):  # the service's user's, as under DynamicUser
        os.chown(p, 65534, 65534)
    victim = tmp_path / "victim"
    victim.write_text("root's own\n")
    victim.chmod(0o644)
    before = victim.stat()

    def untouched() -> None:
        now = victim.stat()
        assert (now.st_uid, now.st_mode, victim.read_text()) == (
            before.st_uid, before.st_mode, "root's own\n")

    shm = state / "tsnetchat.db-shm"
    shm.unlink(missing_ok=True)
    shm.symlink_to(victim)
    out = run_cli("token", "list", "--state-dir", str(state))
    assert out.returncode != 0 and f"{shm} is a symbolic link" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    untouched()
    shm.unlink()
    out = run_cli("token", "rotate-key", "--state-dir", str(state))
    assert out.returncode == 0, out.stderr
    key = (state / "jwt.key").stat()
    assert (key.st_uid, stat.S_IMODE(key.st_mode)) == (65534, 0o600)  # the server's
    (state / "jwt.key").unlink()
    (state / "jwt.key").symlink_to(victim)
    out = run_cli("token", "issue", "bob@tailnet.test", "--state-dir", str(state))
    assert out.returncode != 0 and "jwt.key is a symbolic link" in out.stderr, out.stderr
    untouched()
    # A hard link: root's SQLite chowned such a -wal to the service's user and wrote into it.
    (state / "jwt.key").unlink()
    wal = state / "tsnetchat.db-wal"
    wal.unlink(missing_ok=True)
    victim.chmod(0o666)  # (fs.protected_hardlinks: one the service's user may write)
    before = victim.stat()
    os.link(victim, wal)
    cfg = load_config(env={}, flags={"state_dir": str(state), "socket": "/nonexistent"})
    for args in (["token", "list"], ["backup", str(tmp_path / "b.db")]):
        out = run_cli(*args, "--state-dir", str(state))
        assert out.returncode != 0 and f"{wal} has 1 other name(s) (a hard link)" in \
            out.stderr, (args, out.stderr)
    store = {c.name: c for c in asyncio.run(checks(cfg))}["history store"]
    assert store.verdict == FAIL and "(a hard link)" in store.detail, store
    untouched()
    wal.unlink()
    # A FIFO or a huge file as the key: it hung, or tried to read 8 GB.
    key = state / "jwt.key"
    os.mkfifo(key, 0o600)
    out = run_cli("token", "issue", "bob@tailnet.test", "--state-dir", str(state))
    assert out.returncode == 3 and "is not a regular file" in out.stderr, out.stderr
    key.unlink()
    with key.open("wb") as f:
        f.truncate(2**33)
    key.chmod(0o600)
    out = run_cli("token", "issue", "bob@tailnet.test", "--state-dir", str(state))
    assert out.returncode == 3 and "is over 4096 bytes" in out.stderr, out.stderr


def test_token_commands_leave_an_older_database_to_the_server_still_running_on_it(
        tmp_path: Path) -> None:
    """During an upgrade, the new version's `token list` upgraded the database under the old
    server, which then failed every revocation check (an operator's run)."""
    import sqlite3

    from tsnetchat.store import SCHEMA_VERSION

    state, _ = issued_state(tmp_path)
    db = state / "tsnetchat.db"
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.execute(f"PRAGMA user_version={SCHEMA_VERSION - 1}")  # as the old version left it
    server = subprocess.Popen([sys.executable, "-c", (
        "import sys, pathlib; from tsnetchat.statedir import StateLock; "
        f"StateLock(pathlib.Path({str(state)!r}), 'server'); print('held', flush=True); "
        "sys.stdin.read()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline() == "held\n"
        for args in (["list"], ["issue", "bob@tailnet.test"]):
            out = run_cli("token", *args, "--state-dir", str(state))
            assert out.returncode == 8, out.stderr
            assert f"has schema version {SCHEMA_VERSION - 1}, older than" in out.stderr
            assert "systemctl restart tsnetchat" in out.stderr and "Traceback" not in out.stderr
    finally:
        server.communicate("")
    with contextlib.closing(sqlite3.connect(db)) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION - 1


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_a_lock_file_made_a_link_or_a_fifo_neither_hangs_nor_fills_memory(
        tmp_path: Path, target: str) -> None:
    """Root's token commands read it by name: /dev/zero ate memory, a FIFO hung (a review)."""
    state, _ = issued_state(tmp_path)
    lock = state / "tsnetchat.lock"
    lock.unlink(missing_ok=True)
    if target == "fifo":
        os.mkfifo(lock)
    else:
        lock.symlink_to(target)
    assert statedir.running_server(state) is None
    out = run_cli("token", "list", "--state-dir", str(state))
    assert out.returncode == 0 and "active" in out.stdout, out.stderr


def test_a_token_for_a_known_login_with_other_capitals_is_refused_and_a_new_one_warned_of(
        tmp_path: Path) -> None:
    state, _ = issued_state(tmp_path)  # alice@tailnet.test holds a token
    out = run_cli("token", "issue", "Alice@Tailnet.test", "--state-dir", str(state))
    assert out.returncode == 2 and "no token was issued" in out.stderr, out.stderr
    assert "'Alice@Tailnet.test' is 'alice@tailnet.test' with other capitals" in out.stderr
    assert "Alice@" not in run_cli("token", "list", "--state-dir", str(state)).stdout
    out = run_cli("token", "issue", "Carol@tailnet.test", "--state-dir", str(state))
    assert out.returncode == 0 and "note: Carol@tailnet.test has capitals" in out.stderr
    out = run_cli("token", "issue", "tag:Bot", "--state-dir", str(state))
    assert out.returncode == 0 and "capitals" not in out.stderr
    # The other way round: a login seen sending keeps its capitals (GitHub's do).
    import sqlite3

    with contextlib.closing(sqlite3.connect(state / "tsnetchat.db")) as c, c:
        c.execute("INSERT INTO senders (login, display_name, node) VALUES "
                  "('Dave@github', 'Dave', 'laptop')")
    out = run_cli("token", "issue", "dave@github", "--state-dir", str(state))
    assert out.returncode == 2 and "'dave@github' is 'Dave@github' with other capitals" in \
        out.stderr, out.stderr


@pytest.mark.parametrize("args", [["a" * 250 + "@x.test"], ["alice@x.test", "--room", "Ops"],
                                  ["alice@x.test", "--ttl", ""]])
def test_a_refused_token_issue_leaves_no_state_dir_or_key_behind(
        tmp_path: Path, args: list[str]) -> None:
    state = tmp_path / "fresh"
    out = run_cli("token", "issue", *args, "--state-dir", str(state))
    assert out.returncode == 2, out.stderr
    assert not state.exists()


async def test_a_revocation_while_another_process_holds_the_database_says_so_and_revokes_nothing(
        tmp_path: Path) -> None:
    """It used to end in a traceback (StoreError: database is locked), exit 1."""
    state, jti = issued_state(tmp_path)
    async with write_lock_held(state / "tsnetchat.db"):
        out = await asyncio.to_thread(run_cli, "token", "revoke", jti, "--state-dir", str(state))
    assert out.returncode == 8, out.stdout
    assert "Traceback" not in out.stderr and "database is locked" in out.stderr
    # (by what, and that nothing changed: a bare "database is locked" said neither)
    assert "another process has held" in out.stderr and "nothing was changed" in out.stderr
    assert f"fuser -v {state / 'tsnetchat.db'}" in out.stderr
    assert run_cli("token", "list", "--state-dir", str(state)).stdout.rstrip().endswith(
        "active")


def test_an_operators_command_run_without_sudo_says_permission_denied_not_a_traceback(
        tmp_path: Path) -> None:
    """The state dir is the server's (0700), named in a config file anyone may read."""
    from test_discovery import NOBODY, client_env, nobody_cli

    top = Path(tempfile.mkdtemp(prefix="tsnetchat-sudo-"))
    try:
        top.chmod(0o755)
        state, _ = issued_state(top)
        cfg = top / "config.toml"
        cfg.write_text(f'state_dir = "{state}"\n')
        cfg.chmod(0o644)
        home = top / "home"
        home.mkdir()
        os.chown(home, 65534, 65534)
        # ... named in the config or with --state-dir, as the README's `backup` has it (typer
        # refused that one as "not readable", exit 2: an operator's run, 2026-11-24)
        for command, where in [(c, w) for c in (("token", "list"), ("token", "revoke", "x"),
                                                ("backup", "/tmp/x.db"))
                               for w in (("--config", str(cfg)), ("--state-dir", str(state)))]:
            out = subprocess.run([*nobody_cli(), *command, *where],
                                 env=client_env(home), capture_output=True, text=True,
                                 timeout=60, **NOBODY)  # type: ignore[call-overload]
            assert out.returncode == 3, (command, where, out.stderr)
            assert "Traceback" not in out.stderr, out.stderr
            assert "permission denied" in out.stderr and "sudo" in out.stderr
        # doctor stopped the same way, before printing a single check; now it prints them
        # all and says which ones need sudo
        out = subprocess.run([*nobody_cli(), "doctor", "--config", str(cfg), "--socket",
                              str(top / "no.sock")], env=client_env(home), capture_output=True,
                             text=True, timeout=60, **NOBODY)  # type: ignore[call-overload]
        assert "Traceback" not in out.stderr and not out.stderr, out.stderr
        lines = {line[2:26].strip(): line for line in out.stdout.splitlines() if line[:1]}
        assert lines["tailscaled reachable"].startswith("✘")
        for name in ("key file", "history store"):
            assert lines[name].startswith("!") and "run `sudo tsnetchat doctor`" in lines[name]
        # The embedded tailscaled's socket is in the state dir: it said "not answering (...).
        # Is tailscaled running?" of one that ran (an operator's run, 2026-11-25).
        cfg.write_text(f'state_dir = "{state}"\nembedded = true\n')
        out = subprocess.run([*nobody_cli(), "doctor", "--config", str(cfg)],
                             env=client_env(home), capture_output=True, text=True, timeout=60,
                             **NOBODY)  # type: ignore[call-overload]
        lines = {line[2:26].strip(): line for line in out.stdout.splitlines() if line[:1]}
        assert lines["tailscaled reachable"].startswith("!") and (
            "run `sudo tsnetchat doctor` (the embedded tailscaled's socket is in it)" in
            lines["tailscaled reachable"]), out.stdout
        assert lines["listening"].startswith("-"), out.stdout
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("listen,taken,said", [
    ("127.0.0.1", True, "the port is in use (is another server running on it?)"),
    ("203.0.113.7", False, "203.0.113.7 is not an address of this machine"),
])
async def test_a_server_that_cannot_listen_says_why_in_words(
        tmp_path: Path, listen: str, taken: bool, said: str) -> None:
    """gRPC says only "Failed to bind ...; set GRPC_VERBOSITY=debug ...", and an address
    not on this machine was "is another server running on that port?" (a newcomer,
    2026-11-24)."""
    port = free_port()
    with socket.socket() as holder:
        if taken:
            holder.bind(("127.0.0.1", port))
            holder.listen()
        with pytest.raises(ConfigError) as e:
            async with chat_server(tmp_path, listen=listen, port=port):
                pass
    assert str(e.value) == f"cannot listen on {listen}:{port}: {said}"


async def test_a_start_refused_for_its_database_leaves_no_new_key_behind(
        tmp_path: Path) -> None:
    """The next start took the key a refused one had made as the server's own (a newcomer,
    2026-11-24)."""
    from tsnetchat.errors import StoreError

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    db = state / "tsnetchat.db"
    db.write_text("not a database at all\n" * 100)
    db.chmod(0o600)
    with pytest.raises(StoreError, match="is damaged"):
        async with chat_server(tmp_path):
            pass
    assert not (state / "jwt.key").exists()
    assert db.read_text() == "not a database at all\n" * 100  # (left as it was)
