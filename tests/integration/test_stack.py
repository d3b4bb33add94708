"""`pixelpipe stack up | status | down` on its own directory and ports."""

import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest

from pixelpipe.tools.stack.services import port_open
from tests.conftest import free_kafka_port, free_port

pytestmark = pytest.mark.integration


def pixelpipe(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "pixelpipe", "stack", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_stack_up_status_down_leaves_nothing_running(tmp_path):
    ports = {"KAFKA": free_kafka_port()} | {
        name: free_port() for name in ("CLICKHOUSE", "CLICKHOUSE_HTTP", "S3", "PROMETHEUS", "LAG_EXPORTER", "GATEWAY")
    }
    env = os.environ | {f"PIXELPIPE_STACK_{name}_PORT": str(port) for name, port in ports.items()}
    env["PIXELPIPE_STACK_DIR"] = str(tmp_path / "stack")
    env["PIXELPIPE_STACK_SCRAPE_PORTS"] = str(free_port())  # the gateway's metrics
    # A registry of the null model: the gateway maps calls onto its models, and needs no weights to list them.
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"null": {"kind": "null"}}))
    env["PIXELPIPE_MODEL_REGISTRY"] = str(registry)
    services = ["kafka", "clickhouse", "s3", "lag-exporter", "prometheus", "gateway"]
    try:
        up = pixelpipe(env, "up")
        assert up.returncode == 0, up.stderr
        status = pixelpipe(env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        lines = status.stdout.splitlines()
        assert [line.split()[:2] for line in lines] == [[name, "healthy"] for name in services]
        pids = [int(re.search(r"pid=(\d+)", line).group(1)) for line in lines]
        for name in services:
            assert (tmp_path / "stack" / name / "service.log").exists()
        again = pixelpipe(env, "up")  # idempotent: finds them running
        assert again.returncode == 0 and [int(p) for p in re.findall(r"pid=(\d+)", again.stdout)] == pids
        # `stack env` hands clients the gateway's URL and the key the stack made for it.
        exports = dict(line.removeprefix("export ").split("=", 1) for line in pixelpipe(env, "env").stdout.splitlines())
        call = urllib.request.Request(
            f"{exports['PIXELPIPE_GATEWAY_URL']}/models",
            headers={"Authorization": f"Bearer {exports['PIXELPIPE_GATEWAY_API_KEY']}"},
        )
        with urllib.request.urlopen(call, timeout=10) as answer:
            assert [model["id"] for model in json.loads(answer.read())["data"]] == ["null"]
    finally:
        down = pixelpipe(env, "down")
    assert down.returncode == 0, down.stderr
    assert all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in pids)
    assert not any(port_open(port) for port in ports.values())
    after = pixelpipe(env, "status")
    assert after.returncode == 1
    assert [line.split()[1] for line in after.stdout.splitlines()] == ["stopped"] * len(services)


def test_without_a_registry_the_gateway_is_skipped_and_the_stack_still_counts_as_healthy(tmp_path):
    env = os.environ | {
        "PIXELPIPE_STACK_DIR": str(tmp_path / "stack"),
        "PIXELPIPE_MODEL_REGISTRY": str(tmp_path / "none.json"),
        "PIXELPIPE_STACK_GATEWAY_PORT": str(free_port()),
    }
    status = pixelpipe(env, "status")  # nothing runs: every service but the gateway is stopped
    lines = {line.split()[0]: line for line in status.stdout.splitlines()}
    assert lines["gateway"].split()[1] == "skipped" and "no model registry" in lines["gateway"]
    assert [line.split()[1] for name, line in lines.items() if name != "gateway"] == ["stopped"] * 5
    assert pixelpipe(env, "env").stdout.count("PIXELPIPE_GATEWAY_") == 0


def _zombie(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] == "Z"
