"""Text that names code names code that exists: README.md's command lines and flags, the
Python names written in README.md, bench/README.md and tsnetchat's docstrings and comments,
and the configuration keys and environment variables README names.

What counts as what (each test is red, naming file, line and what exists instead, until the
text is fixed; nothing here is a list of names to keep up to date by hand):

* **A command line** is a line of a README code block (indented or fenced) that starts with
  ``tsnetchat`` (or ``sudo tsnetchat``): it is split as a shell would (``#`` starts a comment,
  so ``--room #general`` unquoted would lose its room) and parsed by the real CLI's parser
  (typer's click command for ``tsnetchat.cli.app``, ``make_context``: options, their values
  and the count of arguments, without running anything). ``[...]`` around an optional part
  is taken as written, and ``...`` ends what is checked.
* **A flag named for a command** is a backticked span that starts with a command's words
  (``tsnetchat tail``, ``send --split``, ``token issue --ttl``): the command must exist and
  have each ``--flag`` of the span. A backticked flag alone (``--state-dir``) must exist on
  some command, unless its line is about tailscale's own (``--socks5-server``).
* **A Python name** is a chain of identifiers joined by dots (``store.Store.search``,
  ``Gate.hold``, ``tsnetchat.loop``, ``asyncio.Runner``, ``Welcome.topic``), backticked or
  not. Its first part is looked up as the package, one of its modules, a name at the top of
  one of its modules that is not a function (classes, constants, the protocol's messages),
  the class a lowercase word is named for (``gate`` for the server's Gate), a module of the
  folder the text is in (bench/, tests/, scripts/), or a module Python can import (the
  standard library, our dependencies); ``tsnetchat.v1.X`` is looked up in the protocol.
  The rest must resolve by ``getattr``; on a class also as a dataclass field, an annotation
  or an attribute its methods set on ``self``; on a protocol message as a field, nested
  message or enum value; on a gRPC service as a method. Not taken for Python: a chain whose
  first part is none of those (``cfg.port`` naming a local variable, Go's
  ``ipn.NotifyWatchOpt``, a host ``api.tailscale.com``, ``e.g``), a file name (its last
  part an extension: ``tokens.json``), and a name said to be gone (``Store.append_later``,
  since replaced). A capitalised first part the package has no class of is wrong when the
  package has one like it (``Service`` for ChatService); one that is nobody's is another
  program's (grpc's Cython internals). Outside the package a missing part is wrong when the
  module has a name like it (``asyncio.Runer``); one nothing like any of its names is another
  layer's (a gRPC channel argument, grpc-go's API). A name the package's code has as a
  string (a channel argument it sets, a NATS subject) exists. Single words in backticks are
  not checked as Python (keys, protocol fields and SQLite's pragmas look the same), but
  ``name()`` must be a name the code defines, takes, imports or uses (a module's comment:
  the package's code; a README: the package's, tests', scripts' and bench's) or a builtin;
  ``shutdown(2)`` is a manual page.
* **A protocol name** a README backticks alone (``RenewToken``, ``Welcome``): a
  capitalised word that is no name of the protocol's nor of the code's is wrong when one
  like it is (``RenewTokens``), else another program's.
* **A test** named (``test_...``, or the start of a name cut short with ``_...``) must be
  a test module, function or class in tests/.
* **A file** written as a path ending in ``.py`` or ``.md`` must exist: relative to the
  repository, to the text's own folder, or (a bare name) under that name somewhere in it.
* **A script's flags**: a ``bench/*.py`` or ``scripts/*.py`` a README runs must exist and
  take each ``--flag`` given to it (its ``add_argument`` calls, read from its source).
* **A link** in a README goes to a file that exists, and to one of its headings.
* **Configuration keys** are ``config.settings()``. The variables config.py reads are
  ``TSNETCHAT_CONFIG`` and ``TSNETCHAT_<KEY>`` (shown by loading a config with one set: its
  origin, or its error, names the variable) and those it reads by name
  (``STATE_DIRECTORY``); the client's are the ``TSNETCHAT_*`` strings of the package's code
  (``TSNETCHAT_TOKEN``). README's Configuration table must name every key and only keys,
  with ServerConfig's defaults where it gives them as values; ``key = value`` in README
  must set a key; a ``TSNETCHAT_*`` variable README names must be one of those, and each
  of them must be named in README (``TSNETCHAT_<KEY>`` for the keys).
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import difflib
import gc
import importlib
import importlib.util
import inspect
import io
import os
import re
import shlex
import tokenize
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import pytest
import typer
from typer.core import TyperGroup

import tsnetchat
from tsnetchat import cli, config
from tsnetchat.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tsnetchat"
README = ROOT / "README.md"
DOCS = [README, ROOT / "bench" / "README.md"]
SOURCES = sorted(PACKAGE.glob("*.py"))

# A chain of identifiers joined by dots, not part of a path, a host with hyphens or a longer
# word (`tsnetchat-embedded.service`, `docs/tailnet-lab.md`, `tsnetchat.db-wal`).
DOTTED = re.compile(r"(?<![\w./-])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?![\w/-]|\.\w)")
# (`shutdown(2)` is a manual page, not a call)
CALL = re.compile(r"``?([A-Za-z_]\w*)\((?!\d\))[^()`]*\)``?")
# A name said to be gone (`Store.append_later`, since replaced) is history, not a claim.
GONE = re.compile(r"`*,? \(?(since (replaced|removed|renamed)|now gone|no longer exists)")
PATH = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.(?:py|md))(?![\w/-])")
SPAN = re.compile(r"`([^`\n]+)`")
# A last part that makes a dotted word a file's or a host's name, not Python's.
NOT_PYTHON = frozenset({
    "com", "net", "org", "io", "dev", "test", "example", "json", "toml", "db", "key", "txt",
    "py", "md", "proto", "service", "sock", "socket", "lock", "log", "exe", "whl", "yaml",
    "yml", "creds", "token", "partial", "wal", "shm", "cfg", "ini", "sh", "html", "png", "svg"})


def python_tree(source: str) -> ast.Module:
    """``ast.parse`` with the garbage collector held off: in a full in-process run (which
    leaves gRPC objects for the collector) it raised CPython 3.11's "AST constructor
    recursion depth mismatch" (python/cpython#106905: an error met while the tree is built,
    perhaps a finalizer's, is said as that) once in one run, 2026-11-25: it is asked once
    more."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        try:
            return ast.parse(source)
        except SystemError as e:  # (the same text parses: what failed was not the text)
            if "recursion depth mismatch" not in str(e):
                raise
            return ast.parse(source)
    finally:
        if enabled:
            gc.enable()


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines of prose a file holds: a README whole; of a module, its comments and
    docstrings (numbered as in the file)."""
    source = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        yield from enumerate(source.splitlines(), 1)
        return
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    for node in ast.walk(python_tree(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                for i, line in enumerate(first.value.value.splitlines()):
                    yield first.lineno + i, line


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def near(name: str, names: Any) -> str:
    found = difflib.get_close_matches(name, sorted(set(names)), n=3, cutoff=0.6)
    return f" (there is {', '.join(found)})" if found else " (nothing like it)"


# ---------------------------------------------------------------- the CLI's parser


@cache
def command() -> Any:
    return typer.main.get_command(cli.app)


def walk(words: list[str]) -> tuple[Any, list[str], list[str]]:
    """The command ``words`` name, the words that named it, and the rest. Raises KeyError
    naming the first word that is no command."""
    cmd: Any = command()
    path: list[str] = []
    rest = list(words)
    while isinstance(cmd, TyperGroup) and rest and not rest[0].startswith("-"):
        sub = cmd.commands.get(rest[0])
        if sub is None:
            raise KeyError(f"no command {' '.join([*path, rest[0]])!r}"
                           + near(rest[0], cmd.commands))
        cmd, path, rest = sub, [*path, rest.pop(0)], rest
    return cmd, path, rest


def parse(argv: list[str]) -> None:
    """Parse ``tsnetchat ARGV`` as the CLI would, to the command's parameters, without
    calling it. Raises the parser's UsageError."""
    ctx = command().make_context("tsnetchat", list(argv))
    while isinstance(ctx.command, TyperGroup):
        args = [*ctx._protected_args, *ctx.args]
        name, sub, rest = ctx.command.resolve_command(ctx, args)
        assert sub is not None  # (resolve_command raises for a word that is no command)
        ctx = sub.make_context(name, rest, parent=ctx)


def flags_of(cmd: Any) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


@cache
def every_flag() -> frozenset[str]:
    out: set[str] = set()
    todo = [command()]
    while todo:
        cmd = todo.pop()
        out |= flags_of(cmd)
        if isinstance(cmd, TyperGroup):
            todo.extend(cmd.commands.values())
    return frozenset(out)


def words_of(text: str) -> list[str]:
    """A command line's words after ``tsnetchat``, split as a shell splits them; ``[...]``
    taken as written, ``...`` ends it."""
    words = []
    for w in shlex.split(text, comments=True):
        if w in ("&&", "||", "|", ";") or w.startswith(">"):
            break
        if "..." in w:
            break
        words.append(w.strip("[]"))
    while words and words[0] in ("sudo", "$"):
        words.pop(0)
    return words[1:] if words[:1] == ["tsnetchat"] else []


def code_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines of a README's code blocks: fenced, or indented by four spaces or more."""
    fenced = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            yield n, line.strip()


def line_mistakes(line: str) -> list[str]:
    """What is wrong with a code block's command line: the parser's refusal, or a flag its
    comment names that the command does not have."""
    words = words_of(line)
    try:
        parse(words)
    except Exception as e:  # (the parser's UsageError, or our own callbacks' errors)
        return [f"`{line}`: {getattr(e, 'message', e)}"]
    cmd, path, _ = walk(words)
    comment = line.partition(" #")[2]
    return [f"`{line}`: its comment names {flag}, which `tsnetchat {' '.join(path)}` does "
            "not have" + near(flag, flags_of(cmd))
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", comment)
            if flag not in flags_of(cmd)]


def span_mistakes(span: str, line: str) -> list[str] | None:
    """What is wrong with a backticked span that names a command or a flag (None: it names
    neither)."""
    if re.fullmatch(r"--[a-z][a-z0-9-]*", span):
        flags = every_flag()
        if span in flags or "tailscale" in line:
            return []
        return [f"`{span}`: no command has it" + near(span, flags)]
    named = re.match(r"(sudo )?tsnetchat\s", span) is not None
    try:
        words = words_of(span if named else f"tsnetchat {span}")
    except ValueError:  # (not a command: an unclosed quote)
        return None
    if not words or words[0] not in command().commands or not (
            named or any(w.startswith("--") for w in words)):
        return None
    try:
        cmd, path, rest = walk(words)
    except KeyError as e:
        return [f"`{span}`: {e.args[0]}"]
    have = flags_of(cmd)
    wrong = [f"`{span}`: `tsnetchat {' '.join(path)}` has no {flag}" + near(flag, have)
             for w in rest if w.startswith("-")
             for flag in w.split("=")[0].split("/") if flag not in have]
    if named and not wrong and not isinstance(cmd, TyperGroup):
        try:
            parse(words)
        except typer.BadParameter as e:
            # (a command named in a sentence may leave out its arguments: `tsnetchat login`)
            if type(e).__name__ != "MissingParameter":
                wrong.append(f"`{span}`: {e.message}")
        except Exception as e:
            wrong.append(f"`{span}`: {getattr(e, 'message', e)}")
    return wrong


def spans(path: Path) -> Iterator[tuple[int, str]]:
    """A README's backticked spans (one may go on over a line break, not a blank line),
    numbered by the line they start on."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = line.lstrip().startswith("```")
        fenced ^= fence
        lines.append("" if fence or fenced else line)
    text = "\n".join(lines)
    for m in re.finditer(r"(`+)(.+?)\1", text, re.DOTALL):
        if "\n\n" not in m.group(2):
            yield text.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split())


@pytest.fixture(autouse=True)
def no_tsnetchat_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parser reads TSNETCHAT_PORT (``--port``'s variable): what this shell has set is
    not what the README's lines say."""
    for var in [v for v in os.environ if v.startswith(config.ENV_PREFIX)]:
        monkeypatch.delenv(var)


def test_every_command_line_in_the_readme_is_one_the_cli_accepts() -> None:
    lines = [(n, line) for n, line in code_lines(README)
             if re.match(r"(\$ |sudo )?tsnetchat\s", line)]
    wrong = [f"README.md:{n}: {m}" for n, line in lines for m in line_mistakes(line)]
    assert len(lines) >= 20, f"found only {len(lines)} command lines in README.md's code blocks"
    assert not wrong, "\n".join(wrong)


def test_every_command_and_flag_the_readme_names_exists() -> None:
    seen, wrong = 0, []
    lines = README.read_text(encoding="utf-8").splitlines()
    for n, span in spans(README):
        mistakes = span_mistakes(span, lines[n - 1])
        seen += mistakes is not None
        wrong += [f"README.md:{n}: {m}" for m in mistakes or ()]
    assert seen >= 50, f"found only {seen} commands and flags in README.md's spans"
    assert not wrong, "\n".join(wrong)


def test_a_wrong_command_or_flag_is_caught() -> None:
    """The checks above see a wrong line (this holds them, not the README)."""
    assert line_mistakes("tsnetchat tail chat-server --room general --json") == []
    assert "--jsn" in line_mistakes("tsnetchat tail chat-server --jsn")[0]
    assert "tokn" in line_mistakes("sudo tsnetchat tokn issue alice@example.com")[0]
    assert "--port" in line_mistakes("tsnetchat whoami chat-server --port many")[0]
    assert "--all" in line_mistakes("tsnetchat unread chat-server   # --all: read ones too")[0]
    # (unquoted, a shell takes #general for a comment: `tail` is left without its room)
    assert "--room" in line_mistakes("tsnetchat tail chat-server --room #general")[0]
    assert span_mistakes("send --split", "") == []
    assert "--splt" in (span_mistakes("send --splt", "") or [""])[0]
    assert "has no --ttl" in (span_mistakes("tsnetchat token list --ttl", "") or [""])[0]
    assert "--stat-dir" in (span_mistakes("--stat-dir", "") or [""])[0]
    assert span_mistakes("tsnetchat login", "") == []  # (its server left out)
    assert "--port" in (span_mistakes("tsnetchat whoami chat-server --port x", "") or [""])[0]
    assert span_mistakes("a sentence in backticks", "") is None


# ---------------------------------------------------------------- Python names


@cache
def modules() -> dict[str, ModuleType]:
    out = {}
    for p in SOURCES:
        if p.stem != "__init__":
            out[p.stem] = importlib.import_module(f"tsnetchat.{p.stem}")
    return out


@cache
def top_names() -> dict[str, list[Any]]:
    """Every name defined or imported at the top of a package module, and the protocol's
    messages and their nested types."""
    out: dict[str, list[Any]] = {}
    for mod in modules().values():
        for k, v in vars(mod).items():
            out.setdefault(k, []).append(v)
    pb = importlib.import_module("tsnetchat.pb")
    for sub in vars(pb).values():
        if isinstance(sub, ModuleType) and hasattr(sub, "DESCRIPTOR"):
            for k, v in vars(sub).items():
                if not k.startswith("_"):
                    out.setdefault(k, []).append(v)
    return out


@cache
def folder_names(folder: Path) -> dict[str, dict[str, Any]]:
    """The modules of a folder outside the package (bench/, tests/, scripts/), read rather
    than imported: module -> name defined at its top -> its AST node."""
    out: dict[str, dict[str, Any]] = {}
    # (README.md names the modules of all three)
    folders = [ROOT / "tests", ROOT / "scripts", ROOT / "bench"] if folder == ROOT else [folder]
    for p in (p for f in folders for p in f.glob("*.py")):
        tree = python_tree(p.read_text(encoding="utf-8"))
        names: dict[str, Any] = {}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names[node.name] = node
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(t, ast.Name):
                        names[t.id] = node
        out[p.stem] = names
    return out


@cache
def string_constants() -> frozenset[str]:
    out = set()
    for p in SOURCES:
        for node in ast.walk(python_tree(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(node.value)
    return frozenset(out)


def as_string(name: str) -> bool:
    """The code has ``name`` as a string, or a string starting with it and a dot (an
    f-string's fixed part: ``f"tsnetchat.msg.{room}"``)."""
    return any(name == s or s.startswith(name + ".") or (s.endswith(".") and name.startswith(s))
               for s in string_constants())


def self_attributes(cls: type) -> set[str]:
    out: set[str] = set()
    for klass in cls.__mro__:
        try:
            tree = python_tree(inspect.getsource(klass).strip())
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "self" and isinstance(node.ctx, ast.Store)):
                out.add(node.attr)
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                out.add(node.target.id)
    return out


def member(obj: Any, part: str) -> tuple[bool, Any, list[str]]:
    """Whether ``obj`` has ``part``, the member, and what it has (for the message)."""
    descriptor = getattr(obj, "DESCRIPTOR", None)
    if isinstance(obj, type) and descriptor is not None and hasattr(descriptor, "fields_by_name"):
        has = [*descriptor.fields_by_name, *descriptor.nested_types_by_name,
               *descriptor.enum_values_by_name]
        if part in has:
            return True, getattr(obj, part, None), has
    methods = getattr(obj, "methods_by_name", None)  # (a gRPC service's descriptor)
    if methods is not None:
        return part in methods, None, list(methods)
    if hasattr(obj, part):
        return True, getattr(obj, part), dir(obj)
    if isinstance(obj, type):
        fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) \
            else set()
        known = fields | self_attributes(obj)
        for klass in obj.__mro__:
            known |= set(getattr(klass, "__annotations__", {}))
        if part in known:
            return True, None, sorted(known)
        return False, None, [*dir(obj), *known]
    if isinstance(obj, ModuleType) and obj.__name__.startswith("tsnetchat"):
        try:
            return True, importlib.import_module(f"{obj.__name__}.{part}"), []
        except ImportError:
            pass
    return False, None, dir(obj) if obj is not None else []


def proto_symbol(name: str) -> bool:
    """``name`` is a full name in the protocol (``tsnetchat.v1.Identity``)."""
    from google.protobuf import descriptor_pool

    importlib.import_module("tsnetchat.pb")
    pool = descriptor_pool.Default()
    for find in (pool.FindMessageTypeByName, pool.FindEnumTypeByName, pool.FindServiceByName,
                 pool.FindFieldByName, pool.FindMethodByName):
        try:
            find(name)
        except KeyError:
            continue
        return True
    return False


def starts_of(first: str) -> list[Any]:
    """What a chain's first part may name in the package: the package, a module, a name at
    the top of a module, or (``gate`` for the server's Gate) the class named like it."""
    out: list[Any] = [tsnetchat] if first == "tsnetchat" else []
    if first in modules():
        out.append(modules()[first])
    # (not a function: ``send.claimed_sender`` names a variable's field; not a plain value,
    # as ``STREAM`` in NATS's ``STREAM.MSG.DELETE``; not a module from outside the package,
    # which is looked in as one)
    out += [v for v in top_names().get(first, [])
            if not inspect.isroutine(v) and not isinstance(v, str | bytes | int | float)
            and not (isinstance(v, ModuleType) and not v.__name__.startswith("tsnetchat"))]
    if first.islower():
        out += [c for c in top_names().get(first.capitalize(), []) if isinstance(c, type)]
    if not out and first[:1].isupper():
        # a class of a module the package uses (asyncio's ``Handle``), or a service of the
        # gRPC protocols it serves (``Health.Check``)
        for v in {id(v): v for vs in top_names().values() for v in vs}.values():
            if isinstance(v, ModuleType) and not v.__name__.startswith("tsnetchat"):
                if isinstance(getattr(v, first, None), type):
                    out.append(getattr(v, first))
                services = getattr(getattr(v, "DESCRIPTOR", None), "services_by_name", {})
                if first in services:
                    out.append(services[first])
    return out


@cache
def package_classes() -> frozenset[str]:
    return frozenset(k for k, vs in top_names().items()
                     if any(isinstance(v, type) and v.__module__.startswith("tsnetchat")
                            for v in vs))


def follow(start: Any, parts: list[str]) -> str:
    """"" when ``start`` has the chain ``parts[1:]``; else what is missing."""
    obj = start
    for i, part in enumerate(parts[1:], 1):
        if obj is None:  # (an attribute set on instances: nothing further to look in)
            return ""
        ok, obj, has = member(obj, part)
        if not ok:
            return (f"{'.'.join(parts[:i])} has no {part}"
                    + near(part, [h for h in has if not h.startswith("__")]))
    return ""


def resolve(name: str, folder: Path) -> str | None:
    """None when ``name`` is not taken for Python or exists; else what is wrong."""
    parts = name.split(".")
    if parts[-1] in NOT_PYTHON:
        return None
    first = parts[0]
    if folder != PACKAGE and first in folder_names(folder) and first not in modules():
        names = folder_names(folder)[first]
        if parts[1] in names:
            return None
        return f"{first}.py has no {parts[1]}" + near(parts[1], names)
    if first == "tsnetchat" and proto_symbol(name):
        return None
    starts = starts_of(first)
    if starts:
        whys = [follow(s, parts) for s in starts]
        if "" in whys or as_string(name):
            return None
        return whys[0]
    if first[:1].isupper():
        # A class nobody has: a mistake when the package has one like it (``Service`` for
        # ChatService), else some other program's (grpc's Cython internals).
        like = sorted(c for c in package_classes() if c.endswith(first) or c.startswith(first))
        like += difflib.get_close_matches(first, sorted(package_classes()), n=2, cutoff=0.8)
        return f"there is no class {first} (there is {', '.join(like)})" if like else None
    if first.startswith("_") or importlib.util.find_spec(first) is None:
        return None  # (a local variable, another language's name, a host: not Python)
    try:
        why = follow(importlib.import_module(first), parts)
    except ImportError:
        return None
    # Outside the package a name nothing like any of the module's is another layer's (a
    # gRPC channel argument, grpc-go's API); a misspelt one is a mistake.
    return why if why and "nothing like it" not in why and not as_string(name) else None


@cache
def identifiers(folder: Path) -> frozenset[str]:
    """Every name the code in ``folder`` defines, takes as a parameter, assigns, imports or
    uses as an attribute."""
    out: set[str] = set()
    for p in folder.glob("*.py"):
        for node in ast.walk(python_tree(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                out.add(node.name)
            elif isinstance(node, ast.arg):
                out.add(node.arg)
            elif isinstance(node, ast.Name):
                out.add(node.id)
            elif isinstance(node, ast.Attribute):
                out.add(node.attr)
            elif isinstance(node, ast.alias):
                out.add((node.asname or node.name).split(".")[0])
    return frozenset(out)


def call_resolves(name: str, folder: Path) -> bool:
    """``name()`` names a function the code of the text's folder (for a README: of the
    package, tests/, scripts/ and bench/) has, or a builtin."""
    folders = [PACKAGE] if folder == PACKAGE else [
        PACKAGE, ROOT / "tests", ROOT / "scripts", ROOT / "bench"]
    return hasattr(builtins, name) or any(name in identifiers(f) for f in folders)


@cache
def repo_files() -> tuple[Path, ...]:
    skip = {".venv", ".git", ".mypy_cache", ".ruff_cache", "node_modules", ".lab"}
    return tuple(p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".proto")
                 and not skip & set(p.relative_to(ROOT).parts))


def file_exists(written: str, folder: Path) -> bool:
    if (ROOT / written).exists() or (folder / written).exists():
        return True
    return "/" not in written and any(p.name == written for p in repo_files())


@cache
def known_tests() -> frozenset[str]:
    """The tests' modules, functions and classes."""
    out = set()
    for p in (ROOT / "tests").glob("*.py"):
        out.add(p.stem)
        for node in ast.walk(python_tree(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                out.add(node.name)
    return frozenset(out)


def names_a_test(written: str) -> bool:
    """``written`` names a test (or, cut short with ``_...``, the start of one's name)."""
    if written.endswith("..."):
        return any(t.startswith(written.rstrip(".")) for t in known_tests())
    return written in known_tests()


@cache
def protocol_names() -> frozenset[str]:
    """The protocol's messages, fields, enums and their values, services and methods."""
    from tsnetchat.pb import chat_pb2

    out: set[str] = set()
    todo = list(chat_pb2.DESCRIPTOR.message_types_by_name.values())
    while todo:
        m = todo.pop()
        out |= {m.name, *m.fields_by_name}
        todo += list(m.nested_types)
        out |= {n for e in m.enum_types for n in (e.name, *e.values_by_name)}
    out |= {n for e in chat_pb2.DESCRIPTOR.enum_types_by_name.values()
            for n in (e.name, *e.values_by_name)}
    out |= {n for s in chat_pb2.DESCRIPTOR.services_by_name.values()
            for n in (s.name, *s.methods_by_name)}
    return frozenset(out)


def camel_mistake(word: str) -> str | None:
    """A README's backticked ``RenewToken``: a protocol name, or one the code (the package,
    tests/, scripts/, bench/) defines, uses or says; one like such a name is a typo or a
    rename, one like none another program's (grpc-go's ``WithInitialConnWindowSize``)."""
    known = set(protocol_names())
    for f in (PACKAGE, ROOT / "tests", ROOT / "scripts", ROOT / "bench"):
        known |= identifiers(f)
    if word in known or any(word in s for s in string_constants()):
        return None
    like = difflib.get_close_matches(word, sorted(known), n=3, cutoff=0.8)
    return f"{word}: no such name (there is {', '.join(like)})" if like else None


def wrong_names(path: Path) -> list[str]:
    folder = path.parent
    out = []
    if path.suffix == ".md":
        out += [f"{shown(path)}:{n}: {why}" for n, span in spans(path)
                if re.fullmatch(r"[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)*", span)
                and (why := camel_mistake(span))]
    for n, line in text_lines(path):
        for m in DOTTED.finditer(line):
            if GONE.match(line, m.end()):
                continue
            why = resolve(m.group(1), folder)
            if why:
                out.append(f"{shown(path)}:{n}: {m.group(1)}: {why}")
        for m in CALL.finditer(line):
            if not call_resolves(m.group(1), folder):
                out.append(f"{shown(path)}:{n}: {m.group(1)}(): no such function"
                           + near(m.group(1), top_names()))
        for m in re.finditer(r"(?<![\w/.])(test_\w+(?:\.\.\.)?)", line):
            if not names_a_test(m.group(1)):
                out.append(f"{shown(path)}:{n}: {m.group(1)}: no such test"
                           + near(m.group(1), known_tests()))
        for m in PATH.finditer(line):
            if not file_exists(m.group(1), folder):
                out.append(f"{shown(path)}:{n}: {m.group(1)}: no such file")
    return out


@pytest.mark.parametrize("path", [*DOCS, *SOURCES], ids=lambda p: shown(p))
def test_the_python_names_and_files_a_text_names_exist(path: Path) -> None:
    wrong = wrong_names(path)
    assert not wrong, "\n".join(wrong)


def test_a_wrong_python_name_is_caught() -> None:
    """The resolution above tells a name that exists from one that does not."""
    assert resolve("store.Store.search", PACKAGE) is None
    assert resolve("Gate.hold", PACKAGE) is None
    assert resolve("Welcome.topic", PACKAGE) is None
    assert resolve("ServerConfig.db_path", PACKAGE) is None
    assert resolve("asyncio.Runner", PACKAGE) is None
    assert resolve("tokens.json", PACKAGE) is None  # a file
    assert resolve("cfg.port", PACKAGE) is None  # a local variable, not taken for Python
    assert "Store has no serch" in (resolve("store.Store.serch", PACKAGE) or "")
    assert "search" in (resolve("Store.serch", PACKAGE) or "")
    assert resolve("Welcome.topik", PACKAGE)
    assert resolve("tsnetchat.lop", PACKAGE)
    assert resolve("asyncio.Runer", PACKAGE)
    assert resolve("Health.Check", PACKAGE) is None  # gRPC's health service
    assert resolve("Handle._run", PACKAGE) is None  # asyncio's
    assert resolve("helpers.held_calls", ROOT) is None  # tests/helpers.py, named in README
    assert "held_call" in (resolve("helpers.held_call", ROOT) or "")
    assert "ChatService" in (resolve("Service._live", PACKAGE) or "")
    assert camel_mistake("RenewToken") is None and camel_mistake("UIControl") is None
    assert "RenewToken" in (camel_mistake("RenewTokens") or "")
    assert camel_mistake("WithInitialConnWindowSize") is None  # (grpc-go's)
    assert names_a_test("test_a_kick_in_flight_to_server_1_when_its_nats_node_dies_...")
    assert not names_a_test("test_a_kick_in_flight_to_server_3_...")
    assert names_a_test("test_security") and not names_a_test("test_a_revoked_tokn")
    assert not file_exists("tsnetchat/gaet.py", ROOT)
    assert file_exists("gate.py", PACKAGE)


# ---------------------------------------------------------------- configuration


def readme_section(title: str) -> list[tuple[int, str]]:
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line == f"## {title}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    return [(i + 1, lines[i]) for i in range(start, end)]


def keys() -> set[str]:
    return {f.name for f in config.settings()}


def table_mistakes(lines: list[tuple[int, str]]) -> list[str]:
    """A key the table's first column names that config does not read, and a key config
    reads that the table does not name."""
    named: dict[str, int] = {}
    for n, line in lines:
        if line.startswith("| ") and not line.startswith("| key") and "---" not in line:
            for key in SPAN.findall(line.split("|")[1]):
                named[key] = n
    return ([f"README.md:{n}: `{k}` is no key" + near(k, keys())
             for k, n in named.items() if k not in keys()]
            + [f"the Configuration table does not name `{k}`" for k in sorted(keys() - set(named))])


def default_mistakes(lines: list[tuple[int, str]]) -> tuple[int, list[str]]:
    """How many defaults the table states as values (a row naming as many keys as values;
    not one said in words or from the environment, ``$STATE_DIRECTORY``), and those that
    are not ServerConfig's."""
    defaults = {f.name: getattr(config.ServerConfig(), f.name) for f in config.settings()}
    seen, wrong = 0, []
    for n, line in lines:
        cells = line.split("|")
        if not line.startswith("| `") or len(cells) < 4:
            continue
        named, values = SPAN.findall(cells[1]), SPAN.findall(cells[2])
        if len(named) != len(values) or any("$" in v for v in values):
            continue
        for key, said in zip(named, values, strict=True):
            value = defaults.get(key)
            if value is None:
                continue
            seen += 1
            as_code = str(value).lower() if isinstance(value, bool) else (
                f"{value:g}" if isinstance(value, float) else str(value))
            if said.strip('"') != as_code:
                wrong.append(f"README.md:{n}: `{key}` defaults to {value!r}, not {said}")
    return seen, wrong


def toml_mistakes(lines: list[tuple[int, str]]) -> tuple[int, list[str]]:
    """How many ``key = value`` the lines set (in a TOML example or backticked), and those
    whose key config does not read."""
    seen, wrong = 0, []
    for n, line in lines:
        for key in re.findall(r"(?:^\s+#? ?|`)([a-z_][a-z0-9_]*) = [\"'0-9a-z]", line):
            seen += 1
            if key not in keys():
                wrong.append(f"README.md:{n}: {key} is no key" + near(key, keys()))
    return seen, wrong


@cache
def config_variables() -> frozenset[str]:
    """The TSNETCHAT_* variables config.py reads, each shown by loading a config with it
    set (the setting's origin, or the error, names the variable) rather than by listing
    them; and the variables it reads by name (``os.environ.get("STATE_DIRECTORY")``)."""
    out = set()
    absent = mock.patch.object(config, "DEFAULT_CONFIG_FILE", Path("/nonexistent/config.toml"))
    for f in config.settings():
        var = config.ENV_PREFIX + f.name.upper()
        value = {"bool": "true", "int": "7", "float": "7"}.get(str(f.type), "/nonexistent")
        try:
            with absent:  # (this machine's /etc/tsnetchat/config.toml is not read)
                cfg = config.load_config(file=None, env={var: value})
        except ConfigError as e:  # (a value the key refuses still names it)
            out |= {var} if var in str(e) else set()
            continue
        out |= {var} if cfg.where(f.name) == var else set()
    var = config.ENV_PREFIX + "CONFIG"
    with pytest.raises(ConfigError, match=var):  # (it names the file to read)
        config.load_config(env={var: "/nonexistent/config.toml"})
    out.add(var)
    tree = python_tree((PACKAGE / "config.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if ((isinstance(node, ast.Call) and ast.unparse(node.func) == "os.environ.get")
                or (isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ")):
            arg = node.args[0] if isinstance(node, ast.Call) else node.slice
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.add(arg.value)
    return frozenset(out)


def client_variables() -> set[str]:
    """The TSNETCHAT_* names the package's code has as strings other than config's: the
    client's (``TSNETCHAT_TOKEN``) and the CLI's (``TSNETCHAT_TRACEBACK``)."""
    return {s for s in string_constants() if re.fullmatch(r"TSNETCHAT_[A-Z0-9_]+", s)}


def variable_mistakes(lines: list[tuple[int, str]]) -> list[str]:
    read = config_variables() | client_variables()
    return [f"README.md:{n}: {var} is read by nothing" + near(var, read)
            for n, line in lines for var in re.findall(r"\bTSNETCHAT_[A-Z][A-Z0-9_]*", line)
            if var not in read]


def unsaid_variables(text: str) -> list[str]:
    """The variables tsnetchat reads that the text does not name: config's by name, its
    TSNETCHAT_<KEY> by that rule, and the client's."""
    prefixed = {v for v in config_variables() if v.startswith(config.ENV_PREFIX)}
    by_rule = {config.ENV_PREFIX + k.upper() for k in keys()}
    want = set(config_variables() - by_rule) | client_variables()
    if prefixed & by_rule:
        want.add(config.ENV_PREFIX + "<KEY>")
    return sorted(v for v in want if v not in text)


def test_the_configuration_table_names_every_key_config_reads_and_no_other() -> None:
    wrong = table_mistakes(readme_section("Configuration"))
    assert not wrong, "\n".join(wrong)


def test_the_configuration_tables_defaults_are_the_configs() -> None:
    seen, wrong = default_mistakes(readme_section("Configuration"))
    assert seen >= 40, f"found only {seen} defaults in README.md's Configuration table"
    assert not wrong, "\n".join(wrong)


def test_every_key_set_in_the_readme_is_a_key() -> None:
    seen, wrong = toml_mistakes(list(text_lines(README)))
    assert seen >= 5, f"found only {seen} `key = value` in README.md"
    assert not wrong, "\n".join(wrong)


def test_every_environment_variable_the_readme_names_is_read_and_every_one_read_is_named(
        ) -> None:
    assert not (wrong := variable_mistakes(list(text_lines(README)))), "\n".join(wrong)
    missing = unsaid_variables(README.read_text(encoding="utf-8"))
    assert not missing, f"README.md does not name {', '.join(missing)}"


def test_a_wrong_key_or_variable_is_caught() -> None:
    """The checks above see a wrong key or variable (this holds them, not the README)."""
    assert "TSNETCHAT_PORT" in config_variables()
    assert "STATE_DIRECTORY" in config_variables()
    assert "TSNETCHAT_TOKEN" in client_variables()
    table = [(1, "| key | default | meaning |"), (2, "| --- | --- | --- |"),
             *((3 + i, f"| `{k}` | | |") for i, k in enumerate(sorted(keys())))]
    assert table_mistakes(table) == []
    assert "rate_brust" in table_mistakes([*table, (99, "| `rate_brust` | | |")])[0]
    assert "`port`" in table_mistakes([r for r in table if "`port`" not in r[1]])[0]
    assert default_mistakes([(1, "| `port` | `50051` | |")]) == (1, [])
    assert "50052" in default_mistakes([(1, "| `port` | `50052` | |")])[1][0]
    assert default_mistakes([(1, "| `rate_burst` / `rate_per_second` | `20` / `5` | |")])[1] == []
    assert toml_mistakes([(1, '    cap_domain = "example.com"')]) == (1, [])
    assert "enrol" in toml_mistakes([(1, 'set `enrol = "grant"`')])[1][0]
    assert variable_mistakes([(1, "TSNETCHAT_PORT, TSNETCHAT_TOKEN, TSNETCHAT_CONFIG")]) == []
    assert "TSNETCHAT_PROT" in variable_mistakes([(1, "`TSNETCHAT_PROT`")])[0]
    assert "TSNETCHAT_TRACEBACK" in unsaid_variables("TSNETCHAT_<KEY> TSNETCHAT_CONFIG")


# ---------------------------------------------------------------- the lab's and bench's scripts


@cache
def script_options(script: Path) -> frozenset[str]:
    """The options a script's argparse parser is given (``add_argument("--rounds", ...)``)."""
    out = set()
    for node in ast.walk(python_tree(script.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            out |= {a.value for a in node.args
                    if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return frozenset(out)


def script_mistakes(text: str) -> list[str]:
    """The flags a command line gives a script of bench/ or scripts/ that it does not take,
    and a script that is not there."""
    wrong = []
    for m in re.finditer(r"((?:bench|scripts)/[\w-]+\.py)\b([^#`|;\n]*)", text):
        script = ROOT / m.group(1)
        if not script.exists():
            wrong.append(f"{m.group(1)}: no such script")
            continue
        options = script_options(script)
        if not any(o.startswith("--") for o in options):
            continue  # (a script without argparse: its words are subcommands)
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(2)):
            if flag not in options:
                wrong.append(f"`{m.group(0).strip()}`: {m.group(1)} takes no {flag}"
                             + near(flag, options))
    return wrong


@pytest.mark.parametrize("path", DOCS, ids=shown)
def test_every_flag_a_readme_gives_a_script_is_one_it_takes(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    wrong = [f"{shown(path)}:{n}: {m}" for n, span in spans(path) for m in script_mistakes(span)]
    wrong += [f"{shown(path)}:{n}: {m}" for n, line in code_lines(path)
              for m in script_mistakes(line)]
    wrong += [f"{shown(path)}:{n}: {m}" for n, line in enumerate(lines, 1)
              if "`" not in line and not line.startswith("    ") for m in script_mistakes(line)]
    assert re.search(r"(bench|scripts)/[\w-]+\.py", "\n".join(lines)), "names no script"
    assert not wrong, "\n".join(wrong)


def test_a_wrong_flag_to_a_script_is_caught() -> None:
    assert script_mistakes("`.venv/bin/python bench/compare.py /tmp/before --rounds 5`") == []
    assert "--round" in script_mistakes("python bench/compare.py /tmp/x --round 5")[0]
    assert "no such script" in script_mistakes("python bench/compar.py")[0]


# ---------------------------------------------------------------- links


def anchors(text: str) -> set[str]:
    """The anchors GitHub makes of a Markdown text's headings (lower case, punctuation but
    ``-`` and ``_`` dropped, spaces to ``-``)."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def link_mistakes(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    wrong = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        n = text.count("\n", 0, m.start()) + 1
        if re.match(r"[a-z]+:", target):
            continue  # (https:, mailto:)
        file, _, anchor = target.partition("#")
        into = path.parent / file if file else path
        if not into.exists():
            wrong.append(f"{shown(path)}:{n}: {target}: no such file")
        elif anchor and anchor not in anchors(into.read_text(encoding="utf-8")):
            wrong.append(f"{shown(path)}:{n}: {target}: no such heading"
                         + near(anchor, anchors(into.read_text(encoding="utf-8"))))
    return wrong


@pytest.mark.parametrize("path", DOCS, ids=shown)
def test_every_link_in_a_readme_goes_to_a_file_and_heading_that_exist(path: Path) -> None:
    assert not (wrong := link_mistakes(path)), "\n".join(wrong)


def test_a_broken_link_is_caught(tmp_path: Path) -> None:
    doc = tmp_path / "README.md"
    doc.write_text("## Cluster mode: more than one server\n\n[a](#cluster-mode-more-than-one-"
                   "server) [b](#cluster-mode) [c](docs/none.md)\n", encoding="utf-8")
    assert [w.split(": ", 2)[1] for w in link_mistakes(doc)] == ["#cluster-mode", "docs/none.md"]
