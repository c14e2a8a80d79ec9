"""CRC32C arithmetic that google-crc32c does not offer."""

from __future__ import annotations

import functools

# CRC-32C's polynomial, bit-reflected as the CRC is computed.
_CRC32C_POLY = 0x82F63B78


def _multiply_mod_poly(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial, both bit-reflected (x^0 is the top bit)."""
    product = 0
    bit = 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _CRC32C_POLY if b & 1 else b >> 1
    return product


def _x_to_the_2_to_the(k: int) -> int:
    """x^(2^k) modulo the polynomial."""
    power = 1 << 30  # x^1
    for _ in range(k):
        power = _multiply_mod_poly(power, power)
    return power


_X_TO_THE_2_TO_THE = [_x_to_the_2_to_the(k) for k in range(64)]


@functools.lru_cache(maxsize=64)
def _shift_by_bytes(count: int) -> int:
    """x^(8 * count) modulo the polynomial: what appending `count` bytes does to a CRC."""
    power = 1 << 31  # x^0
    k = 3  # 8 * count = count * 2^3
    while count:
        if count & 1:
            power = _multiply_mod_poly(_X_TO_THE_2_TO_THE[k], power)
        count >>= 1
        k += 1
    return power


def crc32c_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """The CRC32C of A + B from the CRC32Cs of A and of B (B being `length_b` bytes long),
    without the bytes: zlib's crc32_combine for CRC-32C's polynomial. A reader that has
    hashed each piece on its own (to check it, or to send it with its CRC32C) gets the CRC32C
    of the whole without hashing every byte a second time."""
    return _multiply_mod_poly(_shift_by_bytes(length_b), crc_a) ^ crc_b
