"""The stages' pure parts: final parameters, service order, seeds, batching keys, retries."""

import dataclasses
import datetime as dt
import json
import time

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from pixelpipe.core.codec import Codec
from pixelpipe.core.experiments import parse_experiments
from pixelpipe.core.objects import ObjectStoreError
from pixelpipe.core.settings import RequestLimits, StageSettings, TopicSettings
from pixelpipe.core.validation import InvalidRequestError
from pixelpipe.processors.models import DiffusionModels, ModelEntry, ModelError, ModelRegistry
from pixelpipe.processors.stages import (
    GenerateStage,
    Inbound,
    StageContext,
    UserRateLimiter,
    _Pending,
    arrival_s,
    in_service_order,
    is_transient,
    request_seed,
    resolve_params,
    with_retries,
)
from pixelpipe.processors.stamp import ModerationStamp
from pixelpipe.producers import new_request

EXPERIMENTS = parse_experiments(
    {
        "experiments": [
            {
                "key": "a-steps",
                "start": "2026-01-01",
                "variants": [
                    {"name": "control", "weight": 1},
                    {"name": "fast", "weight": 1, "overrides": {"steps": 2}},
                ],
            },
            {
                "key": "b-model",
                "start": "2026-01-01",
                "variants": [
                    {"name": "control", "weight": 1},
                    {"name": "big", "weight": 1, "overrides": {"model": "tiny-sd-b", "steps": 9, "scheduler": "lcm"}},
                ],
            },
            {
                "key": "c-huge",
                "start": "2026-01-01",
                "variants": [
                    {"name": "control", "weight": 1},
                    {"name": "huge", "weight": 1, "overrides": {"steps": 10_000}},
                    {"name": "odd", "weight": 1, "overrides": {"scheduler": "karras-magic"}},
                ],
            },
        ]
    }
)
LIMITS = RequestLimits()


class RegistryOnlyModels:
    """The two things resolve_params asks of DiffusionModels, without loading weights."""

    registry = ModelRegistry(
        {
            "tiny-sd": ModelEntry("tiny-sd", "/models/a", default_steps=4, default_guidance=5.0),
            "tiny-sd-b": ModelEntry("tiny-sd-b", "/models/b", default_steps=6, default_guidance=3.0),
        }
    )

    def default_scheduler(self, name):
        self.registry.get(name)
        return "pndm"


def request(**fields):
    return new_request(**({"prompt": "p", "model": "tiny-sd", "user_id": "u"} | fields))


def params(**fields):
    return resolve_params(request(**fields), EXPERIMENTS, RegistryOnlyModels(), LIMITS)


def test_overrides_of_assigned_variants_apply_in_key_order_then_model_defaults():
    assert params(experiments={"a-steps": "fast"}).steps == 2
    both = params(experiments={"a-steps": "fast", "b-model": "big"})
    assert (both.model, both.steps, both.scheduler) == ("tiny-sd-b", 9, "lcm")  # b-model after a-steps
    assert both.guidance == 3.0  # tiny-sd-b's default
    untouched = params(experiments={"a-steps": "control", "unknown": "x"}, steps=7)
    assert (untouched.model, untouched.steps, untouched.guidance, untouched.scheduler) == ("tiny-sd", 7, 5.0, "pndm")
    assert params().steps == 4  # the model's default


def test_final_parameters_are_validated_after_overrides_naming_the_parameter_and_the_variant():
    with pytest.raises(
        InvalidRequestError,
        match=r"^steps: must be between 1 and 150, got 10000 \(set by experiment c-huge, variant huge\)",
    ):
        params(experiments={"c-huge": "huge"})
    with pytest.raises(InvalidRequestError, match=r"^scheduler: must be one of .*, got 'karras-magic'") as caught:
        params(experiments={"c-huge": "odd"})
    assert caught.value.field == "scheduler"
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        params(model="nope")


def pending(**fields):
    at = fields.pop("at", 0.0)
    item = request(**fields)
    return _Pending(Inbound(b"", None, "t", 0, 0, at), item, resolve_params(item, {}, RegistryOnlyModels(), LIMITS))


def test_interactive_first_then_earliest_deadline_then_oldest():
    soon = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    later = soon + dt.timedelta(hours=1)
    items = {
        "batch-old": pending(prompt="batch-old", at=1.0),
        "batch-deadline": pending(prompt="batch-deadline", at=5.0, deadline=soon),
        "interactive-late": pending(prompt="interactive-late", priority="INTERACTIVE", at=9.0),
        "interactive-deadline": pending(prompt="interactive-deadline", priority="INTERACTIVE", at=9.5, deadline=later),
    }
    order = [p.request.prompt for p in in_service_order(list(items.values()))]
    assert order == ["interactive-deadline", "interactive-late", "batch-deadline", "batch-old"]


def test_users_take_turns_so_a_flood_in_a_take_does_not_hold_anyone_else_behind_it():
    flood = [pending(prompt=f"flood-{k}", user_id="flooder", at=float(k)) for k in range(6)]
    others = [pending(prompt="other", user_id="u2", at=10.0), pending(prompt="urgent", user_id="u3", at=11.0)]
    urgent = pending(prompt="urgent-flood", user_id="flooder", priority="INTERACTIVE", at=12.0)
    order = [p.request.prompt for p in in_service_order([*flood, *others, urgent])]
    # Priority first; then each user's first request, then each one's second, and so on.
    assert order == ["urgent-flood", "flood-0", "other", "urgent", *(f"flood-{k}" for k in range(1, 6))]


def test_seed_is_the_request_seed_or_stable_per_request_id():
    assert request_seed(request(seed=42)) == 42
    unseeded = request(request_id="req-7")
    assert (
        request_seed(unseeded)
        == request_seed(dataclasses.replace(unseeded))
        != request_seed(request(request_id="req-8"))
    )


def test_only_compatible_requests_share_a_batch():
    # Requests are grouped into model calls by their final parameters.
    assert params() == params(prompt="other", seed=3, user_id="v")
    assert params() != params(width=64)
    assert params() != params(n=2)
    assert params() != params(experiments={"a-steps": "fast"})


def test_transient_errors_are_retried_with_backoff_within_the_budget_and_bad_input_is_not():
    settings = StageSettings(storage_retry_budget_s=5.0, retry_backoff_ms=1)
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return "ok"

    assert with_retries(flaky, settings, "test") == "ok" and len(calls) == 3

    def down():
        calls.append(time.monotonic())
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    calls.clear()
    with pytest.raises(EndpointConnectionError):  # the budget runs out
        with_retries(down, StageSettings(storage_retry_budget_s=0.05, retry_backoff_ms=10), "t")
    assert 2 <= len(calls) <= 4 and calls[-1] - calls[0] <= 0.05
    calls.clear()
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.1)  # the deadline (less its margin) comes first
    with pytest.raises(EndpointConnectionError):
        with_retries(down, StageSettings(storage_retry_budget_s=60.0, retry_backoff_ms=20), "t", soon)
    assert calls[-1] - calls[0] < 0.2
    calls.clear()

    def outside_the_store():
        calls.append(time.monotonic())
        raise ObjectStoreError("outside the store")

    with pytest.raises(ObjectStoreError):  # bad input: never retried
        with_retries(outside_the_store, settings, "t")
    assert len(calls) == 1
    assert not is_transient(ObjectStoreError("outside the store"))
    assert is_transient(
        ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "Put")
    )
    assert not is_transient(
        ClientError({"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "Get")
    )


def test_a_flooding_user_gets_a_small_burst_then_the_rate_and_others_are_not_held():
    limiter = UserRateLimiter(per_minute=60, burst=10)  # one a second, ten at once
    flood = [limiter.allow("flooder", 1000.0 + i * 0.01) for i in range(200)]  # 200 requests in 2 s
    assert flood.count(True) == 11  # the burst, plus the one token the 2 s refilled
    assert all(limiter.allow("someone-else", 1001.0 + i) for i in range(10))
    assert limiter.allow("flooder", 1003.0)  # a second later, the next token
    assert UserRateLimiter(per_minute=5, burst=10).capacity == 5  # never more than a minute's worth at once
    assert all(UserRateLimiter(per_minute=0, burst=10).allow("u", 0.0) for _ in range(1000))  # 0 turns it off


def test_the_limiters_clock_is_the_brokers_append_time_or_the_workers_never_the_producers():
    produced_long_ago = Inbound(b"", None, "t", 0, 0, timestamp_s=1.0)
    assert arrival_s(produced_long_ago, read_s=2000.0) == 2000.0
    appended = Inbound(b"", None, "t", 0, 0, timestamp_s=1500.0, appended_s=1500.0)
    assert arrival_s(appended, read_s=2000.0) == 1500.0


def test_each_model_s_max_batch_bounds_its_calls_within_the_stage_s(tmp_path):
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"small": {"kind": "null", "max_batch": 2}, "wide": {"kind": "null"}}))
    stamp = ModerationStamp("key")
    context = StageContext(TopicSettings(), LIMITS, StageSettings(max_batch=3), Codec(), "worker", stamp)
    stage = GenerateStage(context, DiffusionModels.from_file(registry), None, None, {})  # render needs no store
    requests = [
        new_request(prompt=f"p{i}", model=model, user_id="u", width=64, height=64, seed=i)
        for model in ("small", "wide")
        for i in range(5)
    ]
    messages = [
        Inbound(value, r.request_id.encode(), "t", 0, offset, time.time(), headers=stamp.headers(value))
        for offset, (r, value) in enumerate((r, context.codec.encode(r)) for r in requests)
    ]
    take = stage.plan(messages)
    assert [(chunk.params.model, len(chunk.items)) for chunk in take.chunks] == [
        ("small", 2),
        ("small", 2),
        ("small", 1),
        ("wide", 3),
        ("wide", 2),
    ]
