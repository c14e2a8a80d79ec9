"""The chunk store on any S3-compatible object store (Ceph RADOS Gateway, MinIO, AWS S3).

Each chunk is one immutable object named by its SHA-256 under a key prefix. A
PUT that returned is durable and visible to every replica, so there is nothing
to sync; a PUT of a name that exists stores the same bytes again, which makes
put idempotent without a look-up first.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.handlers import convert_body_to_file_like_object

from blobstore.server import errors
from blobstore.server.backends import S3Config

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_MISSING = {"404", "NoSuchKey", "NotFound"}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _unavailable(exc: Exception) -> errors.Unavailable:
    return errors.Unavailable(f"the chunk store (S3) failed: {exc}")


class S3ChunkStore:
    def __init__(self, config: S3Config) -> None:
        if not config.bucket:
            raise ValueError("the s3 chunk store needs a bucket (setting s3.bucket, BLOBSTORE_S3_BUCKET)")
        self.config = config
        self.bucket = config.bucket
        self._prefix = config.prefix.strip("/") + "/chunks/" if config.prefix.strip("/") else "chunks/"
        s3_options: Any = {
            "addressing_style": config.addressing_style,
            # Chunks are named by their SHA-256 and checked on every read: no second body hash.
            "payload_signing_enabled": False,
        }
        client_config = Config(
            max_pool_connections=config.max_connections,
            s3=s3_options,
            # We checksum every chunk ourselves (SHA-256 name, CRC32C in the index, checked
            # on every read); the SDK's extra checksums would hash each byte once more.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        kwargs: dict[str, Any] = {"config": client_config}
        if config.endpoint:
            kwargs["endpoint_url"] = config.endpoint
        if config.region:
            kwargs["region_name"] = config.region
        if config.access_key:
            kwargs["aws_access_key_id"] = config.access_key
            kwargs["aws_secret_access_key"] = config.secret_key
        self._s3: S3Client = boto3.session.Session().client("s3", **kwargs)
        # botocore wraps a bytes body in a BytesIO, which urllib3 then sends in 128 KiB reads:
        # 33 copies and sendall calls per 4 MiB chunk instead of one. Bytes resend as they are on
        # a retry, and we never ask botocore to checksum the body, so it gains nothing from the
        # file object: without it a PUT costs about a quarter less CPU (docs/benchmarks.md,
        # optimisation log).
        self._s3.meta.events.unregister("before-parameter-build.s3.PutObject", convert_body_to_file_like_object)
        if config.create_bucket:
            self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _status(exc) != 404 and _code(exc) not in _MISSING | {"NoSuchBucket"}:
                raise
        try:
            self._s3.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def key(self, digest: bytes) -> str:
        return self._prefix + digest.hex()

    def put(self, digest: bytes, data: bytes | memoryview) -> None:
        # The digest is the chunk's SHA-256 already: servers that check x-amz-checksum-sha256
        # (AWS, MinIO, Ceph 18+) refuse a body damaged on the way, at no hashing cost to us.
        try:
            self._s3.put_object(
                Bucket=self.bucket,
                Key=self.key(digest),
                Body=bytes(data),
                ChecksumSHA256=base64.b64encode(digest).decode(),
            )
        except ClientError as exc:
            if _code(exc) in ("QuotaExceeded", "EntityTooLarge") or _status(exc) == 507:
                raise errors.ResourceExhausted(f"the chunk store refused the chunk: {_code(exc)}") from exc
            raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc

    def sync(self) -> None:
        """Nothing to do: a PUT that returned is durable."""

    def read(self, digest: bytes, offset: int = 0, length: int = -1) -> bytes:
        extra: dict[str, str] = {}
        if offset or length >= 0:
            if length == 0:
                return b""
            extra["Range"] = f"bytes={offset}-" + (str(offset + length - 1) if length > 0 else "")
        try:
            response = self._s3.get_object(Bucket=self.bucket, Key=self.key(digest), **extra)  # type: ignore[arg-type]
            return response["Body"].read()
        except ClientError as exc:
            if _code(exc) in _MISSING or _status(exc) == 404:
                raise FileNotFoundError(self.key(digest)) from None
            if _code(exc) == "InvalidRange":
                return b""
            raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc

    def exists(self, digest: bytes) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=self.key(digest))
        except ClientError as exc:
            if _code(exc) in _MISSING or _status(exc) == 404:
                return False
            raise _unavailable(exc) from exc
        return True

    def delete(self, digest: bytes) -> None:
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self.key(digest))
        except ClientError as exc:
            if _code(exc) in _MISSING or _status(exc) == 404:
                return
            raise _unavailable(exc) from exc

    def iter_digests(self) -> Iterator[bytes]:
        for digest, _ in self.iter_chunks():
            yield digest

    def iter_chunks(self) -> Iterator[tuple[bytes, int]]:
        """Yields (digest, last-modified time in ns) of every chunk object, in digest order (S3
        lists keys in UTF-8 order, and the names are lower-case hex): one LIST request per 1000."""
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(self._prefix) :]
                if len(name) != 64:
                    continue
                try:
                    digest = bytes.fromhex(name)
                except ValueError:
                    continue
                modified: datetime = item["LastModified"]
                yield digest, int(modified.timestamp() * 1e9)

    def local_path(self, digest: bytes) -> str | None:
        return None

    def close(self) -> None:
        self._s3.close()
