"""Object storage for images: one interface, a filesystem backend (the default) and an S3 backend.

Keys are deterministic, ``{prefix}/{yyyy}/{mm}/{dd}/{request_id}/{index}.{ext}``, so a retried write replaces the
object instead of adding a second one. Every key and every URI read back is validated against the configured
store: sources come from upstream events, so a URI naming another bucket, a path outside the root or an http URL is
refused rather than fetched. The store only stores bytes; stripping EXIF and the like happens when the image is
encoded (``processors/imaging.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import os
import re
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from pixelpipe.core.ids import REQUEST_ID_PATTERN
from pixelpipe.core.settings import ObjectStoreSettings

# First character alphanumeric so that "..", "." and hidden names (our temp and sidecar files) can never be a key.
_SEGMENT = REQUEST_ID_PATTERN.pattern
_KEY_PATTERN = re.compile(rf"{_SEGMENT}(/{_SEGMENT})*")
_EXT_PATTERN = re.compile(r"[a-z0-9]{1,8}")
_BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MAX_KEY_CHARS = 900  # S3 allows 1024 bytes; leave room for the configured prefix
DEFAULT_MULTIPART_THRESHOLD = 16 * 1024 * 1024
MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600  # the SigV4 limit
CONFLICT_RETRIES = 5  # of a conditional PUT that met another in progress (HTTP 409)
NewObject = tuple[str, bytes, str]  # key, data, content type
# Linux's syncfs (one filesystem, unlike sync); Python has no binding for it.
_SYNCFS = getattr(ctypes.CDLL(None), "syncfs", None)
# Objects ``put_many`` writes at once: each write waits on a disk or the network, not on the CPU. One by one, a
# chunk's 8 images on the local disk took 2.6 ms each (mostly making each request's folder and its two files).
WRITES_AT_ONCE = 8
_writers = ThreadPoolExecutor(WRITES_AT_ONCE, thread_name_prefix="object-writes")


class ObjectStoreError(ValueError):
    """A key or URI that the configured store does not accept, or an object it cannot serve."""


class ObjectNotFoundError(ObjectStoreError):
    """The URI is valid for the store but no object is there."""


class ObjectTooLargeError(ObjectStoreError):
    """The object is larger than the reader accepts; it was not read beyond that."""


def read_at_most(uri: str, stream: BinaryIO, announced_size: int, max_bytes: int | None) -> bytes:
    """The whole of ``stream``, refused with ObjectTooLargeError when over ``max_bytes``: at once when the store
    announces a larger size, and by reading no more than one byte past the limit otherwise (a file still growing)."""
    if max_bytes is None:
        return stream.read()
    if announced_size > max_bytes:
        raise ObjectTooLargeError(f"{uri} is {announced_size} bytes, over the {max_bytes} accepted")
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ObjectTooLargeError(f"{uri} is over the {max_bytes} bytes accepted")
    return data


@dataclass(frozen=True)
class StoredObject:
    uri: str
    sha256: str
    bytes: int  # named like StoredImage.bytes in ImageResult


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    content_type: str
    sha256: str


def validate_key(key: str) -> str:
    """The key itself when it is made only of safe segments; ObjectStoreError otherwise."""
    if len(key) > MAX_KEY_CHARS or not _KEY_PATTERN.fullmatch(key):
        raise ObjectStoreError(
            f"object key {key!r} is not allowed: segments must match {_SEGMENT} (no '..', no leading '/' or '.')"
        )
    return key


class ObjectStore(ABC):
    """Where images live. URIs returned by ``put`` are the only sources ``get``, ``head`` and friends accept."""

    @property
    @abstractmethod
    def root_uri(self) -> str:
        """The URI every object of this store starts with, for messages and configuration checks."""

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """The URI of a (validated) key."""

    @abstractmethod
    def key_of(self, uri: str) -> str:
        """The key a URI names, or ObjectStoreError when the URI is not inside this store."""

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Store ``data`` under ``key``, replacing what was there."""

    def put_many(self, objects: Sequence[NewObject]) -> list[StoredObject]:
        """Store each ``(key, data, content_type)``, up to ``WRITES_AT_ONCE`` at a time; every one is durable when
        this returns. A store that can make many durable at once for less overrides it."""
        return _all_at_once(self.put, objects)

    @abstractmethod
    def create(self, key: str, data: bytes, content_type: str) -> bool:
        """Store ``data`` under ``key`` only where no object is yet: True when this call made it (durable), False
        when one was there. Atomic: of writers racing for a key, one wins, as long as the store honours the
        condition (``creates_exclusively`` checks)."""

    def create_many(self, objects: Sequence[NewObject]) -> list[bool]:
        """``create`` for each ``(key, data, content_type)``: one by one here, like ``put_many``."""
        return [self.create(key, data, content_type) for key, data, content_type in objects]

    def creates_exclusively(self) -> bool:
        """Whether ``create`` refuses a key that exists: some S3 servers (s3proxy 2.7) ignore the condition and
        replace the object. Leaves a small probe object under ``probes/``."""
        probe = f"probes/{uuid.uuid4().hex}"
        return self.create(probe, b"first", "text/plain") and not self.create(probe, b"second", "text/plain")

    @abstractmethod
    def get(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; ObjectTooLargeError, having read at most ``max_bytes`` + 1, when it is larger."""

    @abstractmethod
    def head(self, uri: str) -> ObjectInfo: ...

    @abstractmethod
    def exists(self, uri: str) -> bool: ...

    @abstractmethod
    def presigned_url(self, uri: str, expires_s: int) -> str:
        """A URL anyone can GET the object with until it expires."""

    def image_key(self, request_id: str, index: int, ext: str, when: datetime) -> str:
        """``yyyy/mm/dd/request_id/index.ext``; ``when`` must come from the request (not the clock) to stay stable.

        Naive datetimes are taken as UTC; aware ones are converted, so the date part never depends on the host.
        """
        if not REQUEST_ID_PATTERN.fullmatch(request_id):
            raise ObjectStoreError(f"request_id {request_id!r} does not match {REQUEST_ID_PATTERN.pattern}")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ObjectStoreError(f"image index must be a non-negative integer, got {index!r}")
        ext = ext.lower().lstrip(".")
        if not _EXT_PATTERN.fullmatch(ext):
            raise ObjectStoreError(f"file extension {ext!r} does not match {_EXT_PATTERN.pattern}")
        day = when.astimezone(UTC) if when.tzinfo else when
        return f"{day:%Y/%m/%d}/{request_id}/{index}.{ext}"

    def _refuse(self, uri: str, reason: str) -> ObjectStoreError:
        return ObjectStoreError(f"source URI {uri} is not in the configured store {self.root_uri}; {reason}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileObjectStore(ObjectStore):
    """Objects as files under ``root``; content type and sha256 in a hidden JSON sidecar next to each file."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        # For the write path, which joins strings rather than build Paths.
        self._root = str(self.root)
        self._root_uri = self.root.as_uri()

    @property
    def root_uri(self) -> str:
        return self.root.as_uri()

    def uri_for(self, key: str) -> str:
        return (self.root / validate_key(key)).as_uri()

    def key_of(self, uri: str) -> str:
        parts = urlsplit(uri)
        if parts.scheme != "file":
            raise self._refuse(uri, f"scheme {parts.scheme or '(none)'!r} is not file")
        if parts.netloc not in ("", "localhost"):
            raise self._refuse(uri, f"host {parts.netloc!r} is not local")
        path = unquote(parts.path)
        if ".." in path.split("/"):
            raise self._refuse(uri, "'..' is not allowed in paths")
        root = self.root.as_posix().rstrip("/") + "/"
        if not path.startswith(root):
            raise self._refuse(uri, "the path is outside the store's root")
        try:
            key = validate_key(path[len(root) :])
        except ObjectStoreError as e:
            raise self._refuse(uri, str(e)) from None
        # A symlink inside the root could still point outside it.
        if not (self.root / key).resolve().is_relative_to(self.root):
            raise self._refuse(uri, "the path resolves outside the store's root")
        return key

    def _paths(self, uri: str) -> tuple[Path, Path]:
        path = self.root / self.key_of(uri)
        return path, Path(_sidecar_path(str(path)))

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        return self.put_many([(key, data, content_type)])[0]

    def put_many(self, objects: Sequence[NewObject]) -> list[StoredObject]:
        """Each object is written to a temporary file and renamed into place, so readers see the old object or
        the new one, never part of one; then one sync of the store's filesystem makes all of them, names
        included, durable: one journal commit for the lot rather than a flush per file. Should the machine stop
        before that sync, the caller has not reported the objects yet and writes them again when it retries.
        Up to ``WRITES_AT_ONCE`` objects are written at a time."""
        stored = _all_at_once(self._write, objects)
        _sync_filesystem(self._root)
        return stored

    def _write(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """``key``'s file and its sidecar, not yet flushed to disk."""
        path = os.path.join(self._root, validate_key(key))
        # Data first, sidecar second: a crash in between leaves a complete file whose sidecar is at worst stale.
        _replace(path, data)
        _replace(_sidecar_path(path), _sidecar(data, content_type))
        # Keys hold only URI-safe characters, so the URI is the root's with the key appended.
        return StoredObject(uri=f"{self._root_uri}/{key}", sha256=_sha256(data), bytes=len(data))

    def create(self, key: str, data: bytes, content_type: str) -> bool:
        return self.create_many([(key, data, content_type)])[0]

    def create_many(self, objects: Sequence[NewObject]) -> list[bool]:
        """Each object is written to a temporary file and hard-linked into place: a link fails where the name
        exists, atomically, so one racing writer wins and every reader sees a whole file. One sync for the lot."""
        created = []
        for key, data, content_type in objects:
            path = os.path.join(self._root, validate_key(key))
            temporary = _write_temporary(path, data)
            try:
                os.link(temporary, path)
            except FileExistsError:
                created.append(False)
                continue
            finally:
                os.unlink(temporary)
            _replace(_sidecar_path(path), _sidecar(data, content_type))
            created.append(True)
        if any(created):
            _sync_filesystem(self._root)
        return created

    def get(self, uri: str, max_bytes: int | None = None) -> bytes:
        path, _ = self._paths(uri)
        try:
            with path.open("rb") as file:
                return read_at_most(uri, file, os.fstat(file.fileno()).st_size, max_bytes)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"no object at {uri}") from None

    def head(self, uri: str) -> ObjectInfo:
        path, meta_path = self._paths(uri)
        try:
            size = path.stat().st_size
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise ObjectNotFoundError(f"no object at {uri}") from None
        return ObjectInfo(size=size, content_type=meta["content_type"], sha256=meta["sha256"])

    def exists(self, uri: str) -> bool:
        return self._paths(uri)[0].is_file()

    def presigned_url(self, uri: str, expires_s: int) -> str:
        raise ObjectStoreError(
            f"presigned URLs need an S3 object store; {self.root_uri} is a local directory and has none"
        )


def _all_at_once(write: Callable[[str, bytes, str], StoredObject], objects: Sequence[NewObject]) -> list[StoredObject]:
    """``write`` each object, up to ``WRITES_AT_ONCE`` at a time; once all are done, their results in order, or
    the first failure (no write is still running then, so a retry never races the one it repeats)."""
    if len(objects) <= 1:
        return [write(*new) for new in objects]
    writes = [_writers.submit(write, *new) for new in objects]
    wait(writes)
    return [done.result() for done in writes]


def _sidecar_path(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.meta.json")


def _sidecar(data: bytes, content_type: str) -> bytes:
    return json.dumps({"content_type": content_type, "sha256": _sha256(data)}).encode()


def _replace(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``. Not flushed to disk:
    ``_sync_filesystem`` does that for a whole batch."""
    temporary = _write_temporary(path, data)
    try:
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _write_temporary(path: str, data: bytes) -> str:
    """A temporary file beside ``path`` (its folder made when missing) holding ``data``; returns its path. The
    name is this process's and thread's, so no other writer can hold it (one left by a crashed process is
    overwritten)."""
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.{os.getpid()}-{threading.get_ident()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(temporary, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(temporary, flags, 0o600)
    try:
        try:
            unwritten = memoryview(data)
            while unwritten:
                unwritten = unwritten[os.write(fd, unwritten) :]
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return temporary


def _sync_filesystem(folder: str) -> None:
    """Flush the filesystem holding ``folder`` to disk, its files' data and its directories' entries (Linux's
    syncfs); where that call is missing, every filesystem (sync)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _SYNCFS is None or _SYNCFS(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


class S3ObjectStore(ObjectStore):
    """Objects in ``bucket`` under ``prefix``; sha256 in the object's user metadata (``x-amz-meta-sha256``)."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        client: Any,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    ) -> None:
        if not _BUCKET_PATTERN.fullmatch(bucket):
            raise ObjectStoreError(f"bucket name {bucket!r} is not a valid S3 bucket name")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.client = client
        self.transfer_config = TransferConfig(multipart_threshold=multipart_threshold)

    @property
    def root_uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _object_key(self, key: str) -> str:
        key = validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def key_of(self, uri: str) -> str:
        parts = urlsplit(uri)
        if parts.scheme != "s3":
            raise self._refuse(uri, f"scheme {parts.scheme or '(none)'!r} is not s3")
        if parts.netloc != self.bucket:
            raise self._refuse(uri, f"bucket {parts.netloc!r} is not {self.bucket!r}")
        if parts.query or parts.fragment:
            raise self._refuse(uri, "query strings and fragments are not allowed")
        path = parts.path.removeprefix("/")
        if ".." in path.split("/"):
            raise self._refuse(uri, "'..' is not allowed in keys")
        if self.prefix:
            if not path.startswith(self.prefix + "/"):
                raise self._refuse(uri, f"the key is outside the prefix {self.prefix!r}")
            path = path[len(self.prefix) + 1 :]
        try:
            return validate_key(path)
        except ObjectStoreError as e:
            raise self._refuse(uri, str(e)) from None

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        object_key = self._object_key(key)
        digest = _sha256(data)
        # upload_fileobj switches to a multipart upload above the threshold; a retry rewrites the same key.
        self.client.upload_fileobj(
            io.BytesIO(data),
            self.bucket,
            object_key,
            ExtraArgs={"ContentType": content_type, "Metadata": {"sha256": digest}},
            Config=self.transfer_config,
        )
        return StoredObject(uri=f"s3://{self.bucket}/{object_key}", sha256=digest, bytes=len(data))

    def create(self, key: str, data: bytes, content_type: str) -> bool:
        """A conditional PUT (``If-None-Match: *``), one request, so for small objects (up to S3's 5 GB)."""
        conflicts = 0
        while True:
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._object_key(key),
                    Body=data,
                    ContentType=content_type,
                    Metadata={"sha256": _sha256(data)},
                    IfNoneMatch="*",
                )
                return True
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                if code == "PreconditionFailed":
                    return False
                # Another conditional write to the key is in progress: S3 asks for a retry.
                conflicts += 1
                if code != "ConditionalRequestConflict" or conflicts == CONFLICT_RETRIES:
                    raise
                time.sleep(0.05 * conflicts)

    def _full_key(self, uri: str) -> str:
        return self._object_key(self.key_of(uri))

    def get(self, uri: str, max_bytes: int | None = None) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full_key(uri))
        except ClientError as e:
            if _is_not_found(e):
                raise ObjectNotFoundError(f"no object at {uri}") from None
            raise
        # Closing the body unread drops the connection rather than downloading what is refused.
        with contextlib.closing(response["Body"]) as body:
            return read_at_most(uri, body, response["ContentLength"], max_bytes)

    def head(self, uri: str) -> ObjectInfo:
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self._full_key(uri))
        except ClientError as e:
            if _is_not_found(e):
                raise ObjectNotFoundError(f"no object at {uri}") from None
            raise
        return ObjectInfo(
            size=response["ContentLength"],
            content_type=response.get("ContentType", ""),
            sha256=response.get("Metadata", {}).get("sha256", ""),
        )

    def exists(self, uri: str) -> bool:
        try:
            self.head(uri)
        except ObjectNotFoundError:
            return False
        return True

    def presigned_url(self, uri: str, expires_s: int) -> str:
        if not 1 <= expires_s <= MAX_PRESIGN_EXPIRY_S:
            raise ObjectStoreError(f"expires_s must be between 1 and {MAX_PRESIGN_EXPIRY_S}, got {expires_s}")
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._full_key(uri)}, ExpiresIn=expires_s
        )


def _is_not_found(error: ClientError) -> bool:
    # HEAD has no body, so a missing object shows up as a bare "404"; GET says NoSuchKey.
    return error.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound")


def s3_client(settings: ObjectStoreSettings) -> Any:
    """A boto3 S3 client from the settings: endpoint (its scheme decides TLS), region, and credentials when given."""
    config = Config(
        # s3proxy and other S3-compatible servers do not speak the newer flexible-checksum trailers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # Custom endpoints (s3proxy, MinIO) are addressed by path; virtual hosts need DNS they rarely have.
        s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
    )
    credentials: dict[str, str] = {}
    if settings.s3_access_key_id:
        credentials = {
            "aws_access_key_id": settings.s3_access_key_id,
            "aws_secret_access_key": settings.s3_secret_access_key,
        }
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region,
        config=config,
        **credentials,
    )


def open_object_store(
    settings: ObjectStoreSettings, multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
) -> ObjectStore:
    """The store ``settings.url`` names: ``file://DIR`` (relative DIRs are from the cwd) or ``s3://bucket/prefix``."""
    url = settings.url
    if url.startswith("file://"):
        # Taken literally rather than through urlsplit, so that file://./data/objects stays a relative path.
        return FileObjectStore(url.removeprefix("file://"))
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return S3ObjectStore(bucket, prefix, s3_client(settings), multipart_threshold=multipart_threshold)
    raise ObjectStoreError(f"PIXELPIPE_OBJECT_STORE_URL {url!r} must start with file:// or s3://")
