"""The message path's pure rules: message text (tsnetchat.render) and rate buckets
(tsnetchat.throttle)."""

from __future__ import annotations

import unicodedata

from tsnetchat.render import UNSAFE as _FORBIDDEN
from tsnetchat.throttle import TokenBucket


def test_text_rule_regex_matches_unicode_categories_everywhere_in_the_bmp() -> None:
    bidi = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
    # (line and paragraph separators: a line break where honoured; interlinear annotation
    # marks: text some renderers hide)
    breaks = set("\u2028\u2029\ufff9\ufffa\ufffb")
    for cp in range(0x10000):
        ch = chr(cp)
        want = ch not in "\n\t" and (unicodedata.category(ch) in ("Cc", "Cs")
                                       or ch in bidi | breaks)
        assert (_FORBIDDEN.search(ch) is not None) == want, hex(cp)


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    b = TokenBucket(3, 0.001)  # (at 1,000 a second, a pause of 1 ms among the takes refilled it)
    assert [b.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take() > 0
