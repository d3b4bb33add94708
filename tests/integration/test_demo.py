"""The README's main command, `pixelpipe demo`, on the test servers with embedded ClickHouse and file storage."""

import re

import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_end_to_end_and_summarises_from_clickhouse(demo_run):
    done = demo_run.done
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    statuses = r"^  (SUCCEEDED|REJECTED|FAILED|CANCELLED)\s+\S*\s+(\d+)$"
    counts = {status: int(n) for status, n in re.findall(statuses, out, re.M)}
    assert counts == {"SUCCEEDED": 16, "REJECTED": 2, "FAILED": 1, "CANCELLED": 1}, out
    for stage in ("MODERATION", "GENERATE", "EDIT", "OUTPUT_MODERATION"):
        assert re.search(rf"^  {stage}\s+\d+", out, re.M), out
    stored = list((demo_run.cwd / "data" / "objects").rglob("*.png"))
    assert len(stored) >= 16 + 2  # inputs plus at least one image per success
    assert (demo_run.cwd / "data" / "demo" / "experiments.json").exists()
    # The gateway beside the worker: one generation over HTTP, and a prompt blocked by moderation.
    assert re.search(r"^  200 'a lighthouse on a cliff at dusk': \d+ bytes of PNG", out, re.M), out
    assert re.search(r"^  400 'a gory massacre in the street': moderation_blocked", out, re.M), out
