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

from blobstore.client.directio import ALIGNMENT, DirectWriter
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

    def iter_chunks(self) -> Iterator[tuple[bytes, int]]:
        """(digest, last-modified time in ns) of every chunk, in digest order."""
        ...

    def local_path(self, digest: bytes) -> str | None:
        """A file holding the chunk, for zero-copy sends; None when not on local disk."""
        ...


_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)


def _raise_disk_error(exc: OSError) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise errors.DiskFull("no space left on the device holding the chunk store") from exc
    raise exc


# A chunk goes through its thread's aligned buffer this much at a time: whatever the configured
# chunk size, each writer thread keeps at most this much resident for it.
DIRECT_WINDOW = 1 << 20
DIRECT_ALIGNMENT = ALIGNMENT


class _AlignedBuffer(threading.local):
    """One page-aligned buffer per writer thread, reused by every chunk it writes: its pages
    stay resident, where a new mapping per chunk would take fresh pages each time."""

    def __init__(self) -> None:
        self.buffer = mmap.mmap(-1, DIRECT_WINDOW)


class FileChunkStore:
    """One file per chunk at chunks/ab/cd/<sha256 hex>, written tmp -> rename, made durable by sync().

    put leaves the names to the kernel and sync() (syncfs) waits for all of them in one go: an
    fdatasync per chunk costs a journal commit per chunk, and uploads ran 1.5-1.9x slower with
    it (docs/benchmarks.md, optimisation log). A crash before sync() can leave chunk files with
    partial bytes, but nothing references them yet and the start-up sweep removes them.

    Chunk bytes are written with O_DIRECT where the file system allows it, through a reused
    aligned buffer per writer thread (blobstore.client.directio's DirectWriter, which get_file
    uses too). Written through the page cache, every chunk took fresh cache pages: on a
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
        self.direct_io = bool(getattr(os, "O_DIRECT", 0))  # until the file system refuses it
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
            with DirectWriter(tmp, buffer=self._aligned.buffer, exclusive=True, direct=self.direct_io) as writer:
                writer.write(data)
            self.direct_io = writer.direct  # once refused, not asked again
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
        # In digest order, as an object store lists them: the ab/cd/ folders sort as the names do.
        for _dirpath, dirnames, filenames in os.walk(self._chunks):
            dirnames.sort()
            for name in sorted(filenames):
                if len(name) == 64:
                    try:
                        yield bytes.fromhex(name)
                    except ValueError:
                        continue

    def iter_chunks(self) -> Iterator[tuple[bytes, int]]:
        for digest in self.iter_digests():
            try:
                yield digest, os.stat(self.path(digest)).st_mtime_ns
            except FileNotFoundError:  # deleted since it was listed
                continue

    def clear_tmp(self) -> int:
        """Removes temp files left by a crash; returns how many."""
        removed = 0
        for name in os.listdir(self._tmp):
            os.unlink(os.path.join(self._tmp, name))
            removed += 1
        return removed
