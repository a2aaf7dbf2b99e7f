"""Untrusted text on its way to a log line: escaped, capped, payment codes masked."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from server.ops.masking import escape, for_log, is_clean_text, mask_code, mask_codes_in


def test_a_code_keeps_only_its_last_four_digits():
    assert mask_code("8896512345678123") == "************8123"
    assert mask_code("123") == "***"


def test_every_long_digit_run_is_masked_and_short_numbers_stay():
    text = "GET /v1/payment-codes/8896500000000777?limit=100 port 8080 code 3301200000000001"
    assert (
        mask_codes_in(text)
        == "GET /v1/payment-codes/************0777?limit=100 port 8080 code ************0001"
    )


def test_bytes_that_are_not_utf8_and_controls_are_escaped():
    assert escape("caf\udce9\x00\n\u2028") == "caf\\xe9\\x00\\x0a\\u2028"
    assert for_log(b"M\xfcnchen") == "M\\xfcnchen"
    assert escape("x" * 300, 10) == "x" * 10 + "…"


def test_text_postgresql_cannot_hold_is_told_apart():
    assert is_clean_text("Budi Santoso, Toko Contoh ✓")
    assert not is_clean_text("a\x00b")
    assert not is_clean_text("caf\udce9")


@given(st.binary(max_size=200))
def test_any_bytes_become_a_line_json_can_write_without_a_full_code(raw):
    import orjson

    text = for_log(raw)
    orjson.dumps({"field": text})  # never a surrogate
    assert "\n" not in text
    assert all(
        len(run) < 10 for run in "".join(c if c.isdigit() and c.isascii() else " " for c in text).split()
    )
