"""Upload messages encoded by hand, Download messages encoded (server) and decoded (client) by
hand, and the calls that use them.

Building an UploadRequest and serializing it copies every byte of its data three times
(into the message, into the encoder's buffer, into the result), and every read of
`message.data` copies it once more. The client sends a GiB as 256 to 1,024 messages, so those
copies were a good part of its CPU. Here the one join copies the data once, straight from
what the file read returned; the server parses the same bytes SerializeToString would give
(tests/unit/test_wire.py checks that they are equal). On the way back, parsing a 1 MiB
DownloadResponse and reading its data copied each byte twice; decode_download_response
slices the data out of the bytes grpc received, one copy (a memoryview would save that one
too, but google_crc32c takes only bytes).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from blobstore.v1 import storage_pb2 as pb

UPLOAD_METHOD = "/blobstore.v1.Storage/Upload"
DOWNLOAD_METHOD = "/blobstore.v1.Storage/Download"

# UploadRequest's fields after the first-message oneof, as protobuf writes them: write_offset
# (3, varint), data (4, length-delimited), crc32c (5, optional fixed32). One-byte tags each.
_WRITE_OFFSET_TAG = b"\x18"
_DATA_TAG = b"\x22"
_CRC32C_TAG = b"\x2d"

# DownloadResponse's data (1, length-delimited) and crc32c (2, fixed32): the server writes them
# first (encode_download_response, as SerializeToString does), the object and content range
# (3, 4) after them.
_DOWNLOAD_DATA_TAG = b"\x0a"
_DOWNLOAD_CRC32C_TAG = b"\x15"


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
        parts += (_WRITE_OFFSET_TAG, varint(write_offset))
    # crc32c has explicit presence: written even when it is 0.
    parts += (_DATA_TAG, varint(len(data)), data, _CRC32C_TAG, crc32c.to_bytes(4, "little"))
    return b"".join(parts)


def upload_call(channel: Any) -> Any:
    """The Upload method of `channel` (sync or grpc.aio) that takes requests already encoded.

    Without a request serializer grpc sends each request's bytes as they are.
    """
    return channel.stream_unary(
        UPLOAD_METHOD, request_serializer=None, response_deserializer=pb.UploadResponse.FromString
    )


class DownloadPiece(NamedTuple):
    """One DownloadResponse: its data, its data's CRC32C, and the message's other fields when
    it has any (the first message's object and content range), else None."""

    data: bytes
    crc32c: int
    rest: pb.DownloadResponse | None


def encode_download_response(data: bytes | memoryview, crc32c: int, head: bytes = b"") -> bytes:
    """The wire bytes of DownloadResponse(data=data, crc32c=crc32c) followed by `head`, the
    serialized fields 3 and 4 (object, content_range) of the first message: what the server
    sends, beside what the client reads back (decode_download_response).

    The same bytes SerializeToString gives, which writes fields in number order and leaves out
    empty ones. Built by hand because the protobuf route copies every byte of data three
    times (into the message, into the encoder's buffer, into the result); here the one join
    copies it once, straight from the chunk.
    """
    parts: list[bytes | memoryview] = []
    if len(data):
        parts += (_DOWNLOAD_DATA_TAG, varint(len(data)), data)
    if crc32c:
        parts += (_DOWNLOAD_CRC32C_TAG, crc32c.to_bytes(4, "little"))
    parts.append(head)
    return b"".join(parts)


def decode_download_response(raw: bytes) -> DownloadPiece:
    """A DownloadResponse from its wire bytes, its data sliced straight out of `raw`.

    Messages that start with their data field and its crc32c, as protobuf writes them, take
    that path; the fields after those, a few hundred bytes at most, are parsed as a message.
    Any other message (one that names data or crc32c again, say, or encodes a field in a way
    protobuf would not) is parsed whole, with the meaning protobuf gives it.
    """
    if raw[:1] == _DOWNLOAD_DATA_TAG:
        decoded = _read_varint(raw, 1)
        if decoded is not None:
            size, start = decoded
            end = start + size
            crc = 0
            if raw[end : end + 1] == _DOWNLOAD_CRC32C_TAG and end + 5 <= len(raw):
                crc = int.from_bytes(raw[end + 1 : end + 5], "little")
                end += 5
            if start + size <= len(raw):
                rest = pb.DownloadResponse.FromString(raw[end:]) if end < len(raw) else None
                # The rest must hold none of the fields read above (written again, even empty, one
                # would replace them): what protobuf writes back from it is then as long as it.
                if rest is None or (
                    not rest.data and not rest.crc32c and len(rest.SerializeToString()) == len(raw) - end
                ):
                    return DownloadPiece(raw[start : start + size], crc, rest)
    message = pb.DownloadResponse.FromString(raw)
    return DownloadPiece(message.data, message.crc32c, message)


def download_call(channel: Any) -> Any:
    """The Download method of `channel` (sync or grpc.aio) that yields DownloadPieces."""
    return channel.unary_stream(
        DOWNLOAD_METHOD,
        request_serializer=pb.DownloadRequest.SerializeToString,
        response_deserializer=decode_download_response,
    )


def _read_varint(raw: bytes, position: int) -> tuple[int, int] | None:
    """The varint at `position` and the position after it; None when it is cut short or too long."""
    value = shift = 0
    for index in range(position, min(len(raw), position + 10)):
        byte = raw[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    return None


def varint(value: int) -> bytes:
    """A protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
