"""The servicer's own work per BatchSet / BatchGet, in process: no gRPC transport, no client.

    python -m bench.batch_servicer                   # CPU ms per call, 5 rounds of 300 calls
    python -m bench.batch_servicer --instructions    # instructions per call under valgrind

Each call parses a serialized request, runs StorageServicer.BatchSet or BatchGet (engine,
real LMDB with its fsyncs) and serializes the response, as gRPC would around it. CPU time
still moves with the machine's load; `--instructions` counts user-space instructions with
valgrind (cachegrind) instead, as the difference between runs of 20 and 80 calls, which
repeats to about 0.5% and is what to compare two trees by (about a minute per count).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import tempfile
import time
from typing import Any

import google_crc32c

from bench import procs
from blobstore.server.engine import EngineConfig, open_engine
from blobstore.server.service import StorageServicer
from blobstore.v1 import storage_pb2 as pb

BATCH = 100
KEYS = 1000


class _Context:
    """The little of a grpc.aio context the servicer reads."""

    def invocation_metadata(self) -> tuple[()]:
        return ()


async def _run(op: str, size: int, calls: int, rounds: int) -> list[float]:
    value = os.urandom(size)
    with tempfile.TemporaryDirectory() as data_dir:
        # A small map: valgrind cannot reserve the default terabyte of address space.
        engine = open_engine(data_dir, EngineConfig(index_map_size=1 << 30))
        servicer = StorageServicer(engine, max_message_bytes=(4 << 20) + (64 << 10))
        context: Any = _Context()
        crc = google_crc32c.value(value)
        sets = []
        for start in range(0, KEYS, BATCH):
            request = pb.BatchSetRequest(storage_type=pb.STORAGE_TYPE_DATA)
            for i in range(start, start + BATCH):
                request.entries.add(key=f"bench/{i:04d}", value=value, crc32c=crc)
            sets.append(request.SerializeToString())
        rng = random.Random(1)
        keys = [f"bench/{i:04d}" for i in range(KEYS)]
        gets = [
            pb.BatchGetRequest(storage_type=pb.STORAGE_TYPE_DATA, keys=rng.sample(keys, BATCH)).SerializeToString()
            for _ in range(10)
        ]
        for raw in sets:  # every key exists: the measured sets overwrite, as in make bench
            await servicer.BatchSet(pb.BatchSetRequest.FromString(raw), context)
        per_call = []
        for _ in range(rounds):
            started = time.process_time()
            for call in range(calls):
                if op == "set":
                    response: Any = await servicer.BatchSet(pb.BatchSetRequest.FromString(sets[call % 10]), context)
                else:
                    response = await servicer.BatchGet(pb.BatchGetRequest.FromString(gets[call % 10]), context)
                response.SerializeToString()
            per_call.append(1000 * (time.process_time() - started) / calls)
        engine.close()
        return per_call


def main() -> None:
    args, ops = procs.set_get_options(__doc__, calls=300)
    for op in ops:
        if args.instructions:
            per_call = procs.instructions_per_call("bench.batch_servicer", op, args.size, 20, 80)
            print(f"Batch{op.title()} {BATCH} x {args.size} B: {per_call / 1e6:.2f}M instructions per call")
            continue
        rounds = asyncio.run(_run(op, args.size, args.calls, args.rounds))
        print(
            f"Batch{op.title()} {BATCH} x {args.size} B: median {statistics.median(rounds):.3f} ms CPU per call "
            f"({' / '.join(f'{ms:.3f}' for ms in rounds)})"
        )


if __name__ == "__main__":
    main()
