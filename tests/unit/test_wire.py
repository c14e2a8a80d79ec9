"""Upload messages encoded by hand are the bytes protobuf would write for the same message; Download
messages decoded by hand mean what protobuf reads in them."""

from __future__ import annotations

import io

import google_crc32c
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from blobstore.client.storage import next_upload_request, upload_spec
from blobstore.client.transfer import UploadSource
from blobstore.client.wire import decode_download_response, encode_upload_data, first_message_head
from blobstore.v1 import storage_pb2 as pb

_SPECS = st.builds(
    upload_spec,
    key=st.text(min_size=1, max_size=40),
    storage_type=st.sampled_from(["data", "tmp", "logs"]),
    content_type=st.none() | st.text(max_size=20),
    # One entry at most: a map's order on the wire is not fixed, so two serializations of a
    # larger one need not be equal byte for byte.
    metadata=st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=1),
    if_generation_match=st.none() | st.integers(0, 2**63 - 1),
    size=st.none() | st.integers(0, 2**63 - 1),
)
_FIRST = st.none() | _SPECS | st.text(min_size=1, max_size=40)
_DATA = st.binary(min_size=1, max_size=300) | st.sampled_from([b"x" * 127, b"x" * 128, b"x" * 16383, b"x" * 16384])


def _first_fields(first: pb.UploadSpec | str | None) -> tuple[pb.UploadRequest, bytes]:
    """The first message's own fields as a message, and as first_message_head encodes them."""
    if isinstance(first, str):
        return pb.UploadRequest(upload_id=first), first_message_head(None, first)
    if first is not None:
        return pb.UploadRequest(spec=first), first_message_head(first, "")
    return pb.UploadRequest(), first_message_head(None, "")


@given(
    first=_FIRST,
    offset=st.sampled_from([0, 1, 127, 128, 2**31, 2**63 - 1]) | st.integers(0, 2**63 - 1),
    data=_DATA,
    crc=st.sampled_from([0, 1, 0x7F, 0x80, 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF),
)
def test_an_encoded_upload_request_is_what_protobuf_writes(
    first: pb.UploadSpec | str | None, offset: int, data: bytes, crc: int
) -> None:
    message, head = _first_fields(first)
    message.write_offset = offset
    message.data = data
    message.crc32c = crc
    encoded = encode_upload_data(head, offset, data, crc)
    assert encoded == message.SerializeToString()
    assert pb.UploadRequest.FromString(encoded) == message


@given(first=_FIRST, data=st.binary(max_size=2500), chunk=st.sampled_from([1, 700, 1000, 4096]))
def test_a_stream_from_the_source_is_what_protobuf_writes(
    first: pb.UploadSpec | str | None, data: bytes, chunk: int
) -> None:
    """Every message of a stream, the final one (checksums, maybe also the first) included."""
    first_message, head = _first_fields(first)
    source = UploadSource(io.BytesIO(data), sha256=True)
    sent: list[bytes] = []
    offset = 0
    while (message := next_upload_request(source, source.generation, chunk, head)) is not None:
        expected = pb.UploadRequest()
        if not sent:
            expected.MergeFrom(first_message)
        expected.write_offset = offset
        piece = data[offset : offset + chunk]
        assert message.data_size == len(piece)
        if piece:
            expected.data = piece
            expected.crc32c = google_crc32c.value(piece)
        else:
            expected.finish_write = True
            expected.object_checksums.crc32c = google_crc32c.value(data)
            expected.object_checksums.sha256 = source.sha.digest()
        assert message.wire == expected.SerializeToString()
        sent.append(message.wire)
        head = b""
        offset += len(piece)
        if not piece:
            break
    assert len(sent) == len(data) // chunk + (1 if len(data) % chunk else 0) + 1


_EXTRA = st.none() | st.builds(
    pb.DownloadResponse,
    object=st.builds(
        pb.Object,
        key=st.text(max_size=20),
        size=st.integers(0, 2**40),
        metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    ),
    content_range=st.builds(pb.ContentRange, start=st.integers(0, 2**40), complete_length=st.integers(0, 2**40)),
)


@given(data=st.binary(max_size=300) | _DATA, crc=st.integers(0, 0xFFFFFFFF), extra=_EXTRA)
def test_a_decoded_download_response_is_what_protobuf_reads(
    data: bytes, crc: int, extra: pb.DownloadResponse | None
) -> None:
    message = pb.DownloadResponse(data=data, crc32c=crc)
    if extra is not None:
        message.MergeFrom(extra)
    piece = decode_download_response(message.SerializeToString())
    assert type(piece.data) is bytes
    assert (piece.data, piece.crc32c) == (data, crc)
    rest = piece.rest or pb.DownloadResponse()
    assert pb.DownloadResponse(object=rest.object, content_range=rest.content_range) == pb.DownloadResponse(
        object=message.object, content_range=message.content_range
    )
    assert rest.HasField("object") == message.HasField("object")


@given(
    data=st.binary(min_size=1, max_size=50),
    crc=st.integers(0, 0xFFFFFFFF),
    later=st.sampled_from(["crc", "zero crc", "data", "empty data", "key"]),
    value=st.integers(1, 0xFFFFFFFF),
)
def test_fields_out_of_the_usual_order_mean_what_protobuf_says(data: bytes, crc: int, later: str, value: int) -> None:
    """A field written again after data and crc32c replaces them, as in protobuf; a cut message fails as there."""
    raw = pb.DownloadResponse(data=data, crc32c=crc).SerializeToString()
    extra = {
        "crc": pb.DownloadResponse(crc32c=value).SerializeToString(),
        "zero crc": b"\x15\x00\x00\x00\x00",
        "data": pb.DownloadResponse(data=value.to_bytes(4, "little")).SerializeToString(),
        "empty data": b"\x0a\x00",
        "key": pb.DownloadResponse(object=pb.Object(key=str(value))).SerializeToString(),
    }[later]
    expected = pb.DownloadResponse.FromString(raw + extra)
    piece = decode_download_response(raw + extra)
    assert (piece.data, piece.crc32c) == (expected.data, expected.crc32c)
    with pytest.raises(DecodeError):
        decode_download_response(raw[:-1])
