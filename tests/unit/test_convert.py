"""Protobuf conversions of the servicer: ObjectFiller writes what fill_object writes; Download
messages encoded by hand are the bytes protobuf would write."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from blobstore.client.wire import encode_download_response
from blobstore.server.convert import ObjectFiller, fill_object, object_to_pb
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


@given(
    data=st.binary(max_size=300) | st.sampled_from([b"x" * 127, b"x" * 128, b"x" * 16383, b"x" * 16384]),
    crc=st.sampled_from([0, 1, 0x7F, 0x80, 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF),
    first=st.booleans(),
)
def test_an_encoded_download_response_is_what_protobuf_writes(data: bytes, crc: int, first: bool) -> None:
    message = pb.DownloadResponse(data=data, crc32c=crc)
    head = b""
    if first:
        extra = pb.DownloadResponse(
            object=object_to_pb(BASE), content_range=pb.ContentRange(start=3, end=3 + len(data), complete_length=10**12)
        )
        message.MergeFrom(extra)
        head = extra.SerializeToString()
    encoded = encode_download_response(memoryview(b"pad" + data + b"pad")[3 : 3 + len(data)], crc, head)
    assert encoded == message.SerializeToString()
    assert pb.DownloadResponse.FromString(encoded) == message
