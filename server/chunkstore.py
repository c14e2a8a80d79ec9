"""The chunk store: immutable content-addressed chunks, and its file backend.

The interface is what an object store can do cheaply and idempotently: put by
hash, ranged read, exists, delete, iterate. Chunks never change once written,
so a put of an existing name is a no-op.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Protocol

from blobstore.server import errors


class ChunkStore(Protocol):
    def put(self, digest: bytes, data: bytes | memoryview) -> None:
        """Stores `data` under its SHA-256 `digest`; durable once a later sync() returns."""
        ...

    def sync(self) -> None:
        """Makes every chunk put so far durable, bytes and names (a barrier before a commit)."""
        ...

    def read(self, digest: bytes, offset: int = 0, length: int = -1) -> bytes:
        """Raises FileNotFoundError when the chunk does not exist."""
        ...

    def exists(self, digest: bytes) -> bool: ...

    def delete(self, digest: bytes) -> None: ...

    def iter_digests(self) -> Iterator[bytes]: ...

    def local_path(self, digest: bytes) -> str | None:
        """A file holding the chunk, for zero-copy sends; None when not on local disk."""
        ...


_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)


def _raise_disk_error(exc: OSError) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise errors.DiskFull("no space left on the device holding the chunk store") from exc
    raise exc


# O_DIRECT wants the buffer's address, the length and the file offset aligned to the device's
# logical block size: 4096 covers every common device.
DIRECT_ALIGNMENT = 4096
# A chunk goes through the aligned buffer this much at a time: whatever the configured chunk
# size, each writer thread keeps at most this much resident for it.
DIRECT_WINDOW = 1 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class _AlignedBuffer(threading.local):
    """One page-aligned buffer per thread, kept for reuse: its pages stay resident. It grows
    to the largest piece it was given, at most DIRECT_WINDOW rounded up to the alignment."""

    def __init__(self) -> None:
        self.buffer = mmap.mmap(-1, DIRECT_ALIGNMENT)

    def holding(self, data: bytes | memoryview) -> memoryview:
        """`data` copied into the buffer and zero-padded to the alignment; a view of that much."""
        size = len(data)
        padded = -(-size // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
        if len(self.buffer) < padded:
            self.buffer.close()
            self.buffer = mmap.mmap(-1, padded)
        self.buffer[:size] = data
        self.buffer[size:padded] = bytes(padded - size)
        return memoryview(self.buffer)[:padded]


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FileChunkStore:
    """One file per chunk at chunks/ab/cd/<sha256 hex>, written tmp -> rename, made durable by sync().

    put leaves the names to the kernel and sync() (syncfs) waits for all of them in one go: an
    fdatasync per chunk costs a journal commit per chunk, and uploads ran 1.5-1.9x slower with
    it (docs/benchmarks.md, optimisation log). A crash before sync() can leave chunk files with
    partial bytes, but nothing references them yet and the start-up sweep removes them.

    Chunk bytes are written with O_DIRECT where the file system allows it, through a reused
    aligned buffer. Written through the page cache, every chunk took fresh cache pages: on a
    VM whose host reclaims the guest's free memory that cost 4.4-4.8 s of kernel CPU per GiB
    against 0.4-1.1 s direct (docs/benchmarks.md, optimisation log); and a store's chunks, read
    rarely and once, are what a page cache should not be filled with. Where the file system
    refuses O_DIRECT (tmpfs before Linux 6.6, some network file systems) the store writes
    through the page cache instead.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._chunks = os.path.join(root, "chunks")
        self._tmp = os.path.join(root, "tmp")
        os.makedirs(self._chunks, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)
        self.direct_io = bool(_O_DIRECT)
        self._aligned = _AlignedBuffer()

    def path(self, digest: bytes) -> str:
        name = digest.hex()
        return os.path.join(self._chunks, name[:2], name[2:4], name)

    local_path = path

    def put(self, digest: bytes, data: bytes | memoryview) -> None:
        final = self.path(digest)
        if os.path.exists(final):
            return  # another writer stored it, maybe not flushed yet: our sync() flushes it too
        tmp = os.path.join(self._tmp, uuid.uuid4().hex)
        try:
            if not (self.direct_io and self._write_direct(tmp, data)):
                self._write_buffered(tmp, data)
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.rename(tmp, final)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            _raise_disk_error(exc)

    def _write_direct(self, path: str, data: bytes | memoryview) -> bool:
        """Writes `path` with O_DIRECT; False (and no file left) where the file system refuses it."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct_io = False
            return False
        try:
            source = memoryview(data)
            try:
                for start in range(0, len(source), DIRECT_WINDOW):
                    _write_all(fd, self._aligned.holding(source[start : start + DIRECT_WINDOW]))
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct_io = False
                os.close(fd)
                fd = -1
                os.unlink(path)
                return False
            if len(source) % DIRECT_ALIGNMENT:
                os.ftruncate(fd, len(source))  # the padding goes; what remains is the chunk
        finally:
            if fd >= 0:
                os.close(fd)
        return True

    @staticmethod
    def _write_buffered(path: str, data: bytes | memoryview) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, memoryview(data))
        finally:
            os.close(fd)

    def sync(self) -> None:
        fd = os.open(self._chunks, os.O_RDONLY)
        try:
            if _syncfs is None:
                os.sync()
            elif _syncfs(fd) != 0:
                # Since Linux 5.8 syncfs reports writeback errors: the bytes of some chunk did
                # not reach the disk, and nothing may commit on them.
                code = ctypes.get_errno()
                _raise_disk_error(OSError(code, f"syncfs of the chunk store failed: {os.strerror(code)}"))
        finally:
            os.close(fd)

    def read(self, digest: bytes, offset: int = 0, length: int = -1) -> bytes:
        with open(self.path(digest), "rb", buffering=0) as f:
            if length < 0:
                length = os.fstat(f.fileno()).st_size - offset
            return os.pread(f.fileno(), length, offset)

    def exists(self, digest: bytes) -> bool:
        return os.path.exists(self.path(digest))

    def delete(self, digest: bytes) -> None:
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            pass

    def iter_digests(self) -> Iterator[bytes]:
        for _dirpath, _, filenames in os.walk(self._chunks):
            for name in filenames:
                if len(name) == 64:
                    try:
                        yield bytes.fromhex(name)
                    except ValueError:
                        continue

    def clear_tmp(self) -> int:
        """Removes temp files left by a crash; returns how many."""
        removed = 0
        for name in os.listdir(self._tmp):
            os.unlink(os.path.join(self._tmp, name))
            removed += 1
        return removed
