"""The gateway without servers: keys, rate limits, parameter mapping and errors, result mapping, upload checks."""

import io
import json

import pytest
from PIL import Image

from pixelpipe.core.events import CategoryScore, ImageResult
from pixelpipe.core.settings import KafkaSettings, RequestLimits, TopicSettings
from pixelpipe.gateway.answers import result_error, transcode
from pixelpipe.gateway.errors import ApiError
from pixelpipe.gateway.keys import KeyStore
from pixelpipe.gateway.params import ModelInfo, parse_call, read_registry
from pixelpipe.gateway.pipeline import request_id_for
from pixelpipe.gateway.ratelimit import TokenBuckets, UsageSync
from pixelpipe.gateway.uploads import check_image, mask_png, source_png

MODELS = {"tiny-sd": ModelInfo("tiny-sd", "stable-diffusion", 4), "tiny-sd-b": ModelInfo("tiny-sd-b", "x", 25)}
LIMITS = RequestLimits()


def call(kind="GENERATE", allowed=None, **params):
    return parse_call({"prompt": "a fox"} | params, kind, MODELS, "tiny-sd", allowed, LIMITS, (64, 64))


def refused(**params):
    with pytest.raises(ApiError) as e:
        call(**params)
    return e.value


def test_keys_are_stored_as_hashes_and_compared_whole(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    secret, entry = store.create("acme", ["tiny-sd"], requests_per_minute=30, burst=2)
    text = (tmp_path / "keys.json").read_text()
    # The secret part (43 characters, after "pp-<key id>-", and may itself hold "-"): never stored.
    assert secret not in text and secret[len(f"pp-{entry.key_id}-") :] not in text
    assert store.authenticate(secret) == entry
    assert store.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert store.authenticate("sk-anything") is None
    assert store.authenticate("") is None
    assert entry.allows("tiny-sd") and not entry.allows("tiny-sd-b")
    store.revoke(entry.key_id)
    assert KeyStore(tmp_path / "keys.json").authenticate(secret) is None
    assert store.authenticate(secret) is None  # the same store rereads the changed file


def test_token_bucket_gives_the_burst_then_paces():
    now = [0.0]
    buckets = TokenBuckets(clock=lambda: now[0])
    assert [buckets.take("k", 60, 2) for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("k", 60, 2) == pytest.approx(1.0)
    now[0] += 1.0
    assert buckets.take("k", 60, 2) == 0.0
    assert buckets.take("other", 60, 2) == 0.0


def test_calls_charged_from_another_instance_are_refused_here_and_refill_from_below_zero():
    now = [0.0]
    buckets = TokenBuckets(clock=lambda: now[0])
    buckets.charge("k", 5, 60, 2)  # another instance spent the burst and 3 more: 3 tokens below zero
    assert buckets.take("k", 60, 2) == pytest.approx(4.0)
    now[0] += 3.9
    assert buckets.take("k", 60, 2) == pytest.approx(0.1)
    now[0] += 0.1
    assert buckets.take("k", 60, 2) == 0.0
    assert buckets.take("other", 60, 2) == 0.0


def test_only_the_calls_admitted_here_are_reported_once():
    buckets = TokenBuckets(clock=lambda: 0.0)
    for _ in range(3):
        buckets.take("k", 60, 2)  # the third is refused
    buckets.charge("j", 4, 60, 2)
    assert buckets.admitted() == {"k": 2}
    assert buckets.admitted() == {}


def usage_sync(tmp_path, buckets):
    keys = KeyStore(tmp_path / "keys.json")
    _, entry = keys.create("acme", requests_per_minute=60, burst=2)
    sync = UsageSync(KafkaSettings(), TopicSettings(), "gw-a", buckets, keys, 0.25)  # not started: no broker
    return sync, entry.key_id


def report(sender, calls):
    return json.dumps({"instance": sender, "calls": calls}).encode()


def test_other_instances_reports_are_charged_with_the_local_keys_limits(tmp_path):
    buckets = TokenBuckets(clock=lambda: 0.0)
    sync, key_id = usage_sync(tmp_path, buckets)
    sync.charge_report(report("gw-b-1234", {key_id: 2}))
    assert buckets.take(key_id, 60, 2) == pytest.approx(1.0)


def test_own_reports_unknown_keys_and_malformed_reports_charge_nothing(tmp_path):
    buckets = TokenBuckets(clock=lambda: 0.0)
    sync, key_id = usage_sync(tmp_path, buckets)
    sync.charge_report(report(sync.sender, {key_id: 2}))
    sync.charge_report(report("gw-b-1234", {"k000000000000": 2, key_id: "2"}))
    sync.charge_report(b"not json")
    sync.charge_report(report("gw-b-1234", [key_id]))
    assert [buckets.take(key_id, 60, 2) for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("k000000000000", 60, 2) == 0.0


def test_parameters_map_onto_the_request():
    c = call(size="128x64", quality="high", n=2, output_format="webp", output_compression=50, user="alice")
    assert (c.width, c.height, c.steps, c.n, c.output_format, c.output_compression) == (128, 64, 8, 2, "webp", 50)
    assert call(quality="low").steps == 2 and call(quality="auto").steps is None
    assert (call().width, call().height) == (64, 64)  # size auto: the configured default
    assert call(kind="EDIT").width is None  # an edit's auto size is its source's


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"size": "100x100"}, "size"),
        ({"size": "big"}, "size"),
        ({"size": "²x64"}, "size"),  # str.isdigit() takes '²', int() does not
        ({"size": "8x" + "9" * 5000}, "size"),  # more digits than int() converts
        ({"n": 11}, "n"),
        ({"n": "²"}, "n"),
        ({"n": "--5"}, "n"),
        ({"quality": "ultra"}, "quality"),
        ({"response_format": "png"}, "response_format"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": 50}, "output_compression"),
        ({"background": "transparent"}, "background"),
        ({"moderation": "low"}, "moderation"),
        ({"prompt": ""}, "prompt"),
        ({"colour": "red"}, "colour"),
        ({"partial_images": 2}, "partial_images"),
        ({"stream": True, "partial_images": 4}, "partial_images"),
        ({"user": "x" * 100}, "user"),
    ],
)
def test_unsupported_values_are_a_400_naming_the_parameter(params, param):
    error = refused(**params)
    assert (error.status, error.param, error.body()["error"]["type"]) == (400, param, "invalid_request_error")


@pytest.mark.parametrize(
    ("kind", "params", "param", "code"),
    [
        ("GENERATE", {"colour": "red"}, "colour", "unknown_parameter"),
        ("GENERATE", {"style": "vivid"}, "style", "unknown_parameter"),  # DALL·E's: OpenAI's models refuse it too
        ("GENERATE", {"input_fidelity": "low"}, "input_fidelity", "unknown_parameter"),  # an edit's parameter
        ("GENERATE", {"prompt": " "}, "prompt", "missing_required_parameter"),
        ("GENERATE", {"quality": "ultra"}, "quality", "invalid_value"),
        ("GENERATE", {"size": "100x100"}, "size", "invalid_value"),
        ("GENERATE", {"background": "transparent"}, "background", "invalid_value"),
        ("GENERATE", {"moderation": "low"}, "moderation", "invalid_value"),
        ("EDIT", {"input_fidelity": "high"}, "input_fidelity", "invalid_value"),
        ("EDIT", {"input_fidelity": "max"}, "input_fidelity", "invalid_value"),
    ],
)
def test_refusals_carry_openais_codes(kind, params, param, code):
    with pytest.raises(ApiError) as e:
        call(kind, **params)
    assert (e.value.status, e.value.param, e.value.code, e.value.type) == (400, param, code, "invalid_request_error")


def test_style_is_refused_with_what_to_do_and_input_fidelity_low_is_what_the_models_do():
    style = refused(style="natural")
    assert style.message == "Unknown parameter: 'style'. Describe the style in the prompt instead."
    fidelity = refused(kind="EDIT", input_fidelity="high")
    assert "'high' is not supported" in fidelity.message and "'low', the default" in fidelity.message
    assert call(kind="EDIT", input_fidelity="low") == call(kind="EDIT")  # accepted, and it changes nothing


def test_each_quality_runs_as_a_tier_and_steps_that_ran_are_reported_as_theirs():
    model = MODELS["tiny-sd"]  # 4 default steps: low 2, medium 4, high 8
    assert [call(quality=q).steps for q in ("low", "medium", "standard", "high", "hd")] == [2, 4, 4, 8, 8]
    ran = {asked: model.quality_of(call(quality=asked).steps, asked) for asked in ("low", "standard", "hd")}
    assert ran == {"low": "low", "standard": "medium", "hd": "high"}
    assert model.quality_of(4, "auto") == "medium"  # auto runs the model's default
    assert model.quality_of(7, "auto") == "high" and model.quality_of(3, "medium") == "medium"  # a variant's steps
    one_step = ModelInfo("one", "x", 1)  # low and medium both run 1 step: the tier asked for is the one reported
    assert [one_step.quality_of(1, asked) for asked in ("low", "medium", "auto")] == ["low", "medium", "medium"]


def test_unknown_and_forbidden_models_are_404():
    assert refused(model="dall-e-3").code == "model_not_found"
    with pytest.raises(ApiError) as e:
        call(model="tiny-sd-b", allowed={"tiny-sd"})
    assert (e.value.status, e.value.param) == (404, "model")


def test_request_ids_lead_with_the_key_and_derive_from_the_idempotency_key():
    assert request_id_for("k0123456789ab", "x") == request_id_for("k0123456789ab", "x")
    assert request_id_for("k0123456789ab", "x") != request_id_for("kffffffffffff", "x")
    assert request_id_for("k0123456789ab", None) != request_id_for("k0123456789ab", None)
    assert request_id_for("k0123456789ab", "x").startswith("k0123456789ab-")


def result(**fields):
    return ImageResult(event_id="e", request_id="r", user_id="u", model="tiny-sd", **fields)


def test_results_map_to_openai_errors():
    rejected = result(
        status="REJECTED",
        moderation_stage="PROMPT",
        moderation_scores=[CategoryScore(category="violence", score=0.9)],
        error_code="MODERATION_REJECTED",
        error_message="prompt rejected: violence",
    )
    error = result_error(rejected)
    # As OpenAI answers a blocked image call: no param; the check and the categories are in the message.
    assert (error.status, error.type, error.code, error.param) == (
        400,
        "image_generation_user_error",
        "moderation_blocked",
        None,
    )
    assert "PROMPT" in error.message and "violence" in error.message
    limited = result_error(result(status="FAILED", error_code="RATE_LIMITED", error_message="over"))
    assert (limited.status, limited.type, limited.code) == (429, "requests", "rate_limit_exceeded")
    assert limited.headers()["Retry-After"] == "1"
    assert result_error(result(status="FAILED", error_code="DEADLINE_EXCEEDED")).status == 504
    unread = result_error(result(status="FAILED", error_code="EXPERIMENT_UNAVAILABLE", error_message="not rendered"))
    assert (unread.status, unread.code, unread.headers()["Retry-After"]) == (503, "experiment_unavailable", "1")
    invalid = result(status="FAILED", error_code="INVALID_REQUEST", error_message="steps: x")
    assert result_error(invalid).param == "steps"
    failed = result_error(result(status="FAILED", error_code="INTERNAL_ERROR", error_message="RuntimeError('gpu 3')"))
    assert (failed.status, failed.code, failed.type) == (500, "internal_error", "server_error")
    assert "gpu 3" not in failed.message and "request id r" in failed.message  # the stage's text stays in the result
    assert result_error(result(status="SUCCEEDED")) is None
    cancelled = result_error(result(status="CANCELLED", error_message="cancelled before its render"))
    assert (cancelled.status, cancelled.code) == (409, "cancelled")
    assert json.loads(json.dumps(error.body()))["error"]["code"] == "moderation_blocked"


def png(size=(16, 16), mode="RGB"):
    out = io.BytesIO()
    Image.new(mode, size, (10, 20, 30, 0)[: len(mode)] if mode != "L" else 0).save(out, format="PNG")
    return out.getvalue()


def test_uploads_are_checked_before_anything_is_stored():
    assert check_image("image", png(), 1 << 20, 4096).size == (16, 16)
    for data, words in [
        (b"", "empty"),
        (b"GIF89a" + b"\0" * 20, "PNG, JPEG or WEBP"),
        (png((64, 128)), "pixels"),
        (png((16, 16))[:-20], "corrupt"),
        (png() + b"\0" * 2048, "bytes"),
    ]:
        with pytest.raises(ApiError) as e:
            check_image("image", data, 1 << 10 if words == "bytes" else 1 << 20, 4096)
        assert e.value.param == "image" and words in e.value.message, (words, e.value.message)


def test_an_edit_source_is_cut_to_multiples_of_8_and_one_under_8_pixels_is_refused():
    assert Image.open(io.BytesIO(source_png(Image.new("RGB", (17, 64))))).size == (16, 64)
    with pytest.raises(ApiError) as e:
        source_png(Image.new("RGB", (5, 64)))
    assert (e.value.status, e.value.param) == (400, "image") and "5x64" in e.value.message


def test_an_openai_mask_becomes_the_pipelines():
    mask = Image.new("RGBA", (16, 16), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 8, 16))  # transparent: edit here
    converted = Image.open(io.BytesIO(mask_png(mask, (16, 16))))
    assert converted.getpixel((2, 2)) == 255 and converted.getpixel((12, 2)) == 0
    with pytest.raises(ApiError) as e:
        mask_png(mask, (32, 32))
    assert e.value.param == "mask"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_transcoding_gives_the_asked_format(fmt):
    assert Image.open(io.BytesIO(transcode(png(), fmt, 80))).format == fmt.upper()


class FixedLag:
    def __init__(self, lag):
        self.value = lag

    def lag(self):
        return self.value


def test_a_backlog_past_the_bound_sheds_load_with_503(tmp_path):
    from pixelpipe.core.objects import FileObjectStore
    from pixelpipe.core.settings import Settings
    from pixelpipe.gateway.pipeline import Pipeline

    pipeline = Pipeline(Settings().updated(gateway_max_lag=100), FileObjectStore(tmp_path), "test")
    pipeline.lag_monitor = FixedLag(100)
    pipeline.check_capacity()  # at the bound: admitted
    pipeline.lag_monitor = FixedLag(None)
    pipeline.check_capacity()  # not measurable: admitted
    pipeline.lag_monitor = FixedLag(101)
    with pytest.raises(ApiError) as e:
        pipeline.check_capacity()
    assert (e.value.status, e.value.code, e.value.headers()["Retry-After"]) == (503, "overloaded", "5")
    assert pipeline.reply_topic == "pixelpipe.replies.gateway.test"


def test_keys_command_creates_lists_and_revokes(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pixelpipe.cli import main

    monkeypatch.setenv("PIXELPIPE_GATEWAY_KEYS_FILE", str(tmp_path / "keys.json"))
    runner = CliRunner()
    created = runner.invoke(main, ["keys", "create", "--user", "acme", "--model", "tiny-sd", "--rpm", "5"])
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip().splitlines()[0]
    store = KeyStore(tmp_path / "keys.json")
    entry = store.authenticate(secret)
    assert entry is not None and entry.models == ["tiny-sd"] and entry.requests_per_minute == 5
    listed = runner.invoke(main, ["keys", "list"])
    assert json.loads(listed.stdout)["key_id"] == entry.key_id and "key_hash" not in listed.stdout
    assert runner.invoke(main, ["keys", "revoke", entry.key_id]).exit_code == 0
    assert store.authenticate(secret) is None
    assert runner.invoke(main, ["keys", "revoke", "knope"]).exit_code == 1


def test_no_result_by_the_deadline_is_a_504_and_cancels_the_request(tmp_path, monkeypatch):
    import asyncio

    from pixelpipe.core.objects import FileObjectStore
    from pixelpipe.core.settings import Settings
    from pixelpipe.gateway.pipeline import Pipeline, Submission
    from tests.fake_kafka import faked_kafka, no_grace

    broker = faked_kafka(monkeypatch)  # no worker: no result comes
    no_grace(monkeypatch)
    pipeline = Pipeline(Settings().updated(gateway_timeout_s=0.1), FileObjectStore(tmp_path), "test")
    submission = Submission(
        request_id="k1-r", idempotent=False, fingerprint="f", kind="GENERATE", user_id="u", prompt="a fox",
        model="tiny-sd", n=1, width=64, height=64, steps=None,
    )  # fmt: skip

    async def wait():
        await pipeline.start()
        try:
            return await pipeline.submit(submission)
        finally:
            await pipeline.close()

    with pytest.raises(ApiError) as e:
        asyncio.run(wait())
    assert (e.value.status, e.value.code, e.value.type) == (504, "timeout", "server_error")
    assert broker.cancellations == [("k1-r", "no result by its deadline", "gateway:test")]


def test_receipts_created_together_are_all_durable_with_one_sync_per_batch(tmp_path):
    import asyncio

    from pixelpipe.core.objects import FileObjectStore
    from pixelpipe.gateway.pipeline import GroupCommit

    batches = []

    class CountingStore(FileObjectStore):
        def create_many(self, objects):
            batches.append(len(objects))
            return super().create_many(objects)

    store = CountingStore(tmp_path)
    receipts = GroupCommit(store)

    async def create_all():
        # r0 twice: the second call of the batch finds the first's receipt
        keys = [f"gateway/receipts/r{i}.json" for i in [*range(20), 0]]
        return await asyncio.gather(*(receipts.create(key, f"{n}".encode()) for n, key in enumerate(keys)))

    assert asyncio.run(create_all()) == [True] * 20 + [False]
    assert all(store.get(store.uri_for(f"gateway/receipts/r{i}.json")) == f"{i}".encode() for i in range(20))
    assert batches == [21]  # one create, one sync, for the calls that came together


def test_the_registry_says_how_many_images_an_edit_may_give_each_model(tmp_path):
    registry = tmp_path / "registry.json"
    registry.write_text(
        json.dumps(
            {
                "sd": {"path": "/m/sd"},
                "klein": {"path": "/m/k", "kind": "flux2-klein"},
                "klein-2": {"path": "/m/k", "kind": "flux2-klein", "max_source_images": 2},
            }
        )
    )
    assert {name: model.max_source_images for name, model in read_registry(registry).items()} == {
        "sd": 1,
        "klein": 4,
        "klein-2": 2,
    }
