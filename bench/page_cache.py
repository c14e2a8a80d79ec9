"""What writing through the page cache costs on this machine, against O_DIRECT.

    .venv/bin/python -m bench.page_cache [--mib 1024] [--rounds 3] [--dir /var/tmp]

Writes MIB of 1 MiB files the way the file chunk store does (a file per chunk, then one
syncfs), once through the page cache and once with O_DIRECT (blobstore's FileChunkStore and
the client's DirectWriter), and prints the CPU seconds per GiB of each. Before each pass it
waits a few seconds with the previous pass's files gone: on a VM whose host takes back freed
guest memory (Firecracker's free page reporting, balloon drivers), fresh page-cache pages
then cost a host fault each, which is what a server storing new data meets.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from blobstore.server.chunkstore import FileChunkStore

MiB = 1 << 20


def cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_stime


def one_pass(root: Path, mib: int, direct: bool, pieces: list[bytes]) -> tuple[float, float, float]:
    store = FileChunkStore(str(root))
    store.direct_io = direct and store.direct_io
    before, before_sys = cpu_seconds()
    started = time.perf_counter()
    for i in range(mib):
        store.put(i.to_bytes(32, "big"), pieces[i % len(pieces)])
    store.sync()
    elapsed = time.perf_counter() - started
    after, after_sys = cpu_seconds()
    gib = mib / 1024
    return (after - before) / gib, (after_sys - before_sys) / gib, mib / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp", help="a folder on the disk to measure (not tmpfs)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait before each pass")
    options = parser.parse_args()
    pieces = [os.urandom(MiB) for _ in range(16)]
    libc = ctypes.CDLL(None)
    for _ in range(options.rounds):
        for direct in (False, True):
            root = Path(tempfile.mkdtemp(prefix="blobstore-page-cache-", dir=options.dir))
            try:
                libc.sync()
                time.sleep(options.settle)
                cpu, kernel, rate = one_pass(root, options.mib, direct, pieces)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            label = "O_DIRECT  " if direct else "page cache"
            print(f"{label} CPU {cpu:.2f} s/GiB (kernel {kernel:.2f})  {rate:.0f} MiB/s", flush=True)


if __name__ == "__main__":
    main()
