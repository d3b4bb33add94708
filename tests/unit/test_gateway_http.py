"""The gateway's HTTP layer with a stand-in pipeline: envelopes, headers, signed file URLs, a full call's answer."""

import base64
import io
import time

import pytest
from PIL import Image
from starlette.testclient import TestClient

from pixelpipe.core.events import ImageResult, StoredImage
from pixelpipe.core.objects import FileObjectStore
from pixelpipe.core.settings import Settings
from pixelpipe.gateway.app import Gateway, create_app
from pixelpipe.gateway.keys import KeyStore
from pixelpipe.gateway.params import ModelInfo
from pixelpipe.gateway.ratelimit import TokenBuckets


class StandInPipeline:
    """Answers every submission with one stored image, as the pipeline would."""

    reply_topic = "pixelpipe.replies.gateway.test"

    def __init__(self, store):
        self.store = store
        self.submissions = []

    def check_capacity(self):
        pass

    async def submit(self, submission):
        self.submissions.append(submission)
        out = io.BytesIO()
        Image.new("RGB", (submission.width, submission.height), (1, 2, 3)).save(out, format="PNG")
        stored = self.store.put(f"2026/01/01/{submission.request_id}/0.png", out.getvalue(), "image/png")
        image = StoredImage(uri=stored.uri, sha256=stored.sha256, width=64, height=64, format="PNG", bytes=stored.bytes)
        return ImageResult(
            event_id="e", request_id=submission.request_id, status="SUCCEEDED", user_id=submission.user_id,
            model=submission.model, images=[image], width=submission.width, height=submission.height,
        )  # fmt: skip


@pytest.fixture
def served(tmp_path):
    settings = Settings().updated(gateway_url_signing_key="s3cret", gateway_default_size="64x64")
    store = FileObjectStore(tmp_path / "objects")
    keys = KeyStore(tmp_path / "keys.json")
    secret, entry = keys.create("acme", ["tiny-sd", "tiny-klein"])
    app = create_app(settings)  # the lifespan (Kafka) is not run: the state is set here
    pipeline = StandInPipeline(store)
    app.state.gateway = Gateway(
        settings=settings,
        keys=keys,
        models={
            "tiny-sd": ModelInfo("tiny-sd", "stable-diffusion", 4),
            "tiny-klein": ModelInfo("tiny-klein", "flux2-klein", 4, max_source_images=4),
            "other": ModelInfo("other", "x", 4),
        },
        store=store,
        pipeline=pipeline,
        buckets=TokenBuckets(),
    )
    client = TestClient(app)
    client.headers["Authorization"] = f"Bearer {secret}"
    return client, pipeline, entry


def test_a_call_answers_like_openai_with_its_request_id(served):
    client, pipeline, entry = served
    answer = client.post("/v1/images/generations", json={"prompt": "a fox", "user": "alice", "output_format": "webp"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"].startswith(entry.key_id + "-")
    assert "gateway;dur=" in answer.headers["server-timing"]
    body = answer.json()
    assert Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).format == "WEBP"
    assert body["usage"]["output_tokens"] == 16 and body["size"] == "64x64"
    assert pipeline.submissions[0].user_id == "acme:alice"


def test_a_url_on_a_file_store_is_signed_and_expires(served):
    client, _, _ = served
    url = client.post("/v1/images/generations", json={"prompt": "a fox", "response_format": "url"}).json()["data"][0]
    path = url["url"].removeprefix("http://testserver")
    fetched = client.get(path)
    assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
    tampered = client.get(path.replace("signature=", "signature=0"))
    assert tampered.status_code == 403 and tampered.json()["error"]["code"] == "invalid_signature"
    expired = client.get(path.replace("expires=", f"expires={int(time.time()) - 10}&was="))
    assert expired.status_code == 403


def test_errors_are_openai_envelopes(served):
    client, _, _ = served
    missing = client.post("/v1/images/generations", json={"prompt": "x"}, headers={"Authorization": ""})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer pp-k000000000000-" + "x" * 43})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    bad = client.post("/v1/images/generations", json={"prompt": "x", "size": "7x7"})
    assert bad.status_code == 400 and bad.json()["error"] == {
        "message": bad.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": "size",
        "code": None,
    }
    assert client.post("/v1/images/generations", json={"prompt": "x", "model": "other"}).status_code == 404
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-sd", "tiny-klein"]
    not_json = client.post("/v1/images/generations", content=b"{", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400
    no_image = client.post("/v1/images/edits", data={"prompt": "x"}, files={"mask": ("m.png", b"x", "image/png")})
    assert no_image.status_code == 400 and no_image.json()["error"]["param"] == "image"


def png(colour, size=(64, 64)):
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def test_an_edit_sends_as_many_images_as_its_model_takes_the_first_as_the_source(served, tmp_path):
    client, pipeline, _ = served
    images = [("image[]", (f"{colour}.png", png(colour), "image/png")) for colour in ("red", "green", "blue")]
    answer = client.post("/v1/images/edits", data={"prompt": "a hat", "model": "tiny-klein"}, files=images)
    assert answer.status_code == 200, answer.text
    (submission,) = pipeline.submissions
    stored = [submission.source_image_uri, *submission.reference_image_uris]
    assert len(stored) == 3
    assert [FileObjectStore(tmp_path / "objects").get(uri) for uri in stored] == [image[1][1] for image in images]
    assert answer.json()["usage"]["input_tokens_details"]["image_tokens"] == 3 * 16  # three 64x64 images

    def refused(model, files):
        answer = client.post("/v1/images/edits", data={"prompt": "a hat", "model": model}, files=files)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "image"
        return answer.json()["error"]["message"]

    assert refused("tiny-sd", images) == "The model 'tiny-sd' takes at most 1 image(s) per edit; 3 were sent"
    assert "at most 4 image(s) per edit; 5 were sent" in refused("tiny-klein", images + images[:2])
    assert "at most 16 images; 17 were sent" in refused("tiny-klein", images * 5 + images[:2])
    assert refused("tiny-klein", [*images, ("image[]", ("x.png", b"GIF89a", "image/png"))]) == (
        "'image' is not a PNG, JPEG or WEBP image"
    )
    assert len(pipeline.submissions) == 1  # nothing refused was published


def sample(name, **labels):
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_calls_are_counted_by_endpoint_and_code_and_timed_without_ids(served):
    client, _, entry = served
    gen, models = "/v1/images/generations", "/v1/models"
    before = {
        "ok": sample("pixelpipe_gateway_requests_total", endpoint=gen, code="200"),
        "bad": sample("pixelpipe_gateway_requests_total", endpoint=gen, code="400"),
        "denied": sample("pixelpipe_gateway_requests_total", endpoint=models, code="401"),
        "other": sample("pixelpipe_gateway_requests_total", endpoint="other", code="404"),
        "timed": sample("pixelpipe_gateway_request_seconds_count", endpoint=gen),
    }
    assert client.post(gen, json={"prompt": "a fox"}).status_code == 200
    assert client.post(gen, json={"prompt": "a fox", "size": "7x7"}).status_code == 400
    assert client.get(models, headers={"Authorization": ""}).status_code == 401
    assert client.get("/v1/no/such/route/k123").status_code == 404
    assert sample("pixelpipe_gateway_requests_total", endpoint=gen, code="200") == before["ok"] + 1
    assert sample("pixelpipe_gateway_requests_total", endpoint=gen, code="400") == before["bad"] + 1
    assert sample("pixelpipe_gateway_requests_total", endpoint=models, code="401") == before["denied"] + 1
    assert sample("pixelpipe_gateway_requests_total", endpoint="other", code="404") == before["other"] + 1
    assert sample("pixelpipe_gateway_request_seconds_count", endpoint=gen) == before["timed"] + 2
    assert sample("pixelpipe_gateway_calls_waiting") == 0  # the call waited, and is done
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    assert 'pixelpipe_gateway_request_seconds_bucket{endpoint="/v1/images/generations",le="0.005"}' in text
    gateway_lines = [line for line in text.splitlines() if line.startswith("pixelpipe_gateway_")]
    assert gateway_lines and not any(entry.key_id in line or "/v1/no" in line for line in gateway_lines)


def test_a_rate_limited_call_is_a_429_in_the_counts_and_a_waiting_call_is_counted(served):
    client, pipeline, entry = served
    gen = "/v1/images/generations"
    seen = []
    submit = pipeline.submit

    async def watched(submission):
        seen.append(sample("pixelpipe_gateway_calls_waiting"))
        return await submit(submission)

    pipeline.submit = watched
    limited = sample("pixelpipe_gateway_requests_total", endpoint=gen, code="429")
    codes = [client.post(gen, json={"prompt": "a fox"}).status_code for _ in range(entry.burst + 1)]
    assert codes == [200] * entry.burst + [429]
    assert sample("pixelpipe_gateway_requests_total", endpoint=gen, code="429") == limited + 1
    assert seen and all(waiting >= 1 for waiting in seen)
    assert sample("pixelpipe_gateway_calls_waiting") == 0


def test_ready_while_the_pipeline_is_started_and_live_while_the_loop_beats(tmp_path, monkeypatch):
    import pixelpipe.gateway.app as app_module
    from pixelpipe.core.telemetry import Health

    class StartedPipeline(StandInPipeline):
        def __init__(self, settings, store, instance):
            super().__init__(store)
            self.started = self.closed = False

        def start(self, loop):
            self.started = True

        def close(self):
            self.closed = True

    registry = tmp_path / "registry.json"
    registry.write_text('{"tiny-sd": {"kind": "stable-diffusion", "default_steps": 4}}')
    monkeypatch.setattr(app_module, "Pipeline", StartedPipeline)
    settings = Settings().updated(
        model_registry=str(registry),
        gateway_keys_file=str(tmp_path / "keys.json"),
        object_store_url=f"file://{tmp_path / 'objects'}",
    )
    health = Health(30.0, ["pipeline"])
    app = create_app(settings, health)
    assert health.ready() == (False, "waiting for: pipeline")
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert health.ready() == (True, "ok")
        assert health.live()[1].startswith("ok: heartbeat")
    assert health.ready() == (False, "waiting for: pipeline")  # shutting down: no longer ready
