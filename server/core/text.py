"""What text from outside may hold: whole numbers as written in it, and the characters of a line.

Every field a client, an import or DOKU writes that dipc reads as a number, and every free text it stores
and shows again (a customer's name on a receipt, a resolution's note), goes through these rules, so that
no two routes read the same text differently.
"""

from __future__ import annotations

import re

_INT_DIGITS = 4000  # int() refuses more than 4,300; every bound dipc reads against has far fewer


class TooLarge(ValueError):
    """Digits alone, but more than the bound allows."""


def whole_number(text: str, *, maximum: int) -> int:
    """``text`` as a whole number from 0 to ``maximum``, written in ASCII digits alone.

    ``int()`` also reads a sign, surrounding spaces, '_' between digits and the digits of other scripts
    ("٣" is 3), and refuses more than 4,300 digits with a ValueError no caller expects; here each of those
    is a ValueError, and a value past ``maximum`` is :class:`TooLarge`. Leading zeros are ignored.
    """
    if not (text.isascii() and text.isdigit()):
        raise ValueError("must be written in the digits 0-9 alone")
    significant = text.lstrip("0") or "0"
    if len(significant) > _INT_DIGITS or (value := int(significant)) > maximum:
        raise TooLarge(f"must be at most {maximum}")
    return value


# One line of text as a person reads it: no C0 or C1 control character, no DEL, no line or paragraph
# separator, and no bidi override or isolate (which could make a receipt, a terminal or a report show
# other text than is stored). Prose (a note) may also hold line breaks (LF, CR) and tabs.
_BIDI = "\u202a-\u202e\u2066-\u2069"
_NOT_IN_A_LINE = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029{_BIDI}]")
_NOT_IN_PROSE = re.compile(f"[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f\\u2028\\u2029{_BIDI}]")


def has_control(text: str, *, prose: bool = False) -> bool:
    """Whether ``text`` holds a character a line (or, with ``prose``, a note) must not."""
    if text.isprintable():  # what most text is, and far cheaper than the regex: none of these is printable
        return False
    return (_NOT_IN_PROSE if prose else _NOT_IN_A_LINE).search(text) is not None
