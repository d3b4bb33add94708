"""One key's rate limit shared by two gateway instances (real processes on the local stack) through the usage topic."""

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pixelpipe.gateway.keys import KeyStore
from tests.conftest import free_port, with_own_topics
from tests.integration.test_gateway import Gateway

pytestmark = pytest.mark.integration
PER_MINUTE, BURST = 120, 5
SYNC_S = 0.25
# The sync delay d of the bound: the interval, plus Kafka's latency and the scheduling of a busy test machine.
DELAY_S = SYNC_S + 1.0
CALLING_S = 8.0
CALL_EVERY_S = 0.05  # 20 calls a second, ten times the key's rate: both instances always have callers


async def alternate_calls(urls: list[str], key: str) -> tuple[list[int], float]:
    """Calls sent every CALL_EVERY_S for CALLING_S, alternately to each url, without waiting for the answers (an
    admitted call waits for its deadline: no worker renders it); their status codes, and how long sending took."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        calls = []
        started = time.monotonic()
        while time.monotonic() - started < CALLING_S:
            url = urls[len(calls) % len(urls)]
            body = {"model": "tiny-sd", "prompt": "a fox", "size": "64x64"}
            call = client.post(f"{url}/images/generations", json=body, headers={"authorization": f"Bearer {key}"})
            calls.append(asyncio.ensure_future(call))
            await asyncio.sleep(CALL_EVERY_S)
        sending_s = time.monotonic() - started
        answers = await asyncio.gather(*calls)
    return [answer.status_code for answer in answers], sending_s


def test_two_instances_share_a_keys_rate_limit(servers, tmp_path):
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"tiny-sd": {"kind": "stable-diffusion", "path": str(tmp_path)}}))
    settings = with_own_topics(servers).updated(
        model_registry=str(registry),
        object_store_url=f"file://{tmp_path / 'objects'}",
        gateway_keys_file=str(tmp_path / "keys.json"),
        gateway_timeout_s=1.0,  # admitted calls end 504 soon after: no worker runs
        gateway_max_lag=0,
        gateway_usage_sync_s=SYNC_S,
    )
    key, _ = KeyStore(settings.gateway.keys_file).create("acme", requests_per_minute=PER_MINUTE, burst=BURST)
    gateways = [
        Gateway(
            settings.updated(gateway_port=free_port(), gateway_instance_id=f"rates-{name}-{uuid.uuid4().hex[:6]}"),
            tmp_path / f"gateway-{name}.log",
        )
        for name in ("a", "b")
    ]
    try:
        with ThreadPoolExecutor(len(gateways)) as pool:
            list(pool.map(Gateway.start, gateways))
        codes, sending_s = asyncio.run(alternate_calls([gateway.url for gateway in gateways], key))
    finally:
        for gateway in gateways:
            if gateway.process is not None:
                gateway.process.stop()
    assert set(codes) <= {429, 504}, codes
    admitted = codes.count(504)
    rate = PER_MINUTE / 60
    bound = rate * sending_s + BURST + (len(gateways) - 1) * (BURST + rate * DELAY_S)
    unshared = len(gateways) * (rate * sending_s + BURST)
    print(f"admitted {admitted} of {len(codes)} calls in {sending_s:.1f} s: bound {bound:.1f}, unshared {unshared:.1f}")
    assert rate * sending_s <= admitted <= bound
    assert admitted < 0.75 * unshared
