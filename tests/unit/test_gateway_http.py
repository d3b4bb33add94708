"""The gateway's HTTP layer with a stand-in pipeline: envelopes, headers, signed file URLs, a full call's answer."""

import asyncio
import base64
import dataclasses
import io
import json
import time

import pytest
from PIL import Image
from starlette.testclient import TestClient

from pixelpipe.core.events import ImageResult, StoredImage
from pixelpipe.core.objects import FileObjectStore
from pixelpipe.core.settings import Settings
from pixelpipe.gateway.app import create_app
from pixelpipe.gateway.keys import KeyStore
from pixelpipe.gateway.params import ModelInfo
from pixelpipe.gateway.ratelimit import TokenBuckets
from pixelpipe.gateway.state import Gateway


class StandInPipeline:
    """Answers every submission with one stored image, as the pipeline would; sends no previews: a stream's only
    image is its completed one."""

    reply_topic = "pixelpipe.replies.gateway.test"

    def __init__(self, store):
        self.store = store
        self.submissions = []

    def check_capacity(self):
        pass

    def previews(self, request_id):
        return asyncio.Queue()

    def forget_previews(self, request_id):
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
            steps=submission.steps,
        )  # fmt: skip


def gateway_client(tmp_path, pipeline_type=StandInPipeline, **key_limits):
    """A client of the gateway's app over a stand-in pipeline, authenticated with a key of user ``acme``."""
    settings = Settings().updated(gateway_url_signing_key="s3cret", gateway_default_size="64x64")
    store = FileObjectStore(tmp_path / "objects")
    keys = KeyStore(tmp_path / "keys.json")
    secret, entry = keys.create("acme", ["tiny-sd", "tiny-klein"], **key_limits)
    app = create_app(settings)  # the lifespan (Kafka) is not run: the state is set here
    pipeline = pipeline_type(store)
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


@pytest.fixture
def served(tmp_path):
    return gateway_client(tmp_path)


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
        "code": "invalid_value",
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

        async def start(self):
            self.started = True

        async def close(self):
            self.closed = True

    registry = tmp_path / "registry.json"
    registry.write_text('{"tiny-sd": {"path": "models/tiny-sd", "kind": "stable-diffusion", "default_steps": 4}}')
    monkeypatch.setattr(app_module, "Pipeline", StartedPipeline)
    settings = Settings().updated(
        model_registry=str(registry),
        gateway_keys_file=str(tmp_path / "keys.json"),
        object_store_url=f"file://{tmp_path / 'objects'}",
        gateway_usage_sync_s=0,  # no broker here: usage sharing between gateways is the integration tests'
    )
    health = Health(30.0, ["pipeline"])
    app = create_app(settings, health)
    assert health.ready() == (False, "waiting for: pipeline")
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert health.ready() == (True, "ok")
        assert health.live()[1].startswith("ok: heartbeat")
    assert health.ready() == (False, "waiting for: pipeline")  # shutting down: no longer ready


def post_json(client, body: bytes):
    return client.post("/v1/images/generations", content=body, headers={"Content-Type": "application/json"})


def assert_plain(error):
    """A refusal's message speaks of the call, not of the gateway's Python."""
    assert not any(word in error["message"] for word in ("Error", "codec", "recursion", "Traceback")), error


def test_a_body_nested_past_the_depth_limit_is_a_400_before_it_is_parsed(served):
    from pixelpipe.gateway.bodies import MAX_JSON_DEPTH

    client, pipeline, entry = served
    deep = post_json(client, b"[" * 2000 + b"]" * 2000)  # 4 KB, 2,000 deep
    assert deep.status_code == 400 and f"more than {MAX_JSON_DEPTH} deep" in deep.json()["error"]["message"]
    assert_plain(deep.json()["error"])
    assert deep.headers["x-request-id"].startswith(entry.key_id + "-")
    nested = b'{"prompt": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    at_limit = post_json(client, nested)  # parsed: refused for its type
    assert at_limit.status_code == 400 and at_limit.json()["error"]["param"] == "prompt"
    assert "must be a string" in at_limit.json()["error"]["message"]
    past_limit = post_json(client, nested.replace(b"[", b"[[", 1).replace(b"]", b"]]", 1))
    assert "deep" in past_limit.json()["error"]["message"]
    brackets_in_text = json.dumps({"prompt": "[" * 500}).encode()  # a string's brackets do not nest
    assert post_json(client, brackets_in_text).status_code == 200
    assert len(pipeline.submissions) == 1


def test_a_lone_surrogate_or_text_that_is_not_utf8_is_a_400_naming_its_parameter(served):
    client, pipeline, _ = served
    for body, param in [
        (b'{"prompt": "a \\ud800 fox"}', "prompt"),
        (b'{"prompt": "a fox", "user": "\\udfff"}', "user"),
        (b'{"prompt": "a fox", "user": {"name": ["\\ud800"]}}', "user"),
        (b'{"prompt": "a fox", "\\ud800": 1}', None),
    ]:
        answer = post_json(client, body)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, (body, answer.text)
        assert "lone surrogate" in answer.json()["error"]["message"]
        assert_plain(answer.json()["error"])
    for body, words in [
        (b'{"prompt": "a \xed\xa0\x80 fox"}', "byte 14 is not UTF-8"),  # a surrogate written as UTF-8 would be
        (b'{"prompt": "a \xff fox"}', "byte 14 is not UTF-8"),
        (b'{"prompt": NaN}', "NaN is not a JSON value"),
        (b'{"n": 1' + b"0" * 200 + b"}", "over 100 digits"),
        (b'{"prompt": "a fox",}', "not valid JSON"),
    ]:
        answer = post_json(client, body)
        assert answer.status_code == 400 and words in answer.json()["error"]["message"], (body, answer.text)
    assert pipeline.submissions == []  # nothing refused was published
    emoji = post_json(client, b'{"prompt": "a fox \\ud83e\\udd8a"}')  # a surrogate pair is one character
    assert emoji.status_code == 200 and pipeline.submissions[0].prompt == "a fox \U0001f98a"


def test_an_edit_text_field_that_is_not_utf8_is_a_400_naming_it(served):
    client, pipeline, _ = served
    image = ("image", ("a.png", png("red"), "image/png"))
    answer = client.post("/v1/images/edits", files=[image, ("prompt", (None, b"a \xff hat"))])
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "prompt"
    assert "not UTF-8" in answer.json()["error"]["message"]
    latin = client.post(
        "/v1/images/edits",
        content=b"--b\r\nContent-Disposition: form-data; name=prompt\r\n\r\nhat\r\n--b--\r\n",
        headers={"Content-Type": "multipart/form-data; charset=latin-1; boundary=b"},
    )
    assert latin.status_code == 400 and "must be UTF-8" in latin.json()["error"]["message"]
    assert client.post("/v1/images/edits", json={"prompt": "a hat"}).json()["error"]["message"] == (
        "The body must be multipart/form-data"
    )
    assert pipeline.submissions == []


def test_unknown_paths_and_wrong_methods_answer_in_the_envelope(served):
    client, _, _ = served
    unknown = client.post("/v1/images/variations", headers={"Authorization": ""})
    assert unknown.status_code == 404 and unknown.json()["error"] == {
        "message": "Invalid URL (POST /v1/images/variations)",
        "type": "invalid_request_error",
        "param": None,
        "code": "unknown_url",
    }
    wrong = client.get("/v1/images/generations")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert wrong.json()["error"]["message"] == "Invalid method for URL (GET /v1/images/generations)"
    assert client.delete("/v1/models").json()["error"]["code"] == "method_not_allowed"


def test_an_unexpected_failure_is_a_generic_500_logged_with_the_request_id(served, caplog):
    client, pipeline, entry = served

    async def failing(submission):
        raise RuntimeError("secret detail of the failure")

    pipeline.submit = failing
    client = TestClient(client.app, raise_server_exceptions=False, headers=client.headers)
    with caplog.at_level("ERROR", logger="pixelpipe.gateway.errors"):
        answer = client.post("/v1/images/generations", json={"prompt": "a fox"})
    request_id = answer.headers["x-request-id"]
    assert answer.status_code == 500 and request_id.startswith(entry.key_id + "-")
    assert answer.json()["error"] == {
        "message": f"The server had an error while processing your request; retry it, or report its request id "
        f"{request_id}.",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    (record,) = [r for r in caplog.records if r.getMessage() == "call failed"]
    assert record.request_id == request_id and "secret detail" in str(record.exc_info[1])

    def broken(_token):
        raise OSError("keys file unreadable")

    client.app.state.gateway.keys.authenticate = broken
    models = client.get("/v1/models")  # fails before any request id
    assert models.status_code == 500 and "x-request-id" not in models.headers
    assert models.json()["error"]["message"] == "The server had an error while processing your request; retry it."


def test_every_answer_to_an_authenticated_call_carries_its_own_request_id(tmp_path):
    client, _, entry = gateway_client(tmp_path, burst=1)
    gen = "/v1/images/generations"
    answers = {
        "models": client.get("/v1/models"),
        "parameter": client.post(gen, json={"prompt": "a fox", "size": "7x7"}),
        "unknown model": client.post(gen, json={"prompt": "a fox", "model": "nope"}),
        "not the key's model": client.post(gen, json={"prompt": "a fox", "model": "other"}),
        "edit without image": client.post("/v1/images/edits", data={"prompt": "a hat"}, files={"mask": ("m", b"x")}),
        "image": client.post(gen, json={"prompt": "a fox"}),
        "rate limit": client.post(gen, json={"prompt": "a fox"}),  # the burst of 1 is spent
    }
    statuses = {what: answer.status_code for what, answer in answers.items()}
    assert statuses == {
        "models": 200,
        "parameter": 400,
        "unknown model": 404,
        "not the key's model": 404,
        "edit without image": 400,
        "image": 200,
        "rate limit": 429,
    }
    request_ids = [answer.headers.get("x-request-id", "") for answer in answers.values()]
    assert all(rid.startswith(entry.key_id + "-") for rid in request_ids), request_ids
    assert len(set(request_ids)) == len(request_ids)  # each call its own
    assert answers["unknown model"].json()["error"]["code"] == "model_not_found"
    limited = answers["rate limit"]
    assert limited.json()["error"]["type"] == "requests" and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 0 < int(limited.headers["retry-after-ms"]) <= 1000  # the key refills one call a second (60 a minute)


def stream_events(answer):
    return [json.loads(chunk.partition("data: ")[2]) for chunk in answer.text.strip().split("\n\n")]


def test_the_answer_names_the_quality_that_ran(served):
    client, pipeline, _ = served
    gen = "/v1/images/generations"
    asked = ("auto", "low", "medium", "standard", "high", "hd")
    reported = {quality: client.post(gen, json={"prompt": "a fox", "quality": quality}).json() for quality in asked}
    assert {quality: answer["quality"] for quality, answer in reported.items()} == {
        "auto": "medium",  # tiny-sd's default steps
        "low": "low",
        "medium": "medium",
        "standard": "medium",
        "high": "high",
        "hd": "high",  # twice the default steps, as high
    }
    assert [submission.steps for submission in pipeline.submissions] == [None, 2, 4, 4, 8, 8]
    stream = client.post(gen, json={"prompt": "a fox", "quality": "hd", "stream": True})
    assert stream_events(stream)[-1]["type"] == "image_generation.completed"
    assert stream_events(stream)[-1]["quality"] == "high"
    submit = pipeline.submit

    async def variant(submission):  # an experiment's variant rendered the auto call at 8 steps
        return dataclasses.replace(await submit(submission), steps=8)

    pipeline.submit = variant
    assert client.post(gen, json={"prompt": "a fox"}).json()["quality"] == "high"
