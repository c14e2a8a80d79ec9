"""A sequential writer of a new file that bypasses the page cache (O_DIRECT) where it can.

`get_file` downloads into a new file, so every byte went into fresh page-cache pages. Where
the host takes back a VM guest's free memory (Firecracker, cloud VMs with free page
reporting), a fresh page costs a host fault: on this project's benchmark machine writing
1 GiB that way took 3.6-4.8 s of kernel CPU, against 0.2-0.4 s with O_DIRECT, and it was
most of the client's CPU on a download (docs/benchmarks.md, optimisation log). A large
download is also rarely read back at once, so filling the page cache with it evicts what
the machine is using.

O_DIRECT wants the buffer's address, the length and the file offset aligned to the device's
block size: the writer gathers pieces in a page-aligned buffer and writes it whole; the
last, partial block is written padded and the file then truncated to its real size. Where
the file system refuses O_DIRECT (EINVAL: tmpfs before Linux 6.6, some network and FUSE
file systems) or the platform has none, the same writer writes through the page cache.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Any

ALIGNMENT = 4096
BUFFER_BYTES = 4 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class DirectWriter:
    """Creates (or truncates) `path` and writes it front to back; close() finishes the file.

    `buffer`, when given, is a reusable mmap (its size a multiple of ALIGNMENT) that the writer
    borrows instead of mapping its own: the server's chunk store writes many small files.
    `exclusive` creates the file with O_EXCL instead of truncating one. `direct=False` skips
    O_DIRECT altogether (a caller that has already seen its file system refuse it); afterwards
    `direct` says whether the whole file went with O_DIRECT.
    """

    def __init__(
        self,
        path: str,
        buffer_bytes: int = BUFFER_BYTES,
        *,
        buffer: mmap.mmap | None = None,
        exclusive: bool = False,
        direct: bool = True,
    ) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        self.direct = False
        if direct and _O_DIRECT:
            try:
                self._fd = os.open(path, flags | _O_DIRECT, 0o644)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        if not self.direct:
            self._fd = os.open(path, flags, 0o644)
        self._owns_buffer = buffer is None
        if buffer is None:
            buffer = mmap.mmap(-1, max(ALIGNMENT, buffer_bytes // ALIGNMENT * ALIGNMENT))
        self._buffer = buffer
        self._filled = 0
        self._size = 0
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        written = len(view)
        if not self.direct:
            self._write_all(view)
            self._size += written
            return written
        capacity = len(self._buffer)
        while view:
            take = min(len(view), capacity - self._filled)
            self._buffer[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == capacity:
                self._write_all(memoryview(self._buffer))
                self._filled = 0
        self._size += written
        return written

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self._filled:
                padded = -(-self._filled // ALIGNMENT) * ALIGNMENT
                self._buffer[self._filled : padded] = bytes(padded - self._filled)
                self._write_all(memoryview(self._buffer)[:padded])
                os.ftruncate(self._fd, self._size)
        finally:
            os.close(self._fd)
            if self._owns_buffer:
                self._buffer.close()

    def _write_all(self, view: memoryview) -> None:
        while view:
            try:
                done = os.write(self._fd, view)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                # The file system took the open but not the write: go on through the page cache.
                self._stop_direct()
                continue
            view = view[done:]

    def _stop_direct(self) -> None:
        import fcntl  # only where O_DIRECT exists: POSIX; the client imports on Windows too

        self.direct = False
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)

    def __enter__(self) -> DirectWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
