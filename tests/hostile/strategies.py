"""What a hostile client sends: JSON of any shape, text with NUL and odd code points, odd numbers."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import strategies as st

# Text that reaches every corner: NUL, controls, line separators, astral planes, long runs of digits.
hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), max_size=12).map(lambda t: t + "\x00"),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "\u2028",
            "\ufeff",
            "null",
            "0",
            "-0",
            "1e309",
            "NaN",
            "٣٤",
            "８８９６５",
            "a" * 200,
        ]
    ),
    st.from_regex(r"[0-9]{1,40}", fullmatch=True),
)

odd_numbers = st.one_of(
    st.integers(-(2**63), 2**64 - 1),  # what orjson writes; larger ones are in raw_bodies
    st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.5, 1e308, -1e-308, 150000.0, 1e20]),
)

json_values = st.recursive(
    st.none() | st.booleans() | odd_numbers | hostile_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(hostile_text, children, max_size=4),
    max_leaves=12,
)


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


# Bodies that are not JSON objects at all, or barely.
raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b'"x"',
            b"{",
            b"\xef\xbb\xbf{}",
            b'{"a":NaN}',
            b'{"a":Infinity}',
            b'{"a":1e999999}',
            b'{"a":"\\ud800"}',
            b'{"a":"\\u0000"}',
            b'{"a":1,"a":2}',
            b'{"order":{"amount":184467440737095516160},"version":-99999999999999999999999}',
            b'{"online_to_offline_info":{"payment_code":8896512345678123}}',
        ]
    ),
    # Deep nesting (built lazily, so a failing case's report stays short).
    st.sampled_from([600, 5000]).map(nested),
    st.just(100000).map(lambda depth: b"[" * depth),
)


@st.composite
def mutated(draw, document: dict[str, Any], paths: list[tuple[str, ...]]) -> bytes:
    """``document`` with some members (at ``paths``) replaced by anything, or removed."""
    document = orjson.loads(orjson.dumps(document))
    for path in draw(st.lists(st.sampled_from(paths), max_size=4, unique=True)):
        target = document
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        if draw(st.booleans()):
            target.pop(path[-1], None)
        else:
            target[path[-1]] = draw(json_values)
    return orjson.dumps(document)


content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/JSON",
        "application/json; charset=latin-1",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json, text/plain",
        "*/*",
        "",
    ]
)
