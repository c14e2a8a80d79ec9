"""The crash harness: a workload against a server subprocess that is SIGKILLed at random moments.

Every key has one owner thread, so the harness always knows what a key may
hold: the last acknowledged version, or the version of the one operation that
was in flight when the server died (which may or may not have committed). The
check after each restart reads every key back and resolves that doubt.
"""

from __future__ import annotations

import hashlib
import io
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from blobstore.client import NotFoundError, Storage, StorageError
from blobstore.server.scrub import scrub_data_dir
from tests.procserver import ServerProcess

KiB = 1 << 10
MiB = 1 << 20
# The server runs with small chunks, so that small values still span many chunks and sessions checkpoint often.
SERVER_CHUNK = 64 * KiB
# Failures a dying server causes; anything else during a round is a bug.
CRASH_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}

ABSENT = "absent"


def content(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class KeyState:
    # SHA-256 of the acknowledged value, or ABSENT.
    acked: str = ABSENT
    # The in-flight operation's outcome when the server died (None: nothing in flight).
    in_flight: str | None = None
    # Every version ever written, by SHA-256 -> size: what a concurrent reader may see.
    versions: dict[str, int] = field(default_factory=dict)

    def allowed(self) -> set[str]:
        return {self.acked} | ({self.in_flight} if self.in_flight is not None else set())


@dataclass
class Session:
    upload_id: str
    key: str
    data: bytes
    persisted: int = 0


class CrashHarness:
    def __init__(self, workdir: Path, *, seed: int, writers: int = 3, keys_per_writer: int = 6) -> None:
        self.data_dir = workdir / "data"
        self.server = ServerProcess(self.data_dir, chunk_size=SERVER_CHUNK)
        self.rng = random.Random(seed)
        self.seed = seed
        self.writer_keys = [[f"w{w}/k{i}" for i in range(keys_per_writer)] for w in range(writers)]
        self.upload_keys = [f"u/big{i}" for i in range(3)]
        self.keys: dict[str, KeyState] = {
            key: KeyState() for key in [k for ks in self.writer_keys for k in ks] + self.upload_keys
        }
        self.session: Session | None = None
        self.stats: Counter[str] = Counter()
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._versions = 0

    # ------------------------------------------------------------------ helpers

    def _client(self) -> Storage:
        # No retries: a killed server must end the round's operations at once.
        return Storage(self.server.address, retries=0, timeout=20, resumable_threshold=1 * MiB)

    def _new_value(self, rng: random.Random, key: str) -> bytes:
        with self._lock:
            self._versions += 1
            number = self._versions
        roll = rng.random()
        if roll < 0.15:
            # The same bytes under many keys: deduplicated chunks with reference counts above one.
            return content("shared", 3 * SERVER_CHUNK + 100)
        size = rng.choice([0, 10, 700, 5 * KiB, 60 * KiB, 64 * KiB, 150 * KiB, 300 * KiB, 900 * KiB, 1500 * KiB])
        return content(f"{self.seed}/{key}/{number}", size)

    def _unexpected(self, what: str, exc: BaseException, killed: threading.Event) -> bool:
        """True if `exc` is a crash symptom while the server is being killed; else records a problem."""
        code = getattr(exc, "code", None)
        if killed.is_set() and isinstance(exc, StorageError) and code in CRASH_CODES:
            return False
        with self._lock:
            self.problems.append(f"{what}: {type(exc).__name__} {code} {exc} (killed={killed.is_set()})")
        return True

    # ------------------------------------------------------------------ workload

    def _writer(self, keys: list[str], rng: random.Random, killed: threading.Event) -> None:
        with self._client() as storage:
            while not killed.is_set():
                key = rng.choice(keys)
                state = self.keys[key]
                if state.acked != ABSENT and rng.random() < 0.2:
                    state.in_flight = ABSENT
                    try:
                        storage.delete(key)
                    except StorageError as exc:
                        self._unexpected(f"delete {key}", exc, killed)
                        return
                    state.acked, state.in_flight = ABSENT, None
                    self.stats["deletes acknowledged"] += 1
                    continue
                value = self._new_value(rng, key)
                version = digest(value)
                state.versions[version] = len(value)
                state.in_flight = version
                try:
                    if len(value) > 1 * MiB or rng.random() < 0.3:
                        storage.set_file(key, io.BytesIO(value))
                    else:
                        storage.set(key, value)
                except StorageError as exc:
                    self._unexpected(f"set {key}", exc, killed)
                    return
                state.acked, state.in_flight = version, None
                self.stats["writes acknowledged"] += 1

    def _reader(self, rng: random.Random, killed: threading.Event) -> None:
        with self._client() as storage:
            while not killed.is_set():
                key = rng.choice(list(self.keys))
                try:
                    value = storage.get(key)
                except NotFoundError:
                    continue
                except StorageError as exc:
                    self._unexpected(f"read {key}", exc, killed)
                    return
                if digest(value) not in self.keys[key].versions:
                    with self._lock:
                        self.problems.append(f"read {key}: {len(value)} bytes that are no version ever written")
                self.stats["concurrent reads verified"] += 1

    def _uploader(self, rng: random.Random, killed: threading.Event) -> None:
        with self._client() as storage:
            while not killed.is_set():
                session = self.session
                try:
                    if session is None:
                        key = rng.choice(self.upload_keys)
                        data = content(f"{self.seed}/{key}/{rng.random()}", rng.randrange(2 * MiB, 4 * MiB))
                        state = self.keys[key]
                        state.versions[digest(data)] = len(data)
                        session = self.session = Session(storage.start_upload(key), key, data)
                    state = self.keys[session.key]
                    state.in_flight = digest(session.data)
                    storage.set_file(session.key, io.BytesIO(session.data), upload_id=session.upload_id)
                except StorageError as exc:
                    self._unexpected("resumable upload", exc, killed)
                    return
                state.acked, state.in_flight = digest(session.data), None
                self.session = None
                self.stats["resumable uploads acknowledged"] += 1

    # ------------------------------------------------------------------ rounds

    def run_round(self) -> None:
        self.server.start()
        self.verify()
        killed = threading.Event()
        rng = random.Random(self.rng.random())
        threads = [
            threading.Thread(target=self._writer, args=(keys, random.Random(rng.random()), killed))
            for keys in self.writer_keys
        ]
        threads.append(threading.Thread(target=self._reader, args=(random.Random(rng.random()), killed)))
        threads.append(threading.Thread(target=self._uploader, args=(random.Random(rng.random()), killed)))
        for thread in threads:
            thread.start()
        threading.Event().wait(rng.uniform(0.05, 0.8))
        killed.set()
        self.server.kill()
        self.stats["kills"] += 1
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive(), "a workload thread hung after the kill"

    def finish(self) -> None:
        """A last restart and check, then a clean shutdown."""
        self.server.start()
        try:
            self.verify()
        finally:
            self.server.stop()

    def verify(self) -> None:
        """After a restart: every key holds exactly an allowed version, and the store is consistent."""
        with Storage(self.server.address, retries=0, timeout=30) as storage:
            self._verify_session(storage)
            for key, state in self.keys.items():
                try:
                    value = storage.get(key)
                    found = digest(value)
                except NotFoundError:
                    found = ABSENT
                if found not in state.allowed():
                    self.problems.append(
                        f"{key}: holds {found[:12]}, expected {state.acked[:12]}"
                        + (f" or the in-flight {state.in_flight[:12]}" if state.in_flight else "")
                    )
                if state.in_flight is not None:
                    self.stats["in-flight operations resolved"] += 1
                    self.stats[f"in-flight operations that {'had' if found != state.acked else 'had not'} landed"] += 1
                state.acked, state.in_flight = found, None
                self.stats["keys verified after restart"] += 1
            for info in storage.iter_objects():
                sizes = self.keys[info.key].versions if info.key in self.keys else {}
                if sizes.get(info.sha256) != info.size:
                    self.problems.append(f"listing shows {info.key} with a size/SHA-256 of no written version")
        report = scrub_data_dir(str(self.data_dir))
        if not report.ok or report.unreferenced:
            self.problems.append(
                f"store inconsistent after the start-up sweep: corrupt={report.corrupt} missing={report.missing} "
                f"unreferenced={len(report.unreferenced)} {report.inconsistencies[:5]}"
            )
        self.stats["chunks re-hashed by the checker"] += report.chunks_checked
        self.stats["rounds verified"] += 1

    def _verify_session(self, storage: Storage) -> None:
        session = self.session
        if session is None:
            return
        status = storage.query_upload(session.upload_id)
        if status.object is not None:
            if status.object.sha256 != digest(session.data):
                self.problems.append(f"session {session.upload_id} committed other bytes")
            self.stats["sessions found committed after a lost acknowledgement"] += 1
            self.session = None
            return
        if status.persisted_size < session.persisted or status.persisted_size > len(session.data):
            self.problems.append(
                f"session persisted size went from {session.persisted} to {status.persisted_size} "
                f"(of {len(session.data)})"
            )
        if status.persisted_size > session.persisted:
            self.stats["sessions resumed with persisted bytes"] += 1
        session.persisted = status.persisted_size
