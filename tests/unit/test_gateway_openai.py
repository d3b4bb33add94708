"""The gateway as the official openai client sees it, in process: the client's own HTTP library (httpx2) sends its
calls to the app through an ASGI transport, over the stand-in pipeline, so each refusal is checked as the exception
class and fields the client raises, and each answer as the client parses it."""

import asyncio
import dataclasses
import io
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import openai
import pytest
from PIL import Image

from pixelpipe.core.events import ImageResult
from tests.unit.test_gateway_http import gateway_client

Scenario = Callable[[openai.AsyncOpenAI], Awaitable[Any]]


@pytest.fixture
def served(tmp_path):
    """The gateway's app over a stand-in pipeline with a key whose burst is 2, and a function that runs a scenario
    with an official client of it (no retries: each refusal is seen as it was answered)."""
    client, pipeline, entry = gateway_client(tmp_path, burst=2)
    key = client.headers["Authorization"].removeprefix("Bearer ")

    def run(scenario: Scenario) -> Any:
        async def with_client() -> Any:
            transport = httpx2.ASGITransport(app=client.app)
            async with (
                httpx2.AsyncClient(transport=transport) as http,
                openai.AsyncOpenAI(
                    base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0
                ) as official,
            ):
                return await scenario(official)

        return asyncio.run(with_client())

    return run, pipeline, entry


def refusal(run: Callable[[Scenario], Any], scenario: Scenario) -> openai.APIStatusError:
    """The exception the client raised for the scenario's call."""
    with pytest.raises(openai.APIStatusError) as e:
        run(scenario)
    return e.value


def png() -> tuple[str, bytes, str]:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 80, 120)).save(out, format="PNG")
    return "source.png", out.getvalue(), "image/png"


def test_parameter_refusals_are_bad_requests_with_openais_codes_and_a_request_id(served):
    run, pipeline, entry = served
    cases = {
        "unknown_parameter": lambda c: c.images.generate(prompt="a fox", extra_body={"colour": "red"}),
        "style": lambda c: c.images.generate(prompt="a fox", style="natural"),
        "invalid_value": lambda c: c.images.generate(prompt="a fox", quality="xhigh"),
        "input_fidelity": lambda c: c.images.edit(image=png(), prompt="a hat", input_fidelity="high"),
        "missing_required_parameter": lambda c: c.images.generate(prompt=" "),
    }
    refused = {case: refusal(run, scenario) for case, scenario in cases.items()}
    assert {case: type(e) for case, e in refused.items()} == dict.fromkeys(cases, openai.BadRequestError)
    assert {case: (e.type, e.code, e.param) for case, e in refused.items()} == {
        "unknown_parameter": ("invalid_request_error", "unknown_parameter", "colour"),
        "style": ("invalid_request_error", "unknown_parameter", "style"),
        "invalid_value": ("invalid_request_error", "invalid_value", "quality"),
        "input_fidelity": ("invalid_request_error", "invalid_value", "input_fidelity"),
        "missing_required_parameter": ("invalid_request_error", "missing_required_parameter", "prompt"),
    }
    assert all(e.request_id and e.request_id.startswith(entry.key_id + "-") for e in refused.values())
    assert pipeline.submissions == []  # nothing refused was published


def test_an_unknown_model_is_not_found_with_a_request_id(served):
    run, _, entry = served
    e = refusal(run, lambda c: c.images.generate(prompt="a fox", model="dall-e-3"))
    assert isinstance(e, openai.NotFoundError) and (e.code, e.param) == ("model_not_found", "model")
    assert e.request_id and e.request_id.startswith(entry.key_id + "-")


def test_the_gateways_rate_limit_is_a_rate_limit_error_of_type_requests(served):
    run, _, entry = served

    async def three_calls(client: openai.AsyncOpenAI) -> None:
        for _ in range(3):  # the burst is 2
            await client.images.generate(prompt="a fox")

    e = refusal(run, three_calls)
    assert isinstance(e, openai.RateLimitError) and (e.type, e.code) == ("requests", "rate_limit_exceeded")
    assert e.request_id and e.request_id.startswith(entry.key_id + "-")
    assert "requests per min (RPM)" in e.message and e.response.headers["retry-after-ms"]


def test_a_blocked_prompt_is_a_bad_request_as_openai_answers_it(served):
    run, pipeline, _ = served
    submit = pipeline.submit

    async def blocked(submission) -> ImageResult:
        answered = await submit(submission)
        return dataclasses.replace(
            answered,
            status="REJECTED",
            images=[],
            moderation_stage="PROMPT",
            error_code="MODERATION_REJECTED",
            error_message="prompt rejected: violence",
        )

    pipeline.submit = blocked
    e = refusal(run, lambda c: c.images.generate(prompt="a gory massacre"))
    assert isinstance(e, openai.BadRequestError)
    assert (e.type, e.code, e.param) == ("image_generation_user_error", "moderation_blocked", None)
    assert "stage PROMPT" in e.message and "violence" in e.message
    assert e.request_id == pipeline.submissions[0].request_id


def test_answers_parse_with_the_quality_that_ran_and_the_model_list_has_a_request_id(served):
    run, _, entry = served

    async def calls(client: openai.AsyncOpenAI) -> tuple[Any, ...]:
        hd = await client.images.generate(prompt="a fox", quality="hd")
        standard = await client.images.edit(image=png(), prompt="a hat", quality="standard", input_fidelity="low")
        listed = await client.models.with_raw_response.list()
        return hd, standard, listed.headers, listed.parse()

    hd, standard, models_headers, models = run(calls)
    assert (hd.quality, standard.quality) == ("high", "medium")  # OpenAI's answers name low, medium or high
    assert models_headers["x-request-id"].startswith(entry.key_id + "-")
    assert [model.id for model in models.data] == ["tiny-sd", "tiny-klein"]
