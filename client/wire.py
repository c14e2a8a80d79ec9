"""Upload messages encoded by hand, and the Upload call that sends them as they are.

Building an UploadRequest and serializing it copies every byte of its data three times
(into the message, into the encoder's buffer, into the result), and every read of
`message.data` copies it once more. The client sends a GiB as 1 MiB messages, so those
copies were a good part of its CPU. Here the one join copies the data once, straight from
what the file read returned; the server parses the same bytes SerializeToString would give
(tests/unit/test_wire.py checks that they are equal).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from blobstore.v1 import storage_pb2 as pb

UPLOAD_METHOD = "/blobstore.v1.Storage/Upload"

# UploadRequest's fields after the first-message oneof, as protobuf writes them: write_offset
# (3, varint), data (4, length-delimited), crc32c (5, optional fixed32). One-byte tags each.
_WRITE_OFFSET_TAG = b"\x18"
_DATA_TAG = b"\x22"
_CRC32C_TAG = b"\x2d"


class UploadMessage(NamedTuple):
    """One encoded UploadRequest and how many bytes of data it carries (0 for the final message)."""

    wire: bytes
    data_size: int


def first_message_head(spec: pb.UploadSpec | None, upload_id: str) -> bytes:
    """The serialized `upload_id` or `spec` field that only a stream's first message carries.

    Its field numbers (1, 2) come before all others, so this followed by the encoding of the
    remaining fields is what SerializeToString writes for the whole message.
    """
    if upload_id:
        return pb.UploadRequest(upload_id=upload_id).SerializeToString()
    if spec is not None:
        return pb.UploadRequest(spec=spec).SerializeToString()
    return b""


def encode_upload_data(head: bytes, write_offset: int, data: bytes, crc32c: int) -> bytes:
    """The wire bytes of UploadRequest(write_offset=write_offset, data=data, crc32c=crc32c)
    preceded by `head` (see first_message_head). `data` must not be empty: an empty bytes
    field is left out by protobuf, and a message without data is built as a message."""
    parts: list[bytes] = [head]
    if write_offset:
        parts += (_WRITE_OFFSET_TAG, _varint(write_offset))
    # crc32c has explicit presence: written even when it is 0.
    parts += (_DATA_TAG, _varint(len(data)), data, _CRC32C_TAG, crc32c.to_bytes(4, "little"))
    return b"".join(parts)


def upload_call(channel: Any) -> Any:
    """The Upload method of `channel` (sync or grpc.aio) that takes requests already encoded.

    Without a request serializer grpc sends each request's bytes as they are.
    """
    return channel.stream_unary(
        UPLOAD_METHOD, request_serializer=None, response_deserializer=pb.UploadResponse.FromString
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
