"""`pixelpipe stack up | status | down` on its own directory and ports."""

import os
import re
import subprocess
import sys

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
        name: free_port() for name in ("CLICKHOUSE", "CLICKHOUSE_HTTP", "S3", "PROMETHEUS", "LAG_EXPORTER")
    }
    env = os.environ | {f"PIXELPIPE_STACK_{name}_PORT": str(port) for name, port in ports.items()}
    env["PIXELPIPE_STACK_DIR"] = str(tmp_path / "stack")
    try:
        up = pixelpipe(env, "up")
        assert up.returncode == 0, up.stderr
        status = pixelpipe(env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        lines = status.stdout.splitlines()
        assert [line.split()[:2] for line in lines] == [
            ["kafka", "healthy"],
            ["clickhouse", "healthy"],
            ["s3", "healthy"],
            ["lag-exporter", "healthy"],
            ["prometheus", "healthy"],
        ]
        pids = [int(re.search(r"pid=(\d+)", line).group(1)) for line in lines]
        for name in ("kafka", "clickhouse", "s3", "lag-exporter", "prometheus"):
            assert (tmp_path / "stack" / name / "service.log").exists()
        again = pixelpipe(env, "up")  # idempotent: finds them running
        assert again.returncode == 0 and [int(p) for p in re.findall(r"pid=(\d+)", again.stdout)] == pids
    finally:
        down = pixelpipe(env, "down")
    assert down.returncode == 0, down.stderr
    assert all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in pids)
    assert not any(port_open(port) for port in ports.values())
    after = pixelpipe(env, "status")
    assert after.returncode == 1
    assert [line.split()[1] for line in after.stdout.splitlines()] == ["stopped"] * 5


def _zombie(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] == "Z"
