"""`tsnetchat grants`: the tsnetchat app-capability grants in the tailnet policy file.

A tsnetchat grant is an entry of the policy's ``grants`` whose ``app`` holds
``<cap_domain>/cap/tsnetchat``, e.g.::

    {"src": ["group:chat"], "dst": ["tag:chat"],
     "app": {"example.com/cap/tsnetchat": [{"rooms": ["general"], "admin": false}]}}

Reading and editing the text is pure (``find``, ``with_grant``, ``without_grant``); every
edit touches only the grant it adds or removes, so the rest of the file, comments
included, stays as it was (hujson.py). ``apply`` is the one path to Tailscale: read the
file and its ETag, edit, have the API validate the result, save it only if nobody saved
another version meanwhile (If-Match), else PolicyConflict and nothing is saved.

A grant is named by an id made from its content, so ``remove ID`` never removes a grant
that changed (or moved) since it was shown.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import hujson
from .config import ROOM_RE, TAG_RE, ServerConfig
from .errors import InvalidInput
from .tsapi import Policy, open_api


@dataclass(frozen=True)
class Grant:
    id: str
    index: int  # in the policy's grants array
    line: int
    src: tuple[str, ...]
    dst: tuple[str, ...]
    values: tuple[dict[str, Any], ...]  # what the capability grants: rooms, admin
    others: bool  # the entry grants more than tsnetchat's capability (ip, other apps)

    def describe(self) -> str:
        """One line, each value as the server reads it (``reads_as``)."""
        what = "; ".join(
            f"rooms={','.join(rooms) or '(none)'}{' admin' if admin else ''}"
            for rooms, admin in map(reads_as, self.values)) or "(no value)"
        where = f"  (line {self.line})" if self.line else ""
        return (f"{self.id}  src={','.join(self.src)}  dst={','.join(self.dst)}  {what}"
                f"{'  (+ more in this entry)' if self.others else ''}{where}")

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "src": list(self.src), "dst": list(self.dst),
                "values": list(self.values), "line": self.line, "others": self.others}


def reads_as(value: dict[str, Any]) -> tuple[list[str], bool]:
    """The rooms and admin right one grant value gives, as the server reads it
    (``auth.grant_from_capmap``, not imported: it needs the server's extra): rooms only
    from a list of strings, admin only when ``true``. A value without rooms gives none (it
    was shown as every room, rooms=*, and its people were let into none)."""
    rooms = value.get("rooms", [])
    listed = [r for r in rooms if isinstance(r, str)] if isinstance(rooms, list) else []
    return list(dict.fromkeys(listed)), value.get("admin") is True


def _grant_id(entry: Any) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:8]


def _grants_array(text: str) -> tuple[hujson.Node, hujson.Node | None]:
    try:
        root = hujson.parse(text)
    except ValueError as e:
        raise InvalidInput(f"the tailnet policy file is not valid HuJSON: {e}") from None
    if root.kind != "object":
        raise InvalidInput("the tailnet policy file is not a JSON object")
    arr = root.member("grants")
    if arr is not None and arr.kind != "array":
        raise InvalidInput("the policy file's \"grants\" is not a list")
    return root, arr


def _grant(entry: dict[str, Any], cap: str, *, index: int, line: int) -> Grant:
    values = entry["app"][cap]
    return Grant(id=_grant_id(entry), index=index, line=line,
                 src=tuple(entry.get("src") or ()), dst=tuple(entry.get("dst") or ()),
                 values=tuple(v for v in values if isinstance(v, dict))
                 if isinstance(values, list) else (),
                 others=bool(set(entry) - {"src", "dst", "app"}) or len(entry["app"]) > 1)


def find(text: str, cap: str) -> list[Grant]:
    """The tsnetchat grants of a policy file, in file order."""
    _, arr = _grants_array(text)
    out = []
    for i, node in enumerate(arr.items if arr else []):
        entry = hujson.value_of(text, node)
        if isinstance(entry, dict) and isinstance(entry.get("app"), dict) and cap in entry["app"]:
            out.append(_grant(entry, cap, index=i, line=text.count("\n", 0, node.start) + 1))
    return out


def describe_new(entry: dict[str, Any], cap: str) -> str:
    return _grant(entry, cap, index=-1, line=0).describe()


def new_grant(cap: str, *, src: list[str], dst: list[str], rooms: list[str],
              admin: bool) -> dict[str, Any]:
    """A grant entry, checked as far as tsnetchat can (the API checks the rest)."""
    if not src:
        raise InvalidInput("--src: give at least one source (a login, group:x, tag:x, or *)")
    if not dst:
        raise InvalidInput("--dst: give the server's tag (tag:chat) or set `tags` in the config")
    for r in rooms:
        if r != "*" and not ROOM_RE.fullmatch(r):
            raise InvalidInput(f"--room: {r!r} is not a room name (a-z, 0-9, _ and -, up to "
                               "32) or *")
    for d in dst:
        if d.startswith("tag:") and not TAG_RE.fullmatch(d):
            raise InvalidInput(f"--dst: {d!r} is not a tag like tag:chat")
    value = {"rooms": sorted(set(rooms)) or ["*"], "admin": admin}
    return {"src": src, "dst": dst, "app": {cap: [value]}}


def with_grant(text: str, entry: dict[str, Any]) -> str:
    """The policy text with ``entry`` appended to its grants (a grants list is added if the
    file has none)."""
    root, arr = _grants_array(text)
    item = json.dumps(entry)
    if arr is None:
        return hujson.add_member(text, root, "grants", f"[{item}]")
    return hujson.append_item(text, arr, item)


def without_grant(text: str, cap: str, grant_id: str) -> str:
    """The policy text without the tsnetchat grant ``grant_id``. An entry that grants more
    than tsnetchat's capability keeps the rest; only the capability goes."""
    _, arr = _grants_array(text)
    match = next((g for g in find(text, cap) if g.id == grant_id), None)
    if match is None or arr is None:
        raise InvalidInput(f"no tsnetchat grant has the id {grant_id!r} (the policy file may "
                           "have changed): run `tsnetchat grants show`")
    node = arr.items[match.index]
    if not match.others:
        return hujson.remove_item(text, arr, match.index)
    entry = hujson.value_of(text, node)
    del entry["app"][cap]
    if not entry["app"]:
        del entry["app"]
    return hujson.replace(text, node, json.dumps(entry))


# --- against the API -----------------------------------------------------------------


async def read(cfg: ServerConfig) -> tuple[Policy, list[Grant]]:
    async with open_api(cfg) as api:
        policy = await api.policy()
    return policy, find(policy.text, cfg.cap_name)


async def apply(cfg: ServerConfig, edit: Callable[[str], str]) -> Policy:
    """Read the policy file, ``edit`` its text, and save the result if the API validates it
    and the file is still the version that was read. Returns the saved policy."""
    async with open_api(cfg) as api:
        policy = await api.policy()
        new = edit(policy.text)
        problem = await api.validate_policy(new)
        if problem:
            raise InvalidInput(f"Tailscale's API refused the edited policy file, so nothing "
                               f"was saved: {problem}")
        return await api.save_policy(new, policy.etag)
