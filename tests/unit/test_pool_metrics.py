"""Each result and metric names its model pool: a render stage's own, the one moderation routed the request to, none
for a request that ended at moderation; and the Prometheus series of the stages say the same."""

import dataclasses
import sys
import time

from prometheus_client import REGISTRY

from pixelpipe.core.codec import Codec
from pixelpipe.core.events import ImageResult, StageMetric
from pixelpipe.core.pools import Pool
from pixelpipe.core.settings import TopicSettings
from pixelpipe.processors.messages import Emission, Inbound
from pixelpipe.processors.telemetry import TELEMETRY, GpuCollector
from pixelpipe.producers import new_request
from tests.unit.test_cancellation import null_registry, run, stage_for
from tests.unit.test_pools import pooled_moderation, table
from tests.unit.test_stages import request

CODEC = Codec()


def events(emissions: list[Emission]) -> tuple[dict[str, ImageResult], dict[str, StageMetric]]:
    """The results and the metrics among ``emissions``, by request id."""
    topics = TopicSettings()
    decoded = [CODEC.decode(e.value) for e in emissions if e.topic in (topics.results, topics.metrics)]
    results = {e.request_id: e for e in decoded if isinstance(e, ImageResult)}
    metrics = {e.request_id: e for e in decoded if isinstance(e, StageMetric)}
    return results, metrics


def test_moderation_names_the_pool_it_routed_to_and_none_for_a_request_that_ended_there():
    topics = TopicSettings()
    stage = pooled_moderation(table(Pool("sd", ("tiny-sd",)), Pool("sd-b", ("tiny-sd-b",))))
    own, moved, unserved = request(), request(experiments={"b-model": "big"}), request(model="tiny-sd-c")
    messages = [
        Inbound(CODEC.encode(r), r.request_id.encode(), topics.requests, 0, i, 1000.0, appended_s=1000.0 + i)
        for i, r in enumerate([own, moved, unserved])
    ]
    garbage = Inbound(b"\xc3\x01garbage", b"req-garbage", topics.requests, 0, 3, 1000.0, appended_s=1003.0)
    results, metrics = events(stage.handle_batch([*messages, garbage]))
    assert {request_id: metric.pool for request_id, metric in metrics.items()} == {
        own.request_id: "sd",
        moved.request_id: "sd-b",  # its variant's model is served by sd-b
        unserved.request_id: None,
    }
    assert {request_id: result.pool for request_id, result in results.items()} == {
        unserved.request_id: None,  # MODEL_NOT_SERVED, at moderation
        "req-garbage": None,
    }


def test_a_render_stage_names_its_pool_on_every_result_and_metric(tmp_path):
    stage = stage_for(null_registry(tmp_path), tmp_path)
    stage.context = dataclasses.replace(stage.context, pool="tiny")
    rendered = new_request(prompt="a fox", model="null", user_id="u", width=16, height=16)
    unknown_model = new_request(prompt="a fox", model="not-in-the-registry", user_id="u", width=16, height=16)
    results, metrics = run(stage, [rendered, unknown_model])
    assert results[rendered.request_id].status == "SUCCEEDED"
    assert results[unknown_model.request_id].status == "FAILED"
    assert {result.pool for result in results.values()} == {"tiny"}
    assert {key[0] for key in metrics} == {rendered.request_id, unknown_model.request_id}
    assert {metric.pool for metric in metrics.values()} == {"tiny"}
    undecodable = Inbound(b"\xc3\x01garbage", b"req-garbage", "t", 0, 9, time.time())
    (unreadable,) = [e for e in stage.plan([undecodable]).emissions if e.topic == stage.context.topics.results]
    assert CODEC.decode_as(ImageResult, unreadable.value).pool == "tiny"


def test_the_stage_series_of_a_render_stage_carry_its_pool(tmp_path):
    stage = stage_for(null_registry(tmp_path), tmp_path)
    stage.context = dataclasses.replace(stage.context, pool="tiny")
    finished = {"stage": "generate", "pool": "tiny", "outcome": "OK"}
    before = REGISTRY.get_sample_value("pixelpipe_stage_events_out_total", finished) or 0.0
    results_before = (
        REGISTRY.get_sample_value("pixelpipe_results_total", {"status": "SUCCEEDED", "error_code": "", "pool": "tiny"})
        or 0.0
    )
    images_before = REGISTRY.get_sample_value("pixelpipe_images_total", {"kind": "generate", "pool": "tiny"}) or 0.0
    was = TELEMETRY.enabled
    TELEMETRY.enable()
    try:
        run(stage, [new_request(prompt="a fox", model="null", user_id="u", width=16, height=16)])
    finally:
        TELEMETRY.enable(was)
    assert REGISTRY.get_sample_value("pixelpipe_stage_events_out_total", finished) == before + 1
    assert REGISTRY.get_sample_value("pixelpipe_stage_events_out_total", finished | {"pool": ""}) is None
    # Its results and images are counted under its pool too.
    succeeded = {"status": "SUCCEEDED", "error_code": "", "pool": "tiny"}
    assert REGISTRY.get_sample_value("pixelpipe_results_total", succeeded) == results_before + 1
    assert (
        REGISTRY.get_sample_value("pixelpipe_images_total", {"kind": "generate", "pool": "tiny"}) == images_before + 1
    )


def test_the_gpu_series_name_the_worker_s_pool(monkeypatch):
    class OneGpu:
        @staticmethod
        def is_available():
            return True

        device_count = staticmethod(lambda: 1)
        memory_allocated = memory_reserved = staticmethod(lambda index: 1024)
        get_device_properties = staticmethod(lambda index: type("Properties", (), {"total_memory": 4096}))
        utilization = staticmethod(lambda index: 50)

    monkeypatch.setitem(sys.modules, "torch", type("Torch", (), {"cuda": OneGpu}))
    collector = GpuCollector()
    collector.pool = "sd-b"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in collector.collect() for s in f.samples}
    assert samples[("pixelpipe_gpu_utilization_ratio", (("gpu", "0"), ("pool", "sd-b")))] == 0.5
    assert samples[("pixelpipe_gpu_memory_total_bytes", (("gpu", "0"), ("pool", "sd-b")))] == 4096
