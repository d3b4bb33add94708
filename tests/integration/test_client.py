"""The client for upstream services on the real servers, with a worker (moderation and generation on tiny Stable
Diffusion) behind it: an upstream service's whole round trip in five lines, blocking and in asyncio; a wait
cancelled while its image renders stops the render; a call that times out cancels its request, so the worker never
finishes rendering what nobody awaits."""

from __future__ import annotations

import asyncio
import io
import time
import uuid

import pytest
from PIL import Image

from pixelpipe.core.events import Cancellation, ImageResult, StageMetric
from pixelpipe.core.settings import Settings
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import AsyncPixelpipeClient, PixelpipeClient, Preview, ResultTimeoutError
from pixelpipe.producers import client as client_module
from pixelpipe.producers.results import collect
from pixelpipe.tools.model_builders import build_tiny_models
from pixelpipe.tools.processes import WorkerProcess
from tests.conftest import free_port, with_own_topics
from tests.integration.test_operations import wait_until
from tests.integration.test_streams import readyz

pytestmark = pytest.mark.integration
SLOW_STEPS = 150  # the most a request may ask: seconds of a tiny model on a CPU, previews from step 37 on


@pytest.fixture(scope="module")
def worker(servers, tmp_path_factory):
    """A worker running moderation and generation on tiny Stable Diffusion, on topics of this module's own."""
    tmp = tmp_path_factory.mktemp("client")
    settings = with_own_topics(servers).updated(
        model_registry=str(build_tiny_models(tmp / "models")),
        consumer_group=f"client-{uuid.uuid4().hex[:8]}",
        object_store_url=f"file://{tmp / 'objects'}",
        topic_partitions=2,
        take_events=4,
        max_wait_ms=50,
    )
    ensure_topics(settings.kafka, settings.topics)
    port = free_port()
    env = {"PIXELPIPE_METRICS_PORT": str(port), "PIXELPIPE_METRICS_HOST": "127.0.0.1"}
    with WorkerProcess(settings, ["moderation", "generate"], tmp / "worker.log", env) as process:
        # Ready (models warm, partitions assigned) before the first call: its deadline is the client's, not the
        # worker's start on a loaded machine.
        wait_until(lambda: readyz(port)[0] == 200, 240, f"worker ready\n{process.log_tail()}")
        yield settings, process


def client_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def test_an_upstream_service_round_trip_in_five_lines(worker):
    settings, process = worker
    name = client_name()

    with PixelpipeClient(settings, name) as client:
        result = client.generate(prompt="a red fox", model="tiny-sd", user_id="u1", width=64, height=64, steps=2)
        png = client.read_image(result.images[0])

    assert result.status == "SUCCEEDED", (result, process.log_tail())
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    # The same result is on the results topic, where every result is; the client had its copy from its reply topic.
    on_results = collect(settings.kafka, settings.topics.results, ImageResult, [result.request_id], timeout_s=60)
    assert on_results.latest()[result.request_id] == result


def test_the_asyncio_round_trip_in_five_lines(worker):
    settings, process = worker

    async def service(prompt: str) -> tuple[ImageResult, bytes]:
        async with AsyncPixelpipeClient(settings, client_name()) as client:
            result = await client.generate(prompt=prompt, model="tiny-sd", user_id="u1", width=64, height=64, steps=2)
            return result, await client.read_image(result.images[0])

    async def services() -> list[tuple[ImageResult, bytes]]:
        return await asyncio.gather(service("a red fox"), service("a grey wolf"))

    answers = asyncio.run(services())
    assert [result.status for result, _ in answers] == ["SUCCEEDED"] * 2, process.log_tail()
    assert len({result.request_id for result, _ in answers}) == 2  # each client got its own request's result
    assert all(Image.open(io.BytesIO(png)).size == (64, 64) for _, png in answers)


def test_a_wait_cancelled_while_its_image_renders_stops_the_render(worker):
    settings, process = worker
    name, request_id = client_name(), f"leave-{uuid.uuid4().hex}"
    previews: list[Preview] = []

    async def wait_then_leave() -> None:
        async with AsyncPixelpipeClient(settings, name, abandon_reason="the user closed the tab") as client:
            rendering = asyncio.Event()

            def on_preview(preview: Preview) -> None:
                previews.append(preview)
                rendering.set()

            call = asyncio.ensure_future(
                client.generate(
                    prompt="a slow fox", model="tiny-sd", user_id="u2", width=64, height=64, steps=SLOW_STEPS,
                    request_id=request_id, partial_images=3, on_preview=on_preview,
                )
            )  # fmt: skip
            await asyncio.wait_for(rendering.wait(), 300)  # its first preview: it renders
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(wait_then_leave())
    assert previews[0].index == 0 and Image.open(io.BytesIO(previews[0].jpeg)).format == "JPEG"
    cancellation = collect(settings.kafka, settings.topics.cancellations, Cancellation, [request_id], timeout_s=30)
    assert not cancellation.missing
    cancelled = cancellation.latest()[request_id]
    assert (cancelled.reason, cancelled.requested_by) == ("the user closed the tab", f"client:{name}")
    result = collect(settings.kafka, settings.topics.results, ImageResult, [request_id], timeout_s=120)
    assert not result.missing, process.log_tail()
    ended = result.latest()[request_id]
    assert ended.status == "CANCELLED" and ended.error_message.startswith("cancelled while rendering: stopped after")
    render = generate_metric(settings, request_id)
    assert render.outcome == "CANCELLED" and render.device_seconds_saved is not None and render.device_seconds_saved > 0


def test_a_call_that_times_out_cancels_its_request(worker, monkeypatch):
    settings, process = worker
    name = client_name()
    with PixelpipeClient(settings, name) as client:
        # How long a slow request takes here, end to end; the next one is given half that.
        started_s = time.monotonic()
        full = client.generate(
            prompt="a slow fox", model="tiny-sd", user_id="u3", width=64, height=64, steps=SLOW_STEPS
        )
        full_s = time.monotonic() - started_s
        assert full.status == "SUCCEEDED", process.log_tail()
        monkeypatch.setattr(client_module, "RESULT_GRACE_S", 0.0)  # give up at the deadline itself
        request_id = f"late-{uuid.uuid4().hex}"
        with pytest.raises(ResultTimeoutError) as raised:
            client.generate(
                prompt="a late fox", model="tiny-sd", user_id="u3", width=64, height=64, steps=SLOW_STEPS,
                request_id=request_id, timeout_s=full_s / 2,
            )  # fmt: skip
    assert raised.value.request_id == request_id and request_id in str(raised.value) and raised.value.cancelled
    cancellation = collect(settings.kafka, settings.topics.cancellations, Cancellation, [request_id], timeout_s=30)
    assert cancellation.latest()[request_id].reason == "no result by its deadline"
    result = collect(settings.kafka, settings.topics.results, ImageResult, [request_id], timeout_s=120)
    assert not result.missing, process.log_tail()
    ended = result.latest()[request_id]
    # Cancelled, in the queue or part way through its render; or past its deadline before its render began.
    assert ended.status == "CANCELLED" or ended.error_code == "DEADLINE_EXCEEDED", ended
    render = generate_metric(settings, request_id)
    assert render is None or render.device_seconds == 0 or (render.device_seconds_saved or 0) > 0, render


def generate_metric(settings: Settings, request_id: str) -> StageMetric | None:
    """The request's GENERATE stage metric, read once its MODERATION one is there too; None when it never reached
    the render stage."""
    metrics = collect(settings.kafka, settings.topics.metrics, StageMetric, {request_id: 2}, timeout_s=30)
    return next((m for m in metrics.events.get(request_id, []) if m.stage == "GENERATE"), None)
