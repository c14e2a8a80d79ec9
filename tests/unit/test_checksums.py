"""CRC32C arithmetic against google-crc32c hashing the bytes themselves."""

from __future__ import annotations

import os

import google_crc32c
from hypothesis import given
from hypothesis import strategies as st

from blobstore.client.checksums import crc32c_combine

MiB = 1 << 20


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_crc32c_combine_gives_the_crc32c_of_the_joined_bytes(a: bytes, b: bytes) -> None:
    assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)


def test_crc32c_combine_over_a_mebibyte() -> None:
    a, b = os.urandom(3 * MiB + 7), os.urandom(MiB)
    assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)
