"""Measuring children for the large transfers: each prints one JSON line with its time and peak RSS.

Run as a separate process so that its peak RSS is its own:
    python -m bench.transfer ours-upload ADDRESS PATH KEY
    python -m bench.transfer bare-upload ADDRESS PATH
    python -m bench.transfer ours-download ADDRESS PATH KEY
    python -m bench.transfer bare-download ADDRESS PATH
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Iterator

import google_crc32c
import grpc

from blobstore.client import Storage
from blobstore.client.memory import keep_freed_memory
from blobstore.client.storage import CHUNK_SIZE
from blobstore.v1 import storage_pb2 as pb
from blobstore.v1 import storage_pb2_grpc as pb_grpc

# Message sizes of the bare upload: "bare-upload" sends the stream our client sends (messages of
# its default size), "bare-upload-1mib" the 1 MiB messages at which the bare servicer itself does best.
MESSAGE_SIZES = {"bare-upload": CHUNK_SIZE, "bare-upload-1mib": 1 << 20}
OPTIONS = [
    ("grpc.max_receive_message_length", (4 << 20) + (64 << 10)),
    ("grpc.max_send_message_length", (4 << 20) + (64 << 10)),
]


def bare_messages(path: str, size: int) -> Iterator[pb.UploadRequest]:
    """The stream blobstore's client sends (spec first, CRC32C per message), minus its hashing."""
    offset = 0
    with open(path, "rb") as f:
        first = True
        while data := f.read(size):
            message = pb.UploadRequest(write_offset=offset, data=data, crc32c=google_crc32c.value(data))
            if first:
                message.spec.key = "bare"
                first = False
            offset += len(data)
            yield message
    yield pb.UploadRequest(write_offset=offset, finish_write=True)


def main() -> None:
    mode, address, path = sys.argv[1:4]
    key = sys.argv[4] if len(sys.argv) > 4 else "big"
    nbytes = 0
    keep_freed_memory()  # the bare client too runs with the allocator settings ours does
    cpu_before = os.times()
    if mode.startswith("ours"):
        with Storage(address) as storage:
            storage.limits()  # connect before the clock starts, as the bare client does
            started = time.perf_counter()
            nbytes = storage.set_file(key, path).size if mode == "ours-upload" else storage.get_file(key, path).size
            seconds = time.perf_counter() - started
    else:
        with grpc.insecure_channel(address, options=OPTIONS) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            stub = pb_grpc.StorageStub(channel)
            started = time.perf_counter()
            if mode in MESSAGE_SIZES:
                nbytes = stub.Upload(bare_messages(path, MESSAGE_SIZES[mode])).persisted_size
            else:
                with open(path, "wb") as f:
                    for response in stub.Download(pb.DownloadRequest(key=key)):
                        f.write(response.data)
                        nbytes += len(response.data)
            seconds = time.perf_counter() - started
    cpu_after = os.times()
    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "bytes": nbytes, "client_peak_rss_mb": peak_kb / 1024, "client_cpu": cpu}))


if __name__ == "__main__":
    main()
