"""The filesystem object store: round trips, deterministic keys, atomic replacing writes, and URI validation."""

import hashlib
import io
import re
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone

import pytest

from pixelpipe.core.objects import (
    FileObjectStore,
    ObjectNotFoundError,
    ObjectStoreError,
    ObjectTooLargeError,
    S3ObjectStore,
    open_object_store,
    read_at_most,
)
from pixelpipe.core.settings import ObjectStoreSettings

WHEN = datetime(2025, 3, 7, 23, 30, tzinfo=UTC)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture
def store(tmp_path):
    return FileObjectStore(tmp_path / "objects")


def test_put_get_head_round_trip(store):
    key = store.image_key("req-1", 0, "png", WHEN)
    stored = store.put(key, PNG, "image/png")
    assert stored.sha256 == hashlib.sha256(PNG).hexdigest()
    assert stored.bytes == len(PNG)
    assert stored.uri == store.uri_for(key)
    assert stored.uri.startswith("file:///")
    assert store.get(stored.uri) == PNG
    info = store.head(stored.uri)
    assert (info.size, info.content_type, info.sha256) == (len(PNG), "image/png", stored.sha256)
    assert store.exists(stored.uri)


def test_missing_object(store):
    uri = store.uri_for("2025/03/07/nope/0.png")
    assert not store.exists(uri)
    with pytest.raises(ObjectNotFoundError, match="no object at"):
        store.get(uri)
    with pytest.raises(ObjectNotFoundError):
        store.head(uri)


def test_get_refuses_an_object_over_max_bytes_without_reading_it(store, tmp_path):
    stored = store.put("inputs/exact.png", PNG, "image/png")
    assert store.get(stored.uri, max_bytes=len(PNG)) == PNG
    with pytest.raises(ObjectTooLargeError, match=f"is {len(PNG)} bytes, over the {len(PNG) - 1} accepted"):
        store.get(stored.uri, max_bytes=len(PNG) - 1)
    junk = store.root / "inputs" / "junk.png"
    with junk.open("wb") as file:
        file.truncate(64 * 1024 * 1024)  # 64 MB, sparse: costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(ObjectTooLargeError, match="over the 33554432 accepted"):
            store.get(junk.as_uri(), max_bytes=32 * 1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


class GrowingFile(io.RawIOBase):
    """A stream that never ends, whatever size was announced for it: counts what is read."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def read(self, size=-1):
        assert size >= 0, "read everything of an endless stream"
        self.read_bytes += size
        return b"x" * size


def test_reading_stops_one_byte_past_the_limit_whatever_size_was_announced():
    stream = GrowingFile()
    with pytest.raises(ObjectTooLargeError, match="s3://b/k is over the 1000 bytes accepted"):
        read_at_most("s3://b/k", stream, announced_size=10, max_bytes=1000)
    assert stream.read_bytes == 1001


def test_image_key_is_deterministic_and_dated_in_utc(store):
    assert store.image_key("req-1", 2, "PNG", WHEN) == "2025/03/07/req-1/2.png"
    # 01:30 the next day at UTC+2 is still 23:30 on the 7th in UTC.
    east = WHEN.astimezone(timezone(timedelta(hours=2)))
    assert store.image_key("req-1", 2, ".png", east) == "2025/03/07/req-1/2.png"


@pytest.mark.parametrize(
    ("request_id", "index", "ext"),
    [
        ("..", 0, "png"),
        ("a/b", 0, "png"),
        (".hidden", 0, "png"),
        ("", 0, "png"),
        ("x" * 129, 0, "png"),
        ("req 1", 0, "png"),
        ("req-1", -1, "png"),
        ("req-1", True, "png"),
        ("req-1", 0, "p/ng"),
        ("req-1", 0, ""),
    ],
)
def test_image_key_rejects_unsafe_parts(store, request_id, index, ext):
    with pytest.raises(ObjectStoreError):
        store.image_key(request_id, index, ext, WHEN)


def test_retried_write_replaces_and_leaves_no_temp_files(store):
    key = store.image_key("req-1", 0, "png", WHEN)
    store.put(key, b"first attempt", "image/png")
    stored = store.put(key, PNG, "image/png")
    assert store.get(stored.uri) == PNG
    assert store.head(stored.uri).sha256 == hashlib.sha256(PNG).hexdigest()
    files = sorted(p.name for p in (store.root / "2025/03/07/req-1").iterdir())
    assert files == [".0.png.meta.json", "0.png"]


def test_create_keeps_the_first_object_and_says_who_made_it(store):
    key = "gateway/receipts/r1.json"
    assert store.create(key, b"first", "application/json")
    assert not store.create(key, b"second", "text/plain")
    uri = store.uri_for(key)
    assert store.get(uri) == b"first"
    assert store.head(uri).content_type == "application/json"
    assert store.create_many([(key, b"third", "text/plain"), ("gateway/receipts/r2.json", b"x", "text/plain")]) == [
        False,
        True,
    ]
    assert sorted(p.name for p in (store.root / "gateway/receipts").iterdir()) == [
        ".r1.json.meta.json",
        ".r2.json.meta.json",
        "r1.json",
        "r2.json",
    ]  # no temporary files left
    assert store.creates_exclusively()


def test_of_writers_racing_to_create_one_key_exactly_one_wins(store):
    barrier = threading.Barrier(8)

    def race(n: int) -> bool:
        barrier.wait()
        return store.create("gateway/receipts/race.json", str(n).encode(), "text/plain")

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(race, range(8)))
    assert outcomes.count(True) == 1
    assert store.get(store.uri_for("gateway/receipts/race.json")) == str(outcomes.index(True)).encode()


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("http://example.com/2025/03/07/r/0.png", "scheme 'http' is not file"),
        ("s3://pixelpipe/images/2025/03/07/r/0.png", "scheme 's3' is not file"),
        ("/etc/passwd", "scheme '(none)' is not file"),
        ("file:///etc/passwd", "outside the store's root"),
        ("file://evil.example/r/0.png", "is not local"),
        ("file://ROOT/../outside/0.png", "'..' is not allowed"),
        ("file://ROOT/r/%2E%2E/%2E%2E/x", "'..' is not allowed"),
        ("file://ROOT/r/.0.png.meta.json", "is not allowed"),
        ("file://ROOT", "outside the store's root"),
    ],
)
def test_uris_outside_the_store_are_refused(store, uri, reason):
    uri = uri.replace("ROOT", store.root.as_posix())
    with pytest.raises(ObjectStoreError, match=re.escape(reason)) as raised:
        store.get(uri)
    assert f"source URI {uri} is not in the configured store {store.root_uri}" in str(raised.value)


def test_sibling_directory_with_common_prefix_is_refused(store, tmp_path):
    sibling = tmp_path / "objects-other" / "0.png"
    sibling.parent.mkdir()
    sibling.write_bytes(b"secret")
    with pytest.raises(ObjectStoreError, match="outside the store's root"):
        store.get(sibling.as_uri())


def test_symlink_out_of_the_root_is_refused(store, tmp_path):
    (tmp_path / "secret").write_bytes(b"secret")
    store.root.mkdir(parents=True)
    (store.root / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(ObjectStoreError, match="resolves outside"):
        store.get(store.root.as_uri() + "/link")


def test_put_rejects_unsafe_keys(store):
    for key in ("../escape.png", "/abs.png", "a//b.png", "a/./b.png", "a/.b.png"):
        with pytest.raises(ObjectStoreError, match="is not allowed"):
            store.put(key, PNG, "image/png")
    assert not store.root.exists()


def test_presigned_url_is_an_s3_feature(store):
    stored = store.put("a.png", PNG, "image/png")
    with pytest.raises(ObjectStoreError, match="presigned URLs need an S3 object store"):
        store.presigned_url(stored.uri, 60)


def test_open_object_store_from_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_object_store(ObjectStoreSettings())
    assert isinstance(store, FileObjectStore)
    assert store.root == tmp_path / "data" / "objects"
    s3 = open_object_store(ObjectStoreSettings(url="s3://pixelpipe/images", s3_endpoint_url="http://127.0.0.1:1"))
    assert isinstance(s3, S3ObjectStore)
    assert (s3.bucket, s3.prefix, s3.root_uri) == ("pixelpipe", "images", "s3://pixelpipe/images")
    with pytest.raises(ObjectStoreError, match="must start with file:// or s3://"):
        open_object_store(ObjectStoreSettings(url="http://example.com/images"))


def test_s3_uri_validation_needs_no_server():
    store = S3ObjectStore("pixelpipe", "images", client=None)
    assert store.key_of("s3://pixelpipe/images/2025/03/07/r/0.png") == "2025/03/07/r/0.png"
    refused = {
        "s3://other/images/2025/03/07/r/0.png": "bucket 'other' is not 'pixelpipe'",
        "s3://pixelpipe/imagesX/r/0.png": "outside the prefix",
        "s3://pixelpipe/other/r/0.png": "outside the prefix",
        "s3://pixelpipe/images/../secret": "'..' is not allowed",
        "s3://pixelpipe/images/r/0.png?versionId=1": "query strings",
        "https://pixelpipe.s3.amazonaws.com/images/r/0.png": "scheme 'https' is not s3",
    }
    for uri, reason in refused.items():
        with pytest.raises(ObjectStoreError, match=re.escape(reason)):
            store.key_of(uri)
