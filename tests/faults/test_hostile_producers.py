"""Producers that do not play by the rules, on the real stack while a steady stream of requests flows.

Each test publishes what a careless or hostile producer could (bypassing the SDK's checks where it would refuse),
then ``Harness.verify`` checks the fault table's invariants: N requests in, N terminal results out, no duplicates,
every image present.
"""

from __future__ import annotations

import time
import uuid

import pytest

from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.events import ImageResult
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import Publisher
from pixelpipe.producers.results import collect
from tests.faults.test_faults import start, wait_stream_midway

pytestmark = pytest.mark.faults


def test_a_bad_reply_topic_fails_its_request_and_never_blocks_the_stage(harness):
    topics = harness.settings.topics
    listening = f"{topics.reply_prefix}{uuid.uuid4().hex[:8]}"
    ensure_topics(harness.settings.kafka, topics, [listening])
    ids, worker = start(harness, "reply")
    wait_stream_midway(harness, ids)
    reply_topics = {
        "not a topic name": "bad topic!",
        "outside the prefix": "svc.results",
        "a pipeline topic": topics.results,
        "a topic nobody created": f"{topics.reply_prefix}nobody-{uuid.uuid4().hex[:8]}",
        "a topic someone listens on": listening,
    }
    requests = {case: harness.requests(1, f"reply-{n}")[0] for n, case in enumerate(reply_topics)}
    codec = codec_from_settings(harness.settings.kafka)
    with Publisher(harness.settings) as publisher:  # encoded as they are: the SDK would refuse the first three
        for case, request in requests.items():
            request.reply_topic = reply_topics[case]
            publisher.publish_encoded(request.request_id.encode(), codec.encode(request)).result(timeout=30)
            harness.published[request.request_id] = time.time()
    cleared = time.time()
    recovery = harness.recovery_after(cleared, timeout_s=120)
    request_ids = {case: r.request_id for case, r in requests.items()}
    row = harness.verify("a bad reply topic", ids + list(request_ids.values()), recovery)
    status = {case: row["status_of"][rid] for case, rid in request_ids.items()}
    assert status == {
        "not a topic name": "FAILED",
        "outside the prefix": "FAILED",
        "a pipeline topic": "FAILED",
        "a topic nobody created": "SUCCEEDED",  # its copy is dropped after PIXELPIPE_REPLY_TIMEOUT_MS
        "a topic someone listens on": "SUCCEEDED",
    }
    failed = collect(
        harness.settings.kafka, topics.results, ImageResult, [request_ids["not a topic name"]], timeout_s=30
    )
    result = failed.latest()[request_ids["not a topic name"]]
    assert result.error_code == "INVALID_REQUEST" and result.error_message.startswith("reply_topic: ")
    replied = collect(
        harness.settings.kafka, listening, ImageResult, [request_ids["a topic someone listens on"]], timeout_s=30
    )
    assert replied.latest()[request_ids["a topic someone listens on"]].status == "SUCCEEDED"
    began = time.monotonic()
    assert worker.stop(timeout_s=30) == 0, worker.log_tail()  # SIGTERM: nothing hangs on a reply
    print(f"\nSIGTERM to exit: {time.monotonic() - began:.1f} s")
