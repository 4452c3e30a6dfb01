"""How text that came from someone else is checked and shown: one rule for the server, for
`tsnetchat history`/`tail`, and for the terminal client.

* ``UNSAFE``: characters that would let one person rewrite another's terminal: C0 and C1
  controls (except tab and newline), DEL, lone surrogates, the bidi embedding, override
  and isolate characters, the line and paragraph separators (a line break where they are
  honoured: a line that passes for someone else's) and the interlinear annotation marks
  (text that some renderers hide). The server refuses messages that contain them; names are shown
  with each one replaced by ``?``.
* ``is_blank``: text made only of whitespace and characters that show nothing (zero-width
  space, joiners, BOM, variation selectors, Hangul fillers ...): an invisible message.
* ``name``: a display name or device name fit to show: one line, unsafe and invisible
  characters replaced by ``?`` (so ``Ali\\u200bce`` does not pass for ``Alice``), at most
  ``NAME_MAX`` characters.
* ``visible``: message text fit to print.
* ``CONTINUATION``: the mark that starts every line of a message after its first (a line
  break in the text, or a wrapped line), after blank space under the text column, so no
  line of a message can pass for a message of its own. ``chatview.layout`` lays messages
  out with it, for the terminal chat and for `tsnetchat history`/`tail` alike.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from .errors import InvalidInput
from .pb import chat_pb2 as pb

# Refused in text, as character-class ranges: C0 and C1 controls (tab and newline apart),
# and the rest, which a terminal would act on rather than show (lone surrogates, bidi
# embeddings, overrides and isolates, line and paragraph separators, annotation marks).
CONTROLS = "\x00-\x08\x0b-\x1f\x7f-\x9f"
UNSHOWN = "\ud800-\udfff\u202a-\u202e\u2066-\u2069\u2028\u2029\ufff9-\ufffb"
UNSAFE = re.compile(f"[{CONTROLS}{UNSHOWN}]")

# Unicode's Default_Ignorable_Code_Point set (they render as nothing), plus the braille
# blank, which renders as an empty cell.
_INVISIBLE = ("\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
              "\u202a-\u202e\u2060-\u206f\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
              "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff")
_BLANK = re.compile(f"[\\s{_INVISIBLE}]*")
_NAME_BAD = re.compile(f"[\\s{_INVISIBLE}\x00-\x1f\x7f-\x9f\ud800-\udfff]")

NAME_MAX = 64
CONTINUATION = "┊ "


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: only whitespace and invisible characters."""
    return _BLANK.fullmatch(text) is not None


def one_line(text: str) -> str:
    """A topic or away message as kept: stripped, and "" when it shows nothing (invisible
    characters alone were stored and shown as "set the topic: " and nothing: an attacker's
    run, 2026-11-24)."""
    return "" if is_blank(text) else text.strip()


def name(shown: str, fallback: str = "") -> str:
    """``shown`` made safe to print as a name (see the module doc), or ``fallback`` (made
    safe the same way) when nothing visible is left."""
    clean = _NAME_BAD.sub(lambda m: " " if m.group() == " " else "?", composed(shown)).strip()
    if not clean or set(clean) <= {"?", " "}:
        return name(fallback) if fallback else "?"
    return clean if len(clean) <= NAME_MAX else clean[:NAME_MAX - 1] + "…"


def who(identity: Any) -> str:
    """How a sender (a ``tsnetchat.v1.Identity``) is named on screen."""
    return name(str(identity.display_name), str(identity.login))


# A character followed by combining marks (accents, a kana's voicing mark): such a cluster is
# shown composed where Unicode has it as one character. An "e" followed by U+0301 was drawn
# with the accent twice, or beside its letter, once the chat scrolled (a new user's day,
# 2026-11-24). Only these clusters: NFC of the whole text would also swap CJK compatibility
# ideographs (a glyph variant in a name) and take apart its composition exclusions.
_MARKED = re.compile("[^\u0300-\u036f][\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-"
                     "\u20ff\u3099\u309a\ufe20-\ufe2f]+")


def composed(text: str) -> str:
    """``text`` with each letter and the accents that follow it composed (see _MARKED)."""
    return _MARKED.sub(lambda m: unicodedata.normalize("NFC", m.group()), text)


def visible(text: str) -> str:
    """Message text safe to print: unsafe characters replaced by ``?``, tabs by spaces (the
    server refuses such text; this is for what was stored before, or came another way), and
    accents composed with their letters (``composed``). What is stored and sent, and what
    ``--json`` prints, is not changed."""
    return UNSAFE.sub("?", composed(text.replace("\t", "    ")))


def validate_text(text: str, kind: int, max_bytes: int) -> None:
    """Raise InvalidInput unless ``text`` may be a message (the server's rule, and the
    client's before it sends: ledger, tui)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidInput(f"message is {size} bytes; the limit is {max_bytes} bytes of UTF-8 "
                           "text. Split it up.")
    if is_blank(text):  # also zero-width characters only: an invisible message
        raise InvalidInput("message is empty")
    if kind not in (pb.MESSAGE_KIND_TEXT, pb.MESSAGE_KIND_ACTION):
        raise InvalidInput(f"unknown message kind {kind}")
    bad = UNSAFE.search(text)
    if bad is not None:
        # Terminal escapes and bidi overrides would let one user rewrite others' screens.
        raise InvalidInput(f"message contains a control character (U+{ord(bad.group()):04X}); "
                           "only printable text, newlines and tabs are allowed")
