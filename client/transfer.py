"""The client side of resumable uploads: a source of bytes that can go back to an earlier offset.

After a failure the server says how many bytes it persisted (QueryUpload); the
upload continues from exactly there, so the source must be able to produce the
bytes from that offset again, together with the CRC32C and SHA-256 of
everything before it (the whole-object checksums sent at the end).

The rule for what can resume:

* A seekable file (a path, an open regular file, BytesIO) resumes from any
  offset: it seeks back to the nearest checksum snapshot (one every
  `SEEKABLE_SNAPSHOT_BYTES`) and re-reads at most that much to rebuild the
  checksums.
* A non-seekable stream (a pipe, a socket, a generator-backed reader) keeps
  only its last `window` bytes in memory. It resumes only if the server's
  persisted size is inside that window; otherwise the upload fails with the
  original error. The server persists every 16 MiB by default (4 chunks of
  4 MiB), so a window of 32 MiB covers its lag.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import deque
from dataclasses import dataclass
from typing import IO, Any, Protocol

import google_crc32c

from blobstore.client.checksums import crc32c_combine

SEEKABLE_SNAPSHOT_BYTES = 8 << 20
DEFAULT_WINDOW = 32 << 20

# Anything with read() (and maybe seek()): open files, BytesIO, raw streams.
Readable = IO[Any] | io.IOBase


class RunningDigest(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def copy(self) -> RunningDigest: ...
    def digest(self) -> bytes: ...


class NoDigest:
    """Stands in for a SHA-256 the client was asked not to compute: digest() is empty."""

    def update(self, data: bytes, /) -> None:
        pass

    def copy(self) -> NoDigest:
        return self

    def digest(self) -> bytes:
        return b""


def running_digest(sha256: bool) -> RunningDigest:
    return hashlib.sha256() if sha256 else NoDigest()


@dataclass
class _Piece:
    start: int
    crc_before: int
    sha_before: RunningDigest
    # Non-seekable sources keep the bytes themselves for replay.
    data: bytes | None = None


def _is_seekable(fobj: Readable) -> bool:
    try:
        if not fobj.seekable():
            return False
        fobj.tell()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def remaining_size(fobj: Readable) -> int | None:
    """Bytes from the current position to the end, or None when that cannot be known."""
    if not _is_seekable(fobj):
        return None
    position = fobj.tell()
    end = fobj.seek(0, 2)
    fobj.seek(position)
    return int(end - position)


class UploadSource:
    """Hands out an upload's bytes in order, keeps their running checksums, and rewinds on request.

    `lock` and `generation` let a retry take over from a message generator that
    gRPC may still be draining on its own thread: a generator holds the lock
    while it reads and stops once `generation` moved on (rewind bumps it).
    """

    def __init__(self, fobj: Readable, *, window: int = DEFAULT_WINDOW, sha256: bool = True) -> None:
        self.fobj = fobj
        self.seekable = _is_seekable(fobj)
        self.window = window
        self.lock = threading.Lock()
        self.generation = 0
        self.offset = 0
        self.crc = 0
        # Without it, the whole-object check the server makes is the CRC32C alone.
        self._sha256 = sha256
        self.sha: RunningDigest = running_digest(sha256)
        self._origin = fobj.tell() if self.seekable else 0
        self._high_water = 0
        self._pieces: deque[_Piece] = deque()
        self._kept = 0
        if self.seekable:
            self._pieces.append(_Piece(0, 0, running_digest(sha256)))

    def read_with_crc32c(self, size: int) -> tuple[bytes, int]:
        """The next bytes (at most `size`) and their CRC32C; b"" at the end. Each byte is
        hashed for CRC32C once: the running CRC32C is combined from the pieces'."""
        if self.offset < self._high_water and not self.seekable:
            data = self._replay(size)
        else:
            if self.seekable and self.offset == self._high_water:
                self._snapshot()
            data = self.fobj.read(size)
            if isinstance(data, str):
                data = data.encode("utf-8")
            if data and not self.seekable:
                self._pieces.append(_Piece(self.offset, self.crc, self.sha.copy(), data))
                self._kept += len(data)
                self._trim()
        data = bytes(data)
        crc = int(google_crc32c.value(data))
        if data:
            self.crc = crc32c_combine(self.crc, crc, len(data))
            self.sha.update(data)
            self.offset += len(data)
            self._high_water = max(self._high_water, self.offset)
        return data, crc

    def _snapshot(self) -> None:
        if self._pieces and self.offset - self._pieces[-1].start < SEEKABLE_SNAPSHOT_BYTES:
            return
        self._pieces.append(_Piece(self.offset, self.crc, self.sha.copy()))

    def _trim(self) -> None:
        while len(self._pieces) > 1 and self._kept - len(self._pieces[0].data or b"") >= self.window:
            self._kept -= len(self._pieces.popleft().data or b"")

    def _replay(self, size: int) -> bytes:
        for piece in self._pieces:
            data = piece.data or b""
            if piece.start <= self.offset < piece.start + len(data):
                skip = self.offset - piece.start
                return data[skip : skip + size]
        raise AssertionError("replay position outside the kept window")

    def rewind(self, position: int) -> bool:
        """Goes back (or forward, within what was read) to `position`; False if those bytes are gone.

        Call with `lock` held.
        """
        # A seekable file may also skip ahead (resuming a session begun by an earlier call).
        if position < 0 or (position > self._high_water and not self.seekable):
            return False
        if position == self.offset:
            self.generation += 1
            return True
        base = None
        for piece in self._pieces:
            if piece.start > position:
                break
            if not self.seekable and position > piece.start + len(piece.data or b""):
                continue
            base = piece
        if base is None:
            return False
        self.generation += 1
        self.crc, self.sha = base.crc_before, base.sha_before.copy()
        if self.seekable:
            self.fobj.seek(self._origin + base.start)
            todo = position - base.start
            while todo:
                data = self.fobj.read(min(todo, 1 << 20))
                if isinstance(data, str):
                    data = data.encode("utf-8")
                if not data:
                    return False  # the file is shorter than what the server holds
                self.crc = google_crc32c.extend(self.crc, data)
                self.sha.update(data)
                todo -= len(data)
            self._high_water = max(self._high_water, position)
        else:
            head = (base.data or b"")[: position - base.start]
            self.crc = google_crc32c.extend(self.crc, head)
            self.sha.update(head)
        self.offset = position
        return True
