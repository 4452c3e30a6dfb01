"""HuJSON (JSON with comments and trailing commas, the tailnet policy file's format): read it
with the position of every value, and edit arrays in place.

The edits change only the bytes of what is added or removed, so the rest of the file
(comments, order, layout) stays exactly as it was. ``remove_item`` undoes ``append_item``
byte for byte for the layouts policy files use (one item per line, with or without a
trailing comma, or all on one line).

Errors in the text raise ValueError naming the line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"')


@dataclass
class Node:
    """A value and where it is in the text: ``text[start:end]``."""

    kind: str  # object, array, string, number, literal
    start: int
    end: int
    items: list[Node] = field(default_factory=list)  # array items
    members: list[tuple[str, Node]] = field(default_factory=list)  # object members, in order
    keys: list[Node] = field(default_factory=list)  # where each member's key is

    def member(self, key: str) -> Node | None:
        return next((v for k, v in self.members if k == key), None)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0

    def fail(self, what: str) -> ValueError:
        line = self.text.count("\n", 0, self.i) + 1
        return ValueError(f"line {line}: {what}")

    def skip(self) -> None:
        """Whitespace and comments."""
        t, n = self.text, len(self.text)
        while self.i < n:
            c = t[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif t.startswith("//", self.i):
                nl = t.find("\n", self.i)
                self.i = n if nl < 0 else nl + 1
            elif t.startswith("/*", self.i):
                close = t.find("*/", self.i + 2)
                if close < 0:
                    raise self.fail("a /* comment is never closed")
                self.i = close + 2
            else:
                return

    def value(self) -> Node:
        self.skip()
        if self.i >= len(self.text):
            raise self.fail("unexpected end of text")
        c = self.text[self.i]
        if c == "{":
            return self.container("object", "}")
        if c == "[":
            return self.container("array", "]")
        if c == '"':
            m = _STRING.match(self.text, self.i)
            if not m:
                raise self.fail("a string is not closed or has a bad escape")
            self.i = m.end()
            return Node("string", m.start(), m.end())
        for lit in ("true", "false", "null"):
            if self.text.startswith(lit, self.i):
                self.i += len(lit)
                return Node("literal", self.i - len(lit), self.i)
        m = _NUMBER.match(self.text, self.i)
        if m and m.end() > self.i:
            self.i = m.end()
            return Node("number", m.start(), m.end())
        raise self.fail(f"unexpected {c!r}")

    def container(self, kind: str, close: str) -> Node:
        node = Node(kind, self.i, self.i)
        self.i += 1
        while True:
            self.skip()
            if self.text.startswith(close, self.i):
                self.i += 1
                node.end = self.i
                return node
            if kind == "object":
                key = self.value()
                if key.kind != "string":
                    raise self.fail("an object key must be a string")
                self.skip()
                if not self.text.startswith(":", self.i):
                    raise self.fail("expected ':' after an object key")
                self.i += 1
                node.keys.append(key)
                node.members.append((json.loads(self.text[key.start:key.end]), self.value()))
            else:
                node.items.append(self.value())
            self.skip()
            if self.text.startswith(",", self.i):
                self.i += 1
            elif not self.text.startswith(close, self.i):
                raise self.fail(f"expected ',' or {close!r}")


def parse(text: str) -> Node:
    """The top-level value of a HuJSON text."""
    p = _Parser(text)
    node = p.value()
    p.skip()
    if p.i != len(text):
        raise p.fail("text after the end of the value")
    return node


def loads(text: str) -> Any:
    """The value of a HuJSON text (or of a span of one) as plain Python data."""
    return _plain(text, parse(text))


def _plain(text: str, node: Node) -> Any:
    if node.kind == "object":
        return {k: _plain(text, v) for k, v in node.members}
    if node.kind == "array":
        return [_plain(text, v) for v in node.items]
    return json.loads(text[node.start:node.end])


def value_of(text: str, node: Node) -> Any:
    return _plain(text, node)


# --- edits ----------------------------------------------------------------------------


def _line_start(text: str, i: int) -> int:
    return text.rfind("\n", 0, i) + 1


def _starts_line(text: str, i: int) -> bool:
    return text[_line_start(text, i):i].strip() == ""


def _after_blanks(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def _rest_is_blank(text: str, i: int) -> bool:
    """Whether only blanks or a // comment are left on the line from ``i``."""
    j = _after_blanks(text, i)
    return j == len(text) or text[j] in "\r\n" or text.startswith("//", j)


def _line_end_if_only_comment(text: str, i: int) -> int:
    """From ``i``: the end of the line (at its newline) if only blanks or a // comment are
    left on it, else ``i``."""
    if _rest_is_blank(text, i):
        nl = text.find("\n", i)
        return len(text) if nl < 0 else nl
    return i


def append_item(text: str, array: Node, item: str) -> str:
    """``text`` with ``item`` (JSON text) added as the last item of ``array``, laid out like
    the items already there."""
    if array.kind != "array":
        raise ValueError("not an array")
    if not array.items:
        inner = text[array.start + 1:array.end - 1]
        if "\n" not in inner and not inner.strip():
            return text[:array.start + 1] + item + text[array.end - 1:]
        indent = _indent_of(text, array.start) + "  "
        return text[:array.start + 1] + "\n" + indent + item + "," + text[array.start + 1:]
    last = array.items[-1]
    after = _after_blanks(text, last.end)
    comma = text.startswith(",", after)
    if not _starts_line(text, last.start):  # all on one line: [a, b] -> [a, b, item]
        at = after + 1 if comma else last.end
        return text[:at] + (" " if comma else ", ") + item + text[at:]
    indent = text[_line_start(text, last.start):last.start]
    if comma:
        at = _line_end_if_only_comment(text, after + 1)
        return text[:at] + "\n" + indent + item + "," + text[at:]
    at = _line_end_if_only_comment(text, last.end)
    return text[:last.end] + "," + text[last.end:at] + "\n" + indent + item + text[at:]


def remove_item(text: str, array: Node, index: int) -> str:
    """``text`` without item ``index`` of ``array`` (and the comma and line that held it)."""
    items = array.items
    item = items[index]
    after = _after_blanks(text, item.end)
    comma = text.startswith(",", after)
    if _starts_line(text, item.start) and _rest_is_blank(text, after + 1 if comma else item.end):
        start = _line_start(text, item.start)
        end = _line_end_if_only_comment(text, after + 1 if comma else item.end)
        if end < len(text) and text[end] == "\n":
            end += 1
        if comma or index == 0:
            return text[:start] + text[end:]
        prev = items[index - 1]  # the item before keeps no comma it no longer needs
        pc = _after_blanks(text, prev.end)
        return text[:pc] + text[pc + 1:start] + text[end:]
    if comma and index > 0 and _rest_is_blank(text, after + 1):
        # the last on a line that holds others: the line ends after the item before it
        pc = _after_blanks(text, items[index - 1].end)
        return text[:pc + 1] + text[after + 1:]
    if comma:
        return text[:item.start] + text[_after_blanks(text, after + 1):]
    if index == 0:
        return text[:item.start] + text[item.end:]
    return text[:items[index - 1].end] + text[item.end:]


def replace(text: str, node: Node, new: str) -> str:
    return text[:node.start] + new + text[node.end:]


def add_member(text: str, obj: Node, key: str, value: str) -> str:
    """``text`` with ``"key": value`` added as the last member of ``obj``, laid out like the
    members already there."""
    if obj.kind != "object":
        raise ValueError("not an object")
    members = [Node("member", k.start, v.end) for k, (_, v) in zip(obj.keys, obj.members,
                                                                     strict=True)]
    return append_item(text, Node("array", obj.start, obj.end, items=members),
                       f"{json.dumps(key)}: {value}")


def _indent_of(text: str, i: int) -> str:
    ls = _line_start(text, i)
    return text[ls:_after_blanks(text, ls)]
