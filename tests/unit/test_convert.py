"""Protobuf conversions of the servicer: ObjectFiller writes what fill_object writes."""

from __future__ import annotations

import dataclasses

from blobstore.server.convert import ObjectFiller, fill_object
from blobstore.server.model import ObjectInfo, StorageType
from blobstore.v1 import storage_pb2 as pb

BASE = ObjectInfo(
    "k", StorageType.DATA, 3, 7, "", {}, 1_700_000_000_123_456_789, 1_700_000_000_123_456_789, 0, b"s" * 32
)


def test_object_filler_writes_what_fill_object_writes() -> None:
    later = BASE.update_time_ns + 1_500_000_001
    infos = [
        BASE,
        dataclasses.replace(BASE, key="older", create_time_ns=BASE.create_time_ns - 10**9),
        dataclasses.replace(BASE, key="typed", content_type="text/plain", metadata={"a": "b"}, crc32c=0xFFFFFFFF),
        dataclasses.replace(BASE, key="tmp", storage_type=StorageType.TMP, expire_time_ns=later + 10**12),
        dataclasses.replace(BASE, key="later", create_time_ns=later, update_time_ns=later),
        dataclasses.replace(BASE, key="later-old", update_time_ns=later),
        BASE,
    ]
    filler = ObjectFiller()
    for info in infos:
        filled = pb.Object()
        filler.fill(filled, info)
        expected = fill_object(pb.Object(), info)
        assert filled == expected, info.key
        assert filled.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
