"""The README's main command, `pixelpipe demo`, on the test servers with embedded ClickHouse and file storage."""

import os
import re
import subprocess
import sys
import uuid

import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_end_to_end_and_summarises_from_clickhouse(topic_settings, tmp_path):
    env = (
        os.environ
        | topic_settings.to_env()
        | {
            "PIXELPIPE_CLICKHOUSE_URL": "chdb://./data/clickhouse",
            "PIXELPIPE_OBJECT_STORE_URL": "file://./data/objects",
            "PIXELPIPE_MODEL_REGISTRY": "./data/models/registry.json",
            "PIXELPIPE_EXPERIMENTS_FILE": "./experiments.json",
            "PIXELPIPE_CONSUMER_GROUP": f"demo-{uuid.uuid4().hex[:8]}",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "pixelpipe", "demo", "--requests", "20"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    counts = {status: int(n) for status, n in re.findall(r"^  (SUCCEEDED|REJECTED|FAILED)\s+\S*\s+(\d+)$", out, re.M)}
    assert counts == {"SUCCEEDED": 17, "REJECTED": 2, "FAILED": 1}, out
    for stage in ("MODERATION", "GENERATE", "EDIT", "OUTPUT_MODERATION"):
        assert re.search(rf"^  {stage}\s+\d+", out, re.M), out
    stored = list((tmp_path / "data" / "objects").rglob("*.png"))
    assert len(stored) >= 17 + 2  # inputs plus at least one image per success
    assert (tmp_path / "data" / "demo" / "experiments.json").exists()
