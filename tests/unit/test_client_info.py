"""The client's ObjectInfo.from_pb, which builds its instances without the dataclass's __init__."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from blobstore.client.storage import ObjectInfo
from blobstore.v1 import storage_pb2 as pb


def _object(**fields: object) -> pb.Object:
    message = pb.Object(key="a/b", storage_type=pb.STORAGE_TYPE_TMP, size=3, generation=7, content_type="text/plain")
    message.metadata["colour"] = "blue"
    message.create_time.seconds, message.create_time.nanos = 1_700_000_000, 123_456_789
    message.update_time.seconds, message.update_time.nanos = 1_700_000_100, 999
    message.expire_time.seconds = 1_700_604_900
    message.checksums.crc32c = 0xDEADBEEF
    message.checksums.sha256 = bytes(range(32))
    for name, value in fields.items():
        setattr(message.checksums if name == "crc32c" else message, name, value)
    return message


def test_from_pb_builds_what_the_constructor_builds() -> None:
    info = ObjectInfo.from_pb(_object())
    expected = ObjectInfo(
        "a/b",
        "tmp",
        3,
        7,
        "text/plain",
        {"colour": "blue"},
        datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC),
        datetime(2023, 11, 14, 22, 15, 0, 0, tzinfo=UTC),
        datetime(2023, 11, 21, 22, 15, 0, tzinfo=UTC),
        0xDEADBEEF,
        bytes(range(32)).hex(),
    )
    assert info == expected
    # Every field, including one added later and forgotten in from_pb.
    assert vars(info) == vars(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.size = 1  # type: ignore[misc]


def test_absent_fields_are_none_and_a_crc32c_of_zero_is_kept() -> None:
    message = _object(crc32c=0)
    message.ClearField("expire_time")
    assert ObjectInfo.from_pb(message).crc32c == 0
    assert ObjectInfo.from_pb(message).expires is None
    message.checksums.ClearField("crc32c")
    assert ObjectInfo.from_pb(message).crc32c is None
    assert ObjectInfo.from_pb(pb.Object(key="k")).created is None
