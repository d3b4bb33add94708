"""The S3 object store against a real S3 endpoint: metadata, presigned GETs, multipart uploads, URI refusal and
conditional creates."""

import hashlib
import logging
import os
import threading
import tracemalloc
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import boto3
import pytest
from moto.server import ThreadedMotoServer

from pixelpipe.core.objects import (
    ObjectNotFoundError,
    ObjectStoreError,
    ObjectTooLargeError,
    S3ObjectStore,
    open_object_store,
)

pytestmark = pytest.mark.integration

MB = 1024 * 1024


@pytest.fixture
def store(servers):
    store = open_object_store(servers.objects, multipart_threshold=5 * MB)
    assert isinstance(store, S3ObjectStore)
    return store


def key(store, index=0, ext="png"):
    # A request id of this test's own, so reruns against a long-lived server never see old objects.
    return store.image_key(f"it-{uuid.uuid4().hex}", index, ext, datetime.now(UTC))


def test_put_get_head(store):
    data = os.urandom(4096)
    stored = store.put(key(store), data, "image/png")
    assert stored.uri.startswith("s3://pixelpipe/images/")
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert store.get(stored.uri) == data
    info = store.head(stored.uri)
    assert (info.size, info.content_type, info.sha256) == (len(data), "image/png", stored.sha256)
    assert store.exists(stored.uri)


def test_retried_write_replaces(store):
    k = key(store)
    store.put(k, b"first attempt", "image/png")
    stored = store.put(k, b"second attempt", "image/webp")
    assert store.get(stored.uri) == b"second attempt"
    assert store.head(stored.uri).content_type == "image/webp"
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=f"{store.prefix}/{k.rsplit('/', 1)[0]}/")
    assert [o["Key"] for o in listed["Contents"]] == [f"{store.prefix}/{k}"]


def test_missing_object(store):
    uri = store.uri_for(key(store))
    assert not store.exists(uri)
    with pytest.raises(ObjectNotFoundError):
        store.get(uri)


def test_get_refuses_an_object_over_max_bytes_without_downloading_it(store):
    data = os.urandom(8 * MB)
    stored = store.put(key(store), data, "application/octet-stream")
    assert store.get(stored.uri, max_bytes=len(data)) == data
    tracemalloc.start()
    try:
        with pytest.raises(ObjectTooLargeError, match=f"is {8 * MB} bytes, over the {MB} accepted"):
            store.get(stored.uri, max_bytes=MB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MB


def test_presigned_get_over_http(store):
    data = os.urandom(2048)
    stored = store.put(key(store), data, "image/png")
    url = store.presigned_url(stored.uri, expires_s=300)
    assert url.startswith(("http://", "https://"))
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.read() == data
    with pytest.raises(ObjectStoreError, match="expires_s"):
        store.presigned_url(stored.uri, expires_s=0)


def test_multipart_upload_above_threshold(store):
    data = os.urandom(12 * MB)
    stored = store.put(key(store, ext="bin"), data, "application/octet-stream")
    assert store.get(stored.uri) == data
    info = store.head(stored.uri)
    assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    # S3 (and s3proxy, MinIO, moto) give a multipart object the ETag "<md5 of part md5s>-<parts>".
    full_key = stored.uri.removeprefix(f"s3://{store.bucket}/")
    etag = store.client.head_object(Bucket=store.bucket, Key=full_key)["ETag"]
    assert etag.strip('"').endswith("-2"), etag


def test_objects_outside_the_store_are_refused(store):
    data = b"not ours"
    outside = f"elsewhere/{uuid.uuid4().hex}.png"
    store.client.put_object(Bucket=store.bucket, Key=outside, Body=data)
    for uri in (
        f"s3://{store.bucket}/{outside}",
        f"s3://other-bucket/images/{outside}",
        f"s3://{store.bucket}/images/../{outside}",
        "http://127.0.0.1/pixelpipe/images/x.png",
    ):
        with pytest.raises(ObjectStoreError, match="is not in the configured store s3://pixelpipe/images"):
            store.get(uri)
        with pytest.raises(ObjectStoreError):
            store.presigned_url(uri, 60)


@pytest.fixture(scope="module")
def conditional_store():
    """A store on moto's S3 server, which honours ``If-None-Match: *`` as S3 does (s3proxy 2.7 ignores it)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        region_name="us-east-1",
        aws_access_key_id="pixelpipe",
        aws_secret_access_key="pixelpipe",
    )
    client.create_bucket(Bucket="pixelpipe")
    try:
        yield S3ObjectStore("pixelpipe", "images", client)
    finally:
        server.stop()


def test_create_is_a_conditional_put_that_keeps_the_first_object(conditional_store):
    store = conditional_store
    k = key(store, ext="json")
    assert store.create(k, b"first", "application/json")
    assert not store.create(k, b"second", "text/plain")
    assert store.get(store.uri_for(k)) == b"first"
    assert store.head(store.uri_for(k)).content_type == "application/json"
    assert store.creates_exclusively()


def test_of_writers_racing_to_create_one_key_on_s3_exactly_one_wins(conditional_store):
    store = conditional_store
    for _ in range(5):
        k, barrier = key(store, ext="json"), threading.Barrier(8)

        def race(n: int, k: str = k, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            return store.create(k, str(n).encode(), "text/plain")

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(race, range(8)))
        assert outcomes.count(True) == 1
        assert store.get(store.uri_for(k)) == str(outcomes.index(True)).encode()
