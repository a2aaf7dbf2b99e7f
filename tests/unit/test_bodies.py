"""Request bodies decoded by dipc within their limit (server/http/bodies.py), as aiohttp decoded them."""

from __future__ import annotations

import gzip
import os
import zlib

import pytest

from server.core.errors import BadRequest, BodyTooLarge
from server.http.bodies import _INFLATE_PIECE, _Body


def read(encoding: str | None, pieces: list[bytes], limit: int = 1 << 30) -> bytes:
    body = _Body(encoding, limit, "the body")
    decoded = b"".join(part for piece in pieces for part in body.take(piece))
    body.end()
    return decoded


def squeezed(data: bytes, wbits: int) -> bytes:
    squeeze = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return squeeze.compress(data) + squeeze.flush()


def test_gzip_members_one_after_another_are_one_body():
    """RFC 1952: a gzip stream is a series of members (`cat a.csv.gz b.csv.gz`). A review found them
    refused with 400 after the first; aiohttp had read them all."""
    first, second = b"payment_code,amount\n", b"8896500000000001,1000\n"
    coded = gzip.compress(first) + gzip.compress(second)
    assert read("gzip", [coded]) == first + second
    assert read("gzip", [coded[:25], coded[25:]]) == first + second


def test_zlib_deflate_whose_first_piece_is_one_byte():
    """A review found a zlib body whose first chunk held one byte read as bare deflate (400)."""
    data = b'{"payment_code": "8896512345678123"}'
    coded = zlib.compress(data)
    assert read("deflate", [coded[:1], coded[1:]]) == data
    bare = squeezed(data, -zlib.MAX_WBITS)
    assert read("deflate", [bare[:1], bare[1:]]) == data


@pytest.mark.parametrize("size", range(_INFLATE_PIECE + 21, _INFLATE_PIECE + 249, 19))
def test_bare_deflate_whose_output_outruns_its_input_is_read_whole(size):
    """A review found bare deflate of these sizes refused as cut short: zlib had taken all the input with
    output still to give at the 256 KiB step, and nothing asked it for the rest."""
    data = b"a" * size
    assert read("deflate", [squeezed(data, -zlib.MAX_WBITS)]) == data


@pytest.mark.parametrize(("encoding", "wbits"), [("gzip", 16 + zlib.MAX_WBITS), ("deflate", zlib.MAX_WBITS)])
@pytest.mark.parametrize("limit", [1024, 64 * 1024])
def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_refused(encoding, wbits, limit):
    data = os.urandom(limit).hex().encode()[:limit]
    coded = squeezed(data, wbits)
    assert read(encoding, [coded], limit) == data
    with pytest.raises(BodyTooLarge):
        read(encoding, [coded], limit - 1)


@pytest.mark.parametrize(
    ("encoding", "coded"),
    [
        ("gzip", gzip.compress(b"{}") + b"junk"),
        ("deflate", zlib.compress(b"{}") + b"junk"),
        ("gzip", gzip.compress(b"{}")[:-6]),
        ("gzip", b""),
    ],
    ids=["junk after gzip", "junk after deflate", "gzip cut short", "no gzip at all"],
)
def test_a_broken_encoding_is_a_bad_request(encoding, coded):
    with pytest.raises(BadRequest):
        read(encoding, [coded])


def test_an_unknown_coding_is_taken_as_it_is():
    assert read("compress", [b"{}"]) == b"{}"
    assert read(None, [b"{", b"}"]) == b"{}"
