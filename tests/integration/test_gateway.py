"""The gateway as a real process on the local stack, with a real worker, called with the official openai client."""

import base64
import io
import time
import urllib.request
import uuid

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from pixelpipe.core.events import ImageRequest, ImageResult
from pixelpipe.core.topics import ensure_topics
from pixelpipe.gateway.keys import KeyStore
from pixelpipe.producers.results import collect
from pixelpipe.tools.model_builders import build_tiny_models
from pixelpipe.tools.processes import PixelpipeProcess, WorkerProcess
from tests.conftest import free_port, with_own_topics

pytestmark = pytest.mark.integration
STAGES = ("moderation", "generate", "edit")


class Gateway:
    def __init__(self, settings, log_path):
        self.settings = settings
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{settings.gateway.port}/v1"
        self.process = None

    def start(self, timeout_s=120):
        self.process = PixelpipeProcess(self.settings, ["gateway"], self.log_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.process.poll() is None, self.process.log_tail()
            try:
                urllib.request.urlopen(self.url.removesuffix("/v1") + "/healthz", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError("the gateway did not answer:\n" + self.process.log_tail())


@pytest.fixture(scope="module")
def deployment(servers, tmp_path_factory):
    """One worker and one gateway on topics of this module's own, and three keys."""
    tmp = tmp_path_factory.mktemp("gateway")
    settings = with_own_topics(servers).updated(
        model_registry=str(build_tiny_models(tmp / "models", ("stable-diffusion", "flux2-klein"))),
        consumer_group=f"gw-{uuid.uuid4().hex[:8]}",
        object_store_url=f"{servers.objects.url.rstrip('/')}/{uuid.uuid4().hex[:8]}",
        experiments_file=str(tmp / "experiments.json"),
        topic_partitions=2,
        max_batch=4,
        take_events=4,
        max_wait_ms=50,
        gateway_port=free_port(),
        gateway_keys_file=str(tmp / "keys.json"),
        gateway_instance_id=f"test-{uuid.uuid4().hex[:8]}",
        gateway_default_size="64x64",
        gateway_timeout_s=90.0,
    )
    ensure_topics(settings.kafka, settings.topics)
    keys = KeyStore(settings.gateway.keys_file)
    main, main_entry = keys.create("acme", requests_per_minute=600, burst=100)
    slow, _ = keys.create("slowco", requests_per_minute=30, burst=1)
    worker = WorkerProcess(settings, STAGES, tmp / "worker.log")
    gateway = Gateway(settings, tmp / "gateway.log").start()
    try:
        yield {
            "settings": settings,
            "gateway": gateway,
            "worker": worker,
            "key": main,
            "key_id": main_entry.key_id,
            "slow_key": slow,
        }
    finally:
        gateway.process.stop()
        worker.stop()


@pytest.fixture
def client(deployment):
    return openai.OpenAI(base_url=deployment["gateway"].url, api_key=deployment["key"], timeout=120, max_retries=0)


def decoded(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_models_lists_the_registry(client):
    assert sorted(m.id for m in client.models.list()) == ["tiny-flux2-klein", "tiny-sd", "tiny-sd-b"]


def test_generation_b64_json_then_url_of_the_same_request(client, deployment):
    key = f"same-{uuid.uuid4().hex}"
    raw = client.images.with_raw_response.generate(
        model="tiny-sd", prompt="a lighthouse at dusk", size="64x64", response_format="b64_json",
        extra_headers={"Idempotency-Key": key},
    )  # fmt: skip
    request_id = raw.headers["x-request-id"]
    assert request_id.startswith(deployment["key_id"] + "-")
    response = raw.parse()
    assert response.usage.output_tokens == 16 and response.created > 0
    png = base64.b64decode(response.data[0].b64_json)
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    # The same idempotency key: the same request, answered as a URL this time; the URL downloads the same bytes.
    again = client.images.with_raw_response.generate(
        model="tiny-sd", prompt="a lighthouse at dusk", size="64x64", response_format="url",
        extra_headers={"Idempotency-Key": key},
    )  # fmt: skip
    assert again.headers["x-request-id"] == request_id
    url = again.parse().data[0].url
    assert url.startswith("http")
    assert urllib.request.urlopen(url, timeout=10).read() == png
    settings = deployment["settings"]
    requests = collect(settings.kafka, settings.topics.requests, ImageRequest, [request_id], timeout_s=30, settle_s=1)
    assert len(requests.events[request_id]) == 1  # published once: the retry rendered nothing


def test_n_2_and_every_output_format(client):
    two = client.images.generate(model="tiny-sd", prompt="two foxes", size="64x64", n=2)
    assert len(two.data) == 2 and two.data[0].b64_json != two.data[1].b64_json
    for fmt, extra in (("png", {}), ("jpeg", {"output_compression": 60}), ("webp", {"output_compression": 80})):
        response = client.images.generate(
            model="tiny-sd", prompt="a red kite", size="64x64", output_format=fmt, **extra
        )
        assert decoded(response.data[0].b64_json).format == fmt.upper()
        assert response.output_format == fmt


def test_an_edit_with_a_mask(client):
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    source, mask = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(source, format="PNG")
    mask_image = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask_image.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent: repaint here
    mask_image.save(mask, format="PNG")
    response = client.images.edit(
        model="tiny-sd",
        image=("source.png", source.getvalue(), "image/png"),
        mask=("mask.png", mask.getvalue(), "image/png"),
        prompt="a blue square",
    )
    assert decoded(response.data[0].b64_json).size == (64, 64)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(model="tiny-sd", image=("x.png", b"not an image", "image/png"), prompt="x")
    assert e.value.body["param"] == "image"


def test_an_edit_of_several_images_for_a_model_that_takes_them(client, deployment):
    images = []
    for seed in (2, 3):
        out = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out, "PNG")
        images.append((f"image-{seed}.png", out.getvalue(), "image/png"))
    raw = client.images.with_raw_response.edit(
        model="tiny-flux2-klein", image=images, prompt="the two of them together", size="64x64", quality="low"
    )
    assert decoded(raw.parse().data[0].b64_json).size == (64, 64)
    settings, request_id = deployment["settings"], raw.headers["x-request-id"]
    requests = collect(settings.kafka, settings.topics.requests, ImageRequest, [request_id], timeout_s=30)
    (request,) = requests.events[request_id]
    assert request.source_image_uri and len(request.reference_image_uris) == 1
    with pytest.raises(openai.BadRequestError) as e:  # a model that takes one image: refused before publishing
        client.images.edit(model="tiny-sd", image=images, prompt="x")
    assert e.value.param == "image" and "takes at most 1 image(s) per edit; 2 were sent" in e.value.message


def test_a_blocked_prompt_is_a_moderation_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny-sd", prompt="a gory massacre", size="64x64")
    assert e.value.code == "moderation_blocked"
    assert "PROMPT" in e.value.message


def test_bad_parameters_are_400s_naming_them(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny-sd", prompt="x", size="100x100")
    assert e.value.param == "size"
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="x")


def test_a_wrong_key_is_refused(deployment):
    wrong = openai.OpenAI(base_url=deployment["gateway"].url, api_key="pp-k000000000000-" + "x" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(model="tiny-sd", prompt="x", size="64x64")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_a_rate_limited_key_gets_429_and_a_retry_succeeds(deployment):
    from concurrent.futures import ThreadPoolExecutor

    slow = openai.OpenAI(base_url=deployment["gateway"].url, api_key=deployment["slow_key"], max_retries=0)

    def call(prompt: str) -> object:
        try:
            return slow.images.generate(model="tiny-sd", prompt=prompt, size="64x64")
        except openai.RateLimitError as e:
            return e

    # Two calls at once against a burst of 1: sent one after the other, a render slower than the bucket's 2 s
    # refill (a loaded machine) would let the second through.
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(call, ["one", "two"]))
    refused = [a for a in answers if isinstance(a, openai.RateLimitError)]
    assert len(refused) == 1, answers
    retry_after = float(refused[0].response.headers["retry-after"])
    assert 0 < retry_after <= 2
    time.sleep(retry_after)
    assert len(slow.images.generate(model="tiny-sd", prompt="two", size="64x64").data) == 1


def test_a_retry_after_a_gateway_restart_gets_the_same_result(client, deployment):
    """The call is accepted, the gateway is killed before it answers, and a retry with the same idempotency key,
    on the restarted gateway, gets the result of the one rendering."""
    gateway, settings = deployment["gateway"], deployment["settings"]
    key = f"restart-{uuid.uuid4().hex}"
    impatient = client.with_options(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.images.generate(
            model="tiny-sd", prompt="a harbour", size="64x64", n=2, extra_headers={"Idempotency-Key": key}
        )
    gateway.process.kill()
    gateway.start()
    raw = client.images.with_raw_response.generate(
        model="tiny-sd", prompt="a harbour", size="64x64", n=2, extra_headers={"Idempotency-Key": key}
    )
    request_id = raw.headers["x-request-id"]
    assert len(raw.parse().data) == 2
    results = collect(settings.kafka, settings.topics.results, ImageResult, [request_id], timeout_s=30, settle_s=2)
    assert len(results.events[request_id]) == 1  # rendered once
    requests = collect(settings.kafka, settings.topics.requests, ImageRequest, [request_id], timeout_s=30, settle_s=1)
    assert len(requests.events[request_id]) == 1


def test_streaming_with_partial_images(client):
    events = list(
        client.images.generate(
            model="tiny-sd", prompt="a lighthouse", size="64x64", quality="high", stream=True, partial_images=2
        )
    )
    assert events[-1].type == "image_generation.completed", events
    assert decoded(events[-1].b64_json).size == (64, 64)
    partial = [e for e in events[:-1] if e.type == "image_generation.partial_image"]
    assert [e.partial_image_index for e in partial] == [0, 1]
    assert decoded(partial[0].b64_json).format == "PNG"
    source = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(source, format="PNG")
    edits = list(
        client.images.edit(
            model="tiny-sd",
            image=("source.png", source.getvalue(), "image/png"),
            prompt="make it blue",
            stream=True,
            partial_images=1,
            output_format="jpeg",
        )
    )
    assert [e.type for e in edits] == ["image_edit.partial_image", "image_edit.completed"]
    assert decoded(edits[-1].b64_json).format == "JPEG"


def test_what_the_gateway_adds_to_a_call(client, capsys):
    """The gateway's own time per call (Server-Timing: checks, backlog measure, answer) and what HTTP and the client
    add, beside the pipeline's time (publish, render, result)."""
    own, pipeline, outside = [], [], []
    for i in range(6):
        started = time.perf_counter()
        raw = client.images.with_raw_response.generate(model="tiny-sd", prompt=f"a gull {i}", size="64x64")
        total_ms = (time.perf_counter() - started) * 1000
        timing = dict(part.strip().split(";dur=") for part in raw.headers["server-timing"].split(","))
        own.append(float(timing["gateway"]))
        pipeline.append(float(timing["pipeline"]))
        outside.append(total_ms - own[-1] - pipeline[-1])
    with capsys.disabled():
        print(
            f"\ngateway's own ms per call: median {sorted(own)[3]:.1f} (max {max(own):.1f}); HTTP and client: "
            f"median {sorted(outside)[3]:.1f}; pipeline: median {sorted(pipeline)[3]:.0f}"
        )
    assert sorted(own)[3] < 500


def test_the_backlog_is_measured_from_the_moderation_group(client, deployment):
    from pixelpipe.gateway.pipeline import LagMonitor

    settings = deployment["settings"]
    client.images.generate(model="tiny-sd", prompt="a heron", size="64x64")
    monitor = LagMonitor(settings.kafka, settings.topics.requests, f"{settings.stages.consumer_group}-moderation")
    deadline = time.monotonic() + 30
    lag = monitor.measure()
    while lag != 0 and time.monotonic() < deadline:  # the worker commits about once a second
        time.sleep(1.1)
        lag = monitor.measure()
    assert lag == 0
    assert LagMonitor(settings.kafka, settings.topics.requests, "no-such-group").measure() is None
    # What calls read: the latest measure, taken on a thread of its own, never awaited by a call.
    assert monitor.lag() is None
    while monitor.lag() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert monitor.lag() == 0


def test_a_stalled_pipeline_answers_504_at_the_deadline_then_503_past_the_backlog_bound(deployment, tmp_path):
    """The worker paused (SIGSTOP: it neither consumes nor commits) behind a second gateway on the same topics with a
    1 s deadline and a backlog bound of 1: each accepted call waits out its deadline (504) and leaves its request
    queued, until the moderation group's lag passes the bound and calls are refused before publishing (503). The
    pause is shorter than the worker's 10 s session timeout, so it carries on after without a rebalance, failing
    the requests it missed as past their deadlines."""
    from pixelpipe.gateway.pipeline import LagMonitor

    settings = deployment["settings"].updated(
        gateway_port=free_port(),
        gateway_instance_id=f"test-{uuid.uuid4().hex[:8]}",
        gateway_timeout_s=1.0,
        gateway_max_lag=1,
    )
    # The worker up (its group exists once its models are loaded: a lag, not None) and caught up (0) before it
    # is paused; it commits about once a second.
    monitor = LagMonitor(settings.kafka, settings.topics.requests, f"{settings.stages.consumer_group}-moderation")
    deadline = time.monotonic() + 180
    while monitor.lag() != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    gateway = Gateway(settings, tmp_path / "gateway.log")
    try:
        impatient = openai.OpenAI(base_url=gateway.start().url, api_key=deployment["key"], timeout=30, max_retries=0)
        with deployment["worker"].paused():
            errors = []
            for i in range(6):  # two calls fill the bound; the lag is measured at most once a second
                with pytest.raises(openai.InternalServerError) as e:
                    impatient.images.generate(model="tiny-sd", prompt=f"a stalled heron {i}", size="64x64")
                errors.append(e.value)
                if e.value.status_code == 503:
                    break
    finally:
        if gateway.process is not None:
            gateway.process.stop()
    timeouts, refused = errors[:-1], errors[-1]
    assert len(timeouts) >= 2 and {e.status_code for e in timeouts} == {504}, [e.message for e in errors]
    envelope = timeouts[0].response.json()["error"]
    assert (envelope["type"], envelope["code"]) == ("server_error", "timeout")
    assert "deadline of 1 s" in envelope["message"]
    assert refused.status_code == 503 and refused.code == "overloaded"
    assert refused.response.json()["error"]["type"] == "server_error"
    assert int(refused.response.headers["retry-after"]) > 0


def test_a_key_retried_on_two_instances_at_once_publishes_one_request(deployment, tmp_path):
    """Two instances sharing a file:// store (its hard links are atomic creates), on topics of their own with no
    worker: eight calls with one idempotency key, sent at once and alternated between the instances, race for the
    receipt; one publishes, the others wait for that request's result (here a 504 at the 3 s deadline)."""
    from concurrent.futures import ThreadPoolExecutor

    base = with_own_topics(deployment["settings"]).updated(
        object_store_url=(tmp_path / "objects").as_uri(), gateway_timeout_s=3.0, gateway_max_lag=0
    )
    ensure_topics(base.kafka, base.topics)
    gateways = [
        Gateway(
            base.updated(gateway_port=free_port(), gateway_instance_id=f"race-{n}-{uuid.uuid4().hex[:6]}"),
            tmp_path / f"gateway-{n}.log",
        )
        for n in range(2)
    ]
    idempotency_key = f"race-{uuid.uuid4().hex}"

    def call(n: int) -> tuple[int, str]:
        response = httpx.post(
            f"{gateways[n % 2].url}/images/generations",
            headers={"Authorization": f"Bearer {deployment['key']}", "Idempotency-Key": idempotency_key},
            json={"model": "tiny-sd", "prompt": "two doors, one key", "size": "64x64"},
            timeout=30,
        )
        return response.status_code, response.headers["x-request-id"]

    try:
        for gateway in gateways:
            gateway.start()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, range(8)))
    finally:
        for gateway in gateways:
            if gateway.process is not None:
                gateway.process.stop()
    assert {status for status, _ in answers} == {504}, answers
    request_ids = {request_id for _, request_id in answers}
    assert len(request_ids) == 1
    published = collect(base.kafka, base.topics.requests, ImageRequest, request_ids, timeout_s=10, settle_s=2)
    assert [len(events) for events in published.events.values()] == [1]
